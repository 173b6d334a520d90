"""Distributed discrete Gaussian sum query: every record (client) adds its own discrete Gaussian
noise before the sum, as under secure aggregation (Kairouz, Liu, Steinke 2021).

TF Privacy's ``DistributedDiscreteGaussianSumQuery`` semantics: integer records of L2 norm at
most ``l2_norm_bound``, each noised locally with ``N_Z(0, local_stddev^2)`` per coordinate in
:meth:`preprocess_records`; the sum of the noised records is the released result (no central
noise).  As in :class:`~.discrete_gaussian_query.DiscreteGaussianSumQuery`, a record above the
bound is clipped (TF Privacy asserts) and floating-point records are conditionally rounded when
``l2_norm_clip`` is given.

The sample state counts the records (noise shares) summed: the privacy event
:class:`~.distributed_events.DistributedDiscreteGaussianEvent` needs it, and its accounting
(:mod:`pytorch_privacy.analysis.distributed`) is under replace-one neighbours, where that count
does not depend on the data.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch

from . import pytree
from .discrete_gaussian import sample_discrete_gaussian
from .discrete_gaussian_query import (
    MAX_L1_BOUND,
    MAX_ROUND_TRIES,
    _check_clip_vs_bound,
    check_norm_bound,
    check_noise_scale,
    check_round_tries,
    check_scale,
    decode,
    prepare_integer_records,
    rounded_l1_norm_bound,
)
from .dp_query import DPQuery
from .distributed_events import DistributedDiscreteGaussianEvent
from .events import DpEvent, NoOpEvent
from .randomness import RandomSource, as_random_source

__all__ = [
    "DistributedDiscreteGaussianSumQuery",
    "DistributedDiscreteGaussianGlobalState",
    "DistributedSumState",
    "record_dimension",
]


@attrs.frozen
class DistributedSumState:
    """Sample state of the distributed sum queries: the int64 sum of the locally noised records
    and how many records (noise shares) it holds."""

    total: Any
    num_records: int


@attrs.frozen
class DistributedDiscreteGaussianGlobalState:
    """Global state of :class:`DistributedDiscreteGaussianSumQuery`."""

    l2_norm_bound: float
    l1_norm_bound: float | None
    local_stddev: float


def record_dimension(tree: Any) -> int:
    """The number of coordinates of one record (all leaves together)."""
    leaves, _ = pytree.flatten(tree)
    return sum(l.numel() for l in leaves)


class _DistributedIntegerSumQuery(DPQuery):
    """Shared plumbing of the distributed queries: int64 sums with a record count; subclasses
    define :meth:`preprocess_records` (bound, round, add the local noise) and :meth:`event`."""

    generator: RandomSource

    def random_sources(self) -> list[RandomSource]:
        """The randomness this query owns (what a checkpoint saves)."""
        return [self.generator]

    def derive_sample_params(self, global_state):
        return global_state

    def initial_sample_state(self, template: Any) -> DistributedSumState:
        pytree.flatten(template)
        zeros = pytree.tree_map(lambda t: torch.zeros(t.shape, dtype=torch.int64, device=t.device), template)
        return DistributedSumState(zeros, 0)

    def preprocess_record(self, params, record: Any) -> Any:
        batched = pytree.tree_map(lambda t: t.unsqueeze(0), record)
        return pytree.tree_map(lambda t: t[0], self.preprocess_records(params, batched))

    def _reduce(self, total: torch.Tensor) -> torch.Tensor:
        """Hook applied to every partial sum (the Skellam query reduces modulo its modulus)."""
        return total

    def _add(self, a: DistributedSumState, total: Any, n: int) -> DistributedSumState:
        pytree.check_same_structure(a.total, total)
        summed = pytree.tree_map(lambda s, b: self._reduce(s + b.to(torch.int64)), a.total, total)
        return DistributedSumState(summed, a.num_records + n)

    def accumulate_preprocessed_record(self, sample_state: DistributedSumState, preprocessed_record: Any) -> DistributedSumState:
        return self._add(sample_state, preprocessed_record, 1)

    def accumulate_preprocessed_records(self, sample_state: DistributedSumState, preprocessed_batch: Any) -> DistributedSumState:
        pytree.check_same_structure(sample_state.total, preprocessed_batch, batched=True)
        leaves, _ = pytree.flatten(preprocessed_batch)
        n = leaves[0].shape[0] if leaves else 0
        return self._add(sample_state, pytree.tree_map(lambda b: self._reduce(b.sum(dim=0)), preprocessed_batch), n)

    def merge_sample_states(self, sample_state_1: DistributedSumState, sample_state_2: DistributedSumState) -> DistributedSumState:
        return self._add(sample_state_1, sample_state_2.total, sample_state_2.num_records)


class DistributedDiscreteGaussianSumQuery(_DistributedIntegerSumQuery):
    """Sum of integer records, each carrying its own ``N_Z(0, local_stddev^2)`` noise per
    coordinate (TF Privacy's ``DistributedDiscreteGaussianSumQuery``).

    Args:
        l2_norm_bound: bound on one integer record's global L2 norm; records above it are
            clipped (scaled down, rounded toward zero).
        local_stddev: each record's discrete Gaussian scale (exact; TF Privacy rounds it up to an
            integer).  The sum of ``n`` shares has variance about ``n * local_stddev^2``.
        l1_norm_bound: optional L1 bound, also enforced by clipping; the event's L1 sensitivity
            is the smaller of it and ``min(sqrt(d) * l2_norm_bound, l2_norm_bound^2)``.
        l2_norm_clip: optional; take floating-point records, clip them to this L2 norm, multiply
            them by ``scale`` and conditionally round them (Kairouz et al. 2021) to
            ``l2_norm_bound``; the result is then decoded (divided by ``scale``, float64).
        scale: the scaling factor of floating-point records (granularity ``1/scale``).
        max_round_tries, generator, secure_mode: as for
            :class:`~.discrete_gaussian_query.DiscreteGaussianSumQuery`.

    The result is the sum of the noised records (int64 for integer records).  The event is
    ``DistributedDiscreteGaussianEvent(l2, l1, local_stddev, num_records, dimension)``, accounted
    under replace-one neighbours (see :mod:`pytorch_privacy.analysis.distributed`);
    :class:`~.events.NoOpEvent` for an empty sample or a bound of 0.
    """

    def __init__(
        self,
        l2_norm_bound: float,
        local_stddev: float,
        *,
        l1_norm_bound: float | None = None,
        l2_norm_clip: float | None = None,
        scale: float = 1.0,
        max_round_tries: int = MAX_ROUND_TRIES,
        generator: "torch.Generator | RandomSource | None" = None,
        secure_mode: bool = False,
    ):
        self._l2 = check_norm_bound(l2_norm_bound, "l2_norm_bound")
        self._l1 = None if l1_norm_bound is None else check_norm_bound(l1_norm_bound, "l1_norm_bound", MAX_L1_BOUND)
        self._local = check_noise_scale(local_stddev, "local_stddev")
        self._scale = check_scale(scale, l2_norm_clip)
        self._clip = _check_clip_vs_bound(l2_norm_clip, self._scale, self._l2)
        self._max_tries = check_round_tries(max_round_tries)
        self.generator = as_random_source(generator, secure_mode=secure_mode)

    def initial_global_state(self) -> DistributedDiscreteGaussianGlobalState:
        return DistributedDiscreteGaussianGlobalState(self._l2, self._l1, self._local)

    def derive_metrics(self, global_state: DistributedDiscreteGaussianGlobalState) -> dict[str, float]:
        return {"l2_norm_bound": float(global_state.l2_norm_bound), "local_stddev": float(global_state.local_stddev)}

    def preprocess_records(self, params: DistributedDiscreteGaussianGlobalState, batch: Any) -> Any:
        leaves, spec = pytree.flatten(batch)
        ints = prepare_integer_records(
            leaves,
            l2_norm_bound=float(params.l2_norm_bound),
            l1_norm_bound=None if params.l1_norm_bound is None else float(params.l1_norm_bound),
            l2_norm_clip=self._clip,
            scale=self._scale,
            source=self.generator,
            max_round_tries=self._max_tries,
        )
        sigma = float(params.local_stddev)
        noised = [x + sample_discrete_gaussian(sigma, tuple(x.shape), self.generator, device=x.device) for x in ints]
        return pytree.unflatten(noised, spec)

    def get_noised_result(self, sample_state: DistributedSumState, global_state: DistributedDiscreteGaussianGlobalState):
        """The sum of the locally noised records (no central noise: secure aggregation releases
        only this sum, assuming no noise share is missing)."""
        result = pytree.tree_map(lambda t: decode(t, self._scale, self._clip is not None), sample_state.total)
        return result, global_state, self.event(global_state, sample_state)

    def event(self, global_state: DistributedDiscreteGaussianGlobalState, sample_state: DistributedSumState) -> DpEvent:
        """The privacy event of one sample with ``sample_state.num_records`` noise shares."""
        l2 = float(global_state.l2_norm_bound)
        n = int(sample_state.num_records)
        if l2 == 0 or n == 0:
            return NoOpEvent()
        dim = record_dimension(sample_state.total)
        l1 = rounded_l1_norm_bound(l2, dim)
        if global_state.l1_norm_bound is not None:
            l1 = min(l1, float(global_state.l1_norm_bound))
        return DistributedDiscreteGaussianEvent(l2, l1, float(global_state.local_stddev), n, dim)
