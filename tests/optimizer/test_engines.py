"""Every engine against the naive per-example loop, for every layer family (float64, 1e-5)."""

from __future__ import annotations

import random
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from pytorch_privacy.optimizer.engines import (
    FunctorchEngine,
    GhostEngine,
    GraphedEngine,
    LoopEngine,
    available_engines,
    call_model,
    get_engine,
    select_engine,
)

from .engine_cases import CASES, build, naive_per_example

TOL = dict(rtol=1e-5, atol=1e-5)


def _batch_and_microbatch():
    return st.integers(1, 4).flatmap(
        lambda B: st.tuples(st.just(B), st.sampled_from([None] + [b for b in range(1, B + 1) if B % b == 0]))
    )


def _compute(engine_cls, model, loss_fn, x, y, mb):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # vmap performance warnings, ghost fallback warning
        return engine_cls(model, loss_fn).compute(x, y, microbatch_size=mb)


def _check_against_naive(result, ref, names):
    assert result.names == tuple(ref)
    mat = result.materialize()
    assert set(mat) == set(names)
    for n in names:
        torch.testing.assert_close(mat[n], ref[n], **TOL, msg=lambda m: f"{n}: {m}")
    ref_norms = torch.sqrt(sum(g.reshape(g.shape[0], -1).pow(2).sum(1) for g in ref.values()))
    torch.testing.assert_close(result.norms(), ref_norms, **TOL)
    c = torch.rand(result.num_records, dtype=ref_norms.dtype)
    ws = result.weighted_sum(c)
    for n in names:
        torch.testing.assert_close(ws[n], torch.tensordot(c, ref[n], dims=([0], [0])), **TOL)


@pytest.mark.parametrize("case", sorted(CASES))
@settings(max_examples=4, deadline=None)
@given(bm=_batch_and_microbatch(), seed=st.integers(0, 2**16))
def test_engines_match_naive_loop(case, bm, seed):
    B, mb = bm
    model, x, y, loss_fn = build(case, random.Random(seed), B)
    ref = naive_per_example(model, loss_fn, x, y, mb)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for name, cls in available_engines().items():
        reason = cls.unsupported_reason(model)
        if name not in CASES[case]:
            assert reason, f"{name} should reject {case}"
            continue
        assert reason is None, f"{name} should support {case}: {reason}"
        result = _compute(cls, model, loss_fn, x, y, mb)
        assert result.num_records == B // (mb or 1)
        torch.testing.assert_close(result.losses, loss_fn(call_model(model, x), y).detach(), **TOL)
        _check_against_naive(result, ref, names)
        for p in model.parameters():
            assert p.grad is None, "engines must not write .grad"


def test_frozen_parameters_are_excluded():
    model, x, y, loss_fn = build("lora", random.Random(0), 3)
    for cls in (GhostEngine, FunctorchEngine, LoopEngine):
        res = cls(model, loss_fn).compute(x, y)
        assert set(res.materialize()) == {"lora.A.weight", "lora.B.weight", "head.weight", "head.bias"}
        assert "lora.base.weight" not in res.weighted_sum(torch.ones(3, dtype=torch.float64))


def test_tied_parameter_appears_once_and_sums_both_uses():
    model, x, y, loss_fn = build("tied", random.Random(1), 3)
    ref = naive_per_example(model, loss_fn, x, y)
    assert "out.weight" not in ref and "emb.weight" in ref
    # the tied gradient differs from either use alone: check it against the sum explicitly
    for cls in (GhostEngine, FunctorchEngine, LoopEngine):
        torch.testing.assert_close(cls(model, loss_fn).compute(x, y).materialize()["emb.weight"], ref["emb.weight"])


@pytest.mark.parametrize("case", ["linear", "conv2d", "embedding", "tied", "dplstm"])
def test_engines_agree_in_float32(case):
    model, x, y, loss_fn = build(case, random.Random(3), 4)
    model = model.float()
    x = x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x
    ref = FunctorchEngine(model, loss_fn).compute(x, y)
    for mb in (None, 2):
        ref = FunctorchEngine(model, loss_fn).compute(x, y, microbatch_size=mb)
        got = GhostEngine(model, loss_fn).compute(x, y, microbatch_size=mb)
        torch.testing.assert_close(got.norms(), ref.norms(), rtol=1e-5, atol=1e-6)
        c = torch.rand(ref.num_records)
        a, b = got.weighted_sum(c), ref.weighted_sum(c)
        for n in a:
            torch.testing.assert_close(a[n], b[n], rtol=1e-5, atol=1e-6)


