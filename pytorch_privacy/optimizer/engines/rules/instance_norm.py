"""``nn.InstanceNorm1d/2d/3d`` with ``affine=True`` under the ghost engine.

Instance normalisation uses each example's own statistics (or, in eval mode with
``track_running_stats``, the running ones), so it never mixes examples; its affine parameters
get per-example gradients ``grad w_c = sum g_c * xhat_c`` and ``grad b_c = sum g_c`` over the
spatial positions of channel ``c``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ..ghost_rules import LayerRule, register_ghost_rule, to_records
from .norm import affine_direct

__all__ = ["InstanceNormRule"]


class InstanceNormRule(LayerRule):
    """``nn.InstanceNorm{1,2,3}d(affine=True)``, any ``track_running_stats``."""

    def save(self, module, args, kwargs, output):
        x = args[0].detach()
        if module.training or not module.track_running_stats:
            return x, None, None
        return x, module.running_mean.detach().clone(), module.running_var.detach().clone()

    def contributions(self, module, saved, grad_output, batch, microbatch, names):
        x, mean, var = saved
        to_records(x, batch, microbatch)
        to_records(grad_output, batch, microbatch)
        xhat = F.instance_norm(x, mean, var, None, None, mean is None, 0.0, module.eps)
        return affine_direct(module, xhat, grad_output, microbatch, names, lead=1)


for _cls in (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d):
    register_ghost_rule(_cls, InstanceNormRule())
