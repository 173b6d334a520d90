"""Privacy analysis: turn a ledger or an event into an (epsilon, delta) bound.

Imports numpy/scipy only, never torch: an auditor runs it on a ledger file alone.
Public names are loaded lazily from their modules (one concept a file).
"""

from __future__ import annotations

from .._lazy import lazy_attributes

_LAZY = {
    # rdp.py: RDP of subsampled Gaussian mechanisms, ledger/event analysis
    "DEFAULT_ORDERS": ".orders",
    "compute_rdp": ".rdp",
    "compute_rdp_sample_without_replacement": ".rdp_without_replacement",
    "compute_heterogeneous_rdp": ".rdp",
    "compute_rdp_from_event": ".rdp_accountant",
    "compute_rdp_from_ledger": ".rdp_accountant",
    # conversion.py: RDP -> (eps, delta)
    "get_privacy_spent": ".conversion",
    "refine_epsilon": ".conversion",
    # moments.py: moments accountant view (Abadi et al. 2016)
    "DEFAULT_LAMBDAS": ".moments",
    "compute_log_moments": ".moments",
    "get_privacy_spent_moments": ".moments",
    # accountants
    "PrivacyAccountant": ".accountant_base",
    "RdpAccountant": ".rdp_accountant",
    "PLDAccountant": ".pld",
    "pld_epsilon": ".pld",
    "pld_delta": ".pld",
    "compute_pld_from_ledger": ".pld",
    # calibration.py
    "compute_noise": ".calibration",
    "compute_epochs": ".calibration",
    "register_rdp_rule": ".rdp_accountant",
    "register_pld_equivalent": ".pld.parsing",
    "compute_rdp_tree_restart": ".tree_aggregation",
    "compute_rdp_single_epoch_tree_aggregation": ".tree_aggregation",
    "compute_rdp_single_tree": ".tree_aggregation",
    "compute_zcdp_single_tree": ".tree_aggregation",
    "max_tree_sensitivity_squared": ".tree_aggregation",
    "gaussian_equivalent": ".tree_aggregation",
    "pld_accountant_for": ".tree_aggregation",
    "discrete_gaussian_zcdp": ".distributed",
    "compute_rdp_discrete_gaussian": ".distributed",
    "ddg_tau": ".distributed",
    "compute_rdp_distributed_discrete_gaussian": ".distributed",
    "compute_rdp_skellam": ".distributed",
    "mf_noise_multiplier": ".matrix_factorization",
    "mf_epsilon": ".matrix_factorization",
    "mf_plan_event": ".matrix_factorization",
    "matrix_factorization_rdp": ".matrix_factorization",
    "amplified_banded_rdp": ".matrix_factorization",
    # compute_dp_sgd_privacy_lib.py (the script compute_dp_sgd_privacy.py re-exports it)
    "compute_dp_sgd_privacy": ".compute_dp_sgd_privacy_lib",
}

__getattr__, __dir__, __all__ = lazy_attributes(__name__, globals(), _LAZY)

