"""Binary trees of noise for private prefix sums (tree aggregation, the noise of DP-FTRL).

Dwork, Naor, Pitassi, Rothblum, "Differential privacy under continual observation" (STOC 2010);
Chan, Shi, Song, "Private and continual release of statistics" (2011); Kairouz et al., "Practical
and Private (Deep) Learning without Sampling or Shuffling" (ICML 2021); Honaker, "Efficient Use
of Differentially Private Binary Trees" (2015).  Semantics follow TF Privacy's
``tree_aggregation`` module.

Leaves are steps ``0, 1, 2, ...``; a node at level ``d`` covers ``2^d`` consecutive steps and holds
an independent noise value drawn by a :class:`ValueGenerator` (Gaussian ``N(0, sigma^2)`` per
coordinate for privacy).  The noise of the prefix ``[0, t]`` is the sum of the nodes of its dyadic
decomposition: one node per set bit of ``t + 1``.

* :class:`TreeAggregator`: prefix noise = plain sum of those nodes, variance
  ``popcount(t + 1) * sigma^2`` per coordinate.
* :class:`EfficientTreeAggregator` (Honaker 2015, bottom-up): each stored node is
  ``n_d + (left + right) / 2`` of its fresh noise ``n_d`` and its children's stored values, and is
  used with weight ``1 / (2 - 2^-d)``.  That weighted node is an unbiased estimate of the node's
  sum with variance ``sigma^2 / (2 - 2^-d)`` (from ``V_d = sigma^2 + V_{d-1} / 2``), so the prefix
  noise has variance ``sum over set bits d of (t + 1) of sigma^2 / (2 - 2^-d)``.  It is a linear
  function of the same released node values, so its privacy is that of the plain tree.

State (:class:`TreeState`) is small: only the nodes of the current decomposition are kept
(``popcount(t + 1) <= log2(t + 1) + 1`` of them), stacked in one tensor per record leaf with a
leading node dimension, with their levels in an int64 tensor; all plain tensors, so it goes
through ``torch.save`` / ``torch.load(weights_only=True)`` and the optimizer's checkpoints.  The
state is *lazy*: the initial (and reset) state is empty and the first step draws the first leaf;
it never depends on the record shape until a record arrives (records are known in PyTorch only at
``initial_sample_state(template)``).  Noise is drawn at the step that uses it, in the order of TF
Privacy (the new leaf first, then each parent it completes, bottom up, for the efficient tree;
only the completed node for the plain tree).

The randomness is owned: :class:`GaussianNoiseGenerator` draws from a
:class:`~pytorch_privacy.dp_query.randomness.RandomSource` (OS-seeded by default, a user's
``torch.Generator``, or ``secure_mode``), never torch's global RNG, in float32 or wider.
"""

from __future__ import annotations

import abc
import math
from typing import Any, Callable, Sequence

import attrs
import torch

from . import pytree
from .dp_query import check_stddev
from .randomness import RandomSource, as_random_source, noise_dtype

__all__ = [
    "ValueGenerator",
    "GaussianNoiseGenerator",
    "StatelessValueGenerator",
    "TreeState",
    "TreeAggregator",
    "EfficientTreeAggregator",
    "get_step_idx",
    "tree_noise_variance",
]


def _leaf_noise_dtype(leaf: torch.Tensor) -> torch.dtype:
    return noise_dtype(leaf.dtype) if leaf.is_floating_point() else torch.float32


class ValueGenerator(abc.ABC):
    """Stateful generator of one tree node value per call (TF Privacy's ``ValueGenerator``).

    ``next(state, like)`` returns ``(values, new_state)``: one tensor per tensor of ``like`` (the
    flat leaves of a record), of its shape and device, in float32 or wider.
    """

    @abc.abstractmethod
    def initialize(self) -> Any:
        """The initial generator state (plain numbers or tensors)."""

    @abc.abstractmethod
    def next(self, state: Any, like: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], Any]:
        """One node value shaped like ``like``, and the advanced state."""

    def random_sources(self) -> list[RandomSource]:
        """The randomness this generator owns (what a checkpoint saves)."""
        return []


