"""One traversal of a model per step: its structure signature, trainable and frozen
parameters, and buffers.

Every engine needs the same facts about the model at each step: which parameters are trainable
(and under which names), the frozen parameters and buffers to pass to ``functional_call``, and a
signature of the structure that keys the per-model caches (independence verdicts, traced batch
layouts, hooked modules).  ``named_parameters()``, ``named_buffers()``, ``modules()`` and
``parameters()`` each walk the module tree again; :func:`scan_model` walks it once and derives
all of them, with the same names and the same de-duplication of shared modules and tied
parameters as ``nn.Module``'s own iterators.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["ModelScan", "scan_model"]


@dataclass(frozen=True)
class ModelScan:
    """What one walk of the module tree found.

    Attributes:
        signature: hashable ``(modules, parameters)``: every module as ``(id, training)``
            and every parameter as ``(id, requires_grad)``, in traversal order; equal
            signatures mean the same modules, parameters, modes and trainable set.
        trainable: ``{name: parameter}`` with ``requires_grad`` (tied parameters once).
        frozen: ``{name: parameter}`` without ``requires_grad``.
        buffers: ``{name: buffer}``.
        modules: ``((name, module), ...)`` as ``named_modules()`` gives them.
    """

    signature: tuple
    trainable: dict[str, nn.Parameter]
    frozen: dict[str, nn.Parameter]
    buffers: dict[str, torch.Tensor]
    modules: tuple[tuple[str, nn.Module], ...]


def scan_model(model: nn.Module) -> ModelScan:
    """Walk ``model`` once (see the module docstring)."""
    modules = tuple(model.named_modules())
    trainable: dict[str, nn.Parameter] = {}
    frozen: dict[str, nn.Parameter] = {}
    buffers: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    seen_buffers: set[int] = set()
    mod_sig = []
    param_sig = []
    for mname, m in modules:
        mod_sig.append((id(m), m.training))
        prefix = mname + "." if mname else ""
        for pn, p in m._parameters.items():
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            param_sig.append((id(p), p.requires_grad))
            (trainable if p.requires_grad else frozen)[prefix + pn] = p
        for bn, b in m._buffers.items():
            if b is None or id(b) in seen_buffers:
                continue
            seen_buffers.add(id(b))
            buffers[prefix + bn] = b
    return ModelScan((tuple(mod_sig), tuple(param_sig)), trainable, frozen, buffers, modules)
