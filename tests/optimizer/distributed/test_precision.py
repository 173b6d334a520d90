"""fp16 private steps with a static loss scale (DPLossScaler): unscaled before clipping, norms and
sums in fp32, overflowing records dropped while the step is still released and recorded."""

from __future__ import annotations

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