class GaussianNoiseGenerator(ValueGenerator):
    """I.i.d. ``N(0, stddev^2)`` per coordinate for each node.

    The state is the current stddev (a float), so a query may change it between trees
    (:meth:`make_state`, as adaptive clipping does at a restart).  Draws come from the owned
    :class:`~pytorch_privacy.dp_query.randomness.RandomSource` (``generator``: a ``torch.Generator``
    for reproducible noise, a shared ``RandomSource``, or ``None`` for an OS-seeded one;
    ``secure_mode``: the OS CSPRNG), in float32 (float64 for float64 records and in secure mode).
    A stddev of 0 gives exact zeros and draws nothing.
    """

    def __init__(
        self,
        noise_std: float,
        *,
        generator: "torch.Generator | RandomSource | None" = None,
        secure_mode: bool = False,
    ):
        self._noise_std = check_stddev(noise_std, "noise_std")
        self.generator = as_random_source(generator, secure_mode=secure_mode)

    @property
    def noise_std(self) -> float:
        """The initial stddev."""
        return self._noise_std

    def initialize(self) -> float:
        return self._noise_std

    def make_state(self, stddev: float) -> float:
        """A generator state with noise stddev ``stddev`` (finite, >= 0)."""
        return check_stddev(stddev, "stddev")

    def next(self, state: float, like: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], float]:
        stddev = check_stddev(state, "stddev")
        out = []
        for leaf in like:
            dt = _leaf_noise_dtype(leaf)
            if stddev == 0:
                out.append(torch.zeros(leaf.shape, dtype=dt, device=leaf.device))
                continue
            z = self.generator.normal(leaf.shape, device=leaf.device, dtype=dt)
            out.append(z * stddev)
        return out, state

    def random_sources(self) -> list[RandomSource]:
        return [self.generator]


class StatelessValueGenerator(ValueGenerator):
    """Wraps a no-arg function (TF Privacy's ``StatelessValueGenerator``): ``value_fn()`` returns a
    number or 0-dim tensor (broadcast to every leaf), or a tensor / pytree of tensors matching the
    record (one value per leaf, each broadcastable to the leaf's shape).  Mostly for tests (a
    constant node value makes the tree's sums exact integers)."""

    def __init__(self, value_fn: Callable[[], Any]):
        if not callable(value_fn):
            raise TypeError(f"value_fn must be callable, got {type(value_fn).__name__}")
        self.value_fn = value_fn

    def initialize(self) -> tuple:
        return ()

    def next(self, state: Any, like: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], Any]:
        v = self.value_fn()
        if isinstance(v, (int, float)) or (isinstance(v, torch.Tensor) and v.dim() == 0):
            vals = [v] * len(like)
        else:
            vals, _ = pytree.flatten(v)
            if len(vals) != len(like):
                raise ValueError(f"value_fn returned {len(vals)} tensors for a record of {len(like)}")
        out = []
        for x, leaf in zip(vals, like):
            dt = _leaf_noise_dtype(leaf)
            t = torch.as_tensor(x, dtype=dt, device=leaf.device)
            out.append(t.expand(leaf.shape).clone())
        return out, state


def _as_value_generator(value_generator: Any) -> ValueGenerator:
    if isinstance(value_generator, ValueGenerator):
        return value_generator
    if callable(value_generator):
        return StatelessValueGenerator(value_generator)
    raise TypeError(
        "value_generator must be a ValueGenerator or a no-arg function returning node values, got "
        f"{type(value_generator).__name__}"
    )


