"""The ghost-clipping / book-keeping engine: per-example norms and clipped sums without
materialising per-example gradients and without a second backward pass.

One ``compute()`` runs one forward and one backward pass.  Forward hooks, registered on the
modules that own trainable parameters for the duration of the call only, save each call's input
and route its output through a tap that records the output gradient.  The backward pass is
``torch.autograd.grad(loss, anchor)`` where every tap depends on a dummy ``anchor``: autograd
then propagates output gradients through the network but computes no parameter gradient at all
(those are what the rules in :mod:`.ghost_rules` compute per example).  From the saved
activations and output gradients, :class:`GhostGradients` gives exact per-example norms (ghost
norms, Li et al. 2022, arXiv 2110.05679; mixed per layer, Bu et al. 2022, arXiv 2205.10683) and
the clipped sum ``sum_i c_i grad_i`` by einsum (book-keeping, Bu et al. 2022, arXiv 2210.00038).

Safety: before the backward pass the autograd graph is walked once; a trainable parameter that
is reached other than through the forward of a module that owns it (e.g. ``F.linear(h,
emb.weight)`` in a parent module) would make ghost norms wrong, so the engine then warns and
hands the model to the next engine (functorch, or loop) for good.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import torch
from torch import nn

from .base import (
    GradientEngine,
    PerExampleGradients,
    accumulation_dtype,
    available_engines,
    batch_size_of,
    call_model,
    empty_gradients,
    num_records_for,
    register_engine,
)
from .functional import check_losses
from .checkpointing import refuse_reentrant_checkpoint
from .raw_params import RAW_RULE, RawUseMode, is_raw_owner, raw_parameters, trace_raw_uses, unsupported_use
from .probe import CallLayout, input_signature, model_signature, trace_batch_dims, verified_independent
from .ghost_rules import Contribution, LayerRule, NormPolicy, PerRecord, ghost_rule_for, ghost_rules, sum_sq_norms

__all__ = ["GhostEngine", "GhostGradients"]


class _Call:
    """One forward call of a hooked module: what its rule saved and, after backward, the
    gradient of the loss with respect to its output."""

    __slots__ = ("module", "rule", "local", "saved", "grad", "input_nodes", "input_leaves", "out_dim")

    def __init__(self, module, rule, local, saved, input_nodes, input_leaves, out_dim=0):
        self.module, self.rule, self.local, self.saved = module, rule, local, saved
        self.input_nodes, self.input_leaves = input_nodes, input_leaves
        self.out_dim = out_dim  # where the batch is in the recorded output gradient
        self.grad: torch.Tensor | None = None


class _Tap(torch.autograd.Function):
    """Identity on ``y`` (a view) whose backward stores the output gradient on the call record;
    ``anchor`` puts every tap on the path to it.  autograd forbids in-place ops on a custom
    Function's view output: models that do that (``nn.ReLU(inplace=True)`` after a hooked
    layer) get :class:`_CopyTap` instead (see :meth:`GhostEngine.compute`)."""

    @staticmethod
    def forward(ctx, anchor, y, call):
        ctx.pp_call = call
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        call = ctx.pp_call
        call.grad = grad if call.grad is None else call.grad + grad
        return None, grad, None


class _CopyTap(_Tap):
    """:class:`_Tap` returning a copy, so later in-place ops on the output are allowed."""

    @staticmethod
    def forward(ctx, anchor, y, call):
        ctx.pp_call = call
        return y.clone()


def _is_inplace_view_error(err: RuntimeError) -> bool:
    msg = str(err)
    return "is a view and is being modified inplace" in msg and "custom Function" in msg


def _hooked_modules(model: nn.Module, trainable: dict[str, nn.Parameter]) -> list[tuple[str, nn.Module, LayerRule | None, dict[str, str]]]:
    """``(module name, module, rule, {local param name: canonical name})`` for every module that
    directly owns a trainable parameter."""
    canon = {id(p): n for n, p in trainable.items()}
    out = []
    for mname, m in model.named_modules():
        local = {pn: canon[id(p)] for pn, p in m._parameters.items() if p is not None and id(p) in canon}
        if local:
            out.append((mname, m, ghost_rule_for(m), local))
    return out


def _describe(mname: str, m: nn.Module) -> str:
    return f"module {mname or '<root>'!r} ({type(m).__name__})"


@register_engine
class GhostEngine(GradientEngine):
    """Ghost norms + book-keeping for models built from supported layers.

    Supported (every trainable parameter must belong to one of these, and be used only through
    that module's forward): ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d``, ``nn.Embedding`` (no
    ``max_norm`` / ``scale_grad_by_freq``), ``nn.LayerNorm``, ``nn.GroupNorm``, ``nn.RMSNorm``,
    ``nn.BatchNorm1d/2d/3d`` in eval mode, and the drop-ins of :mod:`.dp_layers` built from
    ``nn.Linear`` (``DPRNN``, ``DPGRU``, ``DPLSTM``, ``DPMultiheadAttention``); more via
    :func:`~.ghost_rules.register_ghost_rule`.  Frozen parameters,
    buffers, modules called several times and parameters tied between supported modules (e.g. an
    embedding and an output projection) are handled: norms are of the *sum* of all uses.
    Layers must see batch-first activations (leading dimension = batch).

    Args:
        model, loss_fn: see :class:`~.base.GradientEngine`.
        norm_mode: ``"auto"`` (per layer by cost), ``"ghost"`` or ``"materialize"``; see
            :class:`~.ghost_rules.NormPolicy`.
        memory_budget_bytes: per-layer bound on materialised per-example gradients in ``"auto"``.
        check_graph: walk the autograd graph on every call to detect parameter uses that the
            hooks cannot see (cheap; disable only for models known to be safe).
    """

    name = "ghost"
    priority = 20

    def __init__(
        self,
        model: nn.Module,
        loss_fn,
        *,
        norm_mode: str = "auto",
        memory_budget_bytes: int = 256 * 2**20,
        check_graph: bool = True,
    ):
        super().__init__(model, loss_fn)
        self.policy = NormPolicy(norm_mode, memory_budget_bytes)
        self.check_graph = check_graph
        self.fallback: GradientEngine | None = None
        self._warned_ambiguous = False
        self._switched = False  # True once the model is handed to the fallback for good
        self._tap: type[_Tap] = _Tap
        self._layouts: dict[tuple, tuple] = {}  # input signature -> traced batch layout of every call

    @classmethod
    def unsupported_reason(cls, model: nn.Module) -> str | None:
        """Why not, naming the first module that holds a trainable parameter without a ghost
        rule (or in an unsupported configuration); ``None`` when every one is covered."""
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        for mname, m, rule, local in _hooked_modules(model, trainable):
            if is_raw_owner(m, rule):
                continue  # a user module's raw parameters: elementwise uses are tapped (.raw_params)
            if rule is None:
                supported = sorted({k.__name__ for k in ghost_rules()})
                return (
                    f"{_describe(mname, m)} holds trainable parameters {sorted(local)} and has no ghost rule "
                    f"(supported: {', '.join(supported)}); freeze it, or use engine='functorch'"
                )
            extra = sorted(set(local) - set(rule.param_names))
            if extra:
                return f"{_describe(mname, m)} holds trainable parameters {extra} that its ghost rule does not cover"
            why = rule.unsupported_reason(m)
            if why:
                return f"{_describe(mname, m)}: {why}"
        return None

    def _fallback_engine(self) -> GradientEngine:
        if self.fallback is None:
            for cls in sorted(available_engines().values(), key=lambda c: -c.priority):
                if cls.priority < self.priority and cls.unsupported_reason(self.model) is None:
                    self.fallback = cls(self.model, self.loss_fn)
                    break
            else:  # pragma: no cover - the loop engine supports everything
                raise ValueError("no fallback engine supports this model")
        return self.fallback

    def compute(self, inputs: Any, targets: Any, *, microbatch_size: int | None = None) -> PerExampleGradients:
        """One forward and one backward pass; returns lazily evaluated :class:`GhostGradients`.

        Falls back for good (with a warning) to the next engine when a parameter is used outside
        its module's forward or a layer sees non-batch-first activations.  If the model modifies
        a hooked layer's output in place, the call is redone with copying taps (remembered).
        """
        try:
            return self._compute(inputs, targets, microbatch_size)
        except RuntimeError as err:
            if self._tap is _CopyTap or not _is_inplace_view_error(err):
                raise
            self._tap = _CopyTap
            return self._compute(inputs, targets, microbatch_size)

    def _switch(self, why: str) -> None:
        """Hand the model to the exact fallback engine for good, with a warning saying why."""
        self._switched = True
        warnings.warn(
            f"ghost engine: {why}; using the {self._fallback_engine().name!r} engine for this model instead",
            RuntimeWarning,
            stacklevel=4,
        )

    def _layouts_for(self, inputs: Any, targets: Any, hooked, raw: dict) -> tuple[dict, frozenset, dict] | None:
        """``(layout of every hooked call, unbatched calls broadcast over a leading size-1 dim)``
        for this input signature (traced once, see :func:`~.probe.trace_batch_dims`); ``None``
        after switching to the fallback engine because some call has no batch dimension the
        rules can use."""
        key = (model_signature(self.model), input_signature(inputs, targets))
        cached = self._layouts.get(key)
        if cached is not None:
            return cached
        names = {m: mname for mname, m, _, _ in hooked}
        layouts = trace_batch_dims(self.model, inputs, names)
        rules = {id(m): (mname, m, rule) for mname, m, rule, _ in hooked}
        problems = []
        unbatched = set()
        for (mid, k), lay in layouts.items():
            mname, m, rule = rules[mid]
            if lay.problem:
                problems.append(lay.problem)
            elif (lay.in_dim is None) != (lay.out_dim is None) or (lay.in_dim is not None and lay.in_dim != lay.out_dim):
                problems.append(
                    f"{_describe(mname, m)} has its batch in dimension {lay.in_dim} of its input but {lay.out_dim} of its "
                    "output"
                )
            elif lay.in_dim is None:
                unbatched.add((mid, k))
            elif lay.in_dim != 0 and not rule.movable_batch_dim(m, len(lay.in_shape), lay.in_dim):
                problems.append(
                    f"{_describe(mname, m)} sees its batch in dimension {lay.in_dim} of an input of shape {lay.in_shape}, "
                    "which its ghost rule cannot move to the front"
                )
        lead1: frozenset = frozenset()
        raw_dims: dict = {}
        if not problems and raw:
            raw_dims, bad = trace_raw_uses(self.model, inputs, raw)
            if bad:
                problems.append(bad)
        if not problems and unbatched:
            lead1, bad = _verify_expansion(self.model, self.loss_fn, inputs, targets, layouts, unbatched, rules)
            if bad:
                problems.append(bad)
        if problems:
            self._switch("; ".join(problems[:2]))
            return None
        if len(self._layouts) >= 64:  # many input signatures (variable lengths): keep the newest
            self._layouts.pop(next(iter(self._layouts)))
        self._layouts[key] = (layouts, lead1, raw_dims)
        return self._layouts[key]

    def _compute(self, inputs: Any, targets: Any, microbatch_size: int | None) -> PerExampleGradients:
        if self._switched:
            return self._fallback_engine().compute(inputs, targets, microbatch_size=microbatch_size)
        trainable = self.trainable_parameters()
        batch = batch_size_of(inputs)
        num_records_for(batch, microbatch_size)
        if batch == 0:
            return empty_gradients(trainable)
        verified_independent(self.model, self.loss_fn, inputs, targets)
        b = microbatch_size or 1
        hooked = _hooked_modules(self.model, trainable)
        raw = raw_parameters(hooked)
        raw_owners = {id(owner) for owner, *_ in raw.values()}
        hooked = [h for h in hooked if id(h[1]) not in raw_owners]
        for mname, m, rule, local in hooked:  # the model may have changed since selection
            why = "no ghost rule" if rule is None else rule.unsupported_reason(m)
            if why:
                raise ValueError(f"ghost engine: {_describe(mname, m)}: {why}; use engine='functorch'")
        traced = self._layouts_for(inputs, targets, hooked, raw)
        if traced is None:
            return self._fallback_engine().compute(inputs, targets, microbatch_size=microbatch_size)
        layouts, lead1_calls, raw_dims = traced
        device = next(iter(trainable.values())).device if trainable else None
        anchor = torch.zeros((), device=device, requires_grad=True)
        calls: list[_Call] = []
        tap = self._tap
        counts: dict[int, int] = {}
        mismatch: list[str] = []

        def make_hook(mname: str, rule: LayerRule, local: dict[str, str]):
            def hook(module, args, kwargs, output):
                k = counts.get(id(module), 0)
                counts[id(module)] = k + 1
                if not (torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad):
                    return None
                first = args[0] if args and isinstance(args[0], torch.Tensor) else None
                lay = layouts.get((id(module), k))
                if lay is None or first is None or not _consistent(lay, first, output, batch):
                    mismatch.append(
                        f"{_describe(mname, module)} call {k} saw input "
                        f"{None if first is None else tuple(first.shape)} / output {tuple(output.shape)}, unlike the "
                        "traced layout"
                    )
                    return None
                tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor) and t.requires_grad]
                nodes = [t.grad_fn for t in tensors if t.grad_fn is not None]
                leaves = [t for t in tensors if t.grad_fn is None]
                if lay.in_dim is None:  # a shared input: every example uses it; give each its own copy
                    lead1 = (id(module), k) in lead1_calls
                    x, y = _expand(first, batch, lead1), _expand(output.detach(), batch, lead1)
                    call = _Call(module, rule, local, rule.save(module, (x, *args[1:]), kwargs, y), nodes, leaves, 0)
                    calls.append(call)
                    return _ExpandTap.apply(anchor, output, call, batch, lead1, tap is _CopyTap)
                d = lay.in_dim
                x = first if d == 0 else first.movedim(d, 0)
                y = output if d == 0 else output.movedim(d, 0)
                call = _Call(module, rule, local, rule.save(module, (x, *args[1:]), kwargs, y), nodes, leaves, d)
                calls.append(call)
                return tap.apply(anchor, output, call)

            return hook

        raw_counts: dict[int, int] = {}

        def on_raw_use(func, args, kwargs, kind, pos):
            out = func(*args, **kwargs)
            if kind is None:
                mismatch.append(unsupported_use(func, args, raw))
                return out
            p = args[pos]
            k = raw_counts.get(id(p), 0)
            raw_counts[id(p)] = k + 1
            d = raw_dims.get((id(p), k))
            if d is None or not (torch.is_grad_enabled() and out.requires_grad) or out.shape[d] != batch:
                if d is None or out.shape[d] != batch:
                    mismatch.append(f"use {k} of raw parameter {raw[id(p)][2]!r} differs from the traced layout")
                return out
            owner, local_name, canon, _ = raw[id(p)]
            other = args[1 - pos]
            saved_other = None
            if kind == "mul":
                t = other.detach() if isinstance(other, torch.Tensor) else torch.as_tensor(other, dtype=out.dtype)
                saved_other = torch.broadcast_to(t, out.shape).movedim(d, 0)
            tensors = [other] if isinstance(other, torch.Tensor) and other.requires_grad else []
            call = _Call(
                owner, RAW_RULE, {local_name: canon}, (kind, saved_other, local_name),
                [t.grad_fn for t in tensors if t.grad_fn is not None], [t for t in tensors if t.grad_fn is None], d,
            )
            calls.append(call)
            return tap.apply(anchor, out, call)

        handles = []
        outside: list[str] = []
        try:
            for mname, m, rule, local in hooked:
                handles.append(m.register_forward_hook(make_hook(mname, rule, local), with_kwargs=True))
            with torch.enable_grad(), refuse_reentrant_checkpoint(), (
                RawUseMode(raw, on_raw_use) if raw else contextlib.nullcontext()
            ):
                output = call_model(self.model, inputs)
                losses = self.loss_fn(output, targets)
                check_losses(losses, batch)
                del output
                if self.check_graph and losses.requires_grad and not mismatch:
                    outside = _params_used_outside(losses, trainable)
                if not (outside or mismatch):
                    total = losses.sum() if b == 1 else losses.sum() / b
                    if total.requires_grad and calls:
                        torch.autograd.grad(total, anchor, allow_unused=True)
        finally:
            for h in handles:
                h.remove()
        if mismatch and not outside:
            # shapes that differ from the traced layout for the same input signature (data-dependent
            # shapes): this batch is computed by the exact fallback engine
            del losses, calls
            if not self._warned_ambiguous:
                self._warned_ambiguous = True
                warnings.warn(
                    "ghost engine: " + "; ".join(mismatch[:2]) + "; such batches are computed with the "
                    f"{self._fallback_engine().name!r} engine (exact, slower)",
                    RuntimeWarning,
                    stacklevel=3,
                )
            return self._fallback_engine().compute(inputs, targets, microbatch_size=microbatch_size)
        if outside:
            del losses, calls
            self._switch(
                f"trainable parameter(s) {outside} are used outside the forward of the module that owns "
                "them (e.g. F.linear(h, embedding.weight)), which its hooks cannot see"
            )
            return self._fallback_engine().compute(inputs, targets, microbatch_size=microbatch_size)
        return GhostGradients(trainable, calls, losses.detach(), b, self.policy)


def _consistent(lay: CallLayout, x: torch.Tensor, y: torch.Tensor, batch: int) -> bool:
    """Whether a call's input/output shapes agree with its traced layout for this batch."""
    for t, d, shape in ((x, lay.in_dim, lay.in_shape), (y, lay.out_dim, lay.out_shape)):
        if d is None:
            if tuple(t.shape) != tuple(shape):
                return False
        elif t.dim() != len(shape) or t.shape[d] != batch or any(
            t.shape[i] != shape[i] for i in range(t.dim()) if i != d
        ):
            return False
    return True


