"""Activation checkpointing and sparse embeddings in the per-example engines."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint, checkpoint_sequential

from pytorch_privacy.optimizer.engines import FunctorchEngine, GhostEngine, LoopEngine
from pytorch_privacy.optimizer.engines.checkpointing import refuse_reentrant_checkpoint

from .engine_cases import naive_per_example

D = torch.float64


def ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


class Checkpointed(nn.Module):
    def __init__(self, reentrant: bool, sequential: bool = False):
        super().__init__()
        self.reentrant, self.sequential = reentrant, sequential
        self.body = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh())
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        if self.sequential:
            h = checkpoint_sequential(self.body, 2, x, use_reentrant=self.reentrant)
        else:
            h = checkpoint(self.body, x, use_reentrant=self.reentrant)
        return self.head(h)


def _batch(B=6):
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, 3, dtype=D, generator=g), torch.randint(0, 2, (B,), generator=g)


def _assert_matches(res, ref):
    mat = res.materialize()
    assert set(mat) == set(ref)
    for n, g in ref.items():
        torch.testing.assert_close(mat[n], g, rtol=1e-9, atol=1e-12)
    ref_norms = torch.sqrt(sum(g.reshape(g.shape[0], -1).pow(2).sum(1) for g in ref.values()))
    torch.testing.assert_close(res.norms(), ref_norms, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("sequential", [False, True])
@pytest.mark.parametrize("microbatch", [None, 2])
def test_non_reentrant_checkpoint_in_loop_engine(sequential, microbatch):
    torch.manual_seed(0)
    model = Checkpointed(False, sequential).to(D)
    x, y = _batch()
    ref = naive_per_example(model, ce, x, y, microbatch)
    eng = LoopEngine(model, ce)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        _assert_matches(eng.compute(x, y, microbatch_size=microbatch), ref)
    assert eng.use_autograd
    _assert_matches(eng.compute(x, y, microbatch_size=microbatch), ref)  # remembered


def test_non_reentrant_checkpoint_in_functorch_engine_hands_over_to_loop_with_a_clear_warning():
    torch.manual_seed(1)
    model = Checkpointed(False).to(D)
    x, y = _batch()
    ref = naive_per_example(model, ce, x, y)
    eng = FunctorchEngine(model, ce)
    with pytest.warns(RuntimeWarning, match="non-reentrant activation checkpointing"):
        res = eng.compute(x, y)
    _assert_matches(res, ref)
    assert isinstance(eng.fallback, LoopEngine)


@pytest.mark.parametrize("engine", [FunctorchEngine, LoopEngine])
@pytest.mark.parametrize("sequential", [False, True])
def test_reentrant_checkpoint_is_refused_naming_the_fix(engine, sequential):
    model = Checkpointed(True, sequential).to(D)
    x, y = _batch()
    with pytest.raises(ValueError, match="use_reentrant=False"):
        engine(model, ce).compute(x, y)
    # torch is restored: outside the engines reentrant checkpointing runs as usual
    xg = x.clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = checkpoint(model.body, xg, use_reentrant=True)
    out.sum().backward()
    assert xg.grad is not None


def test_reentrant_checkpoint_is_refused_by_ghost():
    model = Checkpointed(True).to(D)
    x, y = _batch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="use_reentrant=False"):
            GhostEngine(model, ce).compute(x, y).norms()


def test_refusal_nests_and_restores():
    import torch.utils.checkpoint as cp

    before = cp.CheckpointFunction.apply
    with refuse_reentrant_checkpoint():
        with refuse_reentrant_checkpoint():
            pass
        with pytest.raises(ValueError):
            cp.CheckpointFunction.apply(lambda t: t, True, torch.zeros(1))
    assert cp.CheckpointFunction.apply == before
    assert "apply" not in cp.CheckpointFunction.__dict__


# ------------------------------------------------------------------------------------------
# sparse embeddings
# ------------------------------------------------------------------------------------------


class SparseNet(nn.Module):
    def __init__(self, bag: bool):
        super().__init__()
        self.bag = bag
        self.emb = nn.EmbeddingBag(12, 4, mode="mean", sparse=True) if bag else nn.Embedding(12, 4, sparse=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = self.emb(x) if self.bag else self.emb(x).mean(1)
        return self.head(torch.tanh(h))


@pytest.mark.parametrize("engine", [FunctorchEngine, LoopEngine, GhostEngine])
@pytest.mark.parametrize("bag", [False, True])
@pytest.mark.parametrize("microbatch", [None, 3])
def test_sparse_embeddings_get_dense_per_example_gradients(engine, bag, microbatch):
    torch.manual_seed(2)
    model = SparseNet(bag).to(D)
    dense = copy.deepcopy(model)
    dense.emb.sparse = False  # the reference: same function, dense .grad
    x = torch.randint(0, 12, (6, 5))
    x[0, :3] = 4
    y = torch.randint(0, 2, (6,))
    ref = naive_per_example(dense, ce, x, y, microbatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        res = engine(model, ce).compute(x, y, microbatch_size=microbatch)
    _assert_matches(res, ref)
    assert model.emb.sparse  # restored
    # and the ordinary (non-private) step still gets its sparse gradient
    ce(model(x), y).sum().backward()
    assert model.emb.weight.grad.is_sparse


@pytest.mark.parametrize("sequential", [False, True])
@pytest.mark.parametrize("microbatch", [None, 2])
def test_non_reentrant_checkpoint_stays_on_ghost_and_is_exact(sequential, microbatch):
    """Hooks ignore the forward that checkpointing recomputes during backward, so the traced
    layout holds and the ghost engine neither falls back nor double-counts."""
    torch.manual_seed(0)
    model = Checkpointed(False, sequential).to(D)
    x, y = _batch()
    eng = GhostEngine(model, ce)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        res = eng.compute(x, y, microbatch_size=microbatch)
        _assert_matches(res, naive_per_example(model, ce, x, y, microbatch or 1))
    assert not eng._switched
