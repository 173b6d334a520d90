"""Gaussian sum query whose clip norm adapts to a quantile of the record norms.

Andrew, Thakkar, McMahan, Ramaswamy, "Differentially Private Learning with Adaptive Clipping",
NeurIPS 2021 (arXiv:1905.03871).  Each sample (step):

1. every record is clipped to the current clip ``C_t`` (global L2 norm) and summed; the sum
   gets ``N(0, (z C_t)^2)`` noise per coordinate, ``z`` = ``noise_multiplier``;
2. on the same records, the :class:`QuantileEstimatorQuery` counts (privately, stddev
   ``sigma_b`` = ``clipped_count_stddev``) how many norms are at or below ``C_t`` and moves
   ``C_t`` towards the ``target_unclipped_quantile`` of the norms.

Privacy.  The two releases are Gaussian mechanisms on the same sample: the sum with noise
multiplier ``z`` and the centred count with noise multiplier ``2 sigma_b`` (sensitivity 1/2,
see :mod:`.quantile_estimator_query`).  The event is
``ComposedEvent([GaussianEvent(z), GaussianEvent(2 sigma_b)])``.  Because both act on the same
records, together they are exactly one Gaussian mechanism with noise multiplier
``(z^-2 + (2 sigma_b)^-2)^(-1/2)``.  To spend the same privacy as plain DP-SGD with noise
multiplier ``z_total``, raise the sum's multiplier to
``z = (z_total^-2 - (2 sigma_b)^-2)^(-1/2)`` (:func:`compute_sum_noise_multiplier`).

Choosing ``sigma_b``: ``expected_num_records / 20`` is the paper's recommendation; it must
exceed ``z_total / 2`` for the adjustment above to exist.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import attrs
import torch

from .clip_and_count import ClipAndCountAccumulation
from .dp_query import DPQuery, check_stddev
from .events import ComposedEvent, DpEvent, GaussianEvent
from .gaussian_query import GaussianSumGlobalState, GaussianSumQuery, add_gaussian_noise
from .quantile_estimator_query import INDICATOR_SENSITIVITY, QuantileEstimatorGlobalState, QuantileEstimatorQuery
from .randomness import as_random_source

__all__ = [
    "QuantileAdaptiveClipSumQuery",
    "QuantileAdaptiveClipGlobalState",
    "AdaptiveClipSampleParams",
    "AdaptiveClipSampleState",
    "compute_sum_noise_multiplier",
    "combined_noise_multiplier",
]


def _positive_finite(name: str, value) -> float:
    if isinstance(value, torch.Tensor) or isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a Python number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")
    return v


def compute_sum_noise_multiplier(total_noise_multiplier: float, clipped_count_stddev: float) -> float:
    """Noise multiplier for the sum so that sum + clipped count spend ``total_noise_multiplier``.

    Returns ``z = (z_total^-2 - (2 sigma_b)^-2)^(-1/2)``: a Gaussian sum with multiplier ``z``
    and the centred clipped count with stddev ``sigma_b`` (multiplier ``2 sigma_b``) on the same
    sample compose into one Gaussian mechanism with multiplier ``z_total`` (Andrew et al. 2021).

    Raises ``ValueError`` unless ``0 < z_total < 2 sigma_b``: with ``2 sigma_b <= z_total`` the
    count alone would already spend the whole budget.
    """
    z_total = _positive_finite("total_noise_multiplier", total_noise_multiplier)
    sigma_b = _positive_finite("clipped_count_stddev", clipped_count_stddev)
    count_multiplier = sigma_b / INDICATOR_SENSITIVITY
    if count_multiplier <= z_total:
        raise ValueError(
            f"clipped_count_stddev={sigma_b!r} is too small for total_noise_multiplier={z_total!r}: the "
            f"clipped count alone (noise multiplier 2*clipped_count_stddev = {count_multiplier!r}) spends "
            "at least the whole budget. Use clipped_count_stddev > total_noise_multiplier / 2, e.g. "
            "expected_num_records / 20"
        )
    rest = z_total**-2 - count_multiplier**-2
    return rest**-0.5


def combined_noise_multiplier(sum_noise_multiplier: float, clipped_count_stddev: float) -> float:
    """The single Gaussian noise multiplier equivalent to the adaptive-clip pair of releases:
    ``(z^-2 + (2 sigma_b)^-2)^(-1/2)``; inverse of :func:`compute_sum_noise_multiplier`.
    Infinite ``sigma_b`` (no count released) gives ``z``; zero noise anywhere gives 0."""
    z = check_stddev(sum_noise_multiplier, "sum_noise_multiplier")
    sigma_b = float(clipped_count_stddev)
    if math.isnan(sigma_b) or sigma_b < 0:
        raise ValueError(f"clipped_count_stddev must be >= 0, got {clipped_count_stddev!r}")
    c = sigma_b / INDICATOR_SENSITIVITY
    if z == 0 or c == 0:
        return 0.0
    if math.isinf(c):
        return z
    return (z**-2 + c**-2) ** -0.5


@attrs.frozen
class QuantileAdaptiveClipGlobalState:
    """``noise_multiplier`` (fixed), the sum's state (clip and stddev as 0-dim tensors) and the
    quantile estimator's state (its estimate is the clip)."""

    noise_multiplier: float
    sum_state: GaussianSumGlobalState
    quantile_state: QuantileEstimatorGlobalState