def _expand(t: torch.Tensor, batch: int, lead1: bool) -> torch.Tensor:
    """A shared (unbatched) tensor seen by every example: ``[*s] -> [B, *s]`` (or ``[1, *s] -> [B, *s]``)."""
    return t.expand(batch, *t.shape[1:]) if lead1 else t.unsqueeze(0).expand(batch, *t.shape)


class _ExpandTap(torch.autograd.Function):
    """For a call whose input carries no batch dimension (a position table indexed by
    ``arange(T)``, a shared buffer): the output is broadcast to a leading batch dimension, so the
    backward pass delivers each example's own output gradient (what broadcasting would have summed
    away).  Valid when the rest of the model broadcasts the output along a leading batch
    dimension anyway, which the engine verifies on the traced batch (:func:`_verify_expansion`)."""

    @staticmethod
    def forward(ctx, anchor, y, call, batch, lead1, copy):
        ctx.pp_call, ctx.lead1 = call, lead1
        out = _expand(y, batch, lead1)
        return out.contiguous() if copy else out

    @staticmethod
    def backward(ctx, grad):
        call = ctx.pp_call
        call.grad = grad if call.grad is None else call.grad + grad
        return None, grad.sum(0, keepdim=ctx.lead1), None, None, None, None


def _verify_expansion(model, loss_fn, inputs, targets, layouts, unbatched, rules) -> tuple[frozenset | None, str | None]:
    """Choose how to broadcast the outputs of the unbatched calls to a leading batch dimension
    (``[1, *s] -> [B, *s]`` for a leading size-1 dimension, else ``[*s] -> [B, *s]``), and verify
    on this batch that (a) the per-example losses are unchanged and (b) perturbing example ``j``'s
    copy moves no other example's loss, i.e. example ``i`` uses its copy ``i`` alone (so the
    gradient of that copy is its per-example output gradient).  Returns ``(calls broadcast over
    their leading size-1 dimension, None)`` or ``(None, why not)``."""
    from .probe import _isolated

    batch = batch_size_of(inputs)
    names = ", ".join(sorted({_describe(rules[mid][0], rules[mid][1]) for mid, _ in unbatched}))
    gen = torch.Generator().manual_seed(1)

    def run(lead1_calls: frozenset, perturb: bool) -> torch.Tensor:
        counts: dict[int, int] = {}

        def hook(module, args, output):
            k = counts.get(id(module), 0)
            counts[id(module)] = k + 1
            if (id(module), k) not in unbatched or not isinstance(output, torch.Tensor):
                return None
            out = _expand(output, batch, (id(module), k) in lead1_calls)
            if perturb and batch > 1:
                out = out.clone()
                noise = torch.randn(out.shape[1:], generator=gen, dtype=torch.float64).to(out.dtype).to(out.device)
                out[batch - 1] += noise * (out[batch - 1].abs().mean() + 1)
            return out

        handles = [rules[mid][1].register_forward_hook(hook) for mid in {mid for mid, _ in unbatched}]
        try:
            return loss_fn(call_model(model, inputs), targets)
        finally:
            for h in handles:
                h.remove()

    leading = frozenset(
        key for key in unbatched if layouts[key].out_shape[:1] == (1,) and layouts[key].in_shape[:1] == (1,)
    )
    err = "its output is not simply broadcast along a leading batch dimension"
    for lead1_calls in dict.fromkeys((leading, frozenset())):
        try:
            with _isolated(model, 0) as reset, torch.no_grad():
                plain = loss_fn(call_model(model, inputs), targets)
                reset()
                same = run(lead1_calls, False)
                reset()
                moved = run(lead1_calls, True)
        except Exception as e:  # noqa: BLE001 - any failure means this broadcast is not transparent
            err = f"broadcasting its output to the batch fails ({str(e).splitlines()[0][:120]})"
            continue
        if plain.shape != same.shape or not torch.allclose(plain, same, rtol=1e-5, atol=1e-6, equal_nan=True):
            continue
        others = (moved - same)[: batch - 1].abs()
        if bool((others > 1e-5 * (same[: batch - 1].abs() + 1e-3)).any()):
            continue
        return lead1_calls, None
    return None, f"{names} use(s) an input without a batch dimension, and {err}"


