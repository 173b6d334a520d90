"""fp16 private steps with a static loss scale (DPLossScaler): unscaled before clipping, norms and
sums in fp32, overflowing records dropped while the step is still released and recorded."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from pytorch_privacy.dp_query import PrivacyLedger
from pytorch_privacy.optimizer import DPGaussianOptimizer
from pytorch_privacy.optimizer.distributed.precision import DPLossScaler

from . import _workers as w


def weighted_ce(out, y):
    """Per-example cross-entropy times a per-example weight carried in the targets' column 1."""
    return F.cross_entropy(out, y[:, 0].long(), reduction="none") * y[:, 1]


def _batch(n=12, seed=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = torch.stack([torch.randint(0, 3, (n,), generator=g).float(), torch.ones(n)], 1)
    return x, y


def _opt(model, engine, clip=0.3, sigma=0.0, ledger=None, **kw):
    return DPGaussianOptimizer(
        torch.optim.SGD(model.parameters(), lr=1.0), model, weighted_ce, l2_norm_clip=clip, noise_multiplier=sigma,
        expected_batch_size=12, engine=engine, generator=torch.Generator().manual_seed(0), ledger=ledger, **kw,
    )


@pytest.mark.parametrize("engine", ["ghost", "functorch"])
def test_fp16_scaled_step_matches_fp32_and_clips_unscaled_gradients(engine):
    x, y = _batch()
    ref_model = w.make_model()
    ref = _opt(ref_model, engine)
    ref_norms = ref.per_example_gradients(x, y).norms()
    assert (ref_norms > 0.3).sum() >= 6  # the clip binds for most records
    ref.fit_batch(x, y)

    model = w.make_model()
    opt = _opt(model, engine, max_physical_batch_size=5)  # chunks 5 + 5 + 2
    scaler = DPLossScaler(torch.amp.GradScaler("cpu", init_scale=2.0**10))
    assert scaler.scale == 1024.0
    with torch.autocast("cpu", dtype=torch.float16):
        raw = opt.per_example_gradients(x, y, loss_fn=scaler.scaled_loss(weighted_ce))
        norms = scaler.unscale(raw).norms()
        loss = scaler.fit_batch(opt, x, y)
    assert norms.dtype == torch.float32
    torch.testing.assert_close(raw.norms().float() / 1024.0, norms)
    torch.testing.assert_close(norms, ref_norms, rtol=2e-2, atol=1e-3)  # unscaled, fp16 accuracy
    with torch.no_grad():
        torch.testing.assert_close(loss, weighted_ce(w.make_model()(x), y).mean(), rtol=2e-2, atol=1e-3)
    for (n, p), p_ref in zip(model.named_parameters(), ref_model.parameters()):
        assert p.grad.dtype == torch.float32
        # clipping the scaled gradients would shrink this update 1024-fold
        torch.testing.assert_close(p.detach(), p_ref.detach(), rtol=2e-2, atol=2e-3, msg=n)


@pytest.mark.parametrize("engine", ["ghost", "functorch"])
def test_fp16_overflowing_record_is_dropped_and_the_step_still_released_and_recorded(engine):
    x, y = _batch()
    y[0, 1] = 1e3  # record 0: scaled output gradient ~ 4e6 > fp16 max (65504) -> inf
    ref_model = w.make_model()
    _opt(ref_model, engine).fit_batch(x[1:], y[1:])  # the others, same denominator
    model = w.make_model()
    ledger = PrivacyLedger(1200, 0.01)
    opt = _opt(model, engine, ledger=ledger)
    scaler = DPLossScaler(2.0**12)
    with torch.autocast("cpu", dtype=torch.float16), pytest.warns(RuntimeWarning, match="non-finite"):
        scaler.fit_batch(opt, x, y)
    assert opt.dropped_records == 1
    assert ledger.steps == 1  # released (noise, even if zero here) and recorded
    for (n, p), p_ref in zip(model.named_parameters(), ref_model.parameters()):
        assert torch.isfinite(p).all()
        torch.testing.assert_close(p.detach(), p_ref.detach(), rtol=2e-2, atol=2e-3, msg=n)


def test_fp16_noise_is_added_on_an_all_overflow_step():
    x, y = _batch()
    y[:, 1] = 1e3  # every record overflows: the release is noise only
    model = w.make_model()
    before = [p.detach().clone() for p in model.parameters()]
    ledger = PrivacyLedger(1200, 0.01)
    opt = _opt(model, "ghost", sigma=1.0, ledger=ledger)
    with torch.autocast("cpu", dtype=torch.float16), pytest.warns(RuntimeWarning):
        DPLossScaler(2.0**12).fit_batch(opt, x, y)
    update = torch.cat([(p.detach() - b).reshape(-1) for p, b in zip(model.parameters(), before)])
    assert ledger.steps == 1 and opt.dropped_records == 12
    # pure noise: stddev sigma * C / D = 0.3 / 12 per coordinate (53 coordinates: loose bounds)
    assert 0.5 * 0.025 < float(update.std()) < 1.6 * 0.025


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan"), "2", True])
def test_loss_scale_must_be_positive_and_finite(bad):
    with pytest.raises(ValueError, match="scale"):
        DPLossScaler(bad)


def test_disabled_grad_scaler_is_refused():
    with pytest.raises(ValueError, match="disabled"):
        DPLossScaler(torch.amp.GradScaler("cpu", enabled=False))


@pytest.mark.gpu
@pytest.mark.parametrize("engine", ["ghost", "functorch"])
def test_fp16_grad_scaler_on_gpu(engine):
    x, y = (t.cuda() for t in _batch())
    ref_model = w.make_model().cuda()
    _opt(ref_model, engine).fit_batch(x, y)
    model = w.make_model().cuda()
    opt = _opt(model, engine)
    with torch.autocast("cuda", dtype=torch.float16):
        DPLossScaler(torch.amp.GradScaler("cuda", init_scale=2.0**12)).fit_batch(opt, x, y)
    for p, p_ref in zip(model.parameters(), ref_model.parameters()):
        assert p.grad.dtype == torch.float32
        torch.testing.assert_close(p.detach(), p_ref.detach(), rtol=2e-2, atol=2e-3)


# -- the dynamic scale, driven by a noised overflow count ------------------------------------------
def _dyn(**kw):
    from pytorch_privacy.optimizer.distributed.precision import DynamicDPLossScaler

    return DynamicDPLossScaler(**kw)


def test_dynamic_scale_backs_off_until_nothing_overflows_then_grows():
    x, y = _batch()
    y[:, 1] = 30.0  # scaled losses ~30 * 2**15: most records overflow fp16 at the first scale
    opt = _opt(w.make_model(), "ghost", sigma=1.0)
    scaler = _dyn(init_scale=2.0**15, growth_interval=3)
    scales, dropped = [], []
    with torch.autocast("cpu", dtype=torch.float16), pytest.warns(RuntimeWarning, match="non-finite"):
        for _ in range(14):
            scales.append(scaler.scale)
            before = opt.dropped_records
            scaler.fit_batch(opt, x, y)
            dropped.append(opt.dropped_records - before)
    scales.append(scaler.scale)
    assert dropped[0] >= 8  # the first scale overflows most records
    # a step with >= 8 drops backs off (noised count > 4 unless the N(0, 1) noise is below -4)
    assert all(scales[i + 1] == scales[i] / 2 for i in range(14) if dropped[i] >= 8)
    grew = [i for i in range(14) if scales[i + 1] == 2 * scales[i]]
    assert grew and all(dropped[i - 2:i + 1] == [0, 0, 0] for i in grew)  # growth after 3 clean steps
    first_clean = dropped.index(0)
    # like GradScaler, it then probes upwards: at most one overflowing step per 4
    assert sum(d > 0 for d in dropped[first_clean:]) <= -(-(14 - first_clean) // 4)


def test_dynamic_scale_moves_on_the_noised_count_only():
    x, y = _batch()
    y[0, 1] = 1e3  # one record overflows at every step
    opt = _opt(w.make_model(), "ghost", sigma=1.0)
    # the true count (1) is always above the threshold (0.5); with count noise 100 the released
    # count is below it about half the time, and the scale must follow the released count
    scaler = _dyn(init_scale=2.0**12, count_noise_multiplier=100.0, backoff_threshold=0.5, growth_interval=1000)
    released, scales = [], [scaler.scale]
    with torch.autocast("cpu", dtype=torch.float16), pytest.warns(RuntimeWarning):
        for _ in range(8):
            scaler.fit_batch(opt, x, y)
            released.append(scaler.last_noised_count)
            scales.append(scaler.scale)
    assert opt.dropped_records == 8
    assert any(r <= 0.5 for r in released) and any(r > 0.5 for r in released)
    for i, r in enumerate(released):
        assert scales[i + 1] == (scales[i] / 2 if r > 0.5 else scales[i])


def test_count_noise_has_the_stated_stddev_and_uses_the_query_source():
    opt = _opt(w.make_model(), "ghost", sigma=2.0)
    scaler = _dyn()
    sigma_o = scaler.count_stddev(opt)
    assert sigma_o == 2.0
    g = opt._random_sources[0].torch_generator("cpu")
    state = g.get_state()
    draws = torch.stack([scaler.noised_count(opt, 3.0, sigma_o) for _ in range(4000)])
    assert not torch.equal(g.get_state(), state)  # drawn from the query's own source
    assert abs(float(draws.mean()) - 3.0) < 0.15 and abs(float(draws.std()) / 2.0 - 1) < 0.05


def test_dynamic_scale_is_free_in_the_ledger_and_refuses_a_cheaper_count():
    x, y = _batch()
    ledgers = []
    for scaler in (DPLossScaler(2.0**10), _dyn(init_scale=2.0**10, growth_interval=1)):
        ledger = PrivacyLedger(1200, 0.01)
        opt = _opt(w.make_model(), "ghost", sigma=1.0, ledger=ledger)
        with torch.autocast("cpu", dtype=torch.float16):
            for _ in range(3):
                scaler.fit_batch(opt, x, y)
        ledgers.append(ledger.to_json())
    assert ledgers[0] == ledgers[1]  # the count adds no event: same mechanism (module docstring)
    opt = _opt(w.make_model(), "ghost", sigma=1.0)
    with pytest.raises(ValueError, match="below the optimizer's noise_multiplier"):
        _dyn(count_noise_multiplier=0.5).fit_batch(opt, x, y)
    with pytest.raises(ValueError, match="growth_interval"):
        _dyn(growth_interval=0)


def test_dynamic_scale_state_round_trips():
    a = _dyn(init_scale=2.0**10, growth_interval=5)
    a.update(0.0, 1.0)
    a.update(9.0, 1.0)  # backoff
    a.update(0.0, 1.0)
    b = _dyn(init_scale=2.0**12, growth_interval=5)
    b.load_state_dict(a.state_dict())
    assert (b.scale, b._good_steps, b.last_noised_count) == (512.0, 1, 0.0)
    with pytest.raises(ValueError, match="outside"):
        b.load_state_dict({"scale": 2.0**30, "good_steps": 0})


def test_a_new_scale_compiles_no_new_graph():
    from pytorch_privacy.optimizer.engines import CompiledEngine

    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    x, y = _batch()
    opt = _opt(w.make_model(), functools.partial(CompiledEngine, backend=counting), sigma=1.0)
    scaler = _dyn(init_scale=2.0**10, growth_interval=1)  # the scale doubles after every clean step
    with torch.autocast("cpu", dtype=torch.float16):
        for _ in range(3):
            scaler.fit_batch(opt, x, y)
    assert scaler.scale == 2.0**13 and len(graphs) == 1


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_distributed_dynamic_scale_releases_one_count_with_split_noise(tmp_path, fsdp):
    # no overflow: the world's released count is 0 + N(0, sigma_o^2) made of two N(0, sigma_o^2 / 2)
    w.spawn(w.dynamic_scale, 2, str(tmp_path), 300, False, fsdp)
    r0, r1 = (torch.load(tmp_path / f"dyn{r}.pt", weights_only=False) for r in range(2))
    assert r0["released"] == r1["released"] and r0["scales"] == r1["scales"]  # one release, same scale
    assert sum(r0["dropped"]) == sum(r1["dropped"]) == 0
    released = torch.tensor(r0["released"])
    assert abs(float(released.std()) - 1.0) < 0.12 and abs(float(released.mean())) < 0.2  # not sqrt(2), not 0
    assert len(set(r0["released"])) == 300


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_distributed_dynamic_scale_backs_off_on_one_ranks_overflow(tmp_path, fsdp):
    w.spawn(w.dynamic_scale, 2, str(tmp_path), 6, True, fsdp)
    r0, r1 = (torch.load(tmp_path / f"dyn{r}.pt", weights_only=False) for r in range(2))
    assert r0["scales"] == r1["scales"] and r0["released"] == r1["released"]
    assert sum(r0["dropped"]) == 0 and r1["dropped"][0] == 8  # only rank 1's records overflow
    assert r0["scales"][1] == r0["scales"][0] / 2  # rank 0 backs off too: it released the world's count
    # every step released and recorded once (rank 0), the count adding no event
    assert PrivacyLedger.from_json(r0["ledger"]).steps == 6 and PrivacyLedger.from_json(r1["ledger"]).steps == 0
