"""Owned randomness: OS-seeded generators that checkpoints hold, never torch's global RNG; noise in
fp32 or wider; secure mode from the OS CSPRNG."""

from __future__ import annotations

import io
import math

import pytest
import torch
from scipy import stats
from torch import nn

from pytorch_privacy.dp_query import GaussianSumQuery, PrivacyLedger
from pytorch_privacy.dp_query.gaussian_query import add_gaussian_noise
from pytorch_privacy.dp_query.normalized_query import GaussianAverageQuery
from pytorch_privacy.dp_query.randomness import (
    SECURE_NOISE_TERMS,
    RandomSource,
    secure_bernoulli,
    secure_standard_normal,
)
from pytorch_privacy.optimizer import DPDataLoader, DPGaussianOptimizer, DPOptimizer, PoissonSampler
from pytorch_privacy.optimizer.budget import PrivacyBudgetExceeded


def mse(out, y):
    return ((out - y) ** 2).sum(dim=1)


def _build(**kw):
    model = nn.Linear(20, 10, bias=False)
    opt = DPGaussianOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), model, mse, 1.0, 1.0,
                              expected_batch_size=1.0, **kw)
    return model, opt


def _noise_steps(model, opt, k):
    """``k`` empty-batch steps (noise only, D = 1, lr = 1): each step's update is ``-noise``."""
    out = []
    for _ in range(k):
        before = model.weight.detach().clone()
        opt.fit_batch(torch.zeros(0, 20), torch.zeros(0, 10))
        out.append((before - model.weight.detach()).flatten())
    return out


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _cos(a, b):
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def test_resume_after_reseeding_never_repeats_noise_and_continues_the_stream():
    # the reproduction: seed, build, 3 steps, save; seed again, build, load, 3 steps
    torch.manual_seed(0)
    model, opt = _build()
    first = _noise_steps(model, opt, 3)
    ckpt = _roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})
    reference = _noise_steps(model, opt, 3)  # what the uninterrupted run draws next

    torch.manual_seed(0)
    model2, opt2 = _build()
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    resumed = _noise_steps(model2, opt2, 3)
    for a, r in zip(first, resumed):
        assert abs(_cos(a, r)) < 0.5  # 200 coordinates: independent draws have |cos| ~ 0.07
    for ref, r in zip(reference, resumed):
        assert torch.equal(ref, r)  # restored exactly


def test_two_runs_seeded_alike_draw_different_noise():
    torch.manual_seed(0)
    m1, o1 = _build()
    (a,) = _noise_steps(m1, o1, 1)
    torch.manual_seed(0)
    m2, o2 = _build()
    (b,) = _noise_steps(m2, o2, 1)
    assert abs(_cos(a, b)) < 0.5


def test_noise_and_sampling_never_touch_the_global_rng():
    model, opt = _build()
    sampler = PoissonSampler(100, 0.1)
    torch.manual_seed(5)
    expected = torch.rand(4)
    torch.manual_seed(5)
    _noise_steps(model, opt, 2)
    sampler.sample()
    assert torch.equal(torch.rand(4), expected)


def test_a_refused_budget_step_advances_no_generator():
    model = nn.Linear(20, 10, bias=False)
    ledger = PrivacyLedger(1000, 0.001)
    opt = DPGaussianOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), model, mse, 1.0, 1.0, ledger=ledger,
                              target_epsilon=0.05, target_delta=1e-5)
    with pytest.raises(PrivacyBudgetExceeded):
        for _ in range(1000):
            opt.fit_batch(torch.zeros(0, 20), torch.zeros(0, 10))
    saved = [s.state_dict() for s in getattr(opt, "_random_sources", [])]
    torch.manual_seed(9)
    expected = torch.rand(3)
    torch.manual_seed(9)
    with pytest.raises(PrivacyBudgetExceeded):
        opt.fit_batch(torch.zeros(0, 20), torch.zeros(0, 10))
    assert torch.equal(torch.rand(3), expected)
    after = [s.state_dict() for s in opt._random_sources]
    assert len(saved) == len(after) == 1
    for a, b in zip(saved, after):
        assert a["states"].keys() == b["states"].keys()
        assert all(torch.equal(a["states"][k], b["states"][k]) for k in a["states"])


