"""``nn.Conv3d`` under the ghost engine, and N-d patch unfolding.

The per-example weight gradient of a convolution is ``sum_l g_l u_l^T`` over output positions
``l``, with ``g_l`` the output gradient (``[C_out]``) and ``u_l`` the unfolded input patch
(``[C_in/G * prod(k)]``) per group: an :class:`~..ghost_rules.OuterContribution`, so norms come
from the ghost-norm identity or by materialising, whichever is cheaper (see
:class:`~..ghost_rules.NormPolicy`), and clipped sums by book-keeping.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ghost_rules import Contribution, DirectContribution, LayerRule, OuterContribution, _records, register_ghost_rule

__all__ = ["unfold_nd", "Conv3dRule", "group_outer", "explicit_padding"]


def unfold_nd(x: torch.Tensor, kernel, dilation, stride, positions=None) -> torch.Tensor:
    """Patches of an (already padded) ``x`` ``[B, C, *S]``: ``[B, C * prod(kernel), L]`` with
    channel-major, then kernel-offset order (the layout of a flattened convolution weight), by
    one strided view.  ``positions`` fixes the number of patch positions per spatial dimension
    (default: all that fit)."""
    x = x.contiguous()
    n = len(kernel)
    B, C = x.shape[:2]
    spatial = x.shape[2:]
    if positions is None:
        positions = [(spatial[i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1 for i in range(n)]
    st = x.stride()
    size = (B, C, *kernel, *positions)
    strides = (st[0], st[1], *(dilation[i] * st[2 + i] for i in range(n)), *(stride[i] * st[2 + i] for i in range(n)))
    view = x.as_strided(size, strides, x.storage_offset())
    return view.reshape(B, C * math.prod(kernel), math.prod(positions))


def explicit_padding(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """``(x padded by any non-zero padding mode or string padding, remaining zero padding)``."""
    n = x.dim() - 2
    padding = module.padding
    if isinstance(padding, str) or module.padding_mode != "zeros":
        if isinstance(padding, str) and padding == "valid":
            return x, (0,) * n
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        return F.pad(x, module._reversed_padding_repeated_twice, mode=mode), (0,) * n
    return x, tuple(padding)


def zero_pad(x: torch.Tensor, padding) -> torch.Tensor:
    """``x`` zero-padded by ``padding[i]`` on both sides of spatial dimension ``i``."""
    if not any(padding):
        return x
    pads = []
    for p in reversed(padding):
        pads += [p, p]
    return F.pad(x, pads)


def group_outer(rows: torch.Tensor, cols: torch.Tensor, groups: int, microbatch: int, shape) -> OuterContribution:
    """The contribution ``sum_l rows_l cols_l^T`` per group, from ``rows`` ``[B, G*p, L]`` and
    ``cols`` ``[B, G*d, L]``, records of ``microbatch`` consecutive examples."""
    B, L = rows.shape[0], rows.shape[2]
    G, b = groups, microbatch
    g = rows.reshape(B, G, rows.shape[1] // G, L).transpose(2, 3)  # [B, G, L, p]
    a = cols.reshape(B, G, cols.shape[1] // G, L).transpose(2, 3)  # [B, G, L, d]
    if b > 1:
        R = B // b
        g = g.reshape(R, b, G, L, -1).transpose(1, 2).reshape(R, G, b * L, -1)
        a = a.reshape(R, b, G, L, -1).transpose(1, 2).reshape(R, G, b * L, -1)
    return OuterContribution(g, a, shape)


def channel_sums(t: torch.Tensor, microbatch: int) -> torch.Tensor:
    """``t`` ``[B, C, *]`` summed over spatial positions and the examples of each record: ``[R, C]``."""
    B, C = t.shape[:2]
    return t.reshape(B // microbatch, microbatch, C, -1).sum((1, 3))


class Conv3dRule(LayerRule):
    """``nn.Conv3d`` (any stride, dilation, groups, padding, padding mode)."""

    def contributions(self, module, saved, grad_output, batch, microbatch, names):
        _records(saved, batch, microbatch)  # batch-first checks
        _records(grad_output, batch, microbatch)
        out: dict[str, Contribution] = {}
        if "weight" in names:
            x, padding = explicit_padding(module, saved)
            U = unfold_nd(zero_pad(x, padding), module.kernel_size, module.dilation, module.stride, grad_output.shape[2:])
            g = grad_output.reshape(batch, module.out_channels, -1)
            out["weight"] = group_outer(g, U, module.groups, microbatch, module.weight.shape)
        if "bias" in names:
            out["bias"] = DirectContribution(channel_sums(grad_output, microbatch), module.bias.shape)
        return out


register_ghost_rule(nn.Conv3d, Conv3dRule())
