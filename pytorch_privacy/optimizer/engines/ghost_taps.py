"""Taps of the ghost engine: how a hooked call's output gradient is recorded, how a shared
(unbatched) input is broadcast so each example gets its own output gradient, and the checks that
keep the hooks honest (parameters used outside a hooked call, calls that differ from the traced
layout).  See :mod:`.ghost_engine`."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import batch_size_of, call_model
from .probe import CallLayout
from .raw_params import RAW_RULE, unsupported_use

__all__ = [
    "Call", "Tap", "CopyTap", "ExpandTap", "expand_batch", "is_inplace_view_error", "consistent_with",
    "verify_expansion", "params_used_outside", "describe", "ForwardRecorder",
]


def describe(mname: str, m: nn.Module) -> str:
    """``module 'name' (Type)`` for messages."""
    return f"module {mname or '<root>'!r} ({type(m).__name__})"


class Call:
    """One forward call of a hooked module: what its rule saved and, after backward, the
    gradient of the loss with respect to its output."""

    __slots__ = ("module", "rule", "local", "saved", "grad", "input_nodes", "input_leaves", "out_dim")

    def __init__(self, module, rule, local, saved, input_nodes, input_leaves, out_dim=0):
        self.module, self.rule, self.local, self.saved = module, rule, local, saved
        self.input_nodes, self.input_leaves = input_nodes, input_leaves
        self.out_dim = out_dim  # where the batch is in the recorded output gradient
        self.grad: torch.Tensor | None = None


class Tap(torch.autograd.Function):
    """Identity on ``y`` (a view) whose backward stores the output gradient on the call record;
    ``anchor`` puts every tap on the path to it.  autograd forbids in-place ops on a custom
    Function's view output: models that do that (``nn.ReLU(inplace=True)`` after a hooked
    layer) get :class:`CopyTap` instead (see :meth:`GhostEngine.compute`)."""

    @staticmethod
    def forward(ctx, anchor, y, call):
        """The tapped output (see the class docstring)."""
        ctx.pp_call = call
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        """Record the output gradient on the call, pass it through."""
        call = ctx.pp_call
        call.grad = grad if call.grad is None else call.grad + grad
        return None, grad, None


class CopyTap(Tap):
    """:class:`Tap` returning a copy, so later in-place ops on the output are allowed."""

    @staticmethod
    def forward(ctx, anchor, y, call):
        """The tapped output (see the class docstring)."""
        ctx.pp_call = call
        return y.clone()


def is_inplace_view_error(err: RuntimeError) -> bool:
    msg = str(err)
    return "is a view and is being modified inplace" in msg and "custom Function" in msg


def consistent_with(lay: CallLayout, x: torch.Tensor, y: torch.Tensor, batch: int) -> bool:
    """Whether a call's input/output shapes agree with its traced layout for this batch."""
    for t, d, shape in ((x, lay.in_dim, lay.in_shape), (y, lay.out_dim, lay.out_shape)):
        s = tuple(t.shape)
        if d is None:
            if s != tuple(shape):
                return False
        elif len(s) != len(shape) or s[d] != batch or s[:d] != tuple(shape[:d]) or s[d + 1 :] != tuple(shape[d + 1 :]):
            return False
    return True


def expand_batch(t: torch.Tensor, batch: int, lead1: bool) -> torch.Tensor:
    """A shared (unbatched) tensor seen by every example: ``[*s] -> [B, *s]`` (or ``[1, *s] -> [B, *s]``)."""
    return t.expand(batch, *t.shape[1:]) if lead1 else t.unsqueeze(0).expand(batch, *t.shape)


class ExpandTap(torch.autograd.Function):
    """For a call whose input carries no batch dimension (a position table indexed by
    ``arange(T)``, a shared buffer): the output is broadcast to a leading batch dimension, so the
    backward pass delivers each example's own output gradient (what broadcasting would have summed
    away).  Valid when the rest of the model broadcasts the output along a leading batch
    dimension anyway, which the engine verifies on the traced batch (:func:`verify_expansion`)."""

    @staticmethod
    def forward(ctx, anchor, y, call, batch, lead1, copy):
        """The tapped output (see the class docstring)."""
        ctx.pp_call, ctx.lead1 = call, lead1
        out = expand_batch(y, batch, lead1)
        return out.contiguous() if copy else out

    @staticmethod
    def backward(ctx, grad):
        """Record the output gradient on the call, pass it through."""
        call = ctx.pp_call
        call.grad = grad if call.grad is None else call.grad + grad
        return None, grad.sum(0, keepdim=ctx.lead1), None, None, None, None


def verify_expansion(model, loss_fn, inputs, targets, layouts, unbatched, rules) -> tuple[frozenset | None, str | None]:
    """Choose how to broadcast the outputs of the unbatched calls to a leading batch dimension
    (``[1, *s] -> [B, *s]`` for a leading size-1 dimension, else ``[*s] -> [B, *s]``), and verify
    on this batch that (a) the per-example losses are unchanged and (b) perturbing example ``j``'s
    copy moves no other example's loss, i.e. example ``i`` uses its copy ``i`` alone (so the
    gradient of that copy is its per-example output gradient).  Returns ``(calls broadcast over
    their leading size-1 dimension, None)`` or ``(None, why not)``."""
    from .probe import isolated

    batch = batch_size_of(inputs)
    names = ", ".join(sorted({describe(rules[mid][0], rules[mid][1]) for mid, _ in unbatched}))
    gen = torch.Generator().manual_seed(1)

    def run(lead1_calls: frozenset, perturb: bool) -> torch.Tensor:
        counts: dict[int, int] = {}

        def hook(module, args, output):
            k = counts.get(id(module), 0)
            counts[id(module)] = k + 1
            if (id(module), k) not in unbatched or not isinstance(output, torch.Tensor):
                return None
            out = expand_batch(output, batch, (id(module), k) in lead1_calls)
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
            with isolated(model, 0) as reset, torch.no_grad():
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