def test_poisson_sampler_resume_continues_whatever_the_script_seeds():
    torch.manual_seed(1)
    s = PoissonSampler(200, 0.1)
    first = [s.sample().tolist() for _ in range(3)]
    st = _roundtrip(s.state_dict())
    nxt = [s.sample().tolist() for _ in range(3)]
    torch.manual_seed(1)
    s2 = PoissonSampler(200, 0.1)
    s2.load_state_dict(st)
    again = [s2.sample().tolist() for _ in range(3)]
    assert again == nxt and again != first
    with pytest.raises(ValueError, match="sample_rate"):
        PoissonSampler(200, 0.2).load_state_dict(st)


def test_a_shared_source_is_saved_once_and_queries_own_one_by_default():
    from pytorch_privacy.dp_query import QuantileAdaptiveClipSumQuery
    from pytorch_privacy.optimizer.checkpoint import find_random_sources

    q = QuantileAdaptiveClipSumQuery(1.0, 1.0, 0.5, 0.2, 1.0, 10.0)
    assert len(find_random_sources(q)) == 1
    assert GaussianSumQuery(1.0, 1.0).generator.kind == "owned"


# -- precision ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_noise_is_drawn_and_added_in_fp32(dtype):
    n, sigma = 10**6, 0.5
    leaf = (torch.arange(n) % 7).to(dtype) * 0.3
    out = add_gaussian_noise({"w": leaf}, sigma, torch.Generator().manual_seed(0))["w"]
    z = torch.randn(n, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    assert out.dtype == dtype
    assert torch.equal(out, (leaf.float() + z * sigma).to(dtype))  # one rounding, of an fp32 sum
    assert abs(float((out.float() - leaf.float()).std()) - sigma) < 0.01 * sigma
    drawn = RandomSource(torch.Generator().manual_seed(1)).normal((n,), dtype=dtype)
    assert drawn.dtype == torch.float32
    assert drawn.unique().numel() > 900_000  # an fp16 draw has ~22k distinct values, bf16 ~3.6k


def test_float64_noise_stays_float64():
    out = add_gaussian_noise(torch.zeros(1000, dtype=torch.float64), 1.0)
    assert out.dtype == torch.float64 and out.unique().numel() == 1000


# -- secure mode -------------------------------------------------------------------------
def test_secure_normals_are_standard_normal():
    z = secure_standard_normal(200_000)
    assert z.dtype.name == "float64"
    assert stats.kstest(z, "norm").pvalue > 1e-6
    assert abs(z.std() - 1) < 0.01 and abs(z.mean()) < 0.01
    assert SECURE_NOISE_TERMS >= 2


def test_secure_bernoulli_rate():
    n, p = 200_000, 0.013
    k = int(secure_bernoulli(n, p).sum())
    assert stats.binomtest(k, n, p).pvalue > 1e-6
    assert bool(secure_bernoulli(10, 1.0).all()) and not bool(secure_bernoulli(10, 0.0).any())


def test_secure_mode_draws_from_the_os_not_from_torch(monkeypatch):
    calls = []
    real = torch.randn

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    q = GaussianSumQuery(1.0, 2.0, secure_mode=True)
    monkeypatch.setattr(torch, "randn", spy)
    out = add_gaussian_noise({"w": torch.zeros(50_000)}, 2.0, q.generator)["w"]
    monkeypatch.undo()
    assert not calls
    assert abs(float(out.std()) - 2.0) < 0.05
    assert q.generator.state_dict()["states"] == {}


def test_secure_mode_plumbing_and_refusals():
    model = nn.Linear(20, 10, bias=False)
    sgd = torch.optim.SGD(model.parameters(), lr=1.0)
    opt = DPGaussianOptimizer(sgd, model, mse, 1.0, 1.0, expected_batch_size=1.0, secure_mode=True)
    assert opt.secure_mode and all(s.secure_mode for s in opt._random_sources)
    opt.fit_batch(torch.zeros(0, 20), torch.zeros(0, 10))
    with pytest.raises(ValueError, match="not cryptographically secure"):
        DPGaussianOptimizer(sgd, model, mse, 1.0, 1.0, expected_batch_size=1.0, secure_mode=True,
                            generator=torch.Generator())
    with pytest.raises(ValueError, match="non-secure generator"):
        DPOptimizer(sgd, model, mse, GaussianAverageQuery(1.0, 1.0, 1.0), secure_mode=True)
    ds = torch.utils.data.TensorDataset(torch.zeros(100, 20), torch.zeros(100, 10))
    loader = DPDataLoader(ds, 0.1, secure_mode=True)
    assert loader.poisson_sampler.secure_mode and loader.poisson_sampler.generator is None
    sizes = [len(b[0]) for b in loader]
    assert len(sizes) == 10 and all(0 <= s <= 100 for s in sizes)


def test_secure_noise_cost_is_bounded():
    import time

    t = time.perf_counter()
    secure_standard_normal(10**5)
    assert time.perf_counter() - t < 1.0  # ~20 ms per 1e5 values on one core
    assert math.isfinite(float(secure_standard_normal(1)[0]))


def test_the_optimizer_checkpoints_its_loader_so_sampling_resumes_too():
    ds = torch.utils.data.TensorDataset(torch.randn(200, 20), torch.randn(200, 10))

    def build():
        torch.manual_seed(0)
        loader = DPDataLoader(ds, 0.05)
        model = nn.Linear(20, 10, bias=False)
        opt = DPGaussianOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, mse, 1.0, 1.0,
                                  data_loader=loader)
        return loader, opt

    loader, opt = build()
    it = iter(loader)
    first = [next(it)[0] for _ in range(3)]
    ckpt = _roundtrip(opt.state_dict())
    nxt = [next(it)[0] for _ in range(3)]
    loader2, opt2 = build()
    opt2.load_state_dict(ckpt)
    it2 = iter(loader2)
    again = [next(it2)[0] for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(again, nxt))
    assert not all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(again, first))


