"""Empirical privacy auditing: lower bounds on epsilon measured on a trained model.

The ledger gives an *upper* bound on epsilon; an audit gives a *lower* bound, with stated
confidence: membership inference (:mod:`.membership_inference`), canaries and the one-run audit
(Steinke, Nasr, Jagielski 2023), secret-sharer exposure (Carlini et al. 2019).  A lower bound
above the claimed epsilon is evidence of a bug; a lower bound far below it is expected (the
bounds are loose for realistic attacks) and is not a privacy guarantee.

Public names load lazily from their modules (one concept a file).
"""

from __future__ import annotations

from .._lazy import lazy_attributes

_LAZY: dict[str, str] = {
    "clopper_pearson": ".statistics",
    "epsilon_from_rates": ".statistics",
    "epsilon_lower_bound": ".statistics",
    "epsilon_lower_bound_per_threshold": ".statistics",
    "confusion_counts": ".statistics",
    "roc_curve": ".statistics",
    "auc": ".statistics",
    "roc_auc_score": ".statistics",
    "tpr_at_fpr": ".statistics",
    "AttackType": ".membership_inference",
    "AttackInputData": ".membership_inference",
    "SlicingSpec": ".membership_inference",
    "compute_attack_inputs": ".membership_inference",
    "run_attacks": ".membership_inference",
    "train_shadow_models": ".mia_attacks",
    "ShadowModels": ".mia_attacks",
    "lira_scores": ".mia_attacks",
    "lira_statistic": ".mia_attacks",
    "train_attacker": ".mia_attacks",
    "confidence_scores": ".mia_attacks",
    "true_class_probabilities": ".mia_attacks",
    "AttackResult": ".mia_results",
    "AttackResults": ".mia_results",
    "evaluate_scores": ".mia_results",
    "SecretFormat": ".secret_sharer",
    "generate_secrets": ".secret_sharer",
    "insert_secrets": ".secret_sharer",
    "log_perplexity": ".secret_sharer",
    "exposure_from_ranks": ".secret_sharer",
    "extrapolated_exposure": ".secret_sharer",
    "ExposureResult": ".secret_sharer",
    "measure_exposure": ".secret_sharer",
    "one_run_p_value": ".one_run",
    "one_run_epsilon_lower_bound": ".one_run",
    "guesses_from_scores": ".one_run",
    "OneRunAuditResult": ".one_run",
    "one_run_audit": ".one_run",
    "audit_training": ".one_run",
    "claimed_epsilons": ".one_run",
    "DEFAULT_GUESS_FRACTIONS": ".one_run",
    "MAX_CANARIES": ".one_run",
    "GradientCanaries": ".canaries",
    "InputCanaries": ".canaries",
    "mislabelled_canaries": ".canaries",
    "random_input_canaries": ".canaries",
    "canary_step": ".canaries",
    "train_with_canaries": ".canaries",
    "DistinguishingAuditResult": ".distinguishing",
    "distinguishing_audit": ".distinguishing",
    "distinguishing_bound": ".distinguishing",
    "best_threshold": ".distinguishing",
    "gradient_canary_run": ".distinguishing",
}

__getattr__, __dir__, __all__ = lazy_attributes(__name__, globals(), _LAZY)
