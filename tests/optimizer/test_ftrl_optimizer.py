"""DPFTRLOptimizer: DP-FTRL / DP-FTRL-M with tree noise and restarts (Kairouz et al. 2021).

The references here are written from the update rule of the module docstring, independently of
the optimizer: the anchored recursion ``m_t = gamma m_{t-1} + s_t, theta_t = theta_0 - eta m_t / D``
with its restart rule, per-example gradients by a plain loop of ``backward()``, and the tree
noise variance from the binary decomposition of the step count.
"""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pytorch_privacy.optimizer.fixed_order import FixedOrderLoader
from pytorch_privacy.optimizer.ftrl_optimizer import DPFTRLOptimizer, ftrl_epsilon, ftrl_noise_multiplier, plan_ledger

N, B = 24, 6  # 4 steps an epoch


def ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


def _data(n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, 3, (n,), generator=g)
    return TensorDataset(x, y)


def _model():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def _clipped_sum(model, x, y, clip):
    """sum_i clip_C(grad_i), by a loop of backward() over single examples."""
    params = [p for p in model.parameters()]
    total = [torch.zeros_like(p) for p in params]
    for i in range(len(y)):
        grads = torch.autograd.grad(ce(model(x[i : i + 1]), y[i : i + 1]).sum(), params)
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        c = min(1.0, clip / float(norm)) if norm > 0 else 1.0
        for t, g in zip(total, grads):
            t += c * g
    return total


def _anchored_reference(model, batches, clip, lr, gamma, period):
    """The anchored DP-FTRL-M recursion (noise 0) with restarts every ``period`` steps."""
    params = list(model.parameters())
    theta0 = [p.detach().clone() for p in params]
    s = [torch.zeros_like(p) for p in params]
    m = [torch.zeros_like(p) for p in params]
    for t, (x, y) in enumerate(batches):
        if period is not None and t > 0 and t % period == 0:  # restart: new anchor, sums and momentum reset
            theta0 = [p.detach().clone() for p in params]
            s = [torch.zeros_like(p) for p in params]
            m = [torch.zeros_like(p) for p in params]
        g = _clipped_sum(model, x, y, clip)
        with torch.no_grad():
            for i, p in enumerate(params):
                s[i] = s[i] + g[i]
                m[i] = gamma * m[i] + s[i]
                p.copy_(theta0[i] - lr * m[i] / B)
    return [p.detach() for p in params]


def _stream(loader):
    """The loader's batches, epoch after epoch (as a training loop takes them)."""
    while True:
        yield from loader


def _run(opt, loader, steps):
    stream = _stream(loader)
    for _ in range(steps):
        opt.fit_batch(*next(stream))


def _batches(seed, steps):
    """The first ``steps`` batches of a fresh FixedOrderLoader(_data(), B, generator=seed)."""
    stream = _stream(FixedOrderLoader(_data(), B, generator=seed))
    return [next(stream) for _ in range(steps)]


# -- the update rule ---------------------------------------------------------------------------
@pytest.mark.parametrize("engine", ["functorch", "ghost", "loop"])
@pytest.mark.parametrize("restart", ["epoch", None])
def test_noise_free_equals_clipped_sgd(engine, restart):
    loader = FixedOrderLoader(_data(), B, generator=1)
    model, ref = _model(), _model()
    opt = DPFTRLOptimizer(model, ce, 1.0, 0.0, learning_rate=0.3, data_loader=loader, restart=restart, engine=engine)
    _run(opt, loader, 10)
    ref_params = [p for p in ref.parameters()]
    for x, y in _batches(1, 10):  # clipped full-batch-sum SGD on the same batches
        g = _clipped_sum(ref, x, y, 1.0)
        with torch.no_grad():
            for p, gi in zip(ref_params, g):
                p -= 0.3 * gi / B
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


