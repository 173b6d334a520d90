"""Convolutions under the ghost engine: ``nn.Conv1d``/``nn.Conv2d`` (with a CPU kernel that
unfolds patches chunk by chunk, and book-keeping by the native weight-gradient kernel),
``nn.Conv3d``, and N-d patch unfolding.

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

from ..ghost_rules import (
    Contribution,
    DirectContribution,
    LayerRule,
    NormPolicy,
    OuterContribution,
    PerRecord,
    keep_rows,
    register_ghost_rule,
    scale_rows,
    to_records,
)

__all__ = ["unfold2d", "unfold_nd", "ConvContribution", "ConvRule", "Conv3dRule", "group_outer", "explicit_padding"]


def unfold2d(x: torch.Tensor, kernel, dilation, padding, stride) -> torch.Tensor:
    """``F.unfold`` (``[B, C*kh*kw, L]``) by one strided copy, which is faster than ``im2col``
    on CPU."""
    if any(padding):
        x = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    x = x.contiguous()
    B, C, H, W = x.shape
    (kh, kw), (dh, dw), (sh, sw) = kernel, dilation, stride
    Lh, Lw = (H - dh * (kh - 1) - 1) // sh + 1, (W - dw * (kw - 1) - 1) // sw + 1
    sB, sC, sH, sW = x.stride()
    view = x.as_strided((B, C, kh, kw, Lh, Lw), (sB, sC, dh * sH, dw * sW, sh * sH, sw * sW), x.storage_offset())
    return view.reshape(B, C * kh * kw, Lh * Lw)


class ConvContribution(OuterContribution):
    """A convolution weight's contribution: an :class:`OuterContribution` whose ``a`` (unfolded
    input patches) is built only when needed, and whose :meth:`weighted_sum` uses the native
    convolution weight-gradient kernel on coefficient-scaled output gradients (book-keeping
    without unfolding).  ``x`` is the (explicitly padded, 2-d) input ``[B, C, H, W]`` and
    ``grad_output`` ``[B, O, Lh, Lw]``."""

    def __init__(self, x, grad_output, kernel, stride, padding, dilation, groups, microbatch, shape):
        self.x, self.grad_output = x, grad_output
        self.kernel, self.stride, self.padding, self.dilation = kernel, stride, padding, dilation
        self.groups, self.microbatch = groups, microbatch
        self.shape = torch.Size(shape)
        self._dtype = grad_output.dtype
        self._g = self._a = None

    @property
    def num_records(self) -> int:
        return self.x.shape[0] // self.microbatch

    def _build(self):
        B, O = self.grad_output.shape[:2]
        G, b = self.groups, self.microbatch
        U = unfold2d(self.x, self.kernel, self.dilation, self.padding, self.stride)
        L = U.shape[2]
        g = self.grad_output.reshape(B, O, L)
        a = U.reshape(B, G, U.shape[1] // G, L).transpose(2, 3)  # [B, G, L, d]
        gg = g.reshape(B, G, O // G, L).transpose(2, 3)  # [B, G, L, p]
        if b > 1:
            R = B // b
            a = a.reshape(R, b, G, L, -1).transpose(1, 2).reshape(R, G, b * L, -1)
            gg = gg.reshape(R, b, G, L, -1).transpose(1, 2).reshape(R, G, b * L, -1)
        self._g, self._a = gg, a

    @property
    def g(self) -> torch.Tensor:  # type: ignore[override]
        """Output gradients ``[R, G, N, p]``."""
        if self._g is None:
            self._build()
        return self._g

    @property
    def a(self) -> torch.Tensor:  # type: ignore[override]
        """Unfolded input patches ``[R, G, N, d]``."""
        if self._a is None:
            self._build()
        return self._a

    def _dims(self) -> tuple[int, int, int, int, int]:
        """``(R, G, N, p, d)`` of the outer-product form, without unfolding anything."""
        B, O = self.grad_output.shape[:2]
        L = self.grad_output.shape[2] * self.grad_output.shape[3]
        G, b = self.groups, self.microbatch
        return B // b, G, b * L, O // G, self.x.shape[1] // G * math.prod(self.kernel)

    def sq_norms(self, policy: NormPolicy) -> tuple[torch.Tensor, PerRecord | None]:
        R, G, N, p, d = self._dims()
        if N == 1 or policy.use_ghost(R, G, N, p, d, self.grad_output.element_size()):
            return super().sq_norms(policy)
        mat = self._per_record()
        return mat.sq_norms(self._acc()), mat

    #: bytes of unfolded patches per chunk on the CPU.  Chunks bound the unfold buffer's memory;
    #: each chunk costs about seven dispatched ops, so small chunks multiply the ops per step
    #: (547 ATen ops for the MNIST CNN at 512 KiB chunks against 282 in one chunk) for no
    #: measured time gain (fastest-repetition ratio 0.94-1.02 between 512 KiB and 64 MiB on
    #: the MNIST CNN and ResNet-GN, benchmarks/bench_architectures.py): one chunk up to 32 MiB.
    cpu_chunk_bytes = 1 << 25

    def _per_record(self) -> PerRecord:
        if self.x.device.type != "cpu" or self._a is not None:
            # input-major: [R, G, d, N] @ [R, G, N, p]; the unfolded input is contiguous that
            # way and the output-gradient operand is a transposed view, so nothing is copied
            return PerRecord(torch.matmul(self.a.transpose(2, 3), self.g), self.shape, layout="gdp")
        # CPU: per chunk of records, make the input channels-last (a no-op for one channel) and
        # unfold its patches [m*G, b*L, kh*kw*c] (contiguous runs of kw*c without dilation, of c
        # with), multiplying each chunk while it is in cache and writing [R, G, p, kh*kw*c] in
        # place: no full-batch unfold buffer.  (A space-to-depth by the stride gives longer runs
        # but costs more to build than it saves here.)
        x = self.x
        ph, pw = self.padding
        if ph or pw:
            x = F.pad(x, (pw, pw, ph, ph))
        go = self.grad_output
        B, C = x.shape[:2]
        O, Lh, Lw = go.shape[1:]
        G, b = self.groups, self.microbatch
        R, c, p, L = B // b, C // G, O // G, Lh * Lw
        (kh, kw), (dh, dw), (sh, sw) = self.kernel, self.dilation, self.stride
        d = kh * kw * c
        g = go.reshape(R, b, G, p, L)
        g = g.reshape(R * G, p, L) if b == 1 else g.permute(0, 2, 3, 1, 4).reshape(R * G, p, b * L)
        out = go.new_empty((R, G, p, d))
        out3 = out.view(R * G, p, d)
        rec_bytes = G * b * L * d * x.element_size()
        n = max(1, min(R, self.cpu_chunk_bytes // max(rec_bytes, 1)))
        for r0 in range(0, R, n):
            m = min(n, R - r0)
            xc = x[r0 * b : (r0 + m) * b].contiguous(memory_format=torch.channels_last)
            sB, sC, sH, sW = xc.stride()
            patches = xc.as_strided(
                (m, G, b, Lh, Lw, kh, kw, c), (b * sB, c * sC, sB, sh * sH, sw * sW, dh * sH, dw * sW, sC)
            ).reshape(m * G, b * L, d)
            torch.bmm(g[r0 * G : (r0 + m) * G], patches, out=out3[r0 * G : (r0 + m) * G])
        # [G, p, kh, kw, c] -> [G, p, c, kh, kw] = [G*p, c, kh, kw]
        return PerRecord(out, self.shape, layout=("permuted", (G, p, kh, kw, c), (0, 1, 4, 2, 3)))

    def key(self) -> tuple:
        O, G = self.grad_output.shape[1], self.groups
        return (G, O // G, self.x.shape[1] // G * math.prod(self.kernel), self.shape)

    def weighted_sum(self, coefficients: torch.Tensor, mask: bool = True) -> torch.Tensor:
        per_example = coefficients.repeat_interleave(self.microbatch) if self.microbatch > 1 else coefficients
        if mask:
            gs, x = scale_rows(self.grad_output, per_example), keep_rows(self.x, per_example)
        else:
            gs, x = self.grad_output * per_example.to(self._dtype).reshape(-1, 1, 1, 1), self.x
        O, G = gs.shape[1], self.groups
        weight = gs.new_empty((O, x.shape[1] // G) + tuple(self.kernel))
        _, gw, _ = torch.ops.aten.convolution_backward(
            gs, x, weight, None, list(self.stride), list(self.padding), list(self.dilation), False, [0, 0], G,
            [False, True, False],
        )
        return gw.reshape(self.shape)


class ConvRule(LayerRule):
    """``nn.Conv1d`` / ``nn.Conv2d`` (any stride, dilation, groups, padding and padding mode):
    the weight gradient is an outer product of output gradients and unfolded input patches."""

    def contributions(self, module, saved, grad_output, batch, microbatch, names):
        x = saved
        B = batch
        to_records(x, B, microbatch)  # checks the batch-first layout
        to_records(grad_output, B, microbatch)
        one_d = isinstance(module, nn.Conv1d)
        padding = module.padding
        if module.padding_mode != "zeros" or isinstance(padding, str):
            if isinstance(padding, str) and padding == "valid":
                padding = (0,) * (1 if one_d else 2)
            else:
                mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
                x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
                padding = (0,) * (1 if one_d else 2)
        if one_d:
            x = x.unsqueeze(2)
            kernel, dilation = (1, module.kernel_size[0]), (1, module.dilation[0])
            padding, stride = (0, padding[0]), (1, module.stride[0])
        else:
            kernel, dilation, stride = module.kernel_size, module.dilation, module.stride
        out: dict[str, Contribution] = {}
        C_out, G = module.out_channels, module.groups
        g = grad_output.reshape(B, C_out, -1)  # [B, C_out, L]
        if "weight" in names:
            g4 = grad_output.reshape(B, C_out, -1, grad_output.shape[-1]) if one_d else grad_output
            out["weight"] = ConvContribution(
                x, g4, tuple(kernel), tuple(stride), tuple(padding), tuple(dilation), G, microbatch, module.weight.shape
            )
        if "bias" in names:
            gb = g.sum(2)
            if microbatch > 1:
                gb = gb.reshape(B // microbatch, microbatch, C_out).sum(1)
            out["bias"] = DirectContribution(gb, module.bias.shape)
        return out


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
        to_records(saved, batch, microbatch)  # batch-first checks
        to_records(grad_output, batch, microbatch)
        out: dict[str, Contribution] = {}
        if "weight" in names:
            x, padding = explicit_padding(module, saved)
            U = unfold_nd(zero_pad(x, padding), module.kernel_size, module.dilation, module.stride, grad_output.shape[2:])
            g = grad_output.reshape(batch, module.out_channels, -1)
            out["weight"] = group_outer(g, U, module.groups, microbatch, module.weight.shape)
        if "bias" in names:
            out["bias"] = DirectContribution(channel_sums(grad_output, microbatch), module.bias.shape)
        return out


register_ghost_rule(nn.Conv1d, ConvRule())
register_ghost_rule(nn.Conv2d, ConvRule())
register_ghost_rule(nn.Conv3d, Conv3dRule())
