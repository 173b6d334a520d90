"""Cross-check against Opacus: the clipped sum of per-example gradients (clip C, no noise)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pytorch_privacy.dp_query.gaussian_query import GaussianSumQuery
from pytorch_privacy.optimizer.engines import FunctorchEngine, GhostEngine, LoopEngine
from ..reference_models import MnistCNN, SmallResNet

opacus = pytest.importorskip("opacus")
from opacus import GradSampleModule  # noqa: E402

pytestmark = pytest.mark.peer


def ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


class TextNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.ln = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.ln(self.emb(x)).mean(1))


def opacus_clipped_sum(model, x, y, clip):
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    try:
        gsm.zero_grad(set_to_none=True)
        ce(gsm(x), y).sum().backward()
        grads = {n: p.grad_sample.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        for p in model.parameters():
            p.grad = None
            p.grad_sample = None
    finally:
        gsm._close()
    norms = torch.sqrt(sum(g.reshape(g.shape[0], -1).pow(2).sum(1) for g in grads.values()))
    coef = torch.clamp(clip / (norms + 1e-12), max=1.0)
    return {n: torch.einsum("i,i...->...", coef, g) for n, g in grads.items()}


def ours_clipped_sum(engine_cls, model, x, y, clip):
    query = GaussianSumQuery(clip, 0.0)
    params = query.derive_sample_params(query.initial_global_state())
    grads = engine_cls(model, ce).compute(x, y)
    template = {n: torch.zeros_like(p) for n, p in model.named_parameters() if p.requires_grad}
    state = query.initial_sample_state(template)
    return query.accumulate_records_by_norm(params, state, grads.norms(), grads.weighted_sum)


@pytest.mark.parametrize(
    "make",
    [
        lambda: (MnistCNN(), torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))),
        lambda: (MnistCNN("relu"), torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))),
        lambda: (SmallResNet(width=8), torch.randn(6, 3, 12, 12), torch.randint(0, 10, (6,))),
        lambda: (TextNet(), torch.randint(0, 20, (7, 5)), torch.randint(0, 3, (7,))),
    ],
    ids=["mnist_cnn_tanh", "mnist_cnn_relu", "resnet_groupnorm", "embedding_layernorm"],
)
@pytest.mark.parametrize("engine", [GhostEngine, FunctorchEngine, LoopEngine], ids=lambda e: e.name)
def test_clipped_sum_matches_opacus(make, engine):
    torch.manual_seed(0)
    model, x, y = make()
    clip = 0.5  # small enough that most examples are clipped
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = opacus_clipped_sum(model, x, y, clip)
    ours = ours_clipped_sum(engine, model, x, y, clip)
    assert set(ours) == set(theirs)
    for n in ours:
        torch.testing.assert_close(ours[n], theirs[n], rtol=1e-5, atol=1e-5, msg=lambda m: f"{n}: {m}")
