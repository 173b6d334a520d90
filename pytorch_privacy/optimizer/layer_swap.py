"""Automatic, announced swap of fused layers for DP drop-ins, keeping a wrapped optimizer valid.

``nn.LSTM``/``nn.GRU``/``nn.RNN`` and ``nn.MultiheadAttention`` hide their parameter uses from
the ghost engine (fused kernels, functional projections), so a model holding them would step
on a slower engine (an ``nn.LSTM`` classifier about 20x non-private).  With ``engine="auto"``
:class:`~pytorch_privacy.optimizer.DPOptimizer` calls :func:`swap_layers_for_optimizer`: the
layers are replaced in place by drop-ins computing the same function from ``nn.Linear`` maps
(:func:`~pytorch_privacy.optimizer.engines.swap.swap_to_dp_layers`, announced by a warning, with
the native ``state_dict`` keys kept), and the wrapped ``torch.optim`` optimizer's parameter
groups are re-pointed from each old parameter to its replacement(s) (``in_proj_weight`` becomes
the three q/k/v weights), so nothing the user holds goes stale except references to the old
layer objects themselves.  An optimizer that already holds state for a swapped parameter
(momentum buffers) is refused with the fix, rather than silently dropping that state.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["swap_layers_for_optimizer", "swappable_layers"]


def swappable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{qualified name: module}`` of the layers :func:`swap_layers_for_optimizer` would swap."""
    from .engines.swap import why_not_swappable, dp_layer_for

    return {
        n: m for n, m in model.named_modules() if n and dp_layer_for(m) is not None and why_not_swappable(m) is None
    }


def _replacements(old: nn.Module, new: nn.Module) -> dict[int, list[nn.Parameter]]:
    """``{id(old parameter): [new parameters]}`` for one swapped layer."""
    mapping = {torch_name: own for torch_name, own in new._name_map()}  # type: ignore[operator]
    new_params = dict(new.named_parameters())
    out: dict[int, list[nn.Parameter]] = {}
    for name, p in old.named_parameters():
        if name in mapping:
            out[id(p)] = [new_params[n] for n in mapping[name]]
        elif name in new_params:
            out[id(p)] = [new_params[name]]
        else:  # pragma: no cover - every drop-in maps every native parameter
            raise ValueError(f"no replacement for parameter {name!r} of the swapped {type(old).__name__}")
    return out


def swap_layers_for_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> list[str]:
    """Swap every swappable layer of ``model`` in place (announced) and re-point ``optimizer``'s
    parameter groups at the new parameters; returns the swapped names (empty: nothing done).

    ``ValueError`` when ``optimizer`` already holds state for a parameter that would be swapped
    (call :func:`~pytorch_privacy.optimizer.engines.swap.swap_to_dp_layers` before building the
    optimizer, or pass ``engine="functorch"``).
    """
    from .engines.swap import swap_to_dp_layers

    before = swappable_layers(model)
    if not before:
        return []
    old_ids = {id(p) for m in before.values() for p in m.parameters()}
    if optimizer is not None and any(id(p) in old_ids and s for p, s in optimizer.state.items()):
        raise ValueError(
            f"layers {sorted(before)} would be swapped for DP drop-ins (the ghost engine cannot see inside them), "
            "but the optimizer already holds state for their parameters; call "
            "pytorch_privacy.optimizer.engines.swap_to_dp_layers(model) before building the optimizer, or pass "
            "engine='functorch' to keep the native layers"
        )
    swapped = swap_to_dp_layers(model)
    after = dict(model.named_modules())
    repl: dict[int, list[nn.Parameter]] = {}
    for name, old in before.items():
        if name in after and after[name] is not old:
            repl.update(_replacements(old, after[name]))
    if optimizer is not None:
        for group in optimizer.param_groups:
            params: list[nn.Parameter] = []
            for p in group["params"]:
                params.extend(repl.get(id(p), [p]))
            group["params"] = params
    return swapped
