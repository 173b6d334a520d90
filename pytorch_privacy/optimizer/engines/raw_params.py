"""Ghost support for raw parameters used elementwise in a module's own ``forward``.

A learned scale (``x * self.gamma``) or an additive table (``h + self.pos``) is an
``nn.Parameter`` held by a user module that has no ghost rule.  Its per-example gradient is a
reduction of the output gradient: for ``out = x + p`` it is ``g_i`` summed over the dimensions
``p`` is broadcast along, for ``out = x * p`` the same of ``g_i * x_i``.  During the forward a
:class:`torch.overrides.TorchFunctionMode` intercepts every call that takes such a parameter; an
``add``/``sub``/``mul`` with one other operand is tapped like a module output (its output
gradient recorded by the engine's tap), anything else (a matmul, an index, a view of the
parameter) is refused and the engine hands the model to the exact fallback engine.

Which dimension of each tapped output is the batch comes from data flow, as for modules:
:func:`trace_raw_uses` runs the forward on two batch sizes (see :mod:`.probe`).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .ghost_rules import Contribution, DirectContribution, LayerRule

__all__ = ["is_raw_owner", "raw_parameters", "RawParamRule", "RawUseMode", "trace_raw_uses"]

_ADD = {torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__}
_SUB = {torch.sub, torch.Tensor.sub, torch.Tensor.__sub__}
_RSUB = {torch.Tensor.__rsub__}
_MUL = {torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__}


def is_raw_owner(module: nn.Module, rule) -> bool:
    """Whether ``module``'s parameters are treated as raw: a user module without a ghost rule
    (not one of torch's own layers, nor a subclass of a layer with a rule that overrides its
    ``forward``: those use their parameters in ways this module does not cover)."""
    from .ghost_rules import ghost_rules

    if rule is not None or type(module).__module__.startswith("torch."):
        return False
    return not any(isinstance(module, k) for k in ghost_rules())


def raw_parameters(hooked) -> dict[int, tuple[nn.Module, str, str, nn.Parameter]]:
    """``{id(param): (owner, local name, canonical name, param)}`` for the trainable parameters
    of raw owners (:func:`is_raw_owner`)."""
    out = {}
    for mname, m, rule, local in hooked:
        if is_raw_owner(m, rule):
            for pn, canon in local.items():
                p = m._parameters[pn]
                out[id(p)] = (m, pn, canon, p)
    return out


def _kind(func: Callable, args: tuple, kwargs: dict, raw: dict) -> tuple[str | None, int]:
    """``(kind, position of the parameter)`` for a supported use, else ``(None, -1)``."""
    pos = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and id(a) in raw]
    if kwargs or len(args) != 2 or len(pos) != 1:
        return None, -1
    i = pos[0]
    if func in _ADD:
        return "add", i
    if func in _MUL:
        return "mul", i
    if func in _SUB:
        return ("add" if i == 0 else "neg"), i
    if func in _RSUB:  # other - p, with p the receiver (args[0])
        return ("neg" if i == 0 else "add"), i
    return None, -1


class RawUseMode(TorchFunctionMode):
    """Routes every torch call taking a raw parameter to ``on_use(func, args, kwargs, kind, pos)``;
    other calls run unchanged."""

    def __init__(self, raw: dict, on_use: Callable[..., Any]):
        super().__init__()
        self.raw, self.on_use = raw, on_use

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not any(isinstance(a, torch.Tensor) and id(a) in self.raw for a in (*args, *kwargs.values())):
            return func(*args, **kwargs)
        kind, pos = _kind(func, args, kwargs, self.raw)
        return self.on_use(func, args, kwargs, kind, pos)


def unsupported_use(func, args, raw) -> str:
    names = [raw[id(a)][2] for a in args if isinstance(a, torch.Tensor) and id(a) in raw]
    fname = getattr(func, "__name__", repr(func))
    return (
        f"raw parameter(s) {names} are used in {fname}(...), which the ghost engine does not cover (only x + p, "
        "x - p, p - x and x * p with one other operand)"
    )


def trace_raw_uses(model: nn.Module, inputs: Any, raw: dict) -> tuple[dict[tuple[int, int], int | None], str | None]:
    """``({(id(param), k): batch dim of the k-th use's output or None}, problem)`` from forwards
    on two batch sizes (as :func:`~.probe.trace_batch_dims`)."""
    from .base import batch_size_of, call_model
    from .probe import batch_dim_between, isolated, map_batched

    batch = batch_size_of(inputs)
    other = batch - 1 if batch >= 2 else 2
    small = map_batched(inputs, batch, (lambda t: t[: batch - 1]) if batch >= 2 else (lambda t: torch.cat([t, t])))
    shapes: list[dict] = []
    problem: list[str] = []
    with isolated(model, 0) as reset, torch.enable_grad():
        for x in (inputs, small):
            seen: dict[int, list[tuple]] = {}

            def on_use(func, args, kwargs, kind, pos, seen=seen):
                out = func(*args, **kwargs)
                if kind is None:
                    problem.append(unsupported_use(func, args, raw))
                else:
                    seen.setdefault(id(args[pos]), []).append(tuple(out.shape))
                return out

            reset()
            with RawUseMode(raw, on_use):
                call_model(model, x)
            shapes.append(seen)
    if problem:
        return {}, problem[0]
    full, smaller = shapes
    dims: dict[tuple[int, int], int | None] = {}
    for pid, uses in full.items():
        if len(uses) != len(smaller.get(pid, [])):
            return {}, f"raw parameter {raw[pid][2]!r} is used a number of times that depends on the batch size"
        for k, (sa, sb) in enumerate(zip(uses, smaller[pid])):
            d = batch_dim_between(torch.Size(sa), torch.Size(sb), batch, other)
            if d is None:
                why = "carries no batch dimension" if sa == sb else "merges the batch with another dimension"
                return {}, f"the output of use {k} of raw parameter {raw[pid][2]!r} {why} (shape {sa})"
            dims[(pid, k)] = d
    return dims, None


class RawParamRule(LayerRule):
    """Per-example gradients of one elementwise use of a raw parameter; ``saved`` is
    ``(kind, other operand broadcast to the output and batch-first (for mul), local name)``."""

    param_names = ()

    def contributions(self, module, saved, grad_output, batch, microbatch, names) -> dict[str, Contribution]:
        kind, other, pname = saved
        if pname not in names:
            return {}
        shape = module._parameters[pname].shape
        v = grad_output
        if kind == "mul":
            v = v * other
        elif kind == "neg":
            v = -v
        pad = (1,) * (v.dim() - len(shape)) + tuple(shape)
        if len(pad) != v.dim() or pad[0] != 1:
            raise ValueError(f"raw parameter {pname!r} of shape {tuple(shape)} spans the batch dimension")
        v = v.sum_to_size((v.shape[0],) + pad[1:]).reshape(v.shape[0], *shape)
        if microbatch > 1:
            v = v.reshape(batch // microbatch, microbatch, *shape).sum(1)
        return {pname: DirectContribution(v, shape)}


RAW_RULE = RawParamRule()
