"""``nn.Embedding`` under the ghost engine: the table's per-example gradient is
``sum_t onehot(id_t) g_t^T`` (an :class:`~..ghost_rules.EmbeddingContribution`, exact norms
without forming ``[R, V, d]``)."""

from __future__ import annotations

from torch import nn

from ..ghost_rules import EmbeddingContribution, LayerRule, register_ghost_rule, to_records

__all__ = ["EmbeddingRule"]


class EmbeddingRule(LayerRule):
    """``nn.Embedding`` (``padding_idx`` supported; ``max_norm`` and ``scale_grad_by_freq`` are not)."""

    param_names = ("weight",)

    def movable_batch_dim(self, module, ndim, dim):
        return True

    def unsupported_reason(self, module):
        if module.max_norm is not None:
            return "max_norm renormalises the table in place during forward"
        if module.scale_grad_by_freq:
            return "scale_grad_by_freq scales gradients by batch-level token counts"
        return None

    def contributions(self, module, saved, grad_output, batch, microbatch, names):
        B = batch
        R = B // microbatch
        to_records(grad_output, B, microbatch)
        ids = to_records(saved, B, microbatch).reshape(R, -1)
        g = to_records(grad_output, B, microbatch).reshape(R, -1, grad_output.shape[-1])
        if module.padding_idx is not None:
            g = g.masked_fill((ids == module.padding_idx).unsqueeze(2), 0)
        return {"weight": EmbeddingContribution(ids, g, module.num_embeddings, module.weight.shape)}


register_ghost_rule(nn.Embedding, EmbeddingRule())