@pytest.mark.gpu
def test_owned_cuda_generator_draws_on_device_and_resumes_exactly():
    src = RandomSource()
    a = src.normal((1000,), device="cuda")
    assert a.device.type == "cuda" and src.torch_generator("cuda").device.type == "cuda"
    st = src.state_dict()
    b = src.normal((1000,), device="cuda")
    src2 = RandomSource()
    src2.load_state_dict(_roundtrip(st))
    assert torch.equal(src2.normal((1000,), device="cuda"), b)


def test_adaptive_clipping_in_secure_mode_shares_one_secure_source():
    from pytorch_privacy.dp_query import NormalizedQuery, QuantileAdaptiveClipSumQuery
    from pytorch_privacy.optimizer.checkpoint import find_random_sources

    src = RandomSource(secure_mode=True)
    inner = QuantileAdaptiveClipSumQuery(1.0, 1.0, 0.5, 0.2, 1.0, 4.0, generator=src)
    model = nn.Linear(20, 10, bias=False)
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, mse, NormalizedQuery(inner, 4.0),
                      secure_mode=True)
    assert find_random_sources(opt.query) == [src]
    opt.fit_batch(torch.randn(4, 20), torch.randn(4, 10))
    assert torch.isfinite(model.weight).all()


def test_version_1_checkpoints_still_load():
    def build():
        return _build(generator=torch.Generator().manual_seed(11))

    model, opt = build()
    _noise_steps(model, opt, 2)
    sd = opt.state_dict()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    (src,) = opt._random_sources
    v1 = {k: v for k, v in sd.items() if k not in ("query_config", "random_sources", "data_loader")}
    v1.update(version=1, generators=[src.generator.get_state()])
    ref = _noise_steps(model, opt, 2)
    model2, opt2 = build()
    model2.load_state_dict(weights)
    opt2.load_state_dict(v1)
    assert all(torch.equal(a, b) for a, b in zip(_noise_steps(model2, opt2, 2), ref))


def test_a_second_branch_from_one_checkpoint_can_take_fresh_noise():
    model, opt = _build()
    _noise_steps(model, opt, 1)
    sd = _roundtrip(opt.state_dict())
    m1, o1 = _build()
    o1.load_state_dict(sd)
    m2, o2 = _build()
    o2.load_state_dict(sd)
    m3, o3 = _build()
    o3.load_state_dict(sd, fresh_randomness=True)
    (a,), (b,), (c,) = _noise_steps(m1, o1, 1), _noise_steps(m2, o2, 1), _noise_steps(m3, o3, 1)
    assert _cos(a, b) > 0.999  # exact restore: both branches continue the same stream
    assert abs(_cos(a, c)) < 0.5


