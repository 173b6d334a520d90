"""Automatic swap of native LSTM/GRU/RNN/MultiheadAttention for DP drop-ins under engine='auto'."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from pytorch_privacy.optimizer.layer_swap import swap_layers_for_optimizer, swappable_layers


class LSTMClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.rnn = nn.LSTM(8, 6, batch_first=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        out, _ = self.rnn(self.emb(x))
        return self.head(out[:, -1])


class TinyGPT(nn.Module):
    def __init__(self, d=16, t=8):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(30, d), nn.Embedding(t, d)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(d, 2, 32, dropout=0.0, batch_first=True, norm_first=nf) for nf in (False, True)
        )
        self.head = nn.Linear(d, 30)

    def forward(self, x):
        T = x.shape[1]
        h = self.wte(x) + self.wpe(torch.arange(T, device=x.device))
        mask = nn.Transformer.generate_square_subsequent_mask(T, dtype=h.dtype)
        for blk in self.blocks:
            h = blk(h, src_mask=mask, is_causal=True)
        return self.head(h)


def test_swap_repoints_the_optimizer_and_keeps_the_function():
    torch.manual_seed(0)
    model = LSTMClassifier().double()
    x = torch.randint(0, 20, (4, 5))
    ref = model(x)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(RuntimeWarning, match="swapped"):
        names = swap_layers_for_optimizer(model, opt)
    assert names == ["rnn"]
    torch.testing.assert_close(model(x), ref, rtol=1e-12, atol=1e-12)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in model.parameters()}
    assert swappable_layers(model) == {}


def test_swap_refuses_an_optimizer_with_state():
    model = LSTMClassifier()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randint(0, 20, (2, 3))).sum().backward()
    opt.step()
    with pytest.raises(ValueError, match="before building the optimizer"):
        swap_layers_for_optimizer(model, opt)


@pytest.mark.parametrize("model_cls", [LSTMClassifier, TinyGPT])
def test_auto_engine_swaps_and_runs_on_ghost(model_cls):
    """nn.LSTM and torch's Transformer layers train on ghost after the announced swap, and the
    step equals the same step on a copy of the model swapped by hand."""
    from pytorch_privacy.optimizer import DPGaussianOptimizer
    from pytorch_privacy.optimizer.engines import GhostEngine

    torch.manual_seed(0)
    model = model_cls().double()
    x = torch.randint(0, 8 if model_cls is TinyGPT else 20, (4, 8))
    y = torch.randint(0, 30, (4, 8)) if model_cls is TinyGPT else torch.randint(0, 3, (4,))

    def loss_fn(out, y):
        if out.dim() == 3:
            return nn.functional.cross_entropy(out.transpose(1, 2), y, reduction="none").mean(1)
        return nn.functional.cross_entropy(out, y, reduction="none")

    opt = DPGaussianOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.5), model, loss_fn, l2_norm_clip=1e6, noise_multiplier=0.0,
        expected_batch_size=4,
    )
    assert issubclass(opt._engine_cls, GhostEngine)
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    ref = model_cls().double()
    ref.load_state_dict(before)  # native keys load into the swapped model's checkpoint and back
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    ref_opt.zero_grad()
    loss_fn(ref(x), y).mean().backward()
    ref_opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback away from ghost
        opt.fit_batch(x, y)  # no clipping (huge C), no noise: plain SGD on the mean loss
    got = model.state_dict()
    for n, v in ref.state_dict().items():
        torch.testing.assert_close(got[n], v, rtol=1e-9, atol=1e-12)
