"""Tree-aggregation queries: noisy prefix sums of a stream of clipped sums (DP-FTRL).

Kairouz, McMahan, Song, Thakkar, Thakurta, Xu, "Practical and Private (Deep) Learning without
Sampling or Shuffling" (ICML 2021).  Semantics follow TF Privacy's ``tree_aggregation_query``.

Step ``i`` (a call to ``get_noised_result``) has the clipped sum ``x_i = sum_j clip_C(x_{i,j})`` of
its records.  Both queries use one binary tree of noise (:mod:`pytorch_privacy.dp_query.tree_aggregation`) whose prefix
noise after step ``i`` is ``n_i``:

* :class:`TreeCumulativeSumQuery` releases ``s_i + n_i``, ``s_i = x_0 + ... + x_i`` (the noisy
  cumulative sum);
* :class:`TreeResidualSumQuery` releases ``x_i + n_i - n_{i-1}`` (``n_{-1} = 0``): the increments of
  the noisy prefix sums, a drop-in replacement for a Gaussian sum query whose running total is
  the tree's noisy prefix sum.

Restarts (``reset_state``, called by :class:`~.restart_query.RestartQuery`) start a new tree.

Privacy.  With Gaussian nodes of stddev ``sigma`` and L2 clipping to ``C``, each step records
``TreeAggregationStepEvent(noise_multiplier = sigma / C, starts_tree)``, ``starts_tree = 1`` on
the first step of each tree (the first step, and the first after each restart).  The steps of
one tree are accounted together (:mod:`pytorch_privacy.analysis.tree_aggregation`); they are
not a composition of per-step Gaussian mechanisms.  A custom ``clip_fn`` or a non-Gaussian
``noise_generator`` gives an :class:`~.events.UnsupportedEvent` (the analysis refuses to bound
it), as TF Privacy does.
"""

from __future__ import annotations

from typing import Any, Callable

import attrs
import torch

from . import pytree
from .dp_query import SumAggregationDPQuery, check_stddev, clip_coefficients
from .events import DpEvent, NoOpEvent, UnsupportedEvent
from .gaussian_query import clip_record, clip_records
from .randomness import RandomSource
from .tree_aggregation import (
    EfficientTreeAggregator,
    GaussianNoiseGenerator,
    TreeAggregator,
    TreeState,
    ValueGenerator,
)
from .tree_events import TreeAggregationStepEvent

__all__ = [
    "TreeCumulativeSumQuery",
    "TreeResidualSumQuery",
    "TreeCumulativeSumGlobalState",
    "TreeResidualSumGlobalState",
]

ClipFn = Callable[[list, Any], list]


@attrs.frozen
class TreeCumulativeSumGlobalState:
    """``tree_state``, the clip, and the noiseless running sum (flat record leaves, float32 or
    wider; ``None`` = zero, before the first step)."""

    tree_state: TreeState
    clip_value: float
    samples_cumulative_sum: Any


@attrs.frozen
class TreeResidualSumGlobalState:
    """``tree_state``, the clip, and the tree's prefix noise of the previous step ``n_{i-1}``
    (flat record leaves; ``None`` = zero, on the first step of a tree)."""

    tree_state: TreeState
    clip_value: float
    previous_tree_noise: Any


def _wide_add(*terms_and_signs, out_dtype: torch.dtype) -> torch.Tensor:
    """``sum sign * term`` in the widest dtype (float32 at least), cast to ``out_dtype``."""
    terms = [t for t, _ in terms_and_signs]
    wide = terms[0].dtype if terms[0].is_floating_point() else torch.float32
    for t in terms[1:]:
        wide = torch.promote_types(wide, t.dtype)
    if wide in (torch.float16, torch.bfloat16):
        wide = torch.float32
    acc = None
    for t, sign in terms_and_signs:
        t = t.to(dtype=wide, device=terms[0].device)
        acc = t if acc is None else (acc + t if sign > 0 else acc - t)
    return acc.to(out_dtype)


def _flat_checked(x: Any, sample_state: Any, what: str) -> list[torch.Tensor] | None:
    """The stored flat leaves ``x`` (``None`` = zero), checked against the record's leaves before
    anything is drawn (a refused step must not advance the noise stream)."""
    if x is None:
        return None
    leaves, _ = pytree.flatten(sample_state)
    x = list(x)
    if len(x) != len(leaves) or any(tuple(a.shape) != tuple(b.shape) for a, b in zip(x, leaves)):
        raise ValueError(
            f"the record structure or shape changed since the {what} started (stored shapes "
            f"{[tuple(a.shape) for a in x]}, record shapes {[tuple(b.shape) for b in leaves]}); "
            "reset the query (reset_state) before changing it"
        )
    return x


