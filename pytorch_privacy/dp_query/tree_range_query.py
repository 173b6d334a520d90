"""Private range sums of a histogram via a tree of partial sums (TF Privacy's ``tree_range_query``).

Smith, Thakurta, Upadhyay, "Is Interaction Necessary for Distributed Private Learning?" (IEEE S&P
2017).  A record is a histogram over ``n`` leaves (a 1-D tensor).  The query builds the complete
``arity``-ary tree over it (leaves padded with zeros to ``arity^(depth-1)``; each internal node is
the sum of its children; :func:`build_tree_from_leaf`), flattens it root first, and hands the
flat tree to an inner sum query (a :class:`~.gaussian_query.GaussianSumQuery` for central
Gaussian noise), which clips each record's flat tree to L2 norm ``C`` and adds the noise.  Any
range ``[a, b)`` of leaves is then the sum of ``O(arity * log n)`` noisy nodes instead of up to
``n`` noisy leaves.

Sensitivity.  Each level of the tree is a partition of the same leaves, so a record's tree has
L2 norm at most ``sqrt(depth) * ||x||_1`` (exactly ``sqrt(depth)`` for a one-hot histogram):
clipping the flat tree to ``C`` bounds one record's contribution to ``C``, and the release is one
Gaussian mechanism with noise multiplier ``stddev / C`` (the inner query's event; TF Privacy
records an unsupported event here).  To leave one-hot records unclipped take
``C >= sqrt(depth)`` (:func:`tree_depth`).
"""

from __future__ import annotations

from typing import Any

import attrs
import torch

from .dp_query import DPQuery, SumAggregationDPQuery
from .events import DpEvent
from .gaussian_query import GaussianSumQuery
from .randomness import RandomSource

__all__ = ["TreeRangeSumQuery", "TreeRangeSumGlobalState", "build_tree_from_leaf", "range_sum", "tree_depth", "tree_size"]


def _check_arity(arity) -> int:
    if isinstance(arity, bool) or not isinstance(arity, int):
        raise TypeError(f"arity must be an int, got {type(arity).__name__}")
    if arity < 2:
        raise ValueError(f"`arity` must be at least 2, got {arity}.")
    return arity


def tree_depth(num_leaves: int, arity: int = 2) -> int:
    """Levels of the complete ``arity``-ary tree over ``num_leaves`` leaves:
    ``ceil(log_arity(num_leaves)) + 1`` (1 for a single leaf), computed in integers."""
    arity = _check_arity(arity)
    if isinstance(num_leaves, bool) or not isinstance(num_leaves, int) or num_leaves < 1:
        raise ValueError(f"the histogram must have at least one leaf, got {num_leaves!r}")
    depth, width = 1, 1
    while width < num_leaves:
        width *= arity
        depth += 1
    return depth


def tree_size(num_leaves: int, arity: int = 2) -> int:
    """Nodes of that tree: ``(arity^depth - 1) / (arity - 1)``."""
    return (arity ** tree_depth(num_leaves, arity) - 1) // (arity - 1)


