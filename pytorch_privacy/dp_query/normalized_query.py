"""Normalised query: a numerator query divided by a public constant denominator."""

from __future__ import annotations

import math
from typing import Any

import attrs
import torch

from . import pytree
from .delegating_query import DelegatingQuery
from .dp_query import DPQuery
from .gaussian_query import GaussianSumQuery

__all__ = ["NormalizedQuery", "NormalizedGlobalState", "GaussianAverageQuery", "check_denominator"]


def check_denominator(denominator) -> float:
    """A denominator must be a finite number > 0 fixed independently of the data."""
    if isinstance(denominator, torch.Tensor):
        raise TypeError(
            "denominator must be a Python number fixed in advance (e.g. the expected batch size "
            "q*N), not a tensor computed from the data"
        )
    if isinstance(denominator, bool) or not isinstance(denominator, (int, float)):
        raise TypeError(f"denominator must be a number, got {type(denominator).__name__}")
    if not math.isfinite(denominator) or denominator <= 0:
        raise ValueError(
            f"denominator must be finite and > 0, got {denominator!r}; use the expected batch size "
            "q*N, never the realised batch size"
        )
    return float(denominator)


def divide(tree_: Any, d: float, *, in_place: bool = False) -> Any:
    """``t / d`` for every leaf.  A flat dict of CPU tensors of one dtype (the optimizer's
    records) takes one foreach call (the same true division, bit for bit).  ``in_place=True``
    (the caller owns the floating-point leaves and gives them up) divides them where they lie:
    the same values, without new tensors."""
    if pytree.is_flat_dict(tree_) and tree_:
        leaves = list(tree_.values())
        t0 = leaves[0]
        if in_place and all(t.is_floating_point() for t in leaves):
            if t0.device.type == "cpu" and all(t.device == t0.device and t.dtype == t0.dtype for t in leaves):
                torch._foreach_div_(leaves, d)
            else:
                for t in leaves:
                    t.div_(d)
            return dict(tree_)
        if t0.device.type == "cpu" and all(t.device == t0.device and t.dtype == t0.dtype for t in leaves):
            return dict(zip(tree_, torch._foreach_div(leaves, d)))
    return pytree.tree_map(lambda t: t / d, tree_)


@attrs.frozen
class NormalizedGlobalState:
    numerator_state: Any
    denominator: float


class NormalizedQuery(DelegatingQuery):
    """``numerator_query`` result divided by ``denominator``.

    The denominator is a public constant (e.g. the *expected* batch size ``q*N`` under Poisson
    sampling).  Dividing by the realised batch size would leak the batch size, which depends on
    the private data, so it is refused: pass a number, not a tensor.
    """

    def __init__(self, numerator_query: DPQuery, denominator: float):
        super().__init__(numerator_query)
        self._denominator = check_denominator(denominator)

    @property
    def numerator_query(self) -> DPQuery:
        return self._inner

    def initial_global_state(self):
        return NormalizedGlobalState(self._inner.initial_global_state(), self._denominator)

    def derive_sample_params(self, global_state: NormalizedGlobalState):
        return self._inner.derive_sample_params(global_state.numerator_state)

    def derive_metrics(self, global_state: NormalizedGlobalState):
        return self._inner.derive_metrics(global_state.numerator_state)

    def get_noised_result(self, sample_state, global_state: NormalizedGlobalState):
        num, new_num_state, event = self._inner.get_noised_result(sample_state, global_state.numerator_state)
        result = divide(num, global_state.denominator)
        return result, attrs.evolve(global_state, numerator_state=new_num_state), event

    def get_noised_result_in_place(self, sample_state, global_state: NormalizedGlobalState):
        """:meth:`get_noised_result` for a caller that owns ``sample_state``'s tensors and gives them
        up, over a numerator query whose ``get_noised_result_in_place`` returns tensors the caller
        owns (:meth:`GaussianSumQuery.get_noised_result_in_place
        <pytorch_privacy.dp_query.GaussianSumQuery.get_noised_result_in_place>`): its result is
        divided where it lies.  The same values as :meth:`get_noised_result`."""
        num, new_num_state, event = self._inner.get_noised_result_in_place(sample_state, global_state.numerator_state)
        result = divide(num, global_state.denominator, in_place=True)
        return result, attrs.evolve(global_state, numerator_state=new_num_state), event


class GaussianAverageQuery(NormalizedQuery):
    """:class:`GaussianSumQuery` ``(l2_norm_clip, sum_stddev)`` divided by ``denominator``."""

    def __init__(
        self,
        l2_norm_clip: float,
        sum_stddev: float,
        denominator: float,
        *,
        generator: torch.Generator | None = None,
    ):
        super().__init__(GaussianSumQuery(l2_norm_clip, sum_stddev, generator=generator), denominator)