# -- prefetching: draws made early are invisible in the stream ----------------------------------
def _twins(seed=5):
    return RandomSource(torch.Generator().manual_seed(seed)), RandomSource(torch.Generator().manual_seed(seed))


def test_a_prefetch_returns_what_the_next_draw_would_and_the_stream_goes_on_alike():
    a, b = _twins()
    a.prefetch_normal((7,))
    assert torch.equal(a.normal((7,)), b.normal((7,)))
    assert torch.equal(a.normal((3,)), b.normal((3,)))
    # taken once: the next draw of the same shape is new
    a.prefetch_normal((7,))
    first = a.normal((7,))
    assert not torch.equal(first, a.normal((7,)))


@pytest.mark.parametrize("other", ["shape", "dtype", "bernoulli", "generator"])
def test_any_other_draw_first_rewinds_a_prefetch(other):
    a, b = _twins()
    a.prefetch_normal((7,))
    if other == "shape":
        assert torch.equal(a.normal((4,)), b.normal((4,)))
    elif other == "dtype":
        assert torch.equal(a.normal((7,), dtype=torch.float64), b.normal((7,), dtype=torch.float64))
    elif other == "bernoulli":
        assert torch.equal(a.bernoulli_mask(9, 0.5), b.bernoulli_mask(9, 0.5))
    else:  # code drawing from the source's generator itself
        assert torch.equal(torch.randn(4, generator=a.torch_generator()), torch.randn(4, generator=b.torch_generator()))
    assert torch.equal(a.normal((7,)), b.normal((7,)))


def test_a_checkpoint_taken_during_a_prefetch_resumes_before_it():
    a, b = _twins()
    a.prefetch_normal((7,))
    state = a.state_dict()
    assert torch.equal(state["states"]["cpu"], b.state_dict()["states"]["cpu"])
    held = a.normal((7,))
    c = RandomSource(torch.Generator())
    c.load_state_dict(state)
    assert torch.equal(c.normal((7,)), held)  # the same stream as a run that never prefetched
    # a restore drops a held prefetch (it was drawn from a position the restore replaces)
    a.prefetch_normal((7,))
    a.load_state_dict(state)
    assert torch.equal(a.normal((7,)), held)


def test_a_prefetch_is_discarded_not_reused_when_the_shared_generator_moved_on():
    g = torch.Generator().manual_seed(5)
    a = RandomSource(g)
    a.prefetch_normal((7,))
    held = RandomSource(torch.Generator().manual_seed(5)).normal((7,))  # what the prefetch drew
    torch.randn(3, generator=g)  # other code draws from the user's generator meanwhile
    after = g.get_state()
    z = a.normal((7,))
    assert not torch.equal(z, held)  # fresh normals, drawn after the other code's ...
    assert torch.equal(z, torch.randn(7, generator=torch.Generator().set_state(after)))  # ... not rewound over them


def test_a_secure_prefetch_is_used_once():
    s = RandomSource(secure_mode=True)
    s.prefetch_normal((1000,))
    z1, z2 = s.normal((1000,)), s.normal((1000,))
    assert z1.shape == (1000,) and not torch.equal(z1, z2)


def test_stream_state_says_where_the_next_draw_starts():
    """Equal stream states draw equal values (what the distributed steps compare across ranks); a
    held prefetch is reported at its start and kept; a secure source has none."""
    a, b = RandomSource(), RandomSource()
    assert not torch.equal(a.stream_state(), b.stream_state())  # owned: OS-seeded when first asked
    b.load_state_dict(a.state_dict())  # one checkpoint restored twice
    assert torch.equal(a.stream_state(), b.stream_state())
    torch.testing.assert_close(a.normal((5,)), b.normal((5,)), atol=0, rtol=0)
    start = a.stream_state()
    a.prefetch_normal((7,))
    assert torch.equal(a.stream_state(), start)  # at the prefetch's start
    c = RandomSource()
    c.load_state_dict({"kind": "owned", "states": {"cpu": start}})
    torch.testing.assert_close(a.normal((7,)), c.normal((7,)), atol=0, rtol=0)
    user = RandomSource(torch.Generator().manual_seed(3))
    assert torch.equal(user.stream_state(), torch.Generator().manual_seed(3).get_state())
    assert RandomSource(secure_mode=True).stream_state() is None