@pytest.mark.parametrize("restart", [3, None])
def test_momentum_matches_anchored_recursion(restart):
    loader = FixedOrderLoader(_data(), B, generator=2)
    model, ref = _model(), _model()
    opt = DPFTRLOptimizer(model, ce, 0.7, 0.0, learning_rate=0.2, momentum=0.9, data_loader=loader, restart=restart)
    _run(opt, loader, 9)
    expected = _anchored_reference(ref, _batches(2, 9), 0.7, 0.2, 0.9, restart)
    for p, q in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), q, atol=1e-6, rtol=0)
    if restart is None:  # momentum really acted: plain SGD ends elsewhere
        plain = _model()
        _anchored_reference(plain, _batches(2, 9), 0.7, 0.2, 0.0, None)
        assert max((p - q).abs().max().item() for p, q in zip(plain.parameters(), expected)) > 1e-3


def test_physical_chunks_and_the_ledger_free_mode_give_the_same_update():
    loader = FixedOrderLoader(_data(), B, generator=3)
    a, b = _model(), _model()
    opt_a = DPFTRLOptimizer(a, ce, 0.5, 0.0, learning_rate=0.2, momentum=0.5, data_loader=loader, restart=4)
    # no loader and no ledger: the denominator and the restart period are given directly
    opt_b = DPFTRLOptimizer(b, ce, 0.5, 0.0, learning_rate=0.2, momentum=0.5, batch_size=B, restart=4,
                            max_physical_batch_size=4)
    stream = _stream(loader)
    for _ in range(6):
        x, y = next(stream)
        opt_a.fit_batch(x, y)
        opt_b.fit_batch(x, y)
    assert opt_b.ledger is None and len(opt_a.ledger) == 6
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=1e-9, rtol=0)


def test_secure_mode_draws_the_tree_noise_from_the_os():
    opts = []
    for _ in range(2):
        torch.manual_seed(0)  # the global RNG plays no part
        loader = FixedOrderLoader(_data(), B, generator=3)
        m = _model()
        opt = DPFTRLOptimizer(m, ce, 1.0, 1.0, learning_rate=0.1, data_loader=loader, secure_mode=True, metrics=True)
        _run(opt, loader, 3)
        opts.append(m)
    assert opt.secure_mode and opt.last_metrics["query/stddev"] == 1.0
    assert not torch.equal(opts[0][0].weight, opts[1][0].weight)
    with pytest.raises(ValueError, match="secure"):
        DPFTRLOptimizer(_model(), ce, 1.0, 1.0, learning_rate=0.1, data_loader=loader, secure_mode=True,
                        generator=torch.Generator())


@pytest.mark.parametrize("restart", [None, 3])
def test_noisy_run_equals_the_anchored_form_on_the_cumulative_query(restart):
    """With noise: the optimizer (residual releases into SGD with momentum) gives the parameters of
    the anchored recursion fed with TreeCumulativeSumQuery's noisy prefix sums (same tree, same
    seed), restarts included."""
    from pytorch_privacy.dp_query.tree_aggregation_query import TreeCumulativeSumQuery

    lr, gamma, clip, sigma, seed = 0.2, 0.6, 0.7, 0.9, 21
    loader = FixedOrderLoader(_data(), B, generator=2)
    model, ref = _model(), _model()
    opt = DPFTRLOptimizer(model, ce, clip, sigma, learning_rate=lr, momentum=gamma, data_loader=loader,
                          restart=restart, generator=torch.Generator().manual_seed(seed))
    _run(opt, loader, 8)

    query = TreeCumulativeSumQuery.build_l2_gaussian_query(clip, sigma, generator=torch.Generator().manual_seed(seed))
    state = query.initial_global_state()
    names, params = zip(*ref.named_parameters())
    theta0 = [p.detach().clone() for p in params]
    base = {n: torch.zeros_like(p) for n, p in zip(names, params)}  # the release at the last restart
    m = [torch.zeros_like(p) for p in params]
    for t, (x, y) in enumerate(_batches(2, 8)):
        released, state, _ = query.get_noised_result(dict(zip(names, _clipped_sum(ref, x, y, clip))), state)
        with torch.no_grad():
            for i, (n, p) in enumerate(zip(names, params)):
                m[i] = gamma * m[i] + (released[n] - base[n])  # s_t of the current tree
                p.copy_(theta0[i] - lr * m[i] / B)
        if restart is not None and (t + 1) % restart == 0:
            state = query.reset_state(released, state)
            base, theta0 = released, [p.detach().clone() for p in params]
            m = [torch.zeros_like(p) for p in params]
    noise_moved = max((p - q).abs().max().item() for p, q in zip(ref.parameters(), _anchored_reference(
        _model(), _batches(2, 8), clip, lr, gamma, restart)))
    assert noise_moved > 1e-2  # the noise is really there
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, atol=1e-9, rtol=0)


