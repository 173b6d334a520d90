"""Non-private reference queries: exact sums and averages, no clipping, no noise.

They exist to compare a private run with its non-private baseline through the same code path
(same optimizer, same engines).  Their event is :class:`NonPrivateEvent`, so any privacy
analysis of a ledger that contains them reports an unbounded epsilon instead of a number.
"""

from __future__ import annotations

from typing import Any, Callable

import attrs
import torch

from . import pytree
from .dp_query import DPQuery, SumAggregationDPQuery
from .events import DpEvent, NonPrivateEvent

__all__ = ["NoPrivacySumQuery", "NoPrivacyAverageQuery", "AverageSampleState"]


def _finite_record(record):
    pytree.check_finite_norms(pytree.record_norm(record).reshape(1), single=True)
    return record


def _finite_batch(batch):
    leaves, _ = pytree.flatten(batch)
    if leaves and leaves[0].dim() > 0 and leaves[0].shape[0] > 0:
        pytree.check_finite_norms(pytree.global_norms(batch))
    return batch


class NoPrivacySumQuery(SumAggregationDPQuery):
    """The exact sum of the records: no clipping, no noise, event :class:`NonPrivateEvent`.

    Supports :meth:`accumulate_records_by_norm` (every coefficient is 1), so per-sample
    gradient engines that never materialise per-record gradients can use it.  A record with a
    NaN or infinite entry raises ``ValueError`` (it would make the sum NaN).
    """

    def preprocess_record(self, params, record):
        return _finite_record(record)

    def preprocess_records(self, params, batch):
        return _finite_batch(batch)

    def accumulate_records_by_norm(self, params, sample_state, norms: torch.Tensor, weighted_sum: Callable):
        return self.accumulate_preprocessed_record(sample_state, weighted_sum(torch.ones_like(norms)))

    def get_noised_result(self, sample_state, global_state) -> tuple[Any, Any, DpEvent]:
        return sample_state, global_state, NonPrivateEvent()


@attrs.frozen
class AverageSampleState:
    """Sample state of :class:`NoPrivacyAverageQuery`: the (weighted) sum and total weight."""

    sum: Any
    weight: torch.Tensor


def _weight_tensor(like: torch.Tensor, value=0.0) -> torch.Tensor:
    return torch.as_tensor(value, dtype=torch.float64, device=like.device)


