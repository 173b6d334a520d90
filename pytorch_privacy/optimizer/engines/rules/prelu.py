"""``nn.PReLU`` under the ghost engine: ``y = max(0, x) + w * min(0, x)`` with ``w`` one scalar
or one per channel (dimension 1), so ``grad w_c = sum g * min(0, x)`` over the positions of
channel ``c`` (of all positions for a single ``w``)."""

from __future__ import annotations

from torch import nn

from ..ghost_rules import DirectContribution, LayerRule, to_records, register_ghost_rule

__all__ = ["PReLURule"]


class PReLURule(LayerRule):
    """``nn.PReLU(num_parameters=1 or C)``."""

    param_names = ("weight",)

    def movable_batch_dim(self, module, ndim, dim):
        # one shared slope acts elementwise; per-channel slopes are tied to dimension 1
        return module.num_parameters == 1 or dim == 0

    def contributions(self, module, saved, grad_output, batch, microbatch, names):
        to_records(saved, batch, microbatch)
        to_records(grad_output, batch, microbatch)
        v = grad_output * saved.clamp(max=0)
        R, C = batch // microbatch, module.num_parameters
        if C == 1:
            per = v.reshape(R, -1).sum(1, keepdim=True)
        else:
            per = v.reshape(R, microbatch, C, -1).sum((1, 3))
        return {"weight": DirectContribution(per, module.weight.shape)}


register_ghost_rule(nn.PReLU, PReLURule())