# -- the noise ---------------------------------------------------------------------------------
def _node_var(level: int, efficient: bool) -> float:
    """Variance (in units of (sigma C)^2) of one complete subtree's noise estimate at ``level``:
    1 for the plain tree; Honaker's estimator 2^d / (2^(d+1) - 1)."""
    return 2.0**level / (2.0 ** (level + 1) - 1) if efficient else 1.0


def _prefix_var(t: int, efficient: bool) -> float:
    """The prefix sum of t leaves is the sum of one subtree per set bit of t."""
    return sum(_node_var(d, efficient) for d in range(t.bit_length()) if t >> d & 1)


def _noise_run(steps, restart, efficient, sigma=1.5, dim=40_000):
    """theta_t - theta_0 = -lr (sum of clipped gradients + N_t) / D, with zero gradients (zero
    inputs of a bias-free linear layer): returns N_t for t = 0..steps, one row per step."""
    model = nn.Linear(1, dim, bias=False)
    x, y = torch.zeros(8, 1), torch.zeros(8)
    loader = FixedOrderLoader(TensorDataset(x, y), 2, shuffle=False)
    opt = DPFTRLOptimizer(
        model, lambda out, _: out.sum(1), 1.0, sigma, learning_rate=1.0, data_loader=loader, restart=restart,
        efficient_tree=efficient, generator=torch.Generator().manual_seed(11),
    )
    theta0 = model.weight.detach().clone().flatten()
    rows = [torch.zeros(dim)]
    stream = _stream(loader)
    for _ in range(steps):
        opt.fit_batch(*next(stream))
        rows.append((theta0 - model.weight.detach().flatten()) * 2.0)  # * D / lr
    return torch.stack(rows).double() / sigma


@pytest.mark.parametrize("efficient", [False, True])
def test_parameter_noise_has_the_tree_variance(efficient):
    noise = _noise_run(7, None, efficient)
    for t in range(1, 8):
        var = noise[t].var().item()
        assert var == pytest.approx(_prefix_var(t, efficient), rel=0.05), t  # 40k samples: ~0.7 % std error


@pytest.mark.parametrize("efficient", [False, True])
def test_restart_resets_the_tree(efficient):
    period = 3
    noise = _noise_run(6, period, efficient)
    for k in range(1, 4):  # after the restart at step 3 the variance starts again from one leaf
        var = (noise[period + k] - noise[period]).var().item()
        assert var == pytest.approx(_prefix_var(k, efficient), rel=0.05), k
    # without the restart the increment of step 4 would be ~ (N_4 - N_3): 3 independent nodes (plain tree)
    if not efficient:
        no_restart = _noise_run(4, None, False)
        assert (no_restart[4] - no_restart[3]).var().item() == pytest.approx(3.0, rel=0.05)


# -- accounting ---------------------------------------------------------------------------------
def _small_run(loader, sigma, restart, epochs, **kw):
    torch.manual_seed(0)
    model = nn.Linear(5, 3).double()
    opt = DPFTRLOptimizer(model, ce, 1.0, sigma, learning_rate=0.1, data_loader=loader, restart=restart, **kw)
    for _ in range(epochs):
        for x, y in loader:
            opt.fit_batch(x, y)
    return opt


