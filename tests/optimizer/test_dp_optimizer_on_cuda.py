"""DPOptimizer on CUDA: same results as on the CPU, and no host synchronisation per step."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from pytorch_privacy.dp_query import PrivacyLedger
from pytorch_privacy.optimizer import DPGaussianOptimizer

pytestmark = [
    pytest.mark.gpu,
]


def ce(out, y):
    return nn.functional.cross_entropy(out, y, reduction="none")


def model_and_data(device, seed=0, n=16):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.LayerNorm(16), nn.Linear(16, 3)).to(device)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g).to(device)
    y = torch.randint(0, 3, (n,), generator=g).to(device)
    return model, x, y


@contextlib.contextmanager
def no_sync():
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("engine", ["auto", "functorch", "compiled", "graphed"])
def test_cuda_step_equals_cpu_step(engine):
    results = []
    for dev in ("cpu", "cuda"):
        model, x, y = model_and_data(dev)
        opt = DPGaussianOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.5), model, ce, 0.3, 0.0, expected_batch_size=16, engine=engine
        )
        opt.fit_batch(x, y)
        results.append([p.detach().cpu() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("engine", ["auto", "functorch", "compiled", "graphed"])
@pytest.mark.parametrize(
    "config",
    ["plain", "microbatch", "chunks", "per_pass_public", "adam_budget_sched"],
)
def test_no_host_sync_in_a_step(engine, config):
    model, x, y = model_and_data("cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    kw: dict = {"engine": engine, "generator": gen}
    opt_cls = torch.optim.SGD
    if config == "microbatch":
        kw["microbatch_size"] = 4
    if config == "chunks":
        kw["max_physical_batch_size"] = 5
    if config == "per_pass_public":
        kw["pass_clipping"] = "per_pass"
    ledger = PrivacyLedger(1600, 0.01)
    if config == "adam_budget_sched":
        opt_cls = torch.optim.Adam
        from pytorch_privacy.analysis.accountant_base import PrivacyAccountant

        class Toy(PrivacyAccountant):  # host-only accountant (the real ones are numpy, no device)
            n = 0

            def supports(self, e):
                return True

            def compose(self, e, count=1):
                self.n += count
                return self

            def get_epsilon(self, d):
                return 0.01 * self.n

            def get_delta(self, e):
                return 0.0

        kw.update(target_epsilon=100.0, target_delta=1e-5, accountant=Toy())
    opt = DPGaussianOptimizer(opt_cls(model.parameters(), lr=0.1), model, ce, 0.5, 1.0, ledger=ledger, **kw)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.9)

    def one_step(xx, yy):
        if config == "per_pass_public":
            opt.zero_grad()
            opt.backward_pass(xx, yy)
            opt.backward_pass(xx, yy)
            opt.backward_pass(xx, yy, sensitive=False)
            opt.step()
        else:
            opt.fit_batch(xx, yy)
        sched.step()

    one_step(x, y)  # warm-up (lazy initialisation may sync once)
    x_nan = x.clone()
    x_nan[1] = float("nan")
    with no_sync():
        for xx, yy in ((x, y), (x_nan, y), (x[:0], y[:0])):
            one_step(xx, yy)
    assert len(ledger) == 4
    assert all(torch.isfinite(p).all() for p in model.parameters())
    with pytest.warns(RuntimeWarning, match="non-finite"):
        assert opt.dropped_records >= 1


def test_the_sync_detector_detects():
    t = torch.ones(3, device="cuda")
    with pytest.raises(RuntimeError):
        with no_sync():
            t.sum().item()


def test_cuda_nan_record_is_dropped_exactly():
    ref_model, x, y = model_and_data("cuda")
    keep = [i for i in range(16) if i != 5]
    opt = DPGaussianOptimizer(torch.optim.SGD(ref_model.parameters(), lr=0.5), ref_model, ce, 0.3, 0.0,
                              expected_batch_size=16)
    opt.fit_batch(x[keep], y[keep])
    model, _, _ = model_and_data("cuda")
    x_bad = x.clone()
    x_bad[5, 2] = float("nan")
    opt = DPGaussianOptimizer(torch.optim.SGD(model.parameters(), lr=0.5), model, ce, 0.3, 0.0, expected_batch_size=16)
    opt.fit_batch(x_bad, y)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    with pytest.warns(RuntimeWarning):
        assert opt.dropped_records == 1


def test_cuda_resume_is_exact_with_a_cuda_generator():
    def run():
        model, x, y = model_and_data("cuda")
        opt = DPGaussianOptimizer(
            torch.optim.Adam(model.parameters(), lr=0.01), model, ce, 0.5, 1.0, ledger=PrivacyLedger(1600, 0.01),
            generator=torch.Generator(device="cuda").manual_seed(3),
        )
        return model, opt, x, y

    model, opt, x, y = run()
    for _ in range(4):
        opt.fit_batch(x, y)
    ref = [p.detach().clone() for p in model.parameters()]
    model, opt, x, y = run()
    for _ in range(2):
        opt.fit_batch(x, y)
    sd, msd = opt.state_dict(), {k: v.clone() for k, v in model.state_dict().items()}
    model2, opt2, _, _ = run()
    model2.load_state_dict(msd)
    opt2.load_state_dict(sd)
    for _ in range(2):
        opt2.fit_batch(x, y)
    for p, r in zip(model2.parameters(), ref):
        assert torch.equal(p, r)
