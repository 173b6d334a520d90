"""Per-layer rules of the ghost engine: per-example gradient *contributions* from activations
and output gradients, without a second backward pass.

For a layer whose parameter enters the output linearly, the per-example gradient is a sum of
outer products of the output gradient ``g`` and a layer input ``a``: for ``nn.Linear`` on a
sequence ``grad_i W = sum_t g_{i,t} a_{i,t}^T``, for a convolution the same with ``a`` the
unfolded input patches, for an embedding ``a`` is one-hot.  From ``(a, g)`` we get

* the per-example squared norm, either by the *ghost norm* trick (Goodfellow 2015; Li, Tramèr,
  Liang and Hashimoto 2022, "Large language models can be strong differentially private
  learners", arXiv 2110.05679)::

      ||sum_t g_t a_t^T||_F^2 = sum_{t,t'} (a_t . a_t') (g_t . g_t')

  costing ``O(T^2 (p + d))`` per example, or by materialising the per-layer per-example gradient
  (``O(T p d)``), whichever is cheaper for that layer (mixed ghost clipping, Bu, Mao and Xu 2022,
  "Scalable and efficient training of large convolutional neural networks with differential
  privacy", arXiv 2205.10683);
* the clipped sum ``sum_i c_i grad_i = sum_{i,t} (c_i g_{i,t}) a_{i,t}^T`` by one matmul
  (book-keeping, Bu, Wang, Zha and Karypis 2022, "Differentially private optimization on large
  model at small cost", arXiv 2210.00038), with no second backward pass.

A :class:`Contribution` is one use of one parameter in one forward (a module called twice, or a
parameter tied between modules, gives several); the engine sums them per parameter, including
the cross terms in the norm.  A :class:`LayerRule` turns a module's saved input and output
gradient into contributions; :func:`register_ghost_rule` adds one for a new module type.

This module holds the norm policy, the contribution algebra, the rule interface and the
registry; the rules for torch's layers live in :mod:`.rules`, one small module per layer family
(imported, and so registered, with :mod:`pytorch_privacy.optimizer.engines`).
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .base import accumulation_dtype, contract_records

__all__ = [
    "Contribution",
    "OuterContribution",
    "DirectContribution",
    "EmbeddingContribution",
    "NormPolicy",
    "LayerRule",
    "register_ghost_rule",
    "ghost_rule_for",
    "ghost_rules",
    "sum_sq_norms",
    "PerRecord",
    "to_records",
    "scale_rows",
    "keep_rows",
]


@dataclass(frozen=True)
class NormPolicy:
    """How a layer's per-example norm is computed.

    Attributes:
        mode: ``"auto"`` picks per layer by cost (below), ``"ghost"`` always uses the ghost-norm
            trick where it applies, ``"materialize"`` always materialises per-layer gradients.
        memory_budget_bytes: ``"auto"`` materialises a layer's per-example gradients only when
            they fit in this many bytes (they are then kept for :meth:`weighted_sum`).

    ``"auto"``, per layer with ``T`` positions, output width ``p``, input width ``d``: materialise
    when that costs no more flops (``T p d + p d`` against ``T^2 (p + d) + T p d``, the second
    terms being the weighted sum) and fits the budget, else ghost when its ``T^2`` Gram matrices
    take less memory than the ``p d`` gradient, else materialise.
    """

    mode: str = "auto"
    memory_budget_bytes: int = 256 * 2**20

    def __post_init__(self):
        if self.mode not in ("auto", "ghost", "materialize"):
            raise ValueError(f"norm mode must be 'auto', 'ghost' or 'materialize', got {self.mode!r}")

    def use_ghost(self, records: int, groups: int, positions: int, p: int, d: int, itemsize: int) -> bool:
        """Whether to use the ghost norm for an outer-product contribution of these sizes."""
        if self.mode != "auto":
            return self.mode == "ghost"
        t = positions
        mat_flops = t * p * d + p * d
        ghost_flops = t * t * (p + d) + t * p * d
        mat_bytes = records * groups * p * d * itemsize
        ghost_bytes = records * groups * t * t * itemsize
        if mat_flops <= ghost_flops and mat_bytes <= self.memory_budget_bytes:
            return False
        return ghost_bytes < mat_bytes

    def materialize_fits(self, nbytes: int) -> bool:
        """Whether a materialised per-example gradient of ``nbytes`` may be used/kept."""
        return self.mode == "materialize" or (self.mode == "auto" and nbytes <= self.memory_budget_bytes)


# ----------------------------------------------------------------------------------------
# contributions
# ----------------------------------------------------------------------------------------


class Contribution(abc.ABC):
    """One use's share of one parameter's per-record gradient, for ``num_records`` records."""

    shape: torch.Size

    @property
    @abc.abstractmethod
    def num_records(self) -> int:
        """Number of records (examples or microbatches)."""

    @abc.abstractmethod
    def materialize(self) -> torch.Tensor:
        """Per-record gradients ``[R, *shape]``."""

    @abc.abstractmethod
    def weighted_sum(self, coefficients: torch.Tensor, mask: bool = True) -> torch.Tensor:
        """``sum_r coefficients[r] * grad_r``, shaped like the parameter.  With ``mask``, records
        of coefficient exactly 0 contribute exact zeros even if their data is not finite (costs
        an elementwise pass; skipped when the caller knows every record is finite)."""

    @abc.abstractmethod
    def sq_norms(self, policy: NormPolicy) -> tuple[torch.Tensor, PerRecord | None]:
        """``(squared per-record norms [R], the materialised gradients if that was the route, else None)``."""

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the per-example gradient."""
        return self._dtype  # type: ignore[attr-defined]

    def _acc(self) -> torch.dtype:
        return accumulation_dtype(self.dtype)


