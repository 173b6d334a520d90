"""The sample-state arithmetic shared by the adaptive-clipping queries (Andrew et al. 2021).

An adaptive-clipping query runs two queries on the same records: a sum query that clips each
record to the current clip, and a :class:`QuantileEstimatorQuery` that counts which record norms
fall below the current estimate.  Its sample parameters are the pair *(sum params, estimator
params)* and its sample state the pair *(clipped sum, count)*; everything up to the release is
the pairwise application of the two queries, which :class:`ClipAndCountAccumulation` provides.
The queries differ only in how they release (Gaussian noise, tree noise) and update the clip.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from . import pytree
from .gaussian_query import clip_records

__all__ = ["ClipAndCountAccumulation"]


class ClipAndCountAccumulation:
    """Mixin for queries with ``self._sum_query``, ``self._quantile_query`` and a 2-field
    ``_sample_state_type`` (clipped sum, count).  Sample params are ``(sum params, estimator
    params)``, the sum's params being its clip."""

    _sample_state_type: type
    _sum_query: Any
    _quantile_query: Any

    def initial_sample_state(self, template) -> Any:
        """Zero sum shaped like ``template`` and a zero count."""
        leaves, _ = pytree.flatten(template)
        if not leaves:
            raise ValueError("template has no tensors")
        return self._sample_state_type(
            self._sum_query.initial_sample_state(template), self._quantile_query.initial_sample_state(leaves[0])
        )

    def preprocess_record(self, params, record) -> Any:
        """``(record clipped to the clip, indicator of its norm against the estimate)``."""
        leaves, _ = pytree.flatten(record)
        if not leaves:
            raise ValueError("record has no tensors")
        norm = pytree.record_norm(record)  # NaN/inf records are refused by the clip below
        return self._sample_state_type(
            self._sum_query.preprocess_record(params[0], record),
            self._quantile_query.preprocess_record(params[1], norm),
        )

    def preprocess_records(self, params, batch) -> Any:
        """:meth:`preprocess_record` on a batch at once (the norms computed once)."""
        clipped, norms = clip_records(batch, params[0])
        return self._sample_state_type(clipped, self._quantile_query.preprocess_records(params[1], norms))

    def accumulate_preprocessed_record(self, sample_state, preprocessed_record) -> Any:
        """Add one preprocessed record to the sum and the count."""
        return self._sample_state_type(
            self._sum_query.accumulate_preprocessed_record(sample_state[0], preprocessed_record[0]),
            self._quantile_query.accumulate_preprocessed_record(sample_state[1], preprocessed_record[1]),
        )

    def accumulate_preprocessed_records(self, sample_state, preprocessed_batch) -> Any:
        """Add a preprocessed batch to the sum and the count."""
        return self._sample_state_type(
            self._sum_query.accumulate_preprocessed_records(sample_state[0], preprocessed_batch[0]),
            self._quantile_query.accumulate_preprocessed_records(sample_state[1], preprocessed_batch[1]),
        )

    def accumulate_records_by_norm(self, params, sample_state, norms: torch.Tensor, weighted_sum: Callable[[torch.Tensor], Any]) -> Any:
        """Clip coefficients ``min(1, C/norm)`` for the sum and indicators ``1[norm <= estimate]``
        for the count both come from the norms alone."""
        return self._sample_state_type(
            self._sum_query.accumulate_records_by_norm(params[0], sample_state[0], norms, weighted_sum),
            self._quantile_query.accumulate_preprocessed_records(
                sample_state[1], self._quantile_query.preprocess_records(params[1], norms)
            ),
        )

    def merge_sample_states(self, sample_state_1, sample_state_2) -> Any:
        """Pairwise merge of the sums and the counts."""
        return self._sample_state_type(
            self._sum_query.merge_sample_states(sample_state_1[0], sample_state_2[0]),
            self._quantile_query.merge_sample_states(sample_state_1[1], sample_state_2[1]),
        )
