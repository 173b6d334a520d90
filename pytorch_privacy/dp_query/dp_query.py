"""The ``DPQuery`` contract (the shape of TF Privacy's ``DPQuery``) and sum-style defaults.

A query turns a *sample* of records into a private aggregate in four phases::

    global_state = q.initial_global_state()
    params = q.derive_sample_params(global_state)          # once per sample (step)
    state = q.initial_sample_state(template)                # zero accumulator
    state = q.accumulate_records(params, state, batch)     # any number of times, or per record
    result, global_state, event = q.get_noised_result(state, global_state)

``event`` is the privacy event the ledger stores.  A new mechanism is a subclass overriding a
few of these methods; nothing else in the framework changes.
"""

from __future__ import annotations

import abc
from typing import Any, Callable

import torch

from . import pytree
from .events import DpEvent

__all__ = ["DPQuery", "SumAggregationDPQuery", "check_clip", "check_stddev", "clip_coefficients"]


def _check_finite_nonneg(name: str, value, *, positive: bool = False) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got shape {tuple(value.shape)}")
        v = float(value.detach())
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    else:
        v = float(value)
    if v != v or v in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if v < 0 or (positive and v == 0):
        raise ValueError(f"{name} must be {'> 0' if positive else '>= 0'}, got {value!r}")
    return v


def check_clip(value) -> float:
    """Validate an L2 clip norm (finite, > 0)."""
    return _check_finite_nonneg("l2_norm_clip", value, positive=True)


def check_stddev(value, name: str = "stddev") -> float:
    """Validate a noise standard deviation (finite, >= 0)."""
    return _check_finite_nonneg(name, value)


def clip_coefficients(norms: torch.Tensor, l2_norm_clip) -> torch.Tensor:
    """``min(1, C / norm)`` per record; 1 for zero-norm records.  Differentiable-free."""
    tiny = torch.finfo(norms.dtype).tiny if norms.is_floating_point() else 1e-30
    return torch.clamp(l2_norm_clip / norms.clamp_min(tiny), max=1.0)


class DPQuery(abc.ABC):
    """Abstract differentially private query over records (tensors or pytrees of tensors)."""

    # -- global state --------------------------------------------------------------------
    def initial_global_state(self) -> Any:
        """State kept across samples (clip norm, stddev, quantile estimate...)."""
        return ()

    def derive_sample_params(self, global_state: Any) -> Any:
        """Parameters used for one sample, derived from the global state."""
        return ()

    def derive_metrics(self, global_state: Any) -> dict[str, float]:
        """Named scalars for logging (e.g. the current clip).  Empty by default."""
        return {}

    # -- per-sample accumulation ---------------------------------------------------------
    @abc.abstractmethod
    def initial_sample_state(self, template: Any) -> Any:
        """A zero accumulator shaped like one record (``template``)."""

    def preprocess_record(self, params: Any, record: Any) -> Any:
        """Transform one record before accumulation (e.g. clip it).  Identity by default."""
        return record

    def preprocess_records(self, params: Any, batch: Any) -> Any:
        """Vectorised :meth:`preprocess_record` over a leading batch dimension.

        The default loops over rows; subclasses override it with a vectorised version.
        """
        leaves, spec = pytree.flatten(batch)
        n = leaves[0].shape[0] if leaves else 0
        rows = [self.preprocess_record(params, pytree.unflatten([l[i] for l in leaves], spec)) for i in range(n)]
        if not rows:
            return batch
        return pytree.tree_map(lambda *xs: torch.stack(xs), *rows)

    @abc.abstractmethod
    def accumulate_preprocessed_record(self, sample_state: Any, preprocessed_record: Any) -> Any:
        """Add one preprocessed record to the accumulator."""

    def accumulate_preprocessed_records(self, sample_state: Any, preprocessed_batch: Any) -> Any:
        """Add a batch of preprocessed records.  Default: fold the single-record method."""
        leaves, spec = pytree.flatten(preprocessed_batch)
        n = leaves[0].shape[0] if leaves else 0
        for i in range(n):
            sample_state = self.accumulate_preprocessed_record(
                sample_state, pytree.unflatten([l[i] for l in leaves], spec)
            )
        return sample_state

    def accumulate_record(self, params: Any, sample_state: Any, record: Any) -> Any:
        """Preprocess and add one record."""
        return self.accumulate_preprocessed_record(sample_state, self.preprocess_record(params, record))

    def accumulate_records(self, params: Any, sample_state: Any, batch: Any) -> Any:
        """Preprocess and add a batch of records (leading batch dimension on every leaf).

        Equals folding :meth:`accumulate_record` over the rows, up to float rounding.
        """
        return self.accumulate_preprocessed_records(sample_state, self.preprocess_records(params, batch))

    def accumulate_records_by_norm(
        self,
        params: Any,
        sample_state: Any,
        norms: torch.Tensor,
        weighted_sum: Callable[[torch.Tensor], Any],
    ) -> Any:
        """Accumulate a batch known only through per-record L2 norms.

        ``weighted_sum(c)`` returns ``sum_i c[i] * record_i`` (a record-shaped tree).  Engines
        that never materialise per-record gradients (ghost clipping) call this.  Queries whose
        preprocessing is more than norm-based scaling raise ``NotImplementedError`` (the
        default), and the caller falls back to :meth:`accumulate_records`.
        """
        raise NotImplementedError(f"{type(self).__name__} needs the records themselves")

    @abc.abstractmethod
    def merge_sample_states(self, sample_state_1: Any, sample_state_2: Any) -> Any:
        """Combine two partial accumulations (microbatches, workers)."""

    @abc.abstractmethod
    def get_noised_result(self, sample_state: Any, global_state: Any) -> tuple[Any, Any, DpEvent]:
        """``(result, new_global_state, event)`` for the accumulated sample."""


class SumAggregationDPQuery(DPQuery):
    """Base for queries whose accumulator is the plain sum of preprocessed records."""

    def initial_sample_state(self, template: Any) -> Any:
        pytree.flatten(template)  # validates leaves are tensors
        return pytree.zeros_like(template)

    def accumulate_preprocessed_record(self, sample_state: Any, preprocessed_record: Any) -> Any:
        pytree.check_same_structure(sample_state, preprocessed_record)
        return pytree.tree_map(torch.add, sample_state, preprocessed_record)

    def accumulate_preprocessed_records(self, sample_state: Any, preprocessed_batch: Any) -> Any:
        pytree.check_same_structure(sample_state, preprocessed_batch, batched=True)
        return pytree.tree_map(lambda s, b: s + b.sum(dim=0).to(s.dtype), sample_state, preprocessed_batch)

    def merge_sample_states(self, sample_state_1: Any, sample_state_2: Any) -> Any:
        pytree.check_same_structure(sample_state_1, sample_state_2)
        return pytree.tree_map(torch.add, sample_state_1, sample_state_2)