def test_float32_lstm_vmaps_and_float64_does_not():
    model, x, y, loss_fn = build("lstm", random.Random(0), 3)
    assert FunctorchEngine.unsupported_reason(model) is not None  # float64
    assert select_engine(model).name == "loop"
    model = model.float()
    assert FunctorchEngine.unsupported_reason(model) is None
    assert select_engine(model).name == "functorch"
    ref = naive_per_example(model, loss_fn, x, y)
    got = _compute(FunctorchEngine, model, loss_fn, x, y, None).materialize()
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-6)


def test_functorch_falls_back_to_loop_when_vmap_fails():
    class Hidden(nn.Module):
        def __init__(self):
            super().__init__()
            self.cell = nn.Linear(2, 2)
            self.rnn = [nn.GRU(2, 2, batch_first=True).double()]  # not registered: invisible to checks

        def forward(self, x):
            return self.cell(self.rnn[0](x)[0][:, -1])

    model = Hidden().double()
    x, y = torch.randn(3, 4, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    loss = lambda o, t: (o - t).pow(2).sum(1)  # noqa: E731
    eng = FunctorchEngine(model, loss)
    assert FunctorchEngine.unsupported_reason(model) is None
    with pytest.warns(RuntimeWarning, match="loop engine"):
        res = eng.compute(x, y)
    ref = naive_per_example(model, loss, x, y)
    torch.testing.assert_close(res.materialize()["cell.weight"], ref["cell.weight"])
    assert isinstance(eng.fallback, LoopEngine)


def test_dropout_draws_per_example_masks_under_vmap():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 64), nn.Dropout(0.5), nn.Linear(64, 1)).double()
    x = torch.randn(1, 4, dtype=torch.float64).expand(6, 4).contiguous()  # identical examples
    res = FunctorchEngine(model, lambda o, t: o.sum(1)).compute(x, torch.zeros(6))
    g = res.materialize()["2.weight"]
    assert not all(torch.equal(g[0], g[i]) for i in range(1, 6)), "dropout masks should differ per example"


@pytest.mark.parametrize("name", ["ghost", "functorch", "loop"])
def test_empty_batch(name):
    model, x, y, loss_fn = build("linear", random.Random(0), 1)
    res = get_engine(name)(model, loss_fn).compute(x[:0], y[:0])
    assert res.num_records == 0 and res.norms().shape == (0,)
    ws = res.weighted_sum(torch.zeros(0, dtype=torch.float64))
    for n, p in model.named_parameters():
        assert torch.equal(ws[n], torch.zeros_like(p))


@pytest.mark.parametrize("name", ["ghost", "functorch", "loop"])
def test_bad_microbatch_and_scalar_loss_rejected(name):
    model, x, y, loss_fn = build("linear", random.Random(0), 4)
    eng = get_engine(name)(model, loss_fn)
    with pytest.raises(ValueError, match="does not divide"):
        eng.compute(x, y, microbatch_size=3)
    with pytest.raises(ValueError, match="microbatch_size"):
        eng.compute(x, y, microbatch_size=0)
    eng = get_engine(name)(model, lambda o, t: loss_fn(o, t).mean())
    with pytest.raises(ValueError, match="per-example losses"):
        eng.compute(x, y)


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["conv2d", "embedding", "tied", "dplstm", "linear_seq"])
def test_engines_match_naive_loop_on_cuda(case, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    model, x, y, loss_fn = build(case, random.Random(5), 4)
    dev = torch.device("cuda")
    model = model.to(dev)
    x, y = x.to(dev), y.to(dev)
    ref = naive_per_example(model, loss_fn, x, y, 2)
    for cls in (GhostEngine, FunctorchEngine, GraphedEngine):  # graphed: captured CUDA graphs
        res = cls(model, loss_fn).compute(x, y, microbatch_size=2)
        mat = res.materialize()
        for n in ref:
            torch.testing.assert_close(mat[n], ref[n], **TOL)
        assert res.norms().device.type == "cuda"