def params_used_outside(losses: torch.Tensor, trainable: dict[str, nn.Parameter]) -> list[str]:
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
        if isinstance(call, Call):
            stack.extend(call.input_nodes)
            found.update(names[id(t)] for t in call.input_leaves if id(t) in names)
            continue
        var = getattr(node, "variable", None)
        if var is not None and id(var) in names:
            found.add(names[id(var)])
        stack.extend(f for f, _ in node.next_functions)
    return sorted(found)


class ForwardRecorder:
    """The state of one ghost forward pass: forward hooks for the hooked modules and the
    raw-parameter handler tap each call according to its traced layout (moving the batch to the
    front, or broadcasting a shared input to the batch) and collect :class:`Call` records;
    ``mismatch`` lists calls that differ from the traced layout (the batch is then recomputed by
    the exact fallback engine)."""

    def __init__(self, layouts, lead1_calls, raw, raw_dims, batch: int, tap: type[Tap], device):
        self.layouts, self.lead1_calls, self.raw, self.raw_dims = layouts, lead1_calls, raw, raw_dims
        self.batch, self.tap = batch, tap
        self.anchor = torch.zeros((), device=device, requires_grad=True)
        self.calls: list[Call] = []
        self.mismatch: list[str] = []
        self._counts: dict[int, int] = {}
        self._raw_counts: dict[int, int] = {}

    def module_hook(self, mname: str, rule, local: dict[str, str]):
        """A forward hook (``with_kwargs=True``) for one hooked module."""

        def hook(module, args, kwargs, output):
            if torch._C._current_graph_task_id() != -1:
                return None  # a forward recomputed by non-reentrant checkpointing during backward
            k = self._counts.get(id(module), 0)
            self._counts[id(module)] = k + 1
            if not (torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad):
                return None
            first = args[0] if args and isinstance(args[0], torch.Tensor) else None
            lay = self.layouts.get((id(module), k))
            tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor) and t.requires_grad]
            nodes = [t.grad_fn for t in tensors if t.grad_fn is not None]
            leaves = [t for t in tensors if t.grad_fn is None]
            if rule.output_batched and lay is not None and lay.out_dim == 0 and output.shape[0] == self.batch:
                call = Call(module, rule, local, rule.save(module, args, kwargs, output), nodes, leaves, 0)
                self.calls.append(call)
                return self.tap.apply(self.anchor, output, call)
            if lay is None or first is None or not consistent_with(lay, first, output, self.batch):
                self.mismatch.append(
                    f"{describe(mname, module)} call {k} saw input {None if first is None else tuple(first.shape)} / "
                    f"output {tuple(output.shape)}, unlike the traced layout"
                )
                return None
            if lay.in_dim is None:  # a shared input: every example uses it; give each its own copy
                lead1 = (id(module), k) in self.lead1_calls
                x, y = expand_batch(first, self.batch, lead1), expand_batch(output.detach(), self.batch, lead1)
                call = Call(module, rule, local, rule.save(module, (x, *args[1:]), kwargs, y), nodes, leaves, 0)
                self.calls.append(call)
                return ExpandTap.apply(self.anchor, output, call, self.batch, lead1, self.tap is CopyTap)
            d = lay.in_dim
            x = first if d == 0 else first.movedim(d, 0)
            y = output if d == 0 else output.movedim(d, 0)
            call = Call(module, rule, local, rule.save(module, (x, *args[1:]), kwargs, y), nodes, leaves, d)
            self.calls.append(call)
            return self.tap.apply(self.anchor, output, call)

        return hook

    def on_raw_use(self, func, args, kwargs, kind, pos):
        """Handler of :class:`~.raw_params.RawUseMode`: run the op and tap its output."""
        out = func(*args, **kwargs)
        if torch._C._current_graph_task_id() != -1:
            return out  # recomputed during backward (non-reentrant checkpointing)
        if kind is None:
            self.mismatch.append(unsupported_use(func, args, self.raw))
            return out
        p = args[pos]
        k = self._raw_counts.get(id(p), 0)
        self._raw_counts[id(p)] = k + 1
        d = self.raw_dims.get((id(p), k))
        if d is None or out.shape[d] != self.batch:
            self.mismatch.append(f"use {k} of raw parameter {self.raw[id(p)][2]!r} differs from the traced layout")
            return out
        if not (torch.is_grad_enabled() and out.requires_grad):
            return out
        owner, local_name, canon, _ = self.raw[id(p)]
        other = args[1 - pos]
        saved_other = None
        if kind == "mul":
            t = other.detach() if isinstance(other, torch.Tensor) else torch.as_tensor(other, dtype=out.dtype)
            saved_other = torch.broadcast_to(t, out.shape).movedim(d, 0)
        tensors = [other] if isinstance(other, torch.Tensor) and other.requires_grad else []
        call = Call(
            owner, RAW_RULE, {local_name: canon}, (kind, saved_other, local_name),
            [t.grad_fn for t in tensors if t.grad_fn is not None], [t for t in tensors if t.grad_fn is None], d,
        )
        self.calls.append(call)
        return self.tap.apply(self.anchor, out, call)