class _TreeSumQuery(SumAggregationDPQuery):
    """Clipping, parameters and events shared by the two tree queries."""

    def __init__(
        self,
        clip_value: float,
        noise_generator: "ValueGenerator | Callable[[], Any]",
        *,
        clip_fn: ClipFn | None = None,
        use_efficient: bool = True,
    ):
        self._clip_value = check_stddev(clip_value, "clip_value")  # finite, >= 0
        if clip_fn is not None and not callable(clip_fn):
            raise TypeError(f"clip_fn must be callable(flat_record, clip_value) or None, got {type(clip_fn).__name__}")
        if not isinstance(use_efficient, bool):
            raise TypeError(f"use_efficient must be a bool, got {type(use_efficient).__name__}")
        self._clip_fn = clip_fn
        self._use_efficient = use_efficient
        agg_cls = EfficientTreeAggregator if use_efficient else TreeAggregator
        self._tree_aggregator = agg_cls(noise_generator)

    @property
    def tree_aggregator(self) -> TreeAggregator | EfficientTreeAggregator:
        return self._tree_aggregator

    @property
    def use_efficient(self) -> bool:
        return self._use_efficient

    def random_sources(self) -> list[RandomSource]:
        """The randomness this query owns (what a checkpoint saves)."""
        return self._tree_aggregator.random_sources()

    @classmethod
    def build_l2_gaussian_query(
        cls,
        clip_norm: float,
        noise_multiplier: float,
        *,
        generator: "torch.Generator | RandomSource | None" = None,
        secure_mode: bool = False,
        use_efficient: bool = True,
    ):
        """The query with L2 clipping to ``clip_norm`` and Gaussian nodes of stddev
        ``clip_norm * noise_multiplier`` (the multiplier the tree accountant takes)."""
        clip = check_stddev(clip_norm, "clip_norm")
        z = check_stddev(noise_multiplier, "noise_multiplier")
        gen = GaussianNoiseGenerator(clip * z, generator=generator, secure_mode=secure_mode)
        return cls(clip, gen, use_efficient=use_efficient)

    # -- parameters ----------------------------------------------------------------------
    def derive_sample_params(self, global_state) -> float:
        return global_state.clip_value

    def derive_metrics(self, global_state) -> dict[str, float]:
        out = {"tree_agg_dpftrl_clip": float(global_state.clip_value)}
        stddev = self.noise_stddev(global_state)
        if stddev is not None:
            out["stddev"] = stddev
        return out

    def noise_stddev(self, global_state) -> float | None:
        """The stddev of each tree node (``None`` for a non-Gaussian generator)."""
        if isinstance(self._tree_aggregator.value_generator, GaussianNoiseGenerator):
            return float(global_state.tree_state.value_generator_state)
        return None

    def event(self, global_state) -> DpEvent:
        """The event of the step about to be released from ``global_state`` (see the module
        docstring): ``TreeAggregationStepEvent(stddev / clip, starts_tree)``."""
        stddev = self.noise_stddev(global_state)
        if stddev is None or self._clip_fn is not None:
            return UnsupportedEvent("tree aggregation with a custom clip_fn or noise generator")
        clip = float(global_state.clip_value)
        if clip == 0:
            return NoOpEvent()
        starts = 1 if global_state.tree_state.level_buffer_idx.numel() == 0 else 0
        return TreeAggregationStepEvent(noise_multiplier=stddev / clip, starts_tree=starts)

    # -- clipping ------------------------------------------------------------------------
    def preprocess_record(self, params, record):
        if self._clip_fn is None:
            return clip_record(record, params)
        leaves, spec = pytree.flatten(record)
        clipped = list(self._clip_fn(leaves, params))
        if len(clipped) != len(leaves):
            raise ValueError(f"clip_fn returned {len(clipped)} tensors for a record of {len(leaves)}")
        return pytree.unflatten(clipped, spec)

    def preprocess_records(self, params, batch):
        if self._clip_fn is not None:
            return super().preprocess_records(params, batch)
        leaves, _ = pytree.flatten(batch)
        if not leaves or leaves[0].shape[0] == 0:
            return batch
        return clip_records(batch, params)[0]

    def accumulate_records_by_norm(self, params, sample_state, norms: torch.Tensor, weighted_sum: Callable):
        if self._clip_fn is not None:
            return super().accumulate_records_by_norm(params, sample_state, norms, weighted_sum)
        return self.accumulate_preprocessed_record(sample_state, weighted_sum(clip_coefficients(norms, params)))

    def _tree_noise(self, sample_state, tree_state: TreeState):
        leaves, spec = pytree.flatten(sample_state)
        noise, new_tree = self._tree_aggregator.get_cumsum_and_update(tree_state, leaves)
        return leaves, spec, noise, new_tree

    def reset_l2_clip_gaussian_noise(self, global_state, clip_norm: float, stddev: float):
        """``global_state`` with a new clip and node stddev (Gaussian generator only).  Call it
        only at a restart (before :meth:`reset_state`): a tree's nodes must share one stddev."""
        gen = self._tree_aggregator.value_generator
        if not isinstance(gen, GaussianNoiseGenerator):
            raise TypeError("reset_l2_clip_gaussian_noise needs a GaussianNoiseGenerator noise_generator")
        tree = attrs.evolve(global_state.tree_state, value_generator_state=gen.make_state(stddev))
        return attrs.evolve(global_state, tree_state=tree, clip_value=check_stddev(clip_norm, "clip_norm"))


