"""Tree-aggregation residual sums with a clip that adapts to a quantile of the record norms.

TF Privacy's ``QAdaClipTreeResSumQuery``: tree noise for DP-FTRL (Kairouz et al. 2021,
arXiv:2103.00039) with the quantile-based adaptive clipping of Andrew, Thakkar, McMahan,
Ramaswamy (NeurIPS 2021, arXiv:1905.03871).  Each step:

1. every record is clipped to the current clip ``C`` and summed, and the sum is released as a
   :class:`~.tree_aggregation_query.TreeResidualSumQuery` release (efficient tree, nodes of
   stddev ``z C``, ``z`` = ``noise_multiplier``);
2. on the same records, the centred indicators ``1[||x|| <= estimate] - 1/2`` are summed and
   released through a second residual tree (nodes of stddev ``sigma_b`` =
   ``clipped_count_stddev``; TF's ``TreeQuantileEstimatorQuery``), and the estimate moves by the
   update of :class:`~.quantile_estimator_query.QuantileEstimatorQuery` (geometric or arithmetic)
   with the noised fraction ``clip(count / m + 1/2, 0, 1)``, ``m`` = ``expected_num_records``.

The clip (and the node stddev ``z C``) only changes at a restart (:meth:`reset_state`, called by
:class:`~.restart_query.RestartQuery`), when it takes the current estimate: all nodes of one tree
share one stddev.

Privacy.  Both trees have the same structure (same steps, restarted together) and a record
moves each sum node by at most ``C`` in L2 and each count node by at most ``1/2``.  Node by node
the pair is one Gaussian mechanism with noise multiplier ``(z^-2 + (2 sigma_b)^-2)^(-1/2)``
(:func:`~.quantile_adaptive_clip_sum_query.combined_noise_multiplier`), so the two trees together
are exactly one tree with that multiplier: each step records one
``TreeAggregationStepEvent(combined multiplier, starts_tree)``, which the tree accountant handles
as it handles a plain tree (the clip's dependence on earlier releases is post-processing).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import attrs
import torch

from .clip_and_count import ClipAndCountAccumulation
from .dp_query import DPQuery, check_stddev
from .events import DpEvent
from .quantile_adaptive_clip_sum_query import combined_noise_multiplier
from .quantile_estimator_query import INDICATOR_SENSITIVITY, QuantileEstimatorGlobalState, QuantileEstimatorQuery
from .randomness import RandomSource, as_random_source
from .tree_aggregation_query import TreeResidualSumGlobalState, TreeResidualSumQuery
from .tree_events import TreeAggregationStepEvent

__all__ = ["QAdaClipTreeResSumQuery", "QAdaClipTreeGlobalState", "QAdaClipTreeSampleParams", "QAdaClipTreeSampleState"]


@attrs.frozen
class QAdaClipTreeGlobalState:
    """``noise_multiplier`` (fixed), the sum's tree state (its ``clip_value`` is the clip in use),
    the count's tree state, and the quantile estimator's state (its estimate is the next clip)."""

    noise_multiplier: float
    sum_state: TreeResidualSumGlobalState
    count_state: TreeResidualSumGlobalState
    quantile_estimator_state: QuantileEstimatorGlobalState


class QAdaClipTreeSampleParams(NamedTuple):
    sum_params: float  # the clip
    quantile_estimator_params: torch.Tensor  # the current estimate


class QAdaClipTreeSampleState(NamedTuple):
    sum_state: Any  # record-shaped sum of clipped records
    quantile_estimator_state: torch.Tensor  # 0-dim float64 sum of centred indicators


class QAdaClipTreeResSumQuery(ClipAndCountAccumulation, DPQuery):
    """Adaptive-clip tree residual sums (see the module docstring).

    Args:
        initial_l2_norm_clip: the clip of the first tree (>= 0; 0 only with
            ``geometric_update=False``).
        noise_multiplier: ``z``; the sum's nodes have stddev ``z * clip``.
        target_unclipped_quantile: fraction of records that should be unclipped (0.5: the median).
        learning_rate: step of the estimate's update (0.2 for geometric updates in the paper).
        clipped_count_stddev: ``sigma_b``, node stddev of the count tree (``expected_num_records
            / 20`` recommended).
        expected_num_records: public expected number of records per step.
        geometric_update: multiplicative (default) or additive update.
        generator: ``torch.Generator`` / shared ``RandomSource`` for both trees (reproducible), or
            ``None`` (OS-seeded); ``secure_mode``: OS CSPRNG.

    :meth:`get_noised_result` returns ``(x_i + n_i - n_{i-1}, new_global_state, event)`` exactly as
    :class:`~.tree_aggregation_query.TreeResidualSumQuery` (records clipped to the current clip).
    """

    _sample_state_type = QAdaClipTreeSampleState

    def __init__(
        self,
        initial_l2_norm_clip: float,
        noise_multiplier: float,
        target_unclipped_quantile: float,
        learning_rate: float,
        clipped_count_stddev: float,
        expected_num_records: float,
        geometric_update: bool = True,
        *,
        generator: "torch.Generator | RandomSource | None" = None,
        secure_mode: bool = False,
    ):
        clip = check_stddev(initial_l2_norm_clip, "initial_l2_norm_clip")
        self._noise_multiplier = check_stddev(noise_multiplier, "noise_multiplier")
        self._clipped_count_stddev = check_stddev(clipped_count_stddev, "clipped_count_stddev")
        src = as_random_source(generator, secure_mode=secure_mode)
        self.generator = src
        self._quantile_query = QuantileEstimatorQuery(
            initial_estimate=clip,
            target_quantile=target_unclipped_quantile,
            learning_rate=learning_rate,
            below_estimate_stddev=clipped_count_stddev,
            expected_num_records=expected_num_records,
            geometric_update=geometric_update,
            generator=src,
        )
        self._sum_query = TreeResidualSumQuery.build_l2_gaussian_query(clip, self._noise_multiplier, generator=src)
        # the centred indicators are +-1/2: the count tree's records have sensitivity 1/2
        self._count_query = TreeResidualSumQuery.build_l2_gaussian_query(
            INDICATOR_SENSITIVITY, self._clipped_count_stddev / INDICATOR_SENSITIVITY, generator=src
        )

    @property
    def noise_multiplier(self) -> float:
        return self._noise_multiplier

    def random_sources(self) -> list[RandomSource]:
        """The one source both trees draw from (what a checkpoint saves)."""
        return [self.generator]

    # -- global state --------------------------------------------------------------------
    def initial_global_state(self) -> QAdaClipTreeGlobalState:
        return QAdaClipTreeGlobalState(
            self._noise_multiplier,
            self._sum_query.initial_global_state(),
            self._count_query.initial_global_state(),
            self._quantile_query.initial_global_state(),
        )

    def derive_sample_params(self, global_state: QAdaClipTreeGlobalState) -> QAdaClipTreeSampleParams:
        return QAdaClipTreeSampleParams(
            self._sum_query.derive_sample_params(global_state.sum_state),
            self._quantile_query.derive_sample_params(global_state.quantile_estimator_state),
        )

    def derive_metrics(self, global_state: QAdaClipTreeGlobalState) -> dict[str, float]:
        return {
            "current_clip": float(global_state.sum_state.clip_value),
            "estimate_clip": float(global_state.quantile_estimator_state.current_estimate),
        }

    def event(self, global_state: QAdaClipTreeGlobalState) -> DpEvent:
        """``TreeAggregationStepEvent(combined_noise_multiplier(z, sigma_b), starts_tree)`` for the
        step about to be released (see the module docstring)."""
        z = combined_noise_multiplier(global_state.noise_multiplier, self._clipped_count_stddev)
        starts = 1 if global_state.sum_state.tree_state.level_buffer_idx.numel() == 0 else 0
        return TreeAggregationStepEvent(noise_multiplier=z, starts_tree=starts)

    # -- release -------------------------------------------------------------------------
    def get_noised_result(self, sample_state: QAdaClipTreeSampleState, global_state: QAdaClipTreeGlobalState):
        """The sum's residual release; the estimate moves (the clip waits for a restart)."""
        event = self.event(global_state)
        noised, sum_state, _ = self._sum_query.get_noised_result(sample_state.sum_state, global_state.sum_state)
        noised_count, count_state, _ = self._count_query.get_noised_result(sample_state[1], global_state.count_state)
        q_state = global_state.quantile_estimator_state
        m = q_state.expected_num_records
        frac = torch.clamp(noised_count / m + INDICATOR_SENSITIVITY, 0.0, 1.0)
        new_estimate = self._quantile_query.updated_estimate(q_state.current_estimate, frac, q_state)
        new_state = QAdaClipTreeGlobalState(
            global_state.noise_multiplier, sum_state, count_state, attrs.evolve(q_state, current_estimate=new_estimate)
        )
        return noised, new_state, event

    def reset_state(self, noised_results, global_state: QAdaClipTreeGlobalState) -> QAdaClipTreeGlobalState:
        """Restart both trees; the clip becomes ``max(estimate, 0)`` and the sum's node stddev
        ``z * clip``."""
        clip = max(float(global_state.quantile_estimator_state.current_estimate), 0.0)
        sum_state = self._sum_query.reset_l2_clip_gaussian_noise(
            global_state.sum_state, clip_norm=clip, stddev=clip * global_state.noise_multiplier
        )
        return attrs.evolve(
            global_state,
            sum_state=self._sum_query.reset_state(noised_results, sum_state),
            count_state=self._count_query.reset_state(noised_results, global_state.count_state),
        )