class NoPrivacyAverageQuery(DPQuery):
    """The exact (weighted) mean of the records: ``sum_i w_i x_i / sum_i w_i``.  NOT private.

    Dividing by the realised (weighted) number of records is what makes this a *non-private*
    query: the count depends on the data, and releasing it (or a quotient by it) is not
    post-processing of a private release.  Private averages divide by a public constant
    instead (:class:`~pytorch_privacy.dp_query.normalized_query.NormalizedQuery`).  The event is
    :class:`NonPrivateEvent`, so a ledger containing it has no finite epsilon.

    Records have weight 1 unless given with the ``weight`` argument of
    :meth:`accumulate_record` (TF Privacy's signature ``accumulate_record(params, sample_state,
    record, weight)``), :meth:`accumulate_weighted_record`, or the ``weights`` argument of
    :meth:`accumulate_records`.  An empty sample (total weight 0) averages to zeros.  A record
    with a NaN or infinite entry, or a non-finite weight, raises ``ValueError``.
    """

    def preprocess_record(self, params, record):
        return _finite_record(record)

    def preprocess_records(self, params, batch):
        return _finite_batch(batch)

    def accumulate_record(self, params, sample_state: AverageSampleState, record, weight=1.0):
        """Add ``record`` with weight ``weight`` (default 1): the result is
        ``sum_i w_i x_i / sum_i w_i``."""
        return self.accumulate_preprocessed_record(sample_state, self.preprocess_record(params, record), weight)

    def initial_sample_state(self, template) -> AverageSampleState:
        leaves, _ = pytree.flatten(template)
        if not leaves:
            raise ValueError("template has no tensors")
        return AverageSampleState(pytree.zeros_like(template), _weight_tensor(leaves[0]))

    def accumulate_preprocessed_record(self, sample_state: AverageSampleState, preprocessed_record, weight=1.0):
        pytree.check_same_structure(sample_state.sum, preprocessed_record)
        if isinstance(weight, bool) or not isinstance(weight, (int, float, torch.Tensor)):
            raise TypeError(f"weight must be a number or a 0-dim tensor, got {type(weight).__name__}")
        w = torch.as_tensor(weight, dtype=torch.float64)
        if w.dim() != 0:
            raise ValueError(f"weight must be a scalar, got shape {tuple(w.shape)}")
        if w.device.type == "cpu" and not bool(torch.isfinite(w)):
            raise ValueError(f"weight must be finite, got {weight!r}")
        new_sum = pytree.tree_map(
            lambda s, r: s + (r * w.to(device=r.device, dtype=r.dtype)).to(s.dtype), sample_state.sum, preprocessed_record
        )
        return AverageSampleState(new_sum, sample_state.weight + w.to(sample_state.weight.device))

    def accumulate_weighted_record(self, params, sample_state: AverageSampleState, record, weight):
        """Add ``record`` with weight ``weight``."""
        return self.accumulate_preprocessed_record(sample_state, self.preprocess_record(params, record), weight)

    def accumulate_preprocessed_records(self, sample_state: AverageSampleState, preprocessed_batch, weights=None):
        pytree.check_same_structure(sample_state.sum, preprocessed_batch, batched=True)
        leaves, _ = pytree.flatten(preprocessed_batch)
        n = leaves[0].shape[0]
        if weights is None:
            new_sum = pytree.tree_map(lambda s, b: s + b.sum(dim=0).to(s.dtype), sample_state.sum, preprocessed_batch)
            return AverageSampleState(new_sum, sample_state.weight + n)
        w = torch.as_tensor(weights)
        if w.shape != (n,):
            raise ValueError(f"weights must have shape ({n},) (one per record), got {tuple(w.shape)}")

        def add(s, b):
            wb = w.to(device=b.device, dtype=b.dtype).reshape((-1,) + (1,) * (b.dim() - 1))
            return s + (b * wb).sum(dim=0).to(s.dtype)

        new_sum = pytree.tree_map(add, sample_state.sum, preprocessed_batch)
        total = w.to(device=sample_state.weight.device, dtype=torch.float64).sum()
        return AverageSampleState(new_sum, sample_state.weight + total)

    def accumulate_records(self, params, sample_state, batch, weights=None):
        return self.accumulate_preprocessed_records(sample_state, self.preprocess_records(params, batch), weights)

    def accumulate_records_by_norm(self, params, sample_state: AverageSampleState, norms, weighted_sum: Callable):
        part = weighted_sum(torch.ones_like(norms))
        pytree.check_same_structure(sample_state.sum, part)
        new_sum = pytree.tree_map(lambda s, p: s + p.to(s.dtype), sample_state.sum, part)
        return AverageSampleState(new_sum, sample_state.weight + norms.shape[0])

    def merge_sample_states(self, sample_state_1: AverageSampleState, sample_state_2: AverageSampleState):
        pytree.check_same_structure(sample_state_1.sum, sample_state_2.sum)
        return AverageSampleState(
            pytree.tree_map(torch.add, sample_state_1.sum, sample_state_2.sum),
            sample_state_1.weight + sample_state_2.weight.to(sample_state_1.weight.device),
        )

    def get_noised_result(self, sample_state: AverageSampleState, global_state) -> tuple[Any, Any, DpEvent]:
        w = sample_state.weight

        def mean(s: torch.Tensor) -> torch.Tensor:
            d = w.to(device=s.device, dtype=s.dtype if s.is_floating_point() else torch.float64)
            return torch.where(d != 0, s / torch.where(d != 0, d, torch.ones_like(d)), torch.zeros_like(s / 1.0))

        return pytree.tree_map(mean, sample_state.sum), global_state, NonPrivateEvent()
