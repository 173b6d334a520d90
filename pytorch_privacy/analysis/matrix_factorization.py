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

import math
from typing import Any

from ..dp_query.events import (
    ADD_OR_REMOVE_ONE,
    REPLACE_ONE,
    DpEvent,
    GaussianEvent,
    NonPrivateEvent,
    PoissonSampledEvent,
    SelfComposedEvent,
    ShuffledEvent,
    relation_of,
)
from ..dp_query.matrix_factorization_events import (
    AmplifiedBandedMatrixFactorizationEvent,
    MatrixFactorizationEvent,
    MatrixFactorizationStepEvent,
)
from ..dp_query.privacy_ledger import PrivacyLedger
from .calibration import smallest_noise
from .rdp import poisson_rdp_one_step
from .pld.parsing import register_pld_equivalent
from .rdp_accountant import RdpAccountant, register_rdp_rule

__all__ = ["matrix_factorization_rdp", "amplified_banded_rdp", "mf_plan_event", "mf_epsilon", "mf_noise_multiplier"]


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


def _gaussian_of(noise_multiplier: float, sensitivity: float) -> DpEvent:
    if noise_multiplier == 0.0:
        return NonPrivateEvent()
    return GaussianEvent(noise_multiplier / sensitivity)


@register_pld_equivalent(MatrixFactorizationEvent)
def _mf_pld_equivalent(event: MatrixFactorizationEvent) -> DpEvent:
    """A whole MF run is the Gaussian mechanism on ``C G`` with sensitivity ``sens``: exactly
    ``GaussianEvent(sigma / sens)`` (one un-amplified replace-one release for fixed-size batches)."""
    eq = _gaussian_of(event.noise_multiplier, event.sensitivity)
    if getattr(type(event), "neighboring_relation", None) is not None:
        return ShuffledEvent(steps_per_epoch=1, steps=1, event=eq)
    return eq


@register_pld_equivalent(AmplifiedBandedMatrixFactorizationEvent)
def _amplified_pld_equivalent(event: AmplifiedBandedMatrixFactorizationEvent) -> DpEvent:
    """``rounds`` Poisson-subsampled Gaussian steps at ``(q, sigma / column_norm)`` (the RDP rule's
    mechanism, Choquette-Choo et al. 2023)."""
    one = PoissonSampledEvent(event.sampling_probability, _gaussian_of(event.noise_multiplier, event.column_norm))
    return one if event.rounds == 1 else SelfComposedEvent(one, event.rounds)


# -- planning and calibration ----------------------------------------------------------------
def mf_plan_event(
    noise_multiplier: float,
    strategy: Any,
    *,
    population_size: int,
    steps: int,
    sampling: str = "fixed_order",
    batch_size: int | None = None,
    selection_probability: float | None = None,
    partitions: int = 1,
) -> DpEvent:
    """The whole-run event of ``steps`` steps of a
    :class:`~pytorch_privacy.dp_query.matrix_factorization_query.MatrixFactorizationQuery` with
    ``strategy`` (a ``Strategy`` or its JSON) on a loader with these ledger settings, exactly as
    the ledger of that run accounts it (its run grouper)."""
    spec = strategy if isinstance(strategy, str) else strategy.to_json()
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    led = PrivacyLedger(population_size, selection_probability, sampling=sampling, batch_size=batch_size)
    led.record_sample(MatrixFactorizationStepEvent(noise_multiplier, spec, partitions, 1))
    if steps > 1:
        led.record_sample(MatrixFactorizationStepEvent(noise_multiplier, spec, partitions, 0), steps - 1)
    return led.to_event()


def mf_epsilon(noise_multiplier: float, target_delta: float, strategy: Any, **plan) -> float:
    """Epsilon at ``target_delta`` (RDP accountant, the relation the run's loader is stated under)
    of the plan of :func:`mf_plan_event`."""
    event = mf_plan_event(noise_multiplier, strategy, **plan)
    acc = RdpAccountant(neighboring_relation=relation_of(event) or ADD_OR_REMOVE_ONE)
    return float(acc.compose(event).get_epsilon(target_delta))


def mf_noise_multiplier(target_epsilon: float, target_delta: float, strategy: Any, *, rtol: float = 1e-4, **plan) -> float:
    """The smallest ``noise_multiplier`` (to relative ``rtol``) whose plan (:func:`mf_plan_event`)
    meets ``(target_epsilon, target_delta)``, by bisection (:func:`.calibration.smallest_noise`)."""
    if isinstance(target_epsilon, bool) or not isinstance(target_epsilon, (int, float)) or not (
        math.isfinite(target_epsilon) and target_epsilon > 0
    ):
        raise ValueError(f"target_epsilon must be a finite number > 0, got {target_epsilon!r}")
    mf_plan_event(1.0, strategy, **plan)  # validate the plan once, before the search
    return smallest_noise(
        lambda s: mf_epsilon(s, target_delta, strategy, **plan), float(target_epsilon), rtol=rtol,
        plan=f"matrix factorisation {plan}",
    )
