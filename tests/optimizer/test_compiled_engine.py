"""The compiled engine (``engines/compiled_engine.py``): bucketed padding that contributes nothing,
equality with the eager functorch engine, few graphs for Poisson batch sizes, and the optimizer
taking an engine factory.  The engine matrix (``test_engines.py``) covers it on every model case.
Backend: ``aot_eager`` (set in ``conftest.py``) except where inductor is named."""

from __future__ import annotations

import functools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

from pytorch_privacy.optimizer import DPGaussianOptimizer
from pytorch_privacy.optimizer.engines import CompiledEngine, PaddedGradients, FunctorchEngine, bucket_size


def ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


def mlp(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def batch(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


class CountingBackend:
    """A ``torch.compile`` backend that counts the graphs it is handed and runs them eagerly."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def test_bucket_sizes_by_hand():
    # 9 -> step 2 -> 10;  100 (2**6 <= 100 < 2**7) -> step 16 -> 112;  257 -> step 64 -> 320
    assert [bucket_size(n) for n in (0, 1, 7, 8, 9, 10, 11, 100, 112, 113, 256, 257, 1000)] == [
        8, 8, 8, 8, 10, 10, 12, 112, 112, 128, 256, 320, 1024,
    ]
    with pytest.raises(ValueError, match="non-negative int"):
        bucket_size(-1)


@settings(max_examples=60)
@given(n=st.integers(9, 10**6))
def test_bucket_padding_is_bounded_and_sizes_are_few(n):
    b = bucket_size(n)
    assert n <= b <= math.ceil(1.25 * n)
    assert bucket_size(b) == b  # a bucket is its own size
    # sizes a batch between n and 2n can take: at most five buckets
    assert len({bucket_size(k) for k in range(n, min(2 * n, n + 4096))}) <= 5 or n > 4096


@pytest.mark.parametrize("n,mb", [(5, None), (9, 3)])
def test_padded_equals_unpadded_and_functorch(n, mb):
    model = mlp()
    x, y = batch(n)
    padded = CompiledEngine(model, ce).compute(x, y, microbatch_size=mb)
    exact = CompiledEngine(model, ce, pad=False).compute(x, y, microbatch_size=mb)
    ref = FunctorchEngine(model, ce).compute(x, y, microbatch_size=mb)
    records = n // (mb or 1)
    coeff = torch.rand(records, generator=torch.Generator().manual_seed(3))
    for res in (padded, exact):
        assert res.num_records == records and res.names == ref.names
        torch.testing.assert_close(res.losses, ref.losses)
        torch.testing.assert_close(res.norms(), ref.norms())
        for k, v in ref.materialize().items():
            torch.testing.assert_close(res.materialize()[k], v)
        for k, v in ref.weighted_sum(coeff).items():
            torch.testing.assert_close(res.weighted_sum(coeff)[k], v)
    assert padded.padded_records == bucket_size(records) > records  # it was padded
    assert exact.padded_records == records


def test_padded_rows_are_never_read_even_when_nan():
    real_w, real_b = torch.arange(12.0).reshape(3, 2, 2), torch.arange(6.0).reshape(3, 2)
    nan = float("nan")
    grads = {  # 3 real records, 5 NaN padded rows
        "w": torch.cat([real_w, torch.full((5, 2, 2), nan)]),
        "b": torch.cat([real_b, torch.full((5, 2), nan)]),
    }
    real_sq = real_w.square().sum((1, 2)) + real_b.square().sum(1)
    g = PaddedGradients(grads, torch.cat([real_sq, torch.full((5,), nan)]), torch.zeros(3), 3)
    c = torch.tensor([0.5, -1.0, 2.0])
    ws = g.weighted_sum(c)
    assert torch.equal(ws["w"], (c[:, None, None] * real_w).sum(0)) and torch.equal(ws["b"], (c[:, None] * real_b).sum(0))
    assert torch.equal(g.norms(), real_sq.sqrt())
    mat = g.materialize()
    assert torch.equal(mat["w"], real_w) and torch.equal(mat["b"], real_b)


def test_poisson_batch_sizes_compile_few_graphs():
    backend = CountingBackend()
    model = mlp()
    eng = CompiledEngine(model, ce, backend=backend)
    for n in (5, 8, 3, 7, 1):  # all pad to 8
        eng.compute(*batch(n, seed=n))
    assert backend.graphs == 1
    eng.compute(*batch(9))  # 10
    eng.compute(*batch(10))
    assert backend.graphs == 2
    unpadded = CompiledEngine(model, ce, backend=(b2 := CountingBackend()), pad=False)
    for n in (5, 3):
        unpadded.compute(*batch(n, seed=n))
    assert b2.graphs == 2


def test_engines_do_not_share_graph_budget():
    # torch._dynamo caches graphs on the code object: each engine gets its own copy, so one
    # engine's graphs do not count against another's recompile limit
    b1, b2 = CountingBackend(), CountingBackend()
    CompiledEngine(mlp(), ce, backend=b1).compute(*batch(4))
    CompiledEngine(mlp(seed=1), ce, backend=b2).compute(*batch(4))
    assert b1.graphs == 1 and b2.graphs == 1


def test_empty_batch():
    res = CompiledEngine(mlp(), ce).compute(*batch(0))
    assert res.num_records == 0 and res.weighted_sum(torch.zeros(0))["0.weight"].abs().sum() == 0


def _train(engine, sizes, seed=0):
    model = mlp(seed)
    opt = DPGaussianOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.5), model, ce,
        l2_norm_clip=0.1, noise_multiplier=0.0, expected_batch_size=6, engine=engine,
    )
    for i, n in enumerate(sizes):
        opt.fit_batch(*batch(n, seed=10 + i))
    return model


def test_optimizer_with_compiled_engine_equals_functorch():
    sizes = (5, 7, 0, 3, 6)  # Poisson-like sizes, an empty batch included; clip active (C=0.1)
    ref = _train("functorch", sizes)
    for engine in ("compiled", functools.partial(CompiledEngine, chunk_size=4)):
        got = _train(engine, sizes)
        for (k, a), b in zip(ref.state_dict().items(), got.state_dict().values()):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6, msg=lambda m: f"{engine}: {k}: {m}")


def test_engine_factories_are_checked():
    gru = nn.GRU(3, 4)
    opt = torch.optim.SGD(gru.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="'compiled' cannot handle this model"):
        DPGaussianOptimizer(opt, gru, ce, l2_norm_clip=1.0, noise_multiplier=1.0, expected_batch_size=4,
                            engine=functools.partial(CompiledEngine, mode=None))
    model = mlp()
    with pytest.raises(TypeError, match="engine must be"):
        DPGaussianOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, ce, l2_norm_clip=1.0,
                            noise_multiplier=1.0, expected_batch_size=4, engine=3)


def test_compiler_failure_falls_back_to_eager_functorch():
    def broken(gm, example_inputs):
        raise RuntimeError("backend exploded")

    model = mlp()
    eng = CompiledEngine(model, ce, backend=broken)
    x, y = batch(4)
    with pytest.warns(RuntimeWarning, match="torch.compile failed.*eager functorch"):
        res = eng.compute(x, y)
    torch.testing.assert_close(res.norms(), FunctorchEngine(model, ce).compute(x, y).norms())
    assert isinstance(eng.fallback, FunctorchEngine) and not isinstance(eng.fallback, CompiledEngine)


@pytest.mark.slow
def test_inductor_matches_functorch():
    model = mlp()
    x, y = batch(13)  # padded to 14
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = CompiledEngine(model, ce, backend="inductor").compute(x, y)
    ref = FunctorchEngine(model, ce).compute(x, y)
    torch.testing.assert_close(got.norms(), ref.norms(), rtol=1e-5, atol=1e-6)
    c = torch.rand(13)
    for k, v in ref.weighted_sum(c).items():
        torch.testing.assert_close(got.weighted_sum(c)[k], v, rtol=1e-5, atol=1e-6)


# -- with DDP and under autocast ------------------------------------------------------------------
@pytest.mark.slow
def test_ddp_two_ranks_equal_one_process(tmp_path):
    from .distributed import _workers as w

    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("needs gloo")
    # the spawned ranks do not see conftest's backend: name it in the (picklable) factory
    variants = [(functools.partial(CompiledEngine, backend="aot_eager"), {}),
                (functools.partial(CompiledEngine, backend="aot_eager"), {"microbatch_size": 2})]
    refs = [w.train(w.make_model(), engine, w.make_batches(), **kw) for engine, kw in variants]
    w.spawn(w.equivalence, 2, variants, str(tmp_path))
    for rank in range(2):
        out = torch.load(tmp_path / f"params{rank}.pt", weights_only=False)
        assert out["hook_calls"] == [0, 0]
        for ref, params in zip(refs, out["params"]):
            for n in ref:
                torch.testing.assert_close(params[n], ref[n], atol=1e-5, rtol=0)


def test_bf16_autocast_norms_in_fp32_and_close_to_fp32():
    model = mlp()
    x, y = batch(7)
    ref = CompiledEngine(model, ce).compute(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = CompiledEngine(model, ce).compute(x, y)
    assert got.norms().dtype == torch.float32
    assert not torch.equal(got.norms(), ref.norms())  # the forward really ran in bf16
    torch.testing.assert_close(got.norms(), ref.norms(), rtol=3e-2, atol=1e-3)


@pytest.mark.slow
def test_fsdp2_two_ranks_equal_one_process(tmp_path):
    from .distributed import _fsdp_workers as fw
    from .distributed import _workers as w

    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("needs gloo")
    variants = [(functools.partial(CompiledEngine, backend="aot_eager"), {})]
    refs = []
    for engine, kw in variants:
        model = w.make_model()
        fw.train(model, engine, w.make_batches(), **kw)
        refs.append({n: p.detach().clone() for n, p in model.named_parameters()})
    w.spawn(fw.equivalence, 2, variants, str(tmp_path))
    for rank in range(2):
        out = torch.load(tmp_path / f"fsdp{rank}.pt", weights_only=False)
        for ref, res in zip(refs, out):
            for n in ref:
                torch.testing.assert_close(res["params"][n], ref[n], atol=1e-5, rtol=0)


@pytest.mark.gpu
def test_cuda_graphs_two_passes_in_one_step():
    """``mode="reduce-overhead"`` on CUDA: two sensitive passes held at once (a GAN-style step)
    equal the functorch engine's."""
    model = mlp().cuda()
    x1, y1 = (t.cuda() for t in batch(6, seed=1))
    x2, y2 = (t.cuda() for t in batch(6, seed=2))
    eng = CompiledEngine(model, ce, mode="reduce-overhead", backend="inductor")
    for _ in range(3):  # warm-up runs, then recorded and replayed graphs
        a, b = eng.compute(x1, y1), eng.compute(x2, y2)
    ref = FunctorchEngine(model, ce)
    torch.testing.assert_close(a.norms(), ref.compute(x1, y1).norms())
    torch.testing.assert_close(b.norms(), ref.compute(x2, y2).norms())
