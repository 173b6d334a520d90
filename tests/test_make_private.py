"""make_private: a plain loop becomes private with three changed lines (README), and its step
equals a hand-built DPGaussianOptimizer.fit_batch step with the same noise seed."""

from __future__ import annotations

import contextlib
import copy
import difflib
import io
import math
import pathlib
import re
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from pytorch_privacy import make_private
from pytorch_privacy.dp_query import PrivacyLedger
from pytorch_privacy.private_loop import PrivateLoader, PrivateOptimizer
from pytorch_privacy.optimizer import DPGaussianOptimizer, PrivacyBudgetExceeded

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
N, B = 120, 12


@pytest.fixture(autouse=True)
def _one_thread():
    # the CI machine is small and shared: intra-op threads only contend here
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _setup(seed=0, out=2, regression=False):
    g = torch.Generator().manual_seed(0)  # the data are always the same; seed picks the initial weights
    x = torch.randn(N, 5, generator=g)
    y = torch.randn(N, out, generator=g) if regression else torch.randint(0, out, (N,), generator=g)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, out))
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    loader = DataLoader(TensorDataset(x, y), batch_size=B, shuffle=True)
    return model, opt, loader


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _loop_step(model, opt, loader, criterion):
    """One iteration of an unchanged training loop; returns the batch it used."""
    for xb, yb in loader:
        opt.zero_grad()
        loss = criterion(model(xb), yb)
        loss.backward()
        opt.step()
        return xb, yb


# -- equality with a hand-built DPGaussianOptimizer ----------------------------------------
CRITERIA = {
    "CrossEntropyLoss": (nn.CrossEntropyLoss(), lambda o, y: F.cross_entropy(o, y, reduction="none"), "mean", False),
    "CrossEntropyLoss-sum": (nn.CrossEntropyLoss(reduction="sum"), lambda o, y: F.cross_entropy(o, y, reduction="none"), "sum", False),
    "MSELoss": (nn.MSELoss(), lambda o, y: ((o - y) ** 2).mean(1), "mean", True),
    "plain function": (lambda o, y: F.cross_entropy(o, y), lambda o, y: F.cross_entropy(o, y, reduction="none"), "mean", False),
    "plain function, loop fallback": (
        # .item() inside: vmap cannot run it, the example-by-example loop can
        lambda o, y: F.cross_entropy(o, y) * (1.0 if o.sum().item() < 1e30 else 0.0),
        lambda o, y: F.cross_entropy(o, y, reduction="none"),
        "mean",
        False,
    ),
}


@pytest.mark.parametrize("engine", ["ghost", "functorch"])
@pytest.mark.parametrize("name", list(CRITERIA))
def test_loop_step_equals_hand_built_fit_batch(name, engine):
    criterion, per_example, reduction, regression = CRITERIA[name]
    model, opt, loader = _setup(regression=regression)
    ref_model = copy.deepcopy(model)
    ref_opt = DPGaussianOptimizer(
        torch.optim.SGD(ref_model.parameters(), lr=0.3),
        ref_model,
        per_example,
        1.0,
        1.1,
        ledger=PrivacyLedger(N, B / N),
        expected_batch_size=1.0 if reduction == "sum" else None,  # a summed loss: the noisy clipped sum
        generator=torch.Generator().manual_seed(7),
        engine=engine,
    )
    model, opt, loader = make_private(
        model, opt, loader, criterion=criterion, max_grad_norm=1.0, noise_multiplier=1.1,
        generator=torch.Generator().manual_seed(7), sampling_generator=torch.Generator().manual_seed(3),
        engine=engine,
    )
    assert isinstance(opt, DPGaussianOptimizer) and isinstance(loader, PrivateLoader)
    with warnings_if(name.endswith("fallback")):
        for _ in range(2):
            xb, yb = _loop_step(model, opt, loader, criterion)
            assert xb.shape[0] > 0
            ref_opt.fit_batch(xb, yb)
            for p, r in zip(model.parameters(), ref_model.parameters()):
                torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-6)
    assert len(opt.ledger) == len(ref_opt.ledger) == 2
    assert opt.ledger.sampling == "poisson" and opt.ledger.selection_probability == B / N
    assert opt.ledger.population_size == N


def warnings_if(flag):
    return pytest.warns(RuntimeWarning, match="example by example") if flag else contextlib.nullcontext()