def build_tree_from_leaf(leaf_nodes: torch.Tensor, arity: int = 2) -> list[torch.Tensor]:
    """The complete ``arity``-ary tree of sums over the last dimension of ``leaf_nodes``, as a list
    of levels, root first: level ``l`` has ``arity^l`` nodes and node ``i`` of it is the sum of
    leaves ``[i * s, (i + 1) * s)``, ``s = arity^(depth - 1 - l)``.  Leaves are padded with zeros
    to ``arity^(depth - 1)``.  Leading dimensions (a batch) are kept.

    Example: ``build_tree_from_leaf(tensor([1, 2, 3, 4]))`` is ``[[10], [3, 7], [1, 2, 3, 4]]``.
    """
    if not isinstance(leaf_nodes, torch.Tensor):
        raise TypeError(f"leaf_nodes must be a tensor, got {type(leaf_nodes).__name__}")
    if leaf_nodes.dim() == 0:
        raise ValueError("leaf_nodes must have at least one dimension (the histogram's leaves)")
    n = leaf_nodes.shape[-1]
    depth = tree_depth(n, arity)
    width = arity ** (depth - 1)
    lead = leaf_nodes.shape[:-1]
    if width > n:
        pad = torch.zeros(lead + (width - n,), dtype=leaf_nodes.dtype, device=leaf_nodes.device)
        leaf_nodes = torch.cat([leaf_nodes, pad], dim=-1)
    levels = [leaf_nodes]
    while levels[0].shape[-1] > 1:
        prev = levels[0]
        levels.insert(0, prev.reshape(lead + (prev.shape[-1] // arity, arity)).sum(dim=-1))
    return levels


def range_sum(levels: list[torch.Tensor], start: int, stop: int, arity: int = 2) -> torch.Tensor:
    """The sum of leaves ``[start, stop)`` from a tree of levels (root first, as returned by
    :func:`build_tree_from_leaf` or :meth:`TreeRangeSumQuery.get_noised_result`), using the fewest
    nodes that cover the range exactly (at most ``2 (arity - 1)`` per level)."""
    arity = _check_arity(arity)
    width = levels[-1].shape[-1]
    if isinstance(start, bool) or isinstance(stop, bool) or not (0 <= start <= stop <= width):
        raise ValueError(f"need 0 <= start <= stop <= {width} (leaves of the tree), got [{start}, {stop})")
    total = torch.zeros_like(levels[0][..., 0])

    def visit(level: int, i: int, span: int) -> None:
        nonlocal total
        lo, hi = i * span, (i + 1) * span
        if hi <= start or lo >= stop:
            return
        if start <= lo and hi <= stop:
            total = total + levels[level][..., i]
            return
        for c in range(arity):
            visit(level + 1, i * arity + c, span // arity)

    visit(0, 0, width)
    return total


@attrs.frozen
class TreeRangeSumGlobalState:
    """The arity and the inner query's global state."""

    arity: int
    inner_query_state: Any


class TreeRangeSumQuery(DPQuery):
    """Noisy tree of range sums over histogram records (see the module docstring).

    Args:
        inner_query: a sum query applied to each record's flat tree (root first), e.g.
            ``GaussianSumQuery(C, stddev)``; its event is this query's event.
        arity: branching factor, >= 2.

    ``initial_sample_state(template)`` takes a histogram (1-D tensor of ``n`` leaves);
    ``preprocess_record`` builds and clips its tree; :meth:`get_noised_result` returns the noisy
    tree as a list of levels, root first (level ``l`` a tensor of ``arity^l`` nodes).
    """

    def __init__(self, inner_query: DPQuery, arity: int = 2):
        if not isinstance(inner_query, SumAggregationDPQuery):
            raise TypeError(f"inner_query must be a SumAggregationDPQuery, got {type(inner_query).__name__}")
        self._inner_query = inner_query
        self._arity = _check_arity(arity)

    @classmethod
    def build_central_gaussian_query(
        cls,
        l2_norm_clip: float,
        stddev: float,
        arity: int = 2,
        *,
        generator: "torch.Generator | RandomSource | None" = None,
        secure_mode: bool = False,
    ) -> "TreeRangeSumQuery":
        """``TreeRangeSumQuery(GaussianSumQuery(l2_norm_clip, stddev), arity)`` (clip > 0,
        stddev >= 0, arity >= 2)."""
        if isinstance(l2_norm_clip, (int, float)) and not isinstance(l2_norm_clip, bool) and not l2_norm_clip > 0:
            raise ValueError(f"`l2_norm_clip` must be positive, got {l2_norm_clip}.")
        _check_arity(arity)
        return cls(GaussianSumQuery(l2_norm_clip, stddev, generator=generator, secure_mode=secure_mode), arity)

    @property
    def inner_query(self) -> DPQuery:
        return self._inner_query

    def initial_global_state(self) -> TreeRangeSumGlobalState:
        return TreeRangeSumGlobalState(self._arity, self._inner_query.initial_global_state())

    def derive_sample_params(self, global_state: TreeRangeSumGlobalState):
        return global_state.arity, self._inner_query.derive_sample_params(global_state.inner_query_state)

    def derive_metrics(self, global_state: TreeRangeSumGlobalState) -> dict[str, float]:
        return self._inner_query.derive_metrics(global_state.inner_query_state)

    def _flat_tree(self, record: torch.Tensor, arity: int, batched: bool) -> torch.Tensor:
        if not isinstance(record, torch.Tensor):
            raise TypeError(f"a TreeRangeSumQuery record is a 1-D histogram tensor, got {type(record).__name__}")
        if record.dim() != (2 if batched else 1):
            what = "a batch of histograms [B, n]" if batched else "a 1-D histogram"
            raise ValueError(f"expected {what}, got shape {tuple(record.shape)}")
        return torch.cat(build_tree_from_leaf(record, arity), dim=-1)

    def initial_sample_state(self, template: torch.Tensor) -> Any:
        """Zeros shaped like the flat tree of histogram ``template``."""
        return self._inner_query.initial_sample_state(torch.zeros_like(self._flat_tree(template, self._arity, False)))

    def preprocess_record(self, params, record):
        arity, inner_params = params
        return self._inner_query.preprocess_record(inner_params, self._flat_tree(record, arity, False))

    def preprocess_records(self, params, batch):
        arity, inner_params = params
        return self._inner_query.preprocess_records(inner_params, self._flat_tree(batch, arity, True))

    def accumulate_preprocessed_record(self, sample_state, preprocessed_record):
        return self._inner_query.accumulate_preprocessed_record(sample_state, preprocessed_record)

    def accumulate_preprocessed_records(self, sample_state, preprocessed_batch):
        return self._inner_query.accumulate_preprocessed_records(sample_state, preprocessed_batch)

    def merge_sample_states(self, sample_state_1, sample_state_2):
        return self._inner_query.merge_sample_states(sample_state_1, sample_state_2)

    def get_noised_result(self, sample_state, global_state: TreeRangeSumGlobalState) -> tuple[list, Any, DpEvent]:
        flat, inner_state, event = self._inner_query.get_noised_result(sample_state, global_state.inner_query_state)
        sizes, width = [], 1
        while sum(sizes) < flat.shape[-1]:
            sizes.append(width)
            width *= global_state.arity
        if sum(sizes) != flat.shape[-1]:
            raise ValueError(f"a flat tree of {flat.shape[-1]} nodes is not a complete {global_state.arity}-ary tree")
        levels = list(torch.split(flat, sizes, dim=-1))
        return levels, TreeRangeSumGlobalState(global_state.arity, inner_state), event
