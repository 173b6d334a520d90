"""``nn.EmbeddingBag`` (modes ``sum`` and ``mean``) under the ghost engine.

Bag ``i`` of indices ``j in bag(i)`` gives ``out_i = sum_j w_j W[id_j]`` with ``w_j`` the
per-sample weight (mode ``sum``; 1 without weights) or ``1 / |bag(i)|`` (mode ``mean``), indices
equal to ``padding_idx`` excluded (and not counted in the mean).  The per-example gradient of the
table is ``sum_j onehot(id_j) (w_j g_i)^T``: an :class:`~..ghost_rules.EmbeddingContribution`
with ids ``[R, N]`` and rows ``w_j g_i`` (bags padded to a common length with weight 0), so the
norm is exact without forming ``[R, V, d]``.  Mode ``max`` routes each output coordinate to the
arg-max row and is refused.

Bags come as a 2-D ``input`` ``[B, N]`` (one bag per row) or as a 1-D ``input`` with ``offsets``
(``[B]``, or ``[B + 1]`` with ``include_last_offset``); one bag is one example.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ghost_rules import EmbeddingContribution, LayerRule, to_records, register_ghost_rule

__all__ = ["EmbeddingBagRule", "bag_layout"]


def bag_layout(module: nn.EmbeddingBag, input, offsets, per_sample_weights) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids [B, N], weights [B, N])``: each bag's indices and the weight of each in the output
    (0 for padding entries and for ``padding_idx``)."""
    if input.dim() == 2:
        ids = input
        w = per_sample_weights
        valid = torch.ones_like(ids, dtype=torch.bool)
    elif input.dim() == 1:
        if offsets is None:
            raise ValueError("EmbeddingBag with a 1-D input needs offsets")
        offsets = offsets.to(torch.long)
        n = input.shape[0]
        starts = offsets[:-1] if module.include_last_offset else offsets
        ends = offsets[1:] if module.include_last_offset else torch.cat([offsets[1:], offsets.new_tensor([n])])
        B = starts.shape[0]
        lengths = (ends - starts).clamp(min=0)
        N = int(lengths.max()) if B else 0
        pos = torch.arange(N, device=input.device)
        valid = pos.unsqueeze(0) < lengths.unsqueeze(1)  # [B, N]
        src = (starts.unsqueeze(1) + pos.unsqueeze(0)).clamp(max=max(n - 1, 0))
        ids = torch.where(valid, input[src] if n else torch.zeros_like(src), torch.zeros_like(src))
        w = None
        if per_sample_weights is not None:
            w = torch.where(valid, per_sample_weights[src], torch.zeros((), dtype=per_sample_weights.dtype))
    else:
        raise ValueError(f"EmbeddingBag input must be 1-D or 2-D, got {input.dim()}-D")
    if module.padding_idx is not None:
        valid = valid & (ids != module.padding_idx)
    if module.mode == "mean":
        counts = valid.sum(1, keepdim=True).clamp(min=1)
        weights = valid.to(torch.float64) / counts
    elif w is not None:
        weights = torch.where(valid, w, torch.zeros((), dtype=w.dtype))
    else:
        weights = valid.to(torch.float64)
    return ids, weights


class EmbeddingBagRule(LayerRule):
    """``nn.EmbeddingBag`` with ``mode="sum"`` (optionally ``per_sample_weights``) or ``"mean"``."""

    output_batched = True

    param_names = ("weight",)

    def unsupported_reason(self, module):
        if module.mode == "max":
            return "mode='max' routes each coordinate's gradient to the arg-max row; use mode='sum'/'mean' or engine='functorch'"
        if module.max_norm is not None:
            return "max_norm renormalises the table in place during forward"
        if module.scale_grad_by_freq:
            return "scale_grad_by_freq scales gradients by batch-level index counts"
        return None

    def save(self, module, args, kwargs, output):
        input = args[0]
        offsets = args[1] if len(args) > 1 else kwargs.get("offsets")
        psw = args[2] if len(args) > 2 else kwargs.get("per_sample_weights")
        if input.dim() == 2 and offsets is not None:
            raise ValueError(
                "ghost engine: EmbeddingBag got a 2-D input together with offsets (a 1-D input broadcast to a "
                "batch); its bags come from offsets, one per example, so the input must be passed as given"
            )
        ids, weights = bag_layout(module, input.detach(), None if offsets is None else offsets.detach(),
                                  None if psw is None else psw.detach())
        return ids, weights

    def contributions(self, module, saved, grad_output, batch, microbatch, names):
        ids, weights = saved
        R = batch // microbatch
        to_records(grad_output, batch, microbatch)
        to_records(ids, batch, microbatch)
        g = weights.to(grad_output.dtype).unsqueeze(2) * grad_output.unsqueeze(1)  # [B, N, d]
        return {
            "weight": EmbeddingContribution(
                ids.reshape(R, -1), g.reshape(R, -1, g.shape[2]), module.num_embeddings, module.weight.shape
            )
        }


register_ghost_rule(nn.EmbeddingBag, EmbeddingBagRule())