def test_step_differs_from_nonprivate_and_users_gradients_are_discarded():
    model, opt, loader = _setup()
    criterion = nn.CrossEntropyLoss()
    model, opt, loader = make_private(model, opt, loader, criterion=criterion, max_grad_norm=1e-3,
                                      noise_multiplier=0.0, seed=1)
    for xb, yb in loader:
        opt.zero_grad()
        criterion(model(xb), yb).mul(1e6).backward()  # huge user gradient: must not leak into the step
        opt.step()
        break
    # with sigma 0 the released gradient is the clipped sum / (qN): its norm is at most C * n / (qN)
    norm = torch.sqrt(sum((p.grad**2).sum() for p in model.parameters()))
    assert 0 < norm <= 1e-3 * xb.shape[0] / B * (1 + 1e-5)


# -- the README: three changed lines ----------------------------------------------------------
def _readme_blocks():
    text = README.read_text()
    section = text[text.index("## From a plain loop to a private one") : text.index("## Two commands")]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 2, "the README Example shows the plain loop, then the private one"
    return blocks


def test_readme_private_loop_changes_at_most_three_lines():
    plain, private = (b.splitlines() for b in _readme_blocks())
    changed = 0
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=plain, b=private, autojunk=False).get_opcodes():
        if tag != "equal":
            changed += max(i2 - i1, j2 - j1)
            assert all(line.endswith("# changed") for line in private[j1:j2]), private[j1:j2]
    marked = sum(line.endswith("# changed") for line in private)
    assert changed == marked <= 3
    loop = plain[plain.index(next(l for l in plain if l.startswith("for epoch"))) :]
    assert all(line in private for line in loop[:6]), "the loop body is unchanged"


def test_readme_plain_and_private_scripts_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    results = {}
    for which, code in zip(("plain", "private"), _readme_blocks()):
        assert "6000" in code and "range(3)" in code
        small = code.replace("6000", "600").replace("range(3)", "range(2)")  # small sizes, same code
        ns: dict = {}
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            exec(compile(small, f"README-{which}", "exec"), ns)
        results[which] = (ns, buf.getvalue())
    plain_ns, plain_out = results["plain"]
    ns, out = results["private"]
    assert re.findall(r"^epoch \d: loss [\d.]+, train accuracy [\d.]+$", plain_out, re.M).__len__() == 2
    eps = [float(e) for e in re.findall(r"epsilon ([\d.]+) at delta 1e-5", out)]
    assert len(eps) == 2 and 0 < eps[0] < eps[1] < math.inf
    opt = ns["optimizer"]
    assert isinstance(opt, PrivateOptimizer)
    assert len(opt.ledger) == opt.steps == 2 * math.ceil(600 / 64)
    assert math.isfinite(opt.epsilon(1e-5)) and opt.epsilon(1e-5) == pytest.approx(eps[1], abs=0.006)
    # the ledger alone reproduces the epsilon (an auditor's view)
    opt.ledger.save("ledger.json")
    from pytorch_privacy.analysis import RdpAccountant

    again = RdpAccountant(refine=True).compose_ledger(PrivacyLedger.load("ledger.json")).get_epsilon(1e-5)
    assert again == pytest.approx(opt.epsilon(1e-5), rel=1e-9)
    # and the private model still learned (labels are x0 + x1 > 0)
    assert float(re.findall(r"train accuracy ([\d.]+)", out)[-1]) > 0.7


