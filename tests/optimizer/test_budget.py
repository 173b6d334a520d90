"""Budget enforcement: the last step taken is exactly the last one within (epsilon, delta)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pytorch_privacy.analysis.accountant_base import PrivacyAccountant
from pytorch_privacy.dp_query import PrivacyLedger
from pytorch_privacy.dp_query.events import (
    ComposedEvent,
    ShuffledEvent,
    GaussianEvent,
    NoOpEvent,
    PoissonSampledEvent,
    SelfComposedEvent,
)
from pytorch_privacy.optimizer import DPGaussianOptimizer, PrivacyBudget, PrivacyBudgetExceeded

from . import _dp_naive as naive


def ce(out, y):
    return nn.functional.cross_entropy(out, y, reduction="none")


def _cost(ev) -> float:
    if isinstance(ev, NoOpEvent):
        return 0.0
    if isinstance(ev, GaussianEvent):
        return 1.0 / ev.noise_multiplier
    if isinstance(ev, PoissonSampledEvent):
        return ev.sampling_probability * _cost(ev.event)
    if isinstance(ev, SelfComposedEvent):
        return ev.count * _cost(ev.event)
    if isinstance(ev, ComposedEvent):
        return sum(_cost(e) for e in ev.events)
    if isinstance(ev, ShuffledEvent):  # one un-amplified event per started epoch
        return -(-ev.steps // ev.steps_per_epoch) * _cost(ev.event)
    raise ValueError(ev)


class AdditiveAccountant(PrivacyAccountant):
    """Toy accountant: epsilon = sum of q/sigma over composed steps (exact in binary for the
    values used), so the expected number of allowed steps is known in closed form."""

    def __init__(self):
        self.total = 0.0
        self.composed = []

    def supports(self, event):
        return True

    def compose(self, event, count=1):
        self.composed.append((event, count))
        self.total += count * _cost(event)
        return self

    def get_epsilon(self, target_delta):
        return self.total

    def get_delta(self, target_epsilon):
        return 0.0 if self.total <= target_epsilon else 1.0


def _setup(target_epsilon, *, sigma=2.0, q=0.125, accountant=None, ledger=None, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    ledger = ledger if ledger is not None else PrivacyLedger(64, q)
    opt = DPGaussianOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), model, ce, 1.0, sigma, ledger=ledger,
        target_epsilon=target_epsilon, target_delta=1e-5,
        accountant=accountant if accountant is not None else AdditiveAccountant(),
        generator=torch.Generator().manual_seed(seed),
    )
    return model, opt, ledger


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 3, generator=g), torch.randint(0, 2, (8,), generator=g)


def test_steps_stop_exactly_at_the_budget_and_equality_is_allowed():
    # each step costs q/sigma = 0.125/2 = 0.0625 (exact in binary); 4 steps = 0.25 = target
    import copy

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    ledger = PrivacyLedger(64, 0.125)
    gen = torch.Generator().manual_seed(0)
    opt = DPGaussianOptimizer(
        torch.optim.Adam(model.parameters(), lr=0.1), model, ce, 1.0, 2.0, ledger=ledger,
        target_epsilon=0.25, target_delta=1e-5, accountant=AdditiveAccountant(), generator=gen,
    )
    x, y = _batch()
    for _ in range(4):
        opt.fit_batch(x, y)
    assert len(ledger) == 4 and opt.epsilon == 0.25
    before = naive.snapshot(model)
    adam_state = copy.deepcopy(opt.original_optimizer.state_dict())
    assert len(adam_state["state"]) == 4 and all(int(s["step"]) == 4 for s in adam_state["state"].values())
    ledger_before, gen_before = ledger.to_dict(), gen.get_state().clone()
    with pytest.raises(PrivacyBudgetExceeded) as exc:
        opt.fit_batch(x, y)
    assert isinstance(exc.value, RuntimeError)
    assert exc.value.epsilon == pytest.approx(0.3125) and exc.value.steps == 4 and exc.value.target_epsilon == 0.25
    assert "refused before" in str(exc.value)
    assert len(ledger) == 4 and opt.steps == 4 and ledger.to_dict() == ledger_before
    assert torch.equal(gen.get_state(), gen_before)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n])
    after = opt.original_optimizer.state_dict()
    assert after["state"].keys() == adam_state["state"].keys()
    for k, s in adam_state["state"].items():
        assert after["state"][k].keys() == s.keys()
        for name, v in s.items():
            assert torch.equal(torch.as_tensor(after["state"][k][name]), torch.as_tensor(v)), (k, name)


def test_refusal_happens_before_any_gradient_work():
    model, opt, ledger = _setup(0.07)  # one step (0.0625) allowed
    x, y = _batch()
    opt.fit_batch(x, y)
    with pytest.raises(PrivacyBudgetExceeded):
        opt.fit_batch(x, y[:3])  # would be a ValueError (mismatched sizes) if any work were done


def test_first_step_and_by_hand_steps_are_checked_in_step():
    model, opt, ledger = _setup(0.05)  # not even one step
    x, y = _batch()
    before = naive.snapshot(model)
    opt.zero_grad()
    opt.backward_pass(x, y)
    with pytest.raises(PrivacyBudgetExceeded):
        opt.step()
    assert len(ledger) == 0
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]) and p.grad is None


def test_public_only_steps_cost_nothing_under_a_budget():
    model, opt, ledger = _setup(0.07)
    x, y = _batch()
    opt.fit_batch(x, y)
    for _ in range(3):
        opt.zero_grad()
        opt.backward_pass(x, y, sensitive=False)
        opt.step()
    assert len(ledger) == 1 and opt.steps == 4


def test_budget_continues_after_resume():
    model, opt, ledger = _setup(0.25)
    x, y = _batch()
    for _ in range(3):
        opt.fit_batch(x, y)
    sd = opt.state_dict()
    model2, opt2, ledger2 = _setup(0.25, ledger=PrivacyLedger(64, 0.125))
    opt2.load_state_dict(sd)
    assert len(ledger2) == 3 and opt2.epsilon == pytest.approx(0.1875)
    opt2.fit_batch(x, y)
    with pytest.raises(PrivacyBudgetExceeded):
        opt2.fit_batch(x, y)


def test_shared_ledger_counts_every_optimizer():
    ledger = PrivacyLedger(64, 0.125)
    _, a, _ = _setup(0.25, ledger=ledger)
    _, b, _ = _setup(0.25, ledger=ledger, seed=1)
    x, y = _batch()
    a.fit_batch(x, y)
    b.fit_batch(x, y)
    a.fit_batch(x, y)
    assert b.epsilon == pytest.approx(0.1875)
    b.fit_batch(x, y)
    with pytest.raises(PrivacyBudgetExceeded):
        a.fit_batch(x, y)


def test_budget_settings_change_mid_run_are_accounted():
    model, opt, ledger = _setup(0.3)
    x, y = _batch()
    opt.fit_batch(x, y)  # 0.0625
    ledger.set_sampling(64, 0.25)  # now 0.125 per step
    opt.fit_batch(x, y)  # 0.1875
    assert opt.epsilon == pytest.approx(0.1875)
    with pytest.raises(PrivacyBudgetExceeded):
        opt.fit_batch(x, y)  # 0.3125 > 0.3


def test_monitor_only_reports_epsilon_in_metrics():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = DPGaussianOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), model, ce, 1.0, 2.0, ledger=PrivacyLedger(64, 0.125),
        target_delta=1e-5, accountant=AdditiveAccountant(), metrics=True,
    )
    x, y = _batch()
    for _ in range(10):
        opt.fit_batch(x, y)
    assert opt.last_metrics["epsilon"] == pytest.approx(0.625)


def test_budget_configuration_errors():
    model = nn.Linear(3, 2)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="target_delta"):
        DPGaussianOptimizer(sgd, model, ce, 1.0, 1.0, ledger=PrivacyLedger(64, 0.1), target_epsilon=1.0)
    with pytest.raises(ValueError, match="ledger"):
        DPGaussianOptimizer(sgd, model, ce, 1.0, 1.0, expected_batch_size=6, target_epsilon=1.0, target_delta=1e-5,
                            accountant=AdditiveAccountant())
    with pytest.raises(ValueError, match="target_epsilon"):
        PrivacyBudget(-1.0, 1e-5, AdditiveAccountant())
    with pytest.raises(ValueError, match="target_delta"):
        PrivacyBudget(1.0, 1.5, AdditiveAccountant())


def test_budget_object_does_not_modify_the_given_accountant():
    acc = AdditiveAccountant()
    acc.compose(GaussianEvent(4.0))  # prior spending: 0.25
    b = PrivacyBudget(1.0, 1e-5, acc)
    ledger = PrivacyLedger(64, 0.125)
    assert b.epsilon(ledger) == 0.25
    assert b.epsilon_after(ledger, GaussianEvent(2.0)) == pytest.approx(0.3125)
    assert acc.total == 0.25 and len(ledger) == 0


def test_shuffle_ledgers_are_recomposed_from_the_whole_ledger():
    """Shuffled steps cost one event per started epoch: composing per step would overcount."""
    b = PrivacyBudget(10.0, 1e-5, AdditiveAccountant())
    ledger = PrivacyLedger(64, sampling="shuffle", batch_size=16)  # 4 steps per epoch
    ev = GaussianEvent(2.0)  # 0.5 per epoch
    for _ in range(3):
        assert b.epsilon_after(ledger, ev) == 0.5
        ledger.record_sample(ev)
    assert b.epsilon_after(ledger, ev) == 0.5  # step 4 is still in epoch 1
    ledger.record_sample(ev)
    assert b.epsilon(ledger) == 0.5
    assert b.epsilon_after(ledger, ev) == 1.0  # step 5 starts epoch 2


@pytest.mark.parametrize("accountant_name", ["RdpAccountant", "PLDAccountant"])
def test_exact_last_step_with_a_real_accountant(accountant_name):
    from pytorch_privacy import analysis

    cls = getattr(analysis, accountant_name)  # fails (never skips) if the accountant is missing
    q, sigma, delta = 0.125, 1.0, 1e-5
    ev = PoissonSampledEvent(q, GaussianEvent(sigma))
    eps = [cls().compose(ev, k).get_epsilon(delta) for k in range(1, 8)]
    assert all(a < b for a, b in zip(eps, eps[1:]))
    allowed = 5
    target = (eps[allowed - 1] + eps[allowed]) / 2  # strictly between step 5 and step 6
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    ledger = PrivacyLedger(64, q)
    opt = DPGaussianOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), model, ce, 1.0, sigma, ledger=ledger,
        target_epsilon=target, target_delta=delta, accountant=cls(),
    )
    x, y = _batch()
    for _ in range(allowed):
        opt.fit_batch(x, y)
    with pytest.raises(PrivacyBudgetExceeded):
        opt.fit_batch(x, y)
    assert len(ledger) == allowed
    assert opt.epsilon == pytest.approx(eps[allowed - 1], rel=1e-6)


def test_default_accountant_is_rdp():
    from pytorch_privacy.analysis import RdpAccountant as rdp_cls
    b = PrivacyBudget(1.0, 1e-5)
    assert isinstance(b._base, rdp_cls)


def test_budget_with_shuffled_ledger_uses_replace_one_accountant():
    """A shuffled (fixed-size batch) ledger is replace-one: the default budget accountant must
    follow it instead of refusing the first step."""
    import torch
    from torch import nn

    from pytorch_privacy.analysis import RdpAccountant
    from pytorch_privacy.dp_query import PrivacyLedger
    from pytorch_privacy.optimizer import DPGaussianOptimizer

    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    ledger = PrivacyLedger(100, sampling="shuffle", batch_size=10)
    opt = DPGaussianOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), model, nn.CrossEntropyLoss(reduction="none"),
        l2_norm_clip=1.0, noise_multiplier=1.0, ledger=ledger, target_epsilon=1e6, target_delta=1e-5,
    )
    for _ in range(3):
        opt.fit_batch(torch.randn(10, 3), torch.randint(0, 2, (10,)))
    assert len(ledger) == 3
    expected = RdpAccountant(neighboring_relation="replace_one", refine=True).compose_ledger(ledger).get_epsilon(1e-5)
    assert opt.epsilon == expected


def test_target_delta_not_below_one_over_n_warns_once_per_population():
    import warnings

    from pytorch_privacy.dp_query import GaussianEvent

    budget = PrivacyBudget(10.0, 0.02)
    ledger = PrivacyLedger(100, 0.1)
    with pytest.warns(UserWarning, match=r"target_delta=0.02 is not below 1/N = 0.01 \(N=100\)"):
        budget.check(ledger, GaussianEvent(1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        budget.check(ledger, GaussianEvent(1.0))
        PrivacyBudget(10.0, 1e-5).check(ledger, GaussianEvent(1.0))


def test_a_run_calibrated_for_epsilon_takes_every_planned_step():
    """One accountant per plan: sigma from compute_noise lets the budget allow all planned steps
    (found by the make_private work: N=120, B=12, 20 steps, eps=2, delta=1e-3 gave sigma 1.1632
    and the grid-only budget refused step 20 at eps 2.0015)."""
    import warnings

    from pytorch_privacy.analysis import compute_noise
    from pytorch_privacy.dp_query.events import GaussianEvent

    n, b, epochs, eps, delta = 120, 12, 2, 2.0, 1e-3
    sigma = compute_noise(n, b, eps, epochs, delta)
    ledger = PrivacyLedger(n, b / n)
    budget = PrivacyBudget(eps, delta)
    steps = epochs * n // b
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # delta >= 1/N is warned about; irrelevant here
        for _ in range(steps):
            budget.check(ledger, GaussianEvent(sigma))
            ledger.record_sample(GaussianEvent(sigma))
        with pytest.raises(PrivacyBudgetExceeded):
            budget.check(ledger, GaussianEvent(sigma))