def _ledger_rdp(ledger):
    from pytorch_privacy.analysis import RdpAccountant

    acc = RdpAccountant(neighboring_relation="replace_one")
    acc.compose(ledger.to_event())
    return acc.orders, acc.rdp


@pytest.mark.parametrize("restart", ["epoch", None])
def test_ledger_gives_the_tree_accounting_of_the_plan(restart):
    from pytorch_privacy.analysis.tree_aggregation import compute_rdp_single_tree, compute_rdp_tree_restart

    sigma = 2.0
    opt = _small_run(FixedOrderLoader(_data(16), 4, generator=0), sigma, restart, 3)  # 4 steps an epoch
    assert opt.ledger.sampling == "fixed_order" and len(opt.ledger) == 12
    orders, rdp = _ledger_rdp(opt.ledger)
    # replace-one: every participation moves its leaves by up to 2C, so 4x the RDP at sensitivity C
    if restart == "epoch":
        expected = 4 * compute_rdp_tree_restart(sigma, [4, 4, 4], orders)
        by_hand = orders * 4 * (3 * 3) / (2 * sigma**2)  # 3 trees, each leaf under floor(log2 4) + 1 = 3 nodes
        np.testing.assert_allclose(rdp, by_hand, rtol=1e-12)
    else:  # one tree of 12 steps; a record in at most 3 of them, 3 steps strictly between two
        expected = 4 * compute_rdp_single_tree(sigma, 12, 3, 3, orders)
    np.testing.assert_allclose(rdp, expected, rtol=1e-12)
    plan = dict(population_size=16, batch_size=4, epochs=3, restart=restart)
    from pytorch_privacy.analysis import RdpAccountant

    acc = RdpAccountant(neighboring_relation="replace_one", refine=True)
    acc.compose(opt.ledger.to_event())
    assert acc.get_epsilon(1e-5) == pytest.approx(ftrl_epsilon(sigma, 1e-5, **plan), rel=1e-12)


def test_shuffled_loader_with_epoch_restarts_is_one_tree_per_epoch():
    from pytorch_privacy.analysis.tree_aggregation import compute_rdp_tree_restart

    # 16 = 4 x 4: every epoch is 4 steps whether or not a loader keeps a short last batch (the
    # ledger cannot tell which, and with N % B != 0 it counts the trees against both epoch lengths)
    loader = DataLoader(_data(16), batch_size=4, shuffle=True, drop_last=True)
    opt = _small_run(loader, 1.5, "epoch", 2)
    assert opt.ledger.sampling == "shuffle" and opt.restart_period == 4
    orders, rdp = _ledger_rdp(opt.ledger)
    np.testing.assert_allclose(rdp, 4 * compute_rdp_tree_restart(1.5, [4, 4], orders), rtol=1e-12)


def test_budget_stops_before_the_bound_is_exceeded():
    from pytorch_privacy.optimizer import PrivacyBudgetExceeded

    plan = dict(population_size=16, batch_size=4, restart="epoch")
    eps2 = ftrl_epsilon(2.0, 1e-5, epochs=2, **plan)
    assert ftrl_epsilon(2.0, 1e-5, steps=9, **plan) > eps2  # the first step of a third tree costs more
    with pytest.raises(PrivacyBudgetExceeded) as info:
        _small_run(FixedOrderLoader(_data(16), 4), 2.0, "epoch", 3, target_epsilon=eps2 * (1 + 1e-9), target_delta=1e-5)
    assert info.value.steps == 8 and info.value.epsilon > eps2 * (1 + 1e-9)