@pytest.mark.slow  # a fresh interpreter importing torch
def test_function_name_and_submodule_import_order():
    # the function lives in private_loop (no module named like it, so nothing can shadow it)
    code = (
        "import torch\n"
        "from torch.utils.data import DataLoader, TensorDataset\n"
        "import pytorch_privacy.private_loop\n"
        "import pytorch_privacy\n"
        "m = torch.nn.Linear(3, 2); o = torch.optim.SGD(m.parameters(), lr=0.1)\n"
        "l = DataLoader(TensorDataset(torch.randn(20, 3), torch.randint(0, 2, (20,))), batch_size=5)\n"
        "r = pytorch_privacy.make_private(m, o, l, criterion=torch.nn.CrossEntropyLoss(), max_grad_norm=1.0, "
        "noise_multiplier=1.0)\n"
        "print(type(r[1]).__name__)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "PrivateOptimizer" in proc.stdout, proc.stderr


# -- calibration and budget ------------------------------------------------------------------
def test_target_epsilon_calibrates_and_enforces_the_budget():
    from pytorch_privacy.analysis import compute_dp_sgd_privacy

    model, opt, loader = _setup()
    criterion = nn.CrossEntropyLoss()
    model, opt, loader = make_private(model, opt, loader, criterion=criterion, max_grad_norm=1.0,
                                      target_epsilon=2.0, target_delta=1e-3, epochs=2, seed=0)
    sigma = opt.noise_multiplier
    # the plan: 2 epochs of len(loader) = N/B steps at q = B/N; less noise would overshoot it
    assert compute_dp_sgd_privacy(N, B, sigma, 2, 1e-3)[0] <= 2.0
    assert compute_dp_sgd_privacy(N, B, sigma * 0.99, 2, 1e-3)[0] > 2.0
    steps = 0
    for _epoch in range(2):
        for xb, yb in loader:
            opt.zero_grad()
            criterion(model(xb), yb).backward()
            opt.step()
            steps += 1
    assert steps == len(opt.ledger) == 2 * N // B
    eps = opt.epsilon()
    assert 1.9 < eps <= 2.0
    before = _params(model)
    with pytest.raises(PrivacyBudgetExceeded):
        _loop_step(model, opt, loader, criterion)
    assert len(opt.ledger) == steps and all(torch.equal(a, b) for a, b in zip(before, _params(model)))


# -- criteria -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "criterion",
    [
        lambda o, y: F.cross_entropy(o - o.mean(0), y),  # normalised by a batch statistic
        nn.CrossEntropyLoss(weight=torch.tensor([1.0, 3.0])),  # a class-weighted mean
    ],
    ids=["batch-centred", "class-weighted"],
)
def test_non_decomposable_criterion_is_refused(criterion):
    model, opt, loader = _setup()
    model, opt, loader = make_private(model, opt, loader, criterion=criterion, max_grad_norm=1.0, noise_multiplier=1.0)
    before = _params(model)
    with pytest.raises(ValueError, match="not a mean of per-example terms"):
        _loop_step(model, opt, loader, criterion)
    assert len(opt.ledger) == 0 and all(torch.equal(a, b) for a, b in zip(before, _params(model)))


def test_sum_reduced_plain_function_needs_loss_reduction_sum():
    crit = lambda o, y: F.cross_entropy(o, y, reduction="sum")  # noqa: E731
    model, opt, loader = _setup()
    model, popt, ploader = make_private(model, opt, loader, criterion=crit, max_grad_norm=1.0, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="loss_reduction='sum'"):
        _loop_step(model, popt, ploader, crit)
    model, opt, loader = _setup()
    model, opt, loader = make_private(model, opt, loader, criterion=crit, max_grad_norm=1.0, noise_multiplier=1.0,
                                      loss_reduction="sum")
    _loop_step(model, opt, loader, crit)
    assert len(opt.ledger) == 1 and opt.denominator == 1.0


# -- the torch.optim surface ---------------------------------------------------------------------
def test_lr_scheduler_on_the_original_optimizer_takes_effect():
    model, torch_opt, loader = _setup()
    sched = torch.optim.lr_scheduler.StepLR(torch_opt, step_size=1, gamma=0.5)
    criterion = nn.CrossEntropyLoss()
    model, opt, loader = make_private(model, torch_opt, loader, criterion=criterion, max_grad_norm=1.0,
                                      noise_multiplier=1.0, seed=0)
    _loop_step(model, opt, loader, criterion)
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.15)
    before = _params(model)
    _loop_step(model, opt, loader, criterion)
    for b, p in zip(before, model.parameters()):  # plain SGD: p <- p - lr * (private grad)
        torch.testing.assert_close(b - p.detach(), 0.15 * p.grad, rtol=1e-5, atol=1e-7)


def test_state_dict_round_trip_continues_the_same_run():
    criterion = nn.CrossEntropyLoss()
    model, opt, loader = _setup()
    model, opt, loader = make_private(model, opt, loader, criterion=criterion, max_grad_norm=1.0,
                                      noise_multiplier=1.0, seed=4)
    for _ in range(2):
        _loop_step(model, opt, loader, criterion)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)

    model2, opt2, loader2 = _setup(seed=9)  # other weights and seeds: all come from the checkpoint
    model2, opt2, loader2 = make_private(model2, opt2, loader2, criterion=criterion, max_grad_norm=1.0,
                                         noise_multiplier=1.0, seed=123)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    assert len(opt2.ledger) == 2 and opt2.steps == 2
    xa, _ = _loop_step(model, opt, loader, criterion)
    xb, _ = _loop_step(model2, opt2, loader2, criterion)
    assert torch.equal(xa, xb)  # the sampler continues the same sequence of batches
    for p, q in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)  # and the noise the same stream
    assert opt.epsilon(1e-5) == opt2.epsilon(1e-5)


