r"""RDP of matrix-factorisation (MF) mechanisms (numpy only; no torch).

A whole MF run (:class:`~pytorch_privacy.dp_query.matrix_factorization_events.MatrixFactorizationEvent`)
is the Gaussian mechanism on ``C G`` with L2 sensitivity ``sens`` (clip norm 1) and noise stddev
``sigma``:

.. math:: \varepsilon(\alpha) = \frac{\alpha\,\mathrm{sens}^2}{2\sigma^2}
          \quad\text{(add-or-remove-one; } 2\,\mathrm{sens}\text{ under replace-one).}

A banded run with banded Poisson sampling
(:class:`~pytorch_privacy.dp_query.matrix_factorization_events.AmplifiedBandedMatrixFactorizationEvent`)
is as private as ``rounds`` steps of the Poisson-subsampled Gaussian with rate ``q`` and noise
multiplier ``sigma / column_norm`` (Choquette-Choo et al. 2023, "(Amplified) Banded Matrix
Factorization: A unified approach to private training", Sec. 4), computed exactly by
:func:`.rdp.compute_rdp`'s one-step RDP.

The per-step :class:`~pytorch_privacy.dp_query.matrix_factorization_events.MatrixFactorizationStepEvent`
has no RDP of its own: the ledger's run grouper accounts whole runs (compose ``ledger.to_event()``).
"""

from __future__ import annotations

import numpy as np

from ..dp_query.events import ADD_OR_REMOVE_ONE, REPLACE_ONE
from ..dp_query.matrix_factorization_events import (
    AmplifiedBandedMatrixFactorizationEvent,
    MatrixFactorizationEvent,
    MatrixFactorizationStepEvent,
)
from .rdp import poisson_rdp_one_step
from .rdp_accountant import register_rdp_rule

__all__ = ["matrix_factorization_rdp", "amplified_banded_rdp", "mf_noise_multiplier"]


def mf_noise_multiplier(noise_multiplier: float, sensitivity: float) -> float:
    """The noise multiplier of the equivalent single Gaussian: ``sigma / sens``."""
    if not (np.isfinite(sensitivity) and sensitivity > 0):
        raise ValueError(f"sensitivity must be finite and > 0, got {sensitivity!r}")
    return float(noise_multiplier) / float(sensitivity)


@register_rdp_rule(MatrixFactorizationEvent)
def matrix_factorization_rdp(event: MatrixFactorizationEvent, orders: np.ndarray, neighboring_relation: str) -> np.ndarray:
    """RDP of a whole MF run: ``alpha (s sens)^2 / (2 sigma^2)`` with ``s = 1`` (add/remove) or 2
    (replace-one).  A run on fixed-size batches (:class:`MatrixFactorizationReplaceOneEvent`) refuses
    add-or-remove-one."""
    orders = np.asarray(orders, dtype=float)
    required = getattr(type(event), "neighboring_relation", None)
    if required is not None and str(neighboring_relation) != str(required):
        raise ValueError(
            f"this matrix-factorisation run was recorded with a loader of fixed-size batches, accounted under "
            f"{required} neighbours; use an accountant with neighboring_relation='{required}'"
        )
    if str(neighboring_relation) not in (ADD_OR_REMOVE_ONE.value, REPLACE_ONE.value):
        raise ValueError(f"unknown neighbouring relation {neighboring_relation!r}")
    scale = 2.0 if str(neighboring_relation) == REPLACE_ONE.value else 1.0
    if event.noise_multiplier == 0.0:
        return np.full(orders.shape, np.inf)
    mu = scale * event.sensitivity / event.noise_multiplier
    with np.errstate(over="ignore"):
        return orders * (0.5 * mu * mu)


@register_rdp_rule(AmplifiedBandedMatrixFactorizationEvent)
def amplified_banded_rdp(
    event: AmplifiedBandedMatrixFactorizationEvent, orders: np.ndarray, neighboring_relation: str
) -> np.ndarray:
    """RDP of banded MF with banded Poisson sampling: ``rounds`` x the one-step RDP of the
    Poisson-subsampled Gaussian at ``(q, sigma / column_norm)``; add-or-remove-one only."""
    if str(neighboring_relation) != ADD_OR_REMOVE_ONE.value:
        raise ValueError(
            "amplified banded matrix factorisation is stated under add-or-remove-one neighbours (Poisson "
            "sampling); use an accountant with neighboring_relation='add_or_remove_one'"
        )
    orders = np.asarray(orders, dtype=float)
    sigma = event.noise_multiplier / event.column_norm
    if event.sampling_probability == 0.0:
        return np.zeros(orders.shape)
    if sigma == 0.0:
        return np.full(orders.shape, np.inf)
    one = poisson_rdp_one_step(event.sampling_probability, sigma, orders)
    with np.errstate(over="ignore", invalid="ignore"):
        return np.where(one == 0.0, 0.0, one * float(event.rounds))


@register_rdp_rule(MatrixFactorizationStepEvent)
def _step_rdp(event: MatrixFactorizationStepEvent, orders: np.ndarray, neighboring_relation: str) -> np.ndarray:
    raise ValueError(
        "a MatrixFactorizationStepEvent has no per-step RDP: its noise is correlated across steps. "
        "Record the steps in a PrivacyLedger and account ledger.to_event() (its run grouper makes the "
        "whole-run MatrixFactorizationEvent)"
    )
