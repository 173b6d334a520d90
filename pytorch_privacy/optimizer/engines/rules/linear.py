"""``nn.Linear`` under the ghost engine: on ``[B, *, d]`` the weight's per-example gradient is
``sum_t g_t a_t^T`` over positions (an :class:`~..ghost_rules.OuterContribution`), the bias's is
``sum_t g_t`` (direct)."""

from __future__ import annotations

from torch import nn

from ..ghost_rules import Contribution, DirectContribution, LayerRule, OuterContribution, register_ghost_rule, to_records

__all__ = ["LinearRule"]


class LinearRule(LayerRule):
    """``nn.Linear`` on ``[B, *, d]``: weight is an outer-product contribution, bias is direct."""

    def movable_batch_dim(self, module, ndim, dim):
        return dim < ndim - 1

    def contributions(self, module, saved, grad_output, batch, microbatch, names):
        B = batch
        R = B // microbatch
        a = to_records(saved, B, microbatch).reshape(R, 1, -1, saved.shape[-1])
        g = to_records(grad_output, B, microbatch).reshape(R, 1, -1, grad_output.shape[-1])
        out: dict[str, Contribution] = {}
        if "weight" in names:
            out["weight"] = OuterContribution(g, a, module.weight.shape)
        if "bias" in names:  # one position per record ([B, d] inputs): the output gradient itself,
            bias = g.reshape(R, g.shape[-1]) if g.shape[2] == 1 else g.sum((1, 2))  # whose norms the weight has
            out["bias"] = DirectContribution(bias, module.bias.shape, rows_of=out.get("weight"))
        return out


register_ghost_rule(nn.Linear, LinearRule())