def test_zero_grad_and_multipass_api_still_work():
    criterion = nn.CrossEntropyLoss()
    model, opt, loader = _setup()
    model, opt, loader = make_private(model, opt, loader, criterion=criterion, max_grad_norm=1.0,
                                      noise_multiplier=1.0, seed=0)
    x, y = loader.dataset.tensors
    opt.fit_batch(x[:10], y[:10])  # the lower-level API on the same object
    opt.zero_grad()
    opt.backward_pass(x[10:20], y[10:20])
    opt.step()  # releases the pending pass, not the loader's batch
    assert len(opt.ledger) == 2 and all(p.grad is not None for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_microbatches_and_physical_batches_are_accepted():
    criterion = nn.CrossEntropyLoss()
    model, opt, loader = _setup()
    ref_model = copy.deepcopy(model)
    model, opt, loader = make_private(model, opt, loader, criterion=criterion, max_grad_norm=1.0,
                                      noise_multiplier=1.0, microbatch_size=1, max_physical_batch_size=4,
                                      generator=torch.Generator().manual_seed(2))
    ref = DPGaussianOptimizer(torch.optim.SGD(ref_model.parameters(), lr=0.3), ref_model,
                              nn.CrossEntropyLoss(reduction="none"), 1.0, 1.0, ledger=PrivacyLedger(N, B / N),
                              microbatch_size=1, generator=torch.Generator().manual_seed(2))
    xb, yb = _loop_step(model, opt, loader, criterion)
    ref.fit_batch(xb, yb)
    for p, r in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-6)
    assert opt.max_physical_batch_size == 4


# -- validation -------------------------------------------------------------------------------------
class _Stream(IterableDataset):
    def __iter__(self):
        yield torch.zeros(5), torch.tensor(0)


def _kw(**over):
    kw = dict(criterion=nn.CrossEntropyLoss(), max_grad_norm=1.0, noise_multiplier=1.0)
    kw.update(over)
    return kw


@pytest.mark.parametrize(
    "over, loader_fn, exc, match",
    [
        ({}, lambda ds: DataLoader(_Stream(), batch_size=2), ValueError, "IterableDataset"),
        ({}, lambda ds: DataLoader(ds, batch_size=None), ValueError, "batch_size=None"),
        ({}, lambda ds: DataLoader(ds, batch_sampler=[[0, 1]]), ValueError, "batch_size=None"),
        ({}, lambda ds: [(ds.tensors[0], ds.tensors[1])], TypeError, "DataLoader"),
        ({"max_grad_norm": 0.0}, None, ValueError, "max_grad_norm"),
        ({"max_grad_norm": -1}, None, ValueError, "max_grad_norm"),
        ({"noise_multiplier": None}, None, ValueError, "exactly one of noise_multiplier"),
        ({"target_epsilon": 1.0, "target_delta": 1e-5, "epochs": 1}, None, ValueError, "exactly one"),
        ({"noise_multiplier": None, "target_epsilon": 1.0}, None, ValueError, "target_delta and epochs"),
        ({"noise_multiplier": -0.5}, None, ValueError, "noise_multiplier"),
        ({"epochs": 3}, None, ValueError, "epochs is only used"),
        ({"target_delta": 2.0}, None, ValueError, "target_delta"),
        ({"criterion": None}, None, TypeError, "criterion= is required"),
        ({"criterion": nn.CrossEntropyLoss(reduction="none")}, None, ValueError, "reduction='none'"),
        ({"loss_reduction": "max", "criterion": lambda o, y: o.sum()}, None, ValueError, "loss_reduction"),
        ({"seed": 1, "secure_mode": True}, None, ValueError, "secure_mode"),
        ({"seed": 1, "generator": torch.Generator()}, None, ValueError, "not both"),
        ({"ledger": PrivacyLedger(10, 0.1)}, None, TypeError, "sets 'ledger' itself"),
        ({"microbatch_size": 2, "criterion": nn.CrossEntropyLoss(reduction="sum")}, None, ValueError, "sum-reduced"),
    ],
)
def test_invalid_inputs_are_refused_with_clear_errors(over, loader_fn, exc, match):
    model, opt, loader = _setup()
    if loader_fn is not None:
        loader = loader_fn(loader.dataset)
    with pytest.raises(exc, match=match):
        make_private(model, opt, loader, **_kw(**over))


def test_step_needs_a_fresh_batch_and_an_unwrapped_optimizer():
    criterion = nn.CrossEntropyLoss()
    model, opt, loader = _setup()
    model, popt, ploader = make_private(model, opt, loader, criterion=criterion, max_grad_norm=1.0,
                                        noise_multiplier=1.0)
    with pytest.raises(RuntimeError, match="before any batch"):
        popt.step()
    _loop_step(model, popt, ploader, criterion)
    with pytest.raises(RuntimeError, match="already called on this batch"):
        popt.step()
    assert len(popt.ledger) == 1
    with pytest.raises(TypeError, match="already private"):
        make_private(model, popt, loader, **_kw())