class TreeCumulativeSumQuery(_TreeSumQuery):
    """Noisy cumulative sums ``s_i + n_i`` of clipped per-step sums (TF Privacy semantics).

    Args:
        clip_value: L2 clip ``C`` of each record (global norm over the record's tensors), >= 0.
        noise_generator: a :class:`~.tree_aggregation.ValueGenerator` drawing each tree node
            (:class:`~.tree_aggregation.GaussianNoiseGenerator` of stddev ``sigma = z C`` for
            privacy), or a no-arg function returning a node value (tests).
        clip_fn: optional ``clip_fn(flat_record_tensors, clip_value) -> flat tensors`` replacing
            the L2 clip (the event is then unsupported).
        use_efficient: Honaker's efficient tree (default, as in TF Privacy) or the plain tree.

    :meth:`get_noised_result` returns ``(s_i + n_i, new_global_state, event)``: ``s_i`` is the sum
    of every clipped record of every step so far and ``n_i`` the current tree's prefix noise, each
    leaf cast to the dtype of ``sample_state``.  After a restart (:meth:`reset_state`) the running
    sum continues from the last *noised* result (TF Privacy): the release after ``k`` trees is
    ``s_i +`` (the final prefix noise of each finished tree) ``+`` the current tree's prefix noise.
    The record structure is fixed by the first step after each (re)start; a change raises
    ``ValueError``.
    """

    def initial_global_state(self) -> TreeCumulativeSumGlobalState:
        return TreeCumulativeSumGlobalState(self._tree_aggregator.init_state(), self._clip_value, None)

    def get_noised_result(self, sample_state, global_state: TreeCumulativeSumGlobalState):
        event = self.event(global_state)
        prev = _flat_checked(global_state.samples_cumulative_sum, sample_state, "running sum")
        leaves, spec, noise, new_tree = self._tree_noise(sample_state, global_state.tree_state)
        new_sum = [
            x.to(n.dtype) if p is None else _wide_add((x, 1), (p, 1), out_dtype=torch.promote_types(n.dtype, p.dtype))
            for x, n, p in zip(leaves, noise, prev or [None] * len(leaves))
        ]
        out = [_wide_add((s, 1), (n, 1), out_dtype=x.dtype) for s, n, x in zip(new_sum, noise, leaves)]
        new_state = TreeCumulativeSumGlobalState(new_tree, global_state.clip_value, tuple(new_sum))
        return pytree.unflatten(out, spec), new_state, event

    def reset_state(self, noised_results, global_state: TreeCumulativeSumGlobalState):
        """A new tree; the running sum restarts from ``noised_results`` (the last release)."""
        leaves, _ = pytree.flatten(noised_results)
        return TreeCumulativeSumGlobalState(
            self._tree_aggregator.reset_state(global_state.tree_state),
            global_state.clip_value,
            tuple(l.detach().to(torch.promote_types(l.dtype, torch.float32)).clone() for l in leaves),
        )


class TreeResidualSumQuery(_TreeSumQuery):
    """This step's clipped sum plus the increment of the tree's prefix noise (TF Privacy).

    Same arguments as :class:`TreeCumulativeSumQuery`.  :meth:`get_noised_result` returns
    ``(x_i + n_i - n_{i-1}, new_global_state, event)``: ``x_i`` is the sum of this step's clipped
    records, ``n_i`` the current tree's prefix noise after this step and ``n_{i-1}`` the one
    before (0 on the first step of a tree), each leaf cast to the dtype of ``sample_state``.  The
    releases of one tree therefore add up to the tree's noisy prefix sum: ``sum_{k<=i} release_k =
    s_i + n_i`` (what an SGD-style optimizer accumulating them into the parameters sees, the
    DP-FTRL update).  :meth:`reset_state` starts a new tree with ``n_{-1} = 0``.
    """

    def initial_global_state(self) -> TreeResidualSumGlobalState:
        return TreeResidualSumGlobalState(self._tree_aggregator.init_state(), self._clip_value, None)

    def get_noised_result(self, sample_state, global_state: TreeResidualSumGlobalState):
        event = self.event(global_state)
        prev = _flat_checked(global_state.previous_tree_noise, sample_state, "tree")
        leaves, spec, noise, new_tree = self._tree_noise(sample_state, global_state.tree_state)
        out = [
            _wide_add((x, 1), (n, 1), out_dtype=x.dtype)
            if p is None
            else _wide_add((x, 1), (n, 1), (p, -1), out_dtype=x.dtype)
            for x, n, p in zip(leaves, noise, prev or [None] * len(leaves))
        ]
        new_state = TreeResidualSumGlobalState(new_tree, global_state.clip_value, tuple(noise))
        return pytree.unflatten(out, spec), new_state, event

    def reset_state(self, noised_results, global_state: TreeResidualSumGlobalState):
        """A new tree (``n_{-1} = 0``); ``noised_results`` is not used."""
        del noised_results
        return TreeResidualSumGlobalState(
            self._tree_aggregator.reset_state(global_state.tree_state), global_state.clip_value, None
        )
