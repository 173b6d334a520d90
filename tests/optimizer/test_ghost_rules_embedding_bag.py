"""Ghost rule for nn.EmbeddingBag against the naive per-example (per-bag) loop."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pytorch_privacy.optimizer.engines import GhostEngine, NormPolicy
from pytorch_privacy.optimizer.engines.rules.embedding_bag import EmbeddingBagRule

from ._ghost_rule_check import check_ghost_against_naive

D = torch.float64


class BagNet(nn.Module):
    def __init__(self, mode, padding_idx=None):
        super().__init__()
        self.bag = nn.EmbeddingBag(10, 4, mode=mode, padding_idx=padding_idx)
        self.head = nn.Linear(4, 2)

    def forward(self, x, w=None):
        return self.head(torch.tanh(self.bag(x, per_sample_weights=w)))


@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("padding_idx", [None, 0])
@pytest.mark.parametrize("microbatch", [None, 2])
def test_embedding_bag_2d(mode, padding_idx, microbatch):
    torch.manual_seed(0)
    model = BagNet(mode, padding_idx).to(D)
    x = torch.randint(0, 10, (6, 5))
    x[0, :2] = 3  # a repeated index within one bag
    x[1, :] = 0  # a bag of padding only (when padding_idx=0)
    x[2, 1] = 0
    check_ghost_against_naive(model, x, torch.randint(0, 2, (6,)), microbatch=microbatch)


@pytest.mark.parametrize("microbatch", [None, 3])
def test_embedding_bag_per_sample_weights(microbatch):
    torch.manual_seed(1)
    model = BagNet("sum").to(D)
    x = torch.randint(0, 10, (6, 5))
    x[3, :3] = 7
    w = torch.randn(6, 5, dtype=D)
    check_ghost_against_naive(model, (x, w), torch.randint(0, 2, (6,)), microbatch=microbatch)


@pytest.mark.parametrize("mode, weighted", [("sum", False), ("sum", True), ("mean", False)])
@pytest.mark.parametrize("include_last_offset", [False, True])
def test_embedding_bag_offsets_rule(mode, weighted, include_last_offset):
    """1-D input with offsets: the rule's contribution against each bag's own gradient."""
    torch.manual_seed(2)
    bag = nn.EmbeddingBag(9, 3, mode=mode, include_last_offset=include_last_offset, padding_idx=8).to(D)
    lengths = [3, 0, 1, 4, 2]
    flat = torch.randint(0, 9, (sum(lengths),))
    flat[0] = flat[1]  # repeat within a bag
    flat[5] = 8  # padding_idx inside a bag
    starts = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)[:-1]))
    offsets = torch.cat([starts, torch.tensor([len(flat)])]) if include_last_offset else starts
    psw = torch.randn(len(flat), dtype=D) if weighted else None
    B = len(lengths)
    target = torch.randn(B, 3, dtype=D)

    def loss_of(out, t):
        return (torch.sin(out) * t).sum(1)

    out = bag(flat, offsets, per_sample_weights=psw)
    g_out = torch.autograd.grad(loss_of(out, target).sum(), out)[0]
    rule = EmbeddingBagRule()
    saved = rule.save(bag, (flat, offsets), {"per_sample_weights": psw}, out)
    contrib = rule.contributions(bag, saved, g_out, B, 1, frozenset({"weight"}))["weight"]
    naive = []
    for i in range(B):
        s, e = int(starts[i]), int(starts[i]) + lengths[i]
        one = torch.tensor([0, e - s]) if include_last_offset else torch.tensor([0])
        o = bag(flat[s:e], one, per_sample_weights=None if psw is None else psw[s:e])
        naive.append(torch.autograd.grad(loss_of(o, target[i : i + 1]).sum(), bag.weight)[0])
    naive = torch.stack(naive)
    norms = naive.reshape(B, -1).norm(dim=1)
    sq, _ = contrib.sq_norms(NormPolicy())
    torch.testing.assert_close(sq.sqrt(), norms, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(contrib.materialize(), naive, rtol=1e-9, atol=1e-12)
    coef = torch.clamp(float(norms[norms > 0].median()) / norms, max=1.0)
    torch.testing.assert_close(contrib.weighted_sum(coef), torch.tensordot(coef, naive, dims=([0], [0])), rtol=1e-9, atol=1e-12)


def test_max_mode_is_refused_clearly():
    m = nn.Sequential(nn.EmbeddingBag(5, 2, mode="max"))
    assert "mode='max'" in GhostEngine.unsupported_reason(m)


def test_flat_input_with_offsets_stays_on_ghost():
    """A 1-D input with offsets (one bag per example): the batch is read from the output."""
    import warnings

    import torch.nn.functional as F
    from torch import nn

    from pytorch_privacy.optimizer.engines import GhostEngine

    from . import _dp_naive as naive

    class Bags(nn.Module):
        def __init__(self):
            super().__init__()
            self.bag = nn.EmbeddingBag(10, 4, mode="mean")
            self.head = nn.Linear(4, 2)

        def forward(self, ids, offsets):
            return self.head(self.bag(ids, offsets))

    def ce(out, y):
        return F.cross_entropy(out, y, reduction="none")

    torch.manual_seed(0)
    model = Bags().double()
    B = 4
    ids = torch.randint(0, 10, (B, 3))
    # the engine sees (ids [B, 3], offsets [B]); the module sees the flat form
    class Flat(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, ids):
            flat = ids.reshape(-1)
            offsets = torch.arange(0, flat.numel(), ids.shape[1], device=ids.device)
            return self.inner(flat, offsets)

    flat_model = Flat(model)
    y = torch.randint(0, 2, (B,))
    eng = GhostEngine(flat_model, ce)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        norms = eng.compute(ids, y).norms()
    ref = torch.stack([naive.norm(g) for g in naive.per_example_grads(flat_model, ce, ids, y)])
    torch.testing.assert_close(norms.double(), ref, rtol=1e-9, atol=1e-12)
    assert not eng._switched
