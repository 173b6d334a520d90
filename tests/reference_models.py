"""Small reference models for tests and benchmarks (not part of the library; formerly
``pytorch_privacy.optimizer.models``; benchmarks import it with the repository root on the path), all DP-compatible (no layer mixes
examples).

* :class:`MnistCNN`: the MNIST CNN of the TF Privacy / Opacus tutorials, as benchmarked by
  Subramani, Vadivelu and Kamath 2021 ("Enabling fast differentially private SGD via
  just-in-time compilation and vectorization", arXiv 2010.09063).
* :class:`SmallResNet`: a CIFAR-style ResNet with GroupNorm instead of BatchNorm.
* :class:`TextClassifier`: Embedding + LSTM/GRU/RNN (torch's, or the DP drop-ins).
* :class:`TinyTransformer`: one pre-norm transformer block (MultiheadAttention + LayerNorm + MLP)
  over token embeddings, optionally with the output projection tied to the embedding.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["MnistCNN", "SmallResNet", "BasicBlock", "TextClassifier", "TinyTransformer", "TransformerBlock"]

_ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU}


def _activation(name: str) -> type[nn.Module]:
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {name!r}") from None


class MnistCNN(nn.Module):
    """``[B, 1, 28, 28] -> [B, 10]`` logits: conv 16@8x8 stride 2 pad 3, maxpool 2 stride 1,
    conv 32@4x4 stride 2, maxpool 2 stride 1, fc 512->32, fc 32->10 (26,010 parameters).

    Args:
        activation: ``"tanh"`` (tempered sigmoid, Papernot et al. 2021; the default) or
            ``"relu"`` (the TF Privacy tutorial's).
    """

    def __init__(self, activation: str = "tanh"):
        super().__init__()
        act = _activation(activation)
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 8, stride=2, padding=3),
            act(),
            nn.MaxPool2d(2, 1),
            nn.Conv2d(16, 32, 4, stride=2),
            act(),
            nn.MaxPool2d(2, 1),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 32), act(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of 28x28 grey images."""
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with GroupNorm and a (projected when needed) shortcut."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, groups: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(min(groups, out_ch), out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(min(groups, out_ch), out_ch)
        self.act = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.GroupNorm(min(groups, out_ch), out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``act(norm2(conv2(act(norm1(conv1(x))))) + shortcut(x))``."""
        h = self.act(self.norm1(self.conv1(x)))
        return self.act(self.norm2(self.conv2(h)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """A small ResNet (GroupNorm, no BatchNorm) for ``[B, C, H, W]`` images.

    Args:
        num_classes: output logits.
        in_channels: image channels.
        width: channels of the first stage (doubled at each of the following stages).
        blocks: residual blocks per stage (3 stages).
        groups: GroupNorm groups (capped by the channel count).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 16, blocks: int = 1, groups: int = 8):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.GroupNorm(min(groups, width), width), nn.ReLU()
        )
        layers, ch = [], width
        for stage in range(3):
            out = width * 2**stage
            for i in range(blocks):
                layers.append(BasicBlock(ch, out, stride=2 if (stage > 0 and i == 0) else 1, groups=groups))
                ch = out
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits."""
        return self.fc(self.pool(self.layers(self.stem(x))).flatten(1))


class TextClassifier(nn.Module):
    """Token ids ``[B, T]`` -> logits ``[B, num_classes]``: Embedding, a recurrent layer, and a
    linear head on the last time step.

    Args:
        vocab_size, embed_dim, hidden_size, num_classes: sizes.
        rnn: ``"lstm"``, ``"gru"`` or ``"rnn"``.
        dp_layers: use the DP drop-ins (:class:`~pytorch_privacy.optimizer.engines.DPLSTM` etc.,
            ghost/vmap-friendly) instead of torch's fused layers.
        padding_idx: embedding padding index (its row gets no gradient).
    """

    def __init__(
        self,
        vocab_size: int = 100,
        embed_dim: int = 16,
        hidden_size: int = 16,
        num_classes: int = 2,
        rnn: str = "lstm",
        dp_layers: bool = False,
        padding_idx: int | None = None,
    ):
        super().__init__()
        from pytorch_privacy.optimizer.engines import dp_layers as dpl

        table = {"lstm": (nn.LSTM, dpl.DPLSTM), "gru": (nn.GRU, dpl.DPGRU), "rnn": (nn.RNN, dpl.DPRNN)}
        if rnn not in table:
            raise ValueError(f"rnn must be one of {sorted(table)}, got {rnn!r}")
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=padding_idx)
        self.rnn = table[rnn][1 if dp_layers else 0](embed_dim, hidden_size, batch_first=True)
        self.head = nn.Linear(hidden_size, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits from the last hidden state."""
        out, _ = self.rnn(self.embedding(tokens))
        return self.head(out[:, -1])


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + MHA(LN(x))``, then ``x + MLP(LN(x))`` (batch-first).

    ``dp_attention=True`` uses :class:`~pytorch_privacy.optimizer.engines.DPMultiheadAttention`
    (same function, supported by the ghost engine) instead of ``nn.MultiheadAttention``.
    """

    def __init__(self, d_model: int, nhead: int, mlp_ratio: int = 2, dropout: float = 0.0, dp_attention: bool = False):
        super().__init__()
        from pytorch_privacy.optimizer.engines.dp_layers import DPMultiheadAttention

        self.ln1 = nn.LayerNorm(d_model)
        attn_cls = DPMultiheadAttention if dp_attention else nn.MultiheadAttention
        self.attn = attn_cls(d_model, nhead, dropout=dropout, batch_first=True)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, mlp_ratio * d_model), nn.GELU(), nn.Linear(mlp_ratio * d_model, d_model))

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """One block; ``key_padding_mask`` ``[B, T]`` is True at padded positions."""
        h = self.ln1(x)
        x = x + self.attn(h, h, h, key_padding_mask=key_padding_mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class TinyTransformer(nn.Module):
    """Token ids ``[B, T]`` -> logits: embeddings + learned positions, one :class:`TransformerBlock`,
    final LayerNorm, then either a classifier on the mean over positions (``num_classes``) or,
    with ``lm_head=True``, per-position vocabulary logits ``[B, T, V]`` whose projection is tied
    to the token embedding when ``tie_weights``.  ``dp_attention=True`` makes every layer
    ghost-supported (see :class:`TransformerBlock`).
    """

    def __init__(
        self,
        vocab_size: int = 50,
        d_model: int = 16,
        nhead: int = 2,
        max_len: int = 32,
        num_classes: int = 2,
        lm_head: bool = False,
        tie_weights: bool = True,
        dp_attention: bool = False,
    ):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, d_model)
        self.position = nn.Embedding(max_len, d_model)
        self.block = TransformerBlock(d_model, nhead, dp_attention=dp_attention)
        self.ln_f = nn.LayerNorm(d_model)
        self.lm_head = lm_head
        if lm_head:
            self.head = nn.Linear(d_model, vocab_size, bias=False)
            if tie_weights:
                self.head.weight = self.embedding.weight
        else:
            self.head = nn.Linear(d_model, num_classes)

    def forward(self, tokens: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (see the class docstring)."""
        pos = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)  # batch-first lookups
        h = self.embedding(tokens) + self.position(pos)
        h = self.ln_f(self.block(h, key_padding_mask))
        return self.head(h) if self.lm_head else self.head(h.mean(1))
