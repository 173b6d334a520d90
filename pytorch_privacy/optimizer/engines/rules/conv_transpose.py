"""``nn.ConvTranspose1d/2d/3d`` under the ghost engine.

A transposed convolution is the adjoint of a convolution with the same weight, stride, padding
and dilation: ``<conv_transpose(x, W), g> = <x, conv(g, W)>``.  So its per-example weight
gradient is ``sum_l x_l v_l^T`` over *input* positions ``l``, with ``x_l`` the input
(``[C_in/G]`` per group) and ``v_l`` the patch of the zero-padded output gradient that position
``l`` writes to (``[C_out/G * prod(k)]``, strided by ``stride``, dilated by ``dilation``): an
:class:`~..ghost_rules.OuterContribution` shaped like the weight ``[C_in, C_out/G, *k]``.
``output_padding`` only lengthens the output; the patches are taken at the input's positions.
"""

from __future__ import annotations

from torch import nn

from ..ghost_rules import Contribution, DirectContribution, LayerRule, to_records, register_ghost_rule
from .conv import channel_sums, group_outer, unfold_nd, zero_pad

__all__ = ["ConvTransposeRule"]


class ConvTransposeRule(LayerRule):
    """``nn.ConvTranspose{1,2,3}d`` (groups, stride, padding, output_padding, dilation; also
    when called with ``output_size``)."""

    def unsupported_reason(self, module):
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r}"
        return None

    def contributions(self, module, saved, grad_output, batch, microbatch, names):
        x = saved
        to_records(x, batch, microbatch)
        to_records(grad_output, batch, microbatch)
        out: dict[str, Contribution] = {}
        if "weight" in names:
            V = unfold_nd(
                zero_pad(grad_output, module.padding), module.kernel_size, module.dilation, module.stride, x.shape[2:]
            )
            rows = x.reshape(batch, module.in_channels, -1)
            out["weight"] = group_outer(rows, V, module.groups, microbatch, module.weight.shape)
        if "bias" in names:
            out["bias"] = DirectContribution(channel_sums(grad_output, microbatch), module.bias.shape)
        return out


for _cls in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
    register_ghost_rule(_cls, ConvTransposeRule())