class AdaptiveClipSampleParams(NamedTuple):
    l2_norm_clip: Any  # params of the sum (the clip)
    estimate: Any  # params of the quantile estimator (the same value)


class AdaptiveClipSampleState(NamedTuple):
    sum_state: Any  # record-shaped sum of clipped records
    count_state: torch.Tensor  # 0-dim sum of centred unclipped indicators


class QuantileAdaptiveClipSumQuery(ClipAndCountAccumulation, DPQuery):
    """:class:`GaussianSumQuery` whose clip tracks a quantile of the record norms.

    Args:
        initial_l2_norm_clip: clip for the first sample (> 0; 0 is allowed with
            ``geometric_update=False``, as in TF Privacy).
        noise_multiplier: ``z`` of the sum; the sum's noise stddev is ``z * current_clip``.  To
            match a total budget ``z_total`` pass ``compute_sum_noise_multiplier(z_total,
            clipped_count_stddev)``.
        target_unclipped_quantile: fraction of records that should end up unclipped (e.g. 0.5).
        learning_rate: step size of the clip update (0.2 in the paper for geometric updates).
        clipped_count_stddev: ``sigma_b``, noise stddev on the count (in records), e.g.
            ``expected_num_records / 20``.
        expected_num_records: public expected number of records per sample (``q*N``).
        geometric_update: multiplicative (default) or additive clip update.
        generator: optional ``torch.Generator`` for reproducible noise (both releases).

    Records are tensors or pytrees (clipped by their global L2 norm).  The global state holds
    the clip as a 0-dim tensor, so steps run without host synchronisation;
    :meth:`derive_metrics` reports the current clip as a float.
    """

    _sample_state_type = AdaptiveClipSampleState

    def __init__(
        self,
        initial_l2_norm_clip: float,
        noise_multiplier: float,
        target_unclipped_quantile: float,
        learning_rate: float,
        clipped_count_stddev: float,
        expected_num_records: float,
        geometric_update: bool = True,
        generator: torch.Generator | None = None,
    ):
        # 0 is allowed with the arithmetic update (TF Privacy parity); the quantile estimator
        # refuses it with the geometric update, which could never move it
        clip = check_stddev(initial_l2_norm_clip, "initial_l2_norm_clip")
        generator = as_random_source(generator)  # one owned source for both releases
        self._noise_multiplier = check_stddev(noise_multiplier, "noise_multiplier")
        self._sum_query = GaussianSumQuery(clip, self._noise_multiplier * clip, generator=generator)
        self._quantile_query = QuantileEstimatorQuery(
            initial_estimate=clip,
            target_quantile=target_unclipped_quantile,
            learning_rate=learning_rate,
            below_estimate_stddev=clipped_count_stddev,
            expected_num_records=expected_num_records,
            geometric_update=geometric_update,
            generator=generator,
        )
        self.generator = generator

    @property
    def noise_multiplier(self) -> float:
        return self._noise_multiplier

    @property
    def quantile_estimator_query(self) -> QuantileEstimatorQuery:
        return self._quantile_query

    # -- global state --------------------------------------------------------------------
    def initial_global_state(self) -> QuantileAdaptiveClipGlobalState:
        q_state = self._quantile_query.initial_global_state()
        clip = q_state.current_estimate
        return QuantileAdaptiveClipGlobalState(
            noise_multiplier=self._noise_multiplier,
            sum_state=GaussianSumGlobalState(clip, clip * self._noise_multiplier),
            quantile_state=q_state,
        )

    def derive_sample_params(self, global_state: QuantileAdaptiveClipGlobalState) -> AdaptiveClipSampleParams:
        return AdaptiveClipSampleParams(
            self._sum_query.derive_sample_params(global_state.sum_state),
            self._quantile_query.derive_sample_params(global_state.quantile_state),
        )

    def derive_metrics(self, global_state: QuantileAdaptiveClipGlobalState) -> dict[str, float]:
        return {
            "l2_norm_clip": float(global_state.sum_state.l2_norm_clip),
            "stddev": float(global_state.sum_state.stddev),
        }

    def event(self, global_state: QuantileAdaptiveClipGlobalState | None = None) -> DpEvent:
        """``ComposedEvent([GaussianEvent(z), GaussianEvent(2 sigma_b)])``; independent of the
        current clip (the sum's stddev scales with it), so consecutive steps give equal events."""
        z = self._noise_multiplier if global_state is None else global_state.noise_multiplier
        q_state = None if global_state is None else global_state.quantile_state
        return ComposedEvent([GaussianEvent(z), self._quantile_query.event(q_state)])

    # -- release -------------------------------------------------------------------------
    def get_noised_result(self, sample_state: AdaptiveClipSampleState, global_state: QuantileAdaptiveClipGlobalState):
        """Noised sum (stddev ``z * C_t``), then the clip update from the noised count."""
        noised_sum = add_gaussian_noise(sample_state.sum_state, global_state.sum_state.stddev, self.generator)
        new_clip, new_q_state, _ = self._quantile_query.get_noised_result(
            sample_state.count_state, global_state.quantile_state
        )
        new_state = QuantileAdaptiveClipGlobalState(
            noise_multiplier=global_state.noise_multiplier,
            sum_state=GaussianSumGlobalState(new_clip, new_clip * global_state.noise_multiplier),
            quantile_state=new_q_state,
        )
        return noised_sum, new_state, self.event(global_state)