def scale_rows(t: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """``coefficients[r] * t[r]``, with rows of coefficient exactly 0 set to exact zeros (so a
    record with non-finite gradients and coefficient 0 cannot poison a sum with ``0 * NaN``)."""
    c = coefficients.to(t.dtype).reshape((-1,) + (1,) * (t.dim() - 1))
    return torch.where(c != 0, t * c, torch.zeros((), dtype=t.dtype, device=t.device))


def keep_rows(t: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """``t`` with the rows whose coefficient is exactly 0 replaced by zeros."""
    keep = (coefficients != 0).reshape((-1,) + (1,) * (t.dim() - 1))
    return torch.where(keep, t, torch.zeros((), dtype=t.dtype, device=t.device))


def _rowsq(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Squared L2 norm of each row (one pass, accumulated in ``dtype``)."""
    flat = t if t.dim() == 2 else t.reshape(t.shape[0], math.prod(t.shape[1:]))
    return torch.linalg.vector_norm(flat, dim=1, dtype=dtype).square()


def _lastsq(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.linalg.vector_norm(t, dim=-1, dtype=dtype).square()


class PerRecord:
    """Materialised per-record gradients of one parameter.

    ``data`` is ``[R, *shape]`` (``layout="param"``), or ``[R, G, d, p]`` for a weight of shape
    ``[G*p, d...]`` computed input-major (``layout="gdp"``), or ``[R, *inner]`` for a layout
    ``("permuted", inner, perm)``: each record's gradient is ``data[r].permute(perm)`` reshaped
    to ``shape`` (convolution weights computed from channels-last / space-to-depth patches).
    Norms and weighted sums are taken in the stored layout; only their results are permuted.
    """

    def __init__(self, data: torch.Tensor, shape: torch.Size, layout: Any = "param"):
        self.data, self.shape, self.layout = data, torch.Size(shape), layout

    @property
    def nbytes(self) -> int:
        """Memory held."""
        return self.data.numel() * self.data.element_size()

    def sq_norms(self, dtype: torch.dtype) -> torch.Tensor:
        """Squared per-record norms."""
        return _rowsq(self.data, dtype)

    def _to_param(self, t: torch.Tensor, lead: tuple) -> torch.Tensor:
        if self.layout == "gdp":
            t = t.transpose(-1, -2)
        elif self.layout != "param":
            _, inner, perm = self.layout
            k = len(lead)
            t = t.reshape(lead + tuple(inner)).permute(tuple(range(k)) + tuple(k + i for i in perm))
        shape = lead + tuple(self.shape)
        return t if t.shape == shape else t.reshape(shape)

    def weighted_sum(self, coefficients: torch.Tensor, mask: bool = True) -> torch.Tensor:
        """``sum_r c_r grad_r`` (accumulated in float32 for half-precision data)."""
        data = self.data.to(accumulation_dtype(self.data.dtype))
        if mask:
            total = scale_rows(data, coefficients).sum(0)
        else:
            total = contract_records(coefficients, data)
        return self._to_param(total, ())

    def materialize(self) -> torch.Tensor:
        """``[R, *shape]``."""
        return self._to_param(self.data, (self.data.shape[0],))

    def __add__(self, other: PerRecord) -> PerRecord:
        return PerRecord(self.materialize() + other.materialize(), self.shape)


class DirectContribution(Contribution):
    """A contribution small enough to hold per record: ``values`` is ``[R, *shape]`` (biases,
    normalisation scales and shifts).

    ``rows_of``: an :class:`OuterContribution` with one group and one position whose ``g`` holds
    exactly these values (a linear layer's bias on ``[B, d]`` inputs): its squared row norms,
    which the weight's norm computes anyway, are then reused (the same reduction of the same
    numbers)."""

    def __init__(self, values: torch.Tensor, shape: torch.Size, rows_of: OuterContribution | None = None):
        if values.shape[1:] != shape:
            values = values.reshape((values.shape[0],) + tuple(shape))
        self.values = values
        self.shape = torch.Size(shape)
        self._dtype = values.dtype
        self._rows_of = rows_of if rows_of is not None and rows_of.holds_rows(values) else None

    @property
    def num_records(self) -> int:
        return self.values.shape[0]

    def materialize(self) -> torch.Tensor:
        return self.values

    def weighted_sum(self, coefficients: torch.Tensor, mask: bool = True) -> torch.Tensor:
        values = self.values.to(self._acc())  # half precision (autocast): sum in float32
        if not mask:
            return contract_records(coefficients, values)
        return scale_rows(values, coefficients).sum(0)

    def sq_norms(self, policy: NormPolicy) -> tuple[torch.Tensor, PerRecord | None]:
        sq = self._rows_of.g_sq().reshape(-1) if self._rows_of is not None else _rowsq(self.values, self._acc())
        return sq, PerRecord(self.values, self.shape)

    @staticmethod
    def merge(items: list[DirectContribution]) -> DirectContribution:
        """The sum of several direct contributions to one parameter."""
        total = items[0].values
        for c in items[1:]:
            total = total + c.values
        return DirectContribution(total, items[0].shape)


class OuterContribution(Contribution):
    """``grad_r = sum_n g[r, k, n] a[r, k, n]^T`` per group ``k`` (convolution groups), reshaped to
    ``shape``; ``g`` is ``[R, G, N, p]`` and ``a`` is ``[R, G, N, d]``."""

    def __init__(self, g: torch.Tensor, a: torch.Tensor, shape: torch.Size):
        if g.dim() != 4 or a.dim() != 4 or g.shape[:3] != a.shape[:3]:
            raise ValueError(f"outer contribution needs g [R,G,N,p] and a [R,G,N,d], got {tuple(g.shape)}, {tuple(a.shape)}")
        if g.dtype != a.dtype:  # e.g. autocast: half output gradients, float inputs
            common = torch.promote_types(g.dtype, a.dtype)
            g, a = g.to(common), a.to(common)
        self.g, self.a = g, a
        self.shape = torch.Size(shape)
        self._dtype = g.dtype
        self._g_sq: torch.Tensor | None = None

    def holds_rows(self, values: torch.Tensor) -> bool:
        """Whether ``values`` (``[R, p]``) is ``g`` itself (one group, one position), viewed."""
        g = self.g
        return (
            g.shape[1:3] == (1, 1) and values.dim() == 2 and values.shape == (g.shape[0], g.shape[3])
            and values.dtype == g.dtype and values.data_ptr() == g.data_ptr()
            and values.stride() == (g.stride(0), g.stride(3))
        )

    def g_sq(self) -> torch.Tensor:
        """``||g[r, k, n]||^2`` over the output features, ``[R, G, N]`` (computed once)."""
        cached = getattr(self, "_g_sq", None)  # subclasses (convolutions) may not run __init__
        if cached is None:
            cached = self._g_sq = _lastsq(self.g, self._acc())
        return cached

    @property
    def num_records(self) -> int:
        return self.g.shape[0]

    def key(self) -> tuple:
        """Contributions with equal keys can be concatenated along positions."""
        return (self.g.shape[1], self.g.shape[3], self.a.shape[3], self.shape)

    @staticmethod
    def merge(items: list[OuterContribution]) -> list[OuterContribution]:
        """Concatenate contributions to one parameter along positions (exactly the gradient of
        the sum, so the ghost norm then includes all cross terms); incompatible layouts stay apart."""
        groups: dict[tuple, list[OuterContribution]] = {}
        for c in items:
            groups.setdefault(c.key(), []).append(c)
        out = []
        for same in groups.values():
            if len(same) == 1:
                out.append(same[0])
            else:
                out.append(
                    OuterContribution(torch.cat([c.g for c in same], 2), torch.cat([c.a for c in same], 2), same[0].shape)
                )
        return out

    def materialize(self) -> torch.Tensor:
        per = torch.matmul(self.g.transpose(2, 3), self.a)  # [R, G, p, d]
        return per.reshape((per.shape[0],) + tuple(self.shape))

    def weighted_sum(self, coefficients: torch.Tensor, mask: bool = True) -> torch.Tensor:
        acc = self._acc()  # half precision (autocast): contract in float32
        g, a = self.g.to(acc), self.a.to(acc)
        R, G, N, p = g.shape
        d = a.shape[3]
        if mask:
            gs, a = scale_rows(g, coefficients), keep_rows(a, coefficients)
        else:
            gs = g * coefficients.to(g.dtype).reshape(R, 1, 1, 1)
        if G == 1:  # one group: the same product as one matrix multiply, two dispatched views fewer
            out = torch.mm(gs.reshape(R * N, p).t(), a.reshape(R * N, d))
            return out if out.shape == self.shape else out.reshape(self.shape)
        # [G, p, R*N] @ [G, R*N, d]
        left = gs.permute(1, 3, 0, 2).reshape(G, p, R * N)
        right = a.permute(1, 0, 2, 3).reshape(G, R * N, d)
        return torch.bmm(left, right).reshape(self.shape)

    def sq_norms(self, policy: NormPolicy) -> tuple[torch.Tensor, PerRecord | None]:
        R, G, N, p = self.g.shape
        d = self.a.shape[3]
        acc = self._acc()
        if N == 1:  # ||g a^T||^2 = ||g||^2 ||a||^2, always the cheapest
            sq = self.g_sq() * _lastsq(self.a, acc)  # [R, G, 1]
            return (sq.reshape(R) if G == 1 else sq.sum((1, 2))), None
        if policy.use_ghost(R, G, N, p, d, self.g.element_size()):
            ga = torch.matmul(self.a, self.a.transpose(2, 3))  # [R, G, N, N]
            gg = torch.matmul(self.g, self.g.transpose(2, 3))
            return (ga.to(acc) * gg.to(acc)).sum((1, 2, 3)), None
        mat = self._per_record()
        return mat.sq_norms(acc), mat

    def _per_record(self) -> PerRecord:
        return PerRecord(self.materialize(), self.shape)


class EmbeddingContribution(Contribution):
    """``grad_r = sum_n onehot(ids[r, n]) g[r, n]^T`` for an embedding table ``[V, d]``;
    ``ids`` is ``[R, N]`` and ``g`` is ``[R, N, d]`` (zero at ``padding_idx``)."""

    def __init__(self, ids: torch.Tensor, g: torch.Tensor, num_embeddings: int, shape: torch.Size):
        self.ids, self.g = ids, g
        self.num_embeddings = num_embeddings
        self.shape = torch.Size(shape)
        self._dtype = g.dtype

    @property
    def num_records(self) -> int:
        return self.ids.shape[0]

    @staticmethod
    def merge(items: list[EmbeddingContribution]) -> EmbeddingContribution:
        """Concatenate uses of one table along positions."""
        if len(items) == 1:
            return items[0]
        return EmbeddingContribution(
            torch.cat([c.ids for c in items], 1), torch.cat([c.g for c in items], 1), items[0].num_embeddings, items[0].shape
        )

    def materialize(self) -> torch.Tensor:
        R, N = self.ids.shape
        V, d = self.num_embeddings, self.g.shape[2]
        rows = (torch.arange(R, device=self.ids.device).unsqueeze(1) * V + self.ids).reshape(-1)
        out = self.g.new_zeros(R * V, d).index_add_(0, rows, self.g.reshape(R * N, d))
        return out.reshape((R,) + tuple(self.shape))

    def weighted_sum(self, coefficients: torch.Tensor, mask: bool = True) -> torch.Tensor:
        R, N = self.ids.shape
        d = self.g.shape[2]
        g = self.g.to(self._acc())  # half precision (autocast): sum in float32
        if mask:
            gs = scale_rows(g, coefficients).reshape(R * N, d)
        else:
            gs = (g * coefficients.to(g.dtype).reshape(R, 1, 1)).reshape(R * N, d)
        return g.new_zeros(self.num_embeddings, d).index_add_(0, self.ids.reshape(-1), gs).reshape(self.shape)

    def sq_norms(self, policy: NormPolicy) -> tuple[torch.Tensor, PerRecord | None]:
        # Exact, O(R N d) and free of host syncs: sort (record, token) keys, sum g over equal keys
        # into a fixed-size buffer, square, and sum back per record.
        R, N = self.ids.shape
        d = self.g.shape[2]
        acc = self._acc()
        keys = (torch.arange(R, device=self.ids.device).unsqueeze(1) * self.num_embeddings + self.ids).reshape(-1)
        sorted_keys, order = torch.sort(keys)
        new = torch.ones_like(sorted_keys, dtype=torch.long)
        new[1:] = (sorted_keys[1:] != sorted_keys[:-1]).long()
        seg = torch.cumsum(new, 0) - 1
        summed = self.g.new_zeros(R * N, d, dtype=acc).index_add_(0, seg, self.g.reshape(R * N, d)[order].to(acc))
        seg_sq = summed.pow(2).sum(1)
        seg_record = torch.zeros(R * N, dtype=torch.long, device=keys.device).scatter_(
            0, seg, sorted_keys // self.num_embeddings
        )
        return torch.zeros(R, dtype=acc, device=keys.device).index_add_(0, seg_record, seg_sq), None


def _embedding_outer_cross(e: EmbeddingContribution, o: OuterContribution) -> torch.Tensor:
    """``<grad_r(e), grad_r(o)>`` per record for a table tied to a linear map's weight ``[V, d]``
    (an output projection): ``sum_{t,s} g_o[s][ids_t] (g_e[t] . a_o[s])``, no ``[R, V, d]`` tensor."""
    acc = e._acc()
    R, N1 = e.ids.shape
    go, ao = o.g[:, 0], o.a[:, 0]  # [R, N2, V], [R, N2, d]
    N2 = go.shape[1]
    gathered = torch.gather(go, 2, e.ids.unsqueeze(1).expand(R, N2, N1))  # g_o[s][ids_t]
    dots = torch.matmul(ao, e.g.transpose(1, 2))  # a_o[s] . g_e[t]
    return (gathered.to(acc) * dots.to(acc)).sum((1, 2))


def sum_sq_norms(
    contributions: list[Contribution], policy: NormPolicy
) -> tuple[torch.Tensor, PerRecord | None, list[Contribution]]:
    """Squared per-record norm of the *sum* of contributions to one parameter.

    Returns ``(sq [R], materialised per-record gradients or None, merged contributions)``; the
    merged list is what :meth:`~Contribution.weighted_sum` should be summed over.
    """
    if len(contributions) == 1:  # the common case: one use of the parameter, nothing to merge
        sq, mat = contributions[0].sq_norms(policy)
        return sq, mat, list(contributions)
    outer = [c for c in contributions if isinstance(c, OuterContribution)]
    emb = [c for c in contributions if isinstance(c, EmbeddingContribution)]
    direct = [c for c in contributions if isinstance(c, DirectContribution)]
    other = [c for c in contributions if not isinstance(c, (OuterContribution, EmbeddingContribution, DirectContribution))]
    merged: list[Contribution] = []
    if outer:
        merged.extend(OuterContribution.merge(outer))
    if emb:
        merged.append(EmbeddingContribution.merge(emb))
    if direct:
        merged.append(DirectContribution.merge(direct))
    merged.extend(other)
    if len(merged) == 1:
        sq, mat = merged[0].sq_norms(policy)
        return sq, mat, merged
    first = merged[0]
    nbytes = first.num_records * first.shape.numel() * torch.empty((), dtype=first.dtype).element_size()
    if (
        len(merged) == 2
        and isinstance(merged[0], OuterContribution)
        and isinstance(merged[1], EmbeddingContribution)
        and merged[0].g.shape[1] == 1
        and not policy.materialize_fits(nbytes)
    ):
        o, e = merged  # type: ignore[misc]
        sq_o, _ = o.sq_norms(policy)
        sq_e, _ = e.sq_norms(policy)
        return sq_o + sq_e + 2 * _embedding_outer_cross(e, o), None, merged
    total = merged[0].materialize()
    for c in merged[1:]:
        total = total + c.materialize()
    return _rowsq(total, accumulation_dtype(total.dtype)), PerRecord(total, first.shape), merged


# ----------------------------------------------------------------------------------------
# the rule interface and registry (the rules themselves live in .rules, one module per family)
# ----------------------------------------------------------------------------------------


def to_records(t: torch.Tensor, batch: int, microbatch: int) -> torch.Tensor:
    """``[B, ...] -> [R, b * ..., ]`` merging each microbatch's examples into one record."""
    if t.shape[0] != batch:
        raise ValueError(
            f"the ghost engine needs batch-first activations, got a leading dimension {t.shape[0]} for a batch "
            f"of {batch} (a layer applied to a reshaped or time-major tensor); use engine='functorch'"
        )
    return t.reshape((batch // microbatch, -1) + tuple(t.shape[2:])) if microbatch > 1 else t


class LayerRule:
    """How the ghost engine handles one module type.

    Subclasses set :attr:`param_names` (the module's own parameters the rule covers) and
    implement :meth:`contributions`; :meth:`save` picks what to keep from the forward call
    (default: the first positional input, detached).
    """

    #: direct parameters of the module this rule computes gradients for
    param_names: tuple[str, ...] = ("weight", "bias")

    def unsupported_reason(self, module: nn.Module) -> str | None:
        """``None`` when this module's configuration is supported, else why not."""
        return None

    #: the batch is read from the output alone (dimension 0), the inputs are passed to
    #: :meth:`save` as given (e.g. ``nn.EmbeddingBag`` with a flat input and ``offsets``, one bag
    #: per example)
    output_batched: bool = False

    def movable_batch_dim(self, module: nn.Module, ndim: int, dim: int) -> bool:
        """Whether the rule stays exact when the engine moves the batch from dimension ``dim`` of
        an ``ndim``-D input (and the output) to the front: true for layers acting on trailing
        feature dimensions only (a sequence-first ``Linear``); default: only ``dim == 0``."""
        return dim == 0

    def save(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> Any:
        """What the rule needs later from one forward call (default: the input, detached)."""
        return args[0].detach()

    def contributions(
        self, module: nn.Module, saved: Any, grad_output: torch.Tensor, batch: int, microbatch: int, names: frozenset[str]
    ) -> dict[str, Contribution]:
        """Contributions for the trainable parameters ``names`` (a subset of ``param_names``) from
        one call: ``saved`` from :meth:`save`, ``grad_output`` the gradient of the summed
        (per-microbatch averaged) loss with respect to the call's output, batch first;
        ``batch`` examples grouped into records of ``microbatch`` consecutive examples."""
        raise NotImplementedError


_RULES: dict[type[nn.Module], LayerRule] = {}


def register_ghost_rule(module_type: type[nn.Module], rule: LayerRule) -> None:
    """Make the ghost engine handle ``module_type`` (and subclasses that keep its ``forward``)."""
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"module_type must be an nn.Module subclass, got {module_type!r}")
    if not isinstance(rule, LayerRule):
        raise TypeError(f"rule must be a LayerRule, got {type(rule).__name__}")
    _RULES[module_type] = rule


def ghost_rules() -> dict[type[nn.Module], LayerRule]:
    """The registered rules by module type."""
    return dict(_RULES)


def ghost_rule_for(module: nn.Module) -> LayerRule | None:
    """The rule for ``module``: registered for its type or a base type whose ``forward`` it keeps."""
    for klass in type(module).__mro__:
        rule = _RULES.get(klass)  # type: ignore[arg-type]
        if rule is not None:
            return rule if type(module).forward is klass.forward else None
    return None


_records = to_records  # the previous private name

#: layer rules and the convolution kernel moved to :mod:`.rules`; importable from here as before
_MOVED = {
    "LinearRule": "linear",
    "ConvRule": "conv",
    "ConvContribution": "conv",
    "unfold2d": "conv",
    "EmbeddingRule": "embedding",
    "LayerNormRule": "norm",
    "RMSNormRule": "norm",
    "GroupNormRule": "norm",
    "EvalBatchNormRule": "norm",
}


def __getattr__(name: str):  # PEP 562: resolved on use, so no import cycle with .rules
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(f"{__package__}.rules.{_MOVED[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