def _params_used_outside(losses: torch.Tensor, trainable: dict[str, nn.Parameter]) -> list[str]:
    """Names of trainable parameters reached in the autograd graph of ``losses`` other than
    through a tapped module call (whose internals are skipped; the walk resumes at its inputs)."""
    names = {id(p): n for n, p in trainable.items()}
    found: set[str] = set()
    seen: dict[int, Any] = {}
    stack = [losses.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen[id(node)] = node  # keep alive so ids stay unique
        call = getattr(node, "pp_call", None)
        if isinstance(call, _Call):
            stack.extend(call.input_nodes)
            found.update(names[id(t)] for t in call.input_leaves if id(t) in names)
            continue
        var = getattr(node, "variable", None)
        if var is not None and id(var) in names:
            found.add(names[id(var)])
        stack.extend(f for f, _ in node.next_functions)
    return sorted(found)


class GhostGradients(PerExampleGradients):
    """Per-record gradients held implicitly as (activation, output gradient) pairs.

    :meth:`norms` and :meth:`weighted_sum` never form ``[R, *param.shape]`` for layers where
    the ghost route is cheaper; :meth:`materialize` does (for convenience and tests).
    """

    def __init__(self, trainable: dict[str, nn.Parameter], calls: list[_Call], losses: torch.Tensor, microbatch: int, policy: NormPolicy):
        self.names = tuple(trainable)
        self._params = {n: (p.shape, p.dtype, p.device) for n, p in trainable.items()}
        self._calls = calls
        self._losses = losses
        self._microbatch = microbatch
        self._policy = policy
        self._records = losses.shape[0] // microbatch
        self._contribs: dict[str, list[Contribution]] | None = None
        self._norms: torch.Tensor | None = None
        self._materialized: dict[str, PerRecord] = {}

    @property
    def losses(self) -> torch.Tensor:
        return self._losses

    @property
    def num_records(self) -> int:
        return self._records

    def _contributions(self) -> dict[str, list[Contribution]]:
        if self._contribs is None:
            contribs: dict[str, list[Contribution]] = {n: [] for n in self.names}
            for call in self._calls:
                if call.grad is None:  # output did not reach the loss
                    continue
                grad = call.grad if call.out_dim == 0 else call.grad.movedim(call.out_dim, 0)
                parts = call.rule.contributions(
                    call.module, call.saved, grad, self._losses.shape[0], self._microbatch, frozenset(call.local)
                )
                for pn, c in parts.items():
                    contribs[call.local[pn]].append(c)
            self._calls = []  # free activations not captured by contributions
            self._contribs = contribs
        return self._contribs

    def _zeros(self, name: str, records: int | None = None) -> torch.Tensor:
        shape, dtype, device = self._params[name]
        lead = () if records is None else (records,)
        return torch.zeros(lead + tuple(shape), dtype=dtype, device=device)

    def norms(self) -> torch.Tensor:
        """Exact per-record L2 norms over all trainable parameters (ghost or materialised per
        layer, see :class:`~.ghost_rules.NormPolicy`); cached."""
        if self._norms is None:
            parts = []
            for name, cs in self._contributions().items():
                if not cs:
                    continue
                s, mat, merged = sum_sq_norms(cs, self._policy)
                self._contribs[name] = merged  # type: ignore[index]
                if mat is not None and self._policy.materialize_fits(mat.nbytes):
                    self._materialized[name] = mat
                parts.append(s)
            if not parts:
                dt = accumulation_dtype(next(iter(self._params.values()))[1]) if self._params else torch.float32
                sq = torch.zeros(self._records, dtype=dt, device=self._losses.device)
            elif len(parts) == 1:
                sq = parts[0]
            else:
                dt = parts[0].dtype
                sq = torch.stack([p if p.dtype == dt else p.to(dt) for p in parts]).sum(0)
            self._norms = sq.sqrt()
        return self._norms

    def weighted_sum(self, coefficients: torch.Tensor) -> dict[str, torch.Tensor]:
        """``sum_r c_r grad_r`` per parameter, by book-keeping (one matmul per layer use) or from
        per-layer gradients materialised by :meth:`norms`.  Records with ``c_r == 0`` contribute
        exact zeros even when their activations or gradients are not finite."""
        if coefficients.shape != (self._records,):
            raise ValueError(f"coefficients must have shape [{self._records}], got {tuple(coefficients.shape)}")
        # masking costs a pass over the data; skip it when every record is known finite, which
        # is free to check on the CPU (on accelerators it would be a host sync: always mask)
        mask = True
        if self._norms is not None and self._norms.device.type == "cpu":
            mask = not bool(torch.isfinite(self._norms).all())
        out = {}
        for name, cs in self._contributions().items():
            if name in self._materialized:
                out[name] = self._materialized[name].weighted_sum(coefficients, mask)
            elif not cs:
                out[name] = self._zeros(name)
            else:
                total = cs[0].weighted_sum(coefficients, mask)
                for c in cs[1:]:
                    total = total + c.weighted_sum(coefficients, mask)
                out[name] = total
        return out

    def materialize(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, cs in self._contributions().items():
            if name in self._materialized:
                out[name] = self._materialized[name].materialize()
            elif not cs:
                out[name] = self._zeros(name, self._records)
            else:
                total = cs[0].materialize()
                for c in cs[1:]:
                    total = total + c.materialize()
                out[name] = total
        return out