def test_batches_that_are_not_pairs_need_split_batch():
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(N, 5, generator=g), torch.randn(N, 5, generator=g), torch.randint(0, 2, (N,), generator=g))

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(5, 2), nn.Linear(5, 2)

        def forward(self, u, v):
            return self.a(u) + self.b(v)

    model = Two()
    criterion = nn.CrossEntropyLoss()
    model, opt, loader = make_private(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                      DataLoader(ds, batch_size=B), criterion=criterion, max_grad_norm=1.0,
                                      noise_multiplier=1.0)
    for u, v, y in loader:  # (*inputs, targets) batches: the model gets model(u, v)
        opt.zero_grad()
        criterion(model(u, v), y).backward()
        opt.step()
        break
    assert len(opt.ledger) == 1


def test_empty_poisson_batches_are_noise_only_steps():
    # q = 1/N: about 37% of the batches are empty; each one still adds noise and counts as a step
    criterion = nn.CrossEntropyLoss()
    model, opt, loader = _setup()
    loader = DataLoader(loader.dataset, batch_size=1)
    model, opt, loader = make_private(model, opt, loader, criterion=criterion, max_grad_norm=1.0,
                                      noise_multiplier=1.0, seed=5)
    sizes = []
    for i, (xb, yb) in enumerate(loader):
        opt.zero_grad()
        loss = criterion(model(xb), yb)  # NaN for an empty batch: that gradient is discarded anyway
        loss.backward()
        opt.step()
        sizes.append(xb.shape[0])
        if i == 15:
            break
    assert 0 in sizes and any(s > 0 for s in sizes)
    assert len(opt.ledger) == 16 and all(torch.isfinite(p).all() for p in model.parameters())


def test_dp_data_loader_keeps_its_rate_and_secure_mode_and_monitoring_delta():
    from pytorch_privacy.optimizer import DPDataLoader

    criterion = nn.CrossEntropyLoss()
    model, opt, loader = _setup()
    dpl = DPDataLoader(loader.dataset, sample_rate=0.05)
    model, opt, ploader = make_private(model, opt, dpl, criterion=criterion, max_grad_norm=1.0, noise_multiplier=1.0,
                                       secure_mode=True, target_delta=1e-3)
    assert ploader.sample_rate == 0.05 and len(ploader) == len(dpl) and ploader.poisson_sampler.secure_mode
    assert opt.secure_mode and opt.ledger.selection_probability == 0.05
    _loop_step(model, opt, ploader, criterion)
    assert opt.epsilon() == opt.epsilon(1e-3) > 0  # target_delta alone: the default delta, no budget refusal
    assert opt.epsilon(1e-3, accountant="pld") <= opt.epsilon(1e-3)


def test_loader_keeps_dataset_collate_fn_and_epoch_length():
    calls = []

    def collate(items):
        calls.append(len(items))
        return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])

    model, opt, loader = _setup()
    loader = DataLoader(loader.dataset, batch_size=7, shuffle=True, collate_fn=collate, drop_last=True)
    model, opt, ploader = make_private(model, opt, loader, **_kw())
    assert ploader.dataset is loader.dataset and len(ploader) == len(loader) == N // 7
    assert ploader.sample_rate == 7 / N and opt.ledger.selection_probability == 7 / N
    _loop_step(model, opt, ploader, nn.CrossEntropyLoss())
    assert calls and len(opt.ledger) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decomposition_check_tolerates_rounding_but_not_batch_statistics(dtype):
    from pytorch_privacy.private_loop import PerExampleLoss

    g = torch.Generator().manual_seed(0)
    out, y = torch.randn(4096, 10, generator=g).to(dtype), torch.randint(0, 10, (4096,), generator=g)
    # a bf16 batch mean is itself off by ~3e-3 relative here: still a mean of per-example terms
    PerExampleLoss(nn.CrossEntropyLoss()).check_decomposes(out, y)
    PerExampleLoss(lambda o, t: F.cross_entropy(o, t, reduction="sum"), "sum").check_decomposes(out, y)
    with pytest.raises(ValueError, match="not a mean of per-example terms"):
        PerExampleLoss(nn.CrossEntropyLoss(weight=torch.linspace(0.1, 1, 10).to(dtype))).check_decomposes(out, y)