def test_calibrated_noise_takes_every_planned_step():
    plan = dict(population_size=16, batch_size=4, epochs=3, restart=None)
    sigma = ftrl_noise_multiplier(3.0, 1e-5, **plan)
    assert ftrl_epsilon(sigma, 1e-5, **plan) <= 3.0 < ftrl_epsilon(sigma * (1 - 2e-4), 1e-5, **plan)
    opt = _small_run(FixedOrderLoader(_data(16), 4), sigma, None, 3, target_epsilon=3.0, target_delta=1e-5)
    assert len(opt.ledger) == 12 and opt.epsilon <= 3.0
    ledger = plan_ledger(sigma, **plan)
    assert ledger.to_dict()["runs"] == opt.ledger.to_dict()["runs"]  # the plan is the run's own ledger


# -- checkpoints ------------------------------------------------------------------------------
def test_state_dict_resume_continues_the_same_tree():
    def make(seed):
        loader = FixedOrderLoader(_data(), B, generator=seed)
        model = _model()
        opt = DPFTRLOptimizer(
            model, ce, 1.0, 0.8, learning_rate=0.1, momentum=0.5, data_loader=loader, restart=3,
            generator=torch.Generator().manual_seed(seed),
        )
        return model, opt, loader

    m1, o1, l1 = make(5)
    _run(o1, l1, 7)

    m2, o2, l2 = make(5)
    _run(o2, l2, 4)
    buf = io.BytesIO()
    torch.save(o2.state_dict(), buf)  # through a file, read back with weights_only=True
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    weights = copy.deepcopy(m2.state_dict())
    m3, o3, l3 = make(9)  # other seeds: the checkpoint must restore the noise stream and the order
    m3.load_state_dict(weights)
    o3.load_state_dict(sd)
    assert torch.equal(l3.fixed_order_sampler.order, l1.fixed_order_sampler.order) and l3.position == 4
    _run(o3, l3, 3)  # the loop continues at the checkpoint's batch
    for p, q in zip(m1.parameters(), m3.parameters()):
        torch.testing.assert_close(p, q, atol=1e-10, rtol=0)
    assert o3.ledger == o1.ledger and len(o3.ledger) == 7


def test_batches_must_follow_the_fixed_order():
    loader = FixedOrderLoader(_data(), B, generator=4)
    opt = DPFTRLOptimizer(_model(), ce, 1.0, 1.0, learning_rate=0.1, data_loader=loader)
    for i, (x, y) in enumerate(loader):  # a loop left early and started again continues the cycle
        opt.fit_batch(x, y)
        if i == 1:
            break
    x, y = next(iter(loader))
    assert loader.position == 3 and torch.equal(y, _data().tensors[1][loader.fixed_order_sampler.batch(2)])
    opt.fit_batch(x, y)
    it = iter(loader)
    next(it)  # a batch taken and not trained: the next step would bring a record's participations closer
    with pytest.raises(ValueError, match="trained once, in order"):
        opt.fit_batch(*next(it))
    assert len(opt.ledger) == 3 and opt.steps == 3


def test_a_checkpoint_of_another_noise_or_order_is_refused():
    def make(sigma, seed=5):
        loader = FixedOrderLoader(_data(), B, generator=seed)
        return DPFTRLOptimizer(_model(), ce, 1.0, sigma, learning_rate=0.1, data_loader=loader), loader

    opt, loader = make(0.8)
    _run(opt, loader, 2)
    sd = opt.state_dict()
    other, _ = make(1.6)
    with pytest.raises(ValueError, match="differently configured query"):
        other.load_state_dict(sd)
    assert other.steps == 0 and len(other.ledger) == 0
    smaller = DPFTRLOptimizer(_model(), ce, 1.0, 0.8, learning_rate=0.1, data_loader=FixedOrderLoader(_data(12), B))
    with pytest.raises(ValueError, match="sampl"):
        smaller.load_state_dict(sd)


