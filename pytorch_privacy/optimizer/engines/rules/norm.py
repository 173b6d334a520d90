"""Normalisation layers under the ghost engine: ``nn.LayerNorm``, ``nn.RMSNorm``,
``nn.GroupNorm`` and ``nn.BatchNorm1d/2d/3d`` in eval mode.  Each normalises one example with
its own statistics (or fixed running ones), so its scale and shift get per-example gradients
``sum g * xhat`` and ``sum g`` (direct contributions, :func:`affine_direct`)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ..ghost_rules import Contribution, DirectContribution, LayerRule, register_ghost_rule, to_records

__all__ = ["affine_direct", "LayerNormRule", "RMSNormRule", "GroupNormRule", "EvalBatchNormRule"]


def affine_direct(module, xhat, grad_output, microbatch, names, lead: int) -> dict[str, Contribution]:
    """Scale/shift gradients of a normalisation layer: ``sum g * xhat`` and ``sum g`` over every
    dimension that is neither the batch nor the parameter's (``lead`` = where the parameter's
    dimensions start: 1 for channels, else the trailing normalised dimensions)."""
    B = grad_output.shape[0]
    R = B // microbatch
    out: dict[str, Contribution] = {}
    for name in ("weight", "bias"):
        if name not in names:
            continue
        v = grad_output * xhat if name == "weight" else grad_output
        shape = getattr(module, name).shape
        if lead == 1:  # channels: [B, C, *] -> sum over spatial
            v = v.reshape(R, microbatch, shape.numel(), -1).sum((1, 3))
        else:  # trailing normalised dims: [B, *, *ns] -> sum over the middle
            v = v.reshape(R, -1, shape.numel()).sum(1)
        out[name] = DirectContribution(v, shape)
    return out


class LayerNormRule(LayerRule):
    """``nn.LayerNorm``: ``grad w = sum g * xhat``, ``grad b = sum g`` over non-normalised positions."""

    def movable_batch_dim(self, module, ndim, dim):
        return dim < ndim - len(module.normalized_shape)

    def contributions(self, module, saved, grad_output, batch, microbatch, names):
        to_records(saved, batch, microbatch)
        to_records(grad_output, batch, microbatch)
        xhat = F.layer_norm(saved, module.normalized_shape, None, None, module.eps)
        return affine_direct(module, xhat, grad_output, microbatch, names, lead=-1)


class RMSNormRule(LayerRule):
    """``nn.RMSNorm``: ``grad w = sum g * x / rms(x)``."""

    param_names = ("weight",)

    def movable_batch_dim(self, module, ndim, dim):
        return dim < ndim - len(module.normalized_shape)

    def contributions(self, module, saved, grad_output, batch, microbatch, names):
        to_records(saved, batch, microbatch)
        to_records(grad_output, batch, microbatch)
        xhat = F.rms_norm(saved, list(module.normalized_shape), None, module.eps)
        return affine_direct(module, xhat, grad_output, microbatch, names, lead=-1)


class GroupNormRule(LayerRule):
    """``nn.GroupNorm`` on ``[B, C, *]``: per-channel ``sum g * xhat`` and ``sum g``."""

    def contributions(self, module, saved, grad_output, batch, microbatch, names):
        to_records(saved, batch, microbatch)
        to_records(grad_output, batch, microbatch)
        xhat = F.group_norm(saved, module.num_groups, None, None, module.eps)
        return affine_direct(module, xhat, grad_output, microbatch, names, lead=1)


class EvalBatchNormRule(LayerRule):
    """``nn.BatchNorm1d/2d/3d`` in eval mode with running statistics (then a fixed per-channel
    affine map, which does not mix examples); in training mode it is unsupported."""

    def unsupported_reason(self, module):
        if module.training or module.running_mean is None or module.running_var is None:
            return "BatchNorm in training mode (or without running statistics) normalises with batch statistics and mixes examples"
        return None

    def save(self, module, args, kwargs, output):
        return args[0].detach(), module.running_mean.detach(), module.running_var.detach()

    def contributions(self, module, saved, grad_output, batch, microbatch, names):
        x, mean, var = saved
        to_records(x, batch, microbatch)
        to_records(grad_output, batch, microbatch)
        xhat = F.batch_norm(x, mean, var, None, None, False, 0.0, module.eps)
        return affine_direct(module, xhat, grad_output, microbatch, names, lead=1)


register_ghost_rule(nn.LayerNorm, LayerNormRule())
register_ghost_rule(nn.GroupNorm, GroupNormRule())
for _bn in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
    register_ghost_rule(_bn, EvalBatchNormRule())
if hasattr(nn, "RMSNorm"):
    register_ghost_rule(nn.RMSNorm, RMSNormRule())