@attrs.frozen
class TreeState:
    """The nodes of the current dyadic decomposition (see the module docstring).

    Attributes:
        level_buffer: ``None`` before the first step of a tree; else one tensor per record leaf
            (flat, in :func:`~pytorch_privacy.dp_query.pytree.flatten` order) of shape
            ``[k, *leaf_shape]``: the stored value of each of the ``k`` kept nodes, lowest level
            first.
        level_buffer_idx: int64 CPU tensor ``[k]``: the level of each kept node (increasing).
            After ``t`` steps of this tree the levels are the set bits of ``t``.
        value_generator_state: the :class:`ValueGenerator`'s state (the stddev of a Gaussian one).
    """

    level_buffer: Any
    level_buffer_idx: torch.Tensor
    value_generator_state: Any

    @property
    def num_steps(self) -> int:
        """Leaves (steps) of this tree so far."""
        return get_step_idx(self)

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors, numbers and lists (``torch.load(weights_only=True)`` reads them)."""
        buf = None if self.level_buffer is None else [t.detach().clone() for t in self.level_buffer]
        return {
            "level_buffer": buf,
            "level_buffer_idx": self.level_buffer_idx.detach().clone(),
            "value_generator_state": self.value_generator_state,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "TreeState":
        """The inverse of :meth:`state_dict` (checked: levels increasing, one per buffered node)."""
        if not isinstance(state, dict) or "level_buffer_idx" not in state:
            raise ValueError("not a TreeState state dict (expected keys level_buffer, level_buffer_idx, ...)")
        s = cls(state.get("level_buffer"), state["level_buffer_idx"], state.get("value_generator_state"))
        _checked_levels(s)
        _checked_buffer(s, None)
        return s


def _empty_state(generator_state: Any) -> TreeState:
    return TreeState(None, torch.zeros(0, dtype=torch.int64), generator_state)


def _checked_levels(state: TreeState) -> list[int]:
    idx = state.level_buffer_idx
    if not isinstance(idx, torch.Tensor) or idx.dim() != 1 or idx.is_floating_point():
        raise ValueError("TreeState.level_buffer_idx must be a 1-D integer tensor")
    levels = [int(v) for v in idx.tolist()]
    if any(v < 0 for v in levels) or any(b <= a for a, b in zip(levels, levels[1:])) or any(v > 62 for v in levels):
        raise ValueError(f"TreeState levels must be increasing, in [0, 62], got {levels}")
    return levels


def _checked_buffer(state: TreeState, like: Sequence[torch.Tensor] | None) -> list[torch.Tensor]:
    k = int(state.level_buffer_idx.numel())
    buf = state.level_buffer
    if buf is None:
        if k:
            raise ValueError(f"TreeState has {k} levels but no buffered nodes")
        return []
    buf = list(buf)
    if like is not None and len(buf) != len(like):
        raise ValueError(
            f"the tree state holds nodes for {len(buf)} record tensors but the record has {len(like)}: "
            "the record structure changed since the tree started; reset the tree (reset_state) first"
        )
    for i, t in enumerate(buf):
        if not isinstance(t, torch.Tensor) or t.dim() == 0 or t.shape[0] != k:
            raise ValueError(f"TreeState.level_buffer[{i}] must be a tensor with a leading node dimension of {k}")
        if like is not None and tuple(t.shape[1:]) != tuple(like[i].shape):
            raise ValueError(
                f"record leaf {i} has shape {tuple(like[i].shape)} but the tree's nodes have shape "
                f"{tuple(t.shape[1:])}: reset the tree (reset_state) before changing the record shape"
            )
    if like is not None:
        buf = [t if t.device == l.device else t.to(l.device) for t, l in zip(buf, like)]
    return buf


def get_step_idx(state: TreeState) -> int:
    """Steps (leaves) of the current tree so far: ``sum 2^level`` over the kept nodes.  (TF
    Privacy's ``get_step_idx``: the index of the leaf the next call adds.)"""
    return sum(1 << v for v in _checked_levels(state))


class _TreeAggregatorBase:
    """Shared state handling; subclasses say how a new leaf enters and how nodes are weighted."""

    def __init__(self, value_generator: "ValueGenerator | Callable[[], Any]"):
        self.value_generator = _as_value_generator(value_generator)

    def init_state(self) -> TreeState:
        """The state of an empty tree (no step yet; nothing drawn)."""
        return _empty_state(self.value_generator.initialize())

    def reset_state(self, state: TreeState) -> TreeState:
        """An empty tree that keeps the generator state (a restart)."""
        return _empty_state(state.value_generator_state)

    def random_sources(self) -> list[RandomSource]:
        return self.value_generator.random_sources()

    def _weights(self, levels: list[int]) -> list[float] | None:
        return None  # plain sum

    @abc.abstractmethod
    def _push(self, buf, levels, gen_state, like):
        """Add one leaf: ``(new_node, its level, nodes kept from buf (index), gen_state)``."""

    def get_cumsum_and_update(self, state: TreeState, like: Any) -> tuple[Any, TreeState]:
        """Add the next leaf (step ``t = get_step_idx(state)``) and return the noise of the prefix
        ``[0, t]`` and the new state.

        ``like``: a record (tensor or pytree) giving the shape, device and structure of the node
        values; the noise is returned with the same structure, each leaf in float32 or wider.
        """
        leaves, spec = pytree.flatten(like)
        levels = _checked_levels(state)
        buf = _checked_buffer(state, leaves)
        new_node, level, keep_from, gen_state = self._push(buf, levels, state.value_generator_state, leaves)
        new_levels = [level] + levels[keep_from:]
        new_buf = [
            torch.cat([n.unsqueeze(0), b[keep_from:].to(n.dtype)]) if b is not None else n.unsqueeze(0)
            for n, b in zip(new_node, buf or [None] * len(new_node))
        ]
        new_state = TreeState(tuple(new_buf), torch.tensor(new_levels, dtype=torch.int64), gen_state)
        w = self._weights(new_levels)
        if w is None:
            noise = [b.sum(dim=0) for b in new_buf]
        else:
            noise = [
                (b * torch.tensor(w, dtype=b.dtype, device=b.device).reshape((-1,) + (1,) * (b.dim() - 1))).sum(dim=0)
                for b in new_buf
            ]
        return pytree.unflatten(noise, spec), new_state


def _trailing_levels(levels: list[int]) -> int:
    """The number of kept nodes at levels 0, 1, 2, ... without a gap: the nodes a new leaf completes."""
    n = 0
    while n < len(levels) and levels[n] == n:
        n += 1
    return n


class TreeAggregator(_TreeAggregatorBase):
    """Prefix noise = plain sum of the decomposition's nodes (Dwork et al. 2010).

    After the leaf of step ``t`` the prefix noise has ``popcount(t + 1)`` nodes: variance
    ``popcount(t + 1) * sigma^2`` per coordinate for Gaussian nodes of stddev ``sigma``.  Only the
    node at the level the new leaf completes is drawn (the lower ones it replaces are dropped).

    Usage::

        agg = TreeAggregator(GaussianNoiseGenerator(sigma))
        state = agg.init_state()
        for t in range(T):
            noise_t, state = agg.get_cumsum_and_update(state, like=record)
    """

    def _push(self, buf, levels, gen_state, like):
        level = _trailing_levels(levels)
        node, gen_state = self.value_generator.next(gen_state, like)
        return node, level, level, gen_state


class EfficientTreeAggregator(_TreeAggregatorBase):
    """Prefix noise from Honaker's (2015) variance-reducing node estimates.

    A new leaf draws its noise; each node it completes (bottom up) draws a fresh value ``n`` and
    stores ``n + (left + right) / 2``; a kept node at level ``d`` counts with weight
    ``1 / (2 - 2^-d)``.  Per coordinate, a weighted node has variance ``sigma^2 / (2 - 2^-d)``
    (``sigma^2`` at a leaf, ``2 sigma^2 / 3`` one level up, to ``sigma^2 / 2``), and the prefix
    noise after step ``t`` the sum of these over the set bits of ``t + 1``
    (:func:`tree_noise_variance`).
    """

    def _weights(self, levels: list[int]) -> list[float]:
        return [1.0 / (2.0 - 0.5**d) for d in levels]

    def _push(self, buf, levels, gen_state, like):
        value, gen_state = self.value_generator.next(gen_state, like)
        level = _trailing_levels(levels)
        for d in range(level):
            node, gen_state = self.value_generator.next(gen_state, like)
            value = [0.5 * (b[d].to(v.dtype) + v) + n for b, v, n in zip(buf, value, node)]
        return value, level, level, gen_state


def tree_noise_variance(num_steps: int, stddev: float, efficient: bool = False) -> float:
    """Per-coordinate variance of the prefix noise after ``num_steps`` leaves (steps 0 to
    ``num_steps - 1``) of one tree with Gaussian nodes of stddev ``stddev``:
    ``sum over set bits d of num_steps`` of ``stddev^2`` (plain) or ``stddev^2 / (2 - 2^-d)``
    (efficient)."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    s2 = check_stddev(stddev) ** 2
    bits = [d for d in range(num_steps.bit_length()) if num_steps >> d & 1]
    if not efficient:
        return len(bits) * s2
    return math.fsum(s2 / (2.0 - 0.5**d) for d in bits)