# -- bad input ---------------------------------------------------------------------------------
def test_refuses_poisson_loader():
    from pytorch_privacy.optimizer import DPDataLoader

    with pytest.raises(ValueError, match="sampling"):
        DPFTRLOptimizer(_model(), ce, 1.0, 1.0, learning_rate=0.1, data_loader=DPDataLoader(_data(), 0.25))


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"learning_rate": 0.0}, ValueError, "learning_rate"),
        ({"learning_rate": -1.0}, ValueError, "learning_rate"),
        ({"learning_rate": float("nan")}, ValueError, "learning_rate"),
        ({"learning_rate": 0.1, "momentum": 1.0}, ValueError, r"momentum must be in \[0, 1\)"),
        ({"learning_rate": 0.1, "momentum": -0.1}, ValueError, r"momentum must be in \[0, 1\)"),
        ({"learning_rate": 0.1, "restart": 0}, ValueError, "restart"),
        ({"learning_rate": 0.1, "num_microbatches": 2}, ValueError, "microbatch"),
        ({"learning_rate": "0.1"}, TypeError, "learning_rate"),
    ],
)
def test_refuses_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        DPFTRLOptimizer(_model(), ce, 1.0, 1.0, data_loader=FixedOrderLoader(_data(), B), **kwargs)


def test_refuses_shuffle_loader_with_a_short_last_batch_and_wrong_batch_sizes():
    ds = _data(25)
    with pytest.raises(ValueError, match="drop_last"):
        DPFTRLOptimizer(_model(), ce, 1.0, 1.0, learning_rate=0.1, data_loader=DataLoader(ds, batch_size=6, shuffle=True))
    opt = DPFTRLOptimizer(
        _model(), ce, 1.0, 1.0, learning_rate=0.1, data_loader=DataLoader(ds, batch_size=6, shuffle=True, drop_last=True)
    )
    x, y = ds.tensors
    with pytest.raises(ValueError, match="exactly 6"):
        opt.fit_batch(x[:5], y[:5])
    assert len(opt.ledger) == 0


# -- plans (properties) ------------------------------------------------------------------------
from hypothesis import assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=30, deadline=None, derandomize=True)
@given(
    n=st.integers(2, 40), b=st.integers(1, 8), epochs=st.integers(1, 4),
    restart=st.sampled_from(["epoch", None, 1, 3]), sigma=st.floats(0.5, 8.0),
)
def test_plan_ledger_and_its_epsilon(n, b, epochs, restart, sigma):
    assume(b <= n)
    plan = dict(population_size=n, batch_size=b, epochs=epochs, restart=restart)
    ledger = plan_ledger(sigma, **plan)
    steps = epochs * (n // b)
    period = {"epoch": n // b, None: steps}.get(restart, restart)
    assert len(ledger) == steps
    assert sum(r.count for r in ledger.runs if r.event.starts_tree) == math.ceil(steps / period)
    eps = ftrl_epsilon(sigma, 1e-5, **plan)
    assert 0 < eps < math.inf
    assert ftrl_epsilon(sigma * 1.5, 1e-5, **plan) < eps  # more noise, less epsilon
    assert ftrl_epsilon(sigma, 1e-5, **dict(plan, epochs=epochs + 1)) >= eps  # more epochs never cheaper


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(population_size=16, batch_size=4, epochs=2, steps=8), "exactly one"),
        (dict(population_size=16, batch_size=4), "exactly one"),
        (dict(population_size=16, batch_size=4, epochs=0), "epochs"),
        (dict(population_size=16, batch_size=4, steps=8, sampling="poisson"), "sampling"),
        (dict(population_size=16, batch_size=4, steps=8, restart="daily"), "restart"),
    ],
)
def test_plans_refuse_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        plan_ledger(1.0, **kwargs)
    with pytest.raises(ValueError, match=match):
        ftrl_noise_multiplier(2.0, 1e-5, **kwargs)


def test_noise_calibration_refuses_a_bad_target():
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="target_epsilon"):
            ftrl_noise_multiplier(bad, 1e-5, population_size=16, batch_size=4, epochs=1)
