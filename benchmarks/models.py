"""Model builders for the architecture benchmarks (issue 12), from torch's own layers only.

* :class:`SmallGPT`: token + position embeddings (positions indexed by ``arange(T)``, as in
  GPT-2/nanoGPT), ``nn.TransformerEncoderLayer`` blocks under a causal mask, an LM head.
* :class:`LSTMClassifier`: ``Embedding -> nn.LSTM -> Linear`` on the last hidden state.

The ResNet-with-GroupNorm and MNIST CNN cases use
:class:`tests.reference_models.SmallResNet` and
:class:`tests.reference_models.MnistCNN`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SmallGPT", "LSTMClassifier", "lm_per_example_loss", "ce_per_example_loss"]


class SmallGPT(nn.Module):
    """Decoder-only language model: ``ids [B, T] -> logits [B, T, vocab]``.

    ``h = wte(ids) + wpe(arange(T))``, then ``layers`` x ``nn.TransformerEncoderLayer(d_model,
    nhead, batch_first=True)`` (torch's defaults otherwise: post-norm, ReLU, feed-forward 2048,
    dropout 0.1) under a causal mask, then ``LayerNorm`` and a linear head.
    """

    def __init__(self, vocab: int = 512, d_model: int = 128, nhead: int = 4, layers: int = 2, max_len: int = 64,
                 dim_feedforward: int = 2048, dropout: float = 0.1):
        super().__init__()
        self.wte = nn.Embedding(vocab, d_model)
        self.wpe = nn.Embedding(max_len, d_model)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward=dim_feedforward, dropout=dropout,
                                       batch_first=True)
            for _ in range(layers)
        )
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Next-token logits for every position."""
        T = ids.shape[1]
        pos = torch.arange(T, device=ids.device)
        h = self.wte(ids) + self.wpe(pos)
        mask = nn.Transformer.generate_square_subsequent_mask(T, device=ids.device, dtype=h.dtype)
        for block in self.blocks:
            h = block(h, src_mask=mask, is_causal=True)
        return self.head(self.ln_f(h))


class LSTMClassifier(nn.Module):
    """``ids [B, T] -> logits [B, classes]``: Embedding, one ``nn.LSTM`` (batch first), a linear
    head on the last time step's output."""

    def __init__(self, vocab: int = 1000, embed: int = 64, hidden: int = 128, classes: int = 2):
        super().__init__()
        self.emb = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits from the last time step."""
        out, _ = self.lstm(self.emb(ids))
        return self.head(out[:, -1])


def ce_per_example_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example cross-entropy ``[B]`` of logits ``[B, classes]``."""
    return F.cross_entropy(out, y, reduction="none")


def lm_per_example_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example LM loss ``[B]``: the token cross-entropy of ``logits [B, T, V]`` against
    ``y [B, T]``, averaged over the T positions of each example."""
    return F.cross_entropy(logits.transpose(1, 2), y, reduction="none").mean(1)
