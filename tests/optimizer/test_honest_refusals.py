"""A refused step leaves no trace; a missing safety check is an error, never a silent pass.

A step the budget refuses must leave the model, the wrapped optimizer's state (Adam moments,
SGD momentum buffers: compared against deep copies taken after real steps, so the state is not
empty), the query's global state (an adaptive clip), the ledger and every generator exactly as
they were: a later step then draws the same noise it would have drawn without the refused one.
This holds for both places a step can be refused: before any work in ``fit_batch`` (the last
event is known) and in ``step()`` after the noise was drawn (the first step, or steps built by
hand with ``backward_pass``).
"""

from __future__ import annotations

import copy
import sys
import warnings

import pytest
import torch
from torch import nn

from pytorch_privacy.analysis import RdpAccountant
from pytorch_privacy.dp_query import GaussianEvent, PoissonSampledEvent, PrivacyLedger
from pytorch_privacy.dp_query.normalized_query import NormalizedQuery
from pytorch_privacy.dp_query.quantile_adaptive_clip_sum_query import QuantileAdaptiveClipSumQuery
from pytorch_privacy.optimizer import DPGaussianOptimizer, DPOptimizer, PrivacyBudgetExceeded

N, Q, SIGMA, DELTA = 64, 0.125, 1.0, 1e-5
ALLOWED = 3


def ce(out, y):
    return nn.functional.cross_entropy(out, y, reduction="none")


def _target() -> float:
    """Strictly between the epsilon of ALLOWED and ALLOWED + 1 steps (same accountant)."""
    ev = PoissonSampledEvent(Q, GaussianEvent(SIGMA))
    lo = RdpAccountant().compose(ev, ALLOWED).get_epsilon(DELTA)
    hi = RdpAccountant().compose(ev, ALLOWED + 1).get_epsilon(DELTA)
    assert lo < hi
    return (lo + hi) / 2


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 3, generator=g), torch.randint(0, 2, (8,), generator=g)


def _build(optim: str, query: str):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    base = (
        torch.optim.Adam(model.parameters(), lr=0.05)
        if optim == "adam"
        else torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    )
    ledger = PrivacyLedger(N, Q)
    gen = torch.Generator().manual_seed(123)
    budget = dict(target_epsilon=_target(), target_delta=DELTA, accountant=RdpAccountant())
    if query == "gaussian":
        opt = DPGaussianOptimizer(base, model, ce, 1.0, SIGMA, ledger=ledger, generator=gen, **budget)
    else:  # adaptive clipping: two releases (sum and count) from one generator, a moving clip
        inner = QuantileAdaptiveClipSumQuery(
            initial_l2_norm_clip=1.0, noise_multiplier=SIGMA, target_unclipped_quantile=0.5, learning_rate=0.2,
            clipped_count_stddev=1e6, expected_num_records=N * Q, generator=gen,
        )
        opt = DPOptimizer(base, model, ce, NormalizedQuery(inner, N * Q), ledger=ledger, **budget)
    return model, opt, ledger, gen


def _by_hand_step(opt, x, y):
    opt.zero_grad()
    opt.backward_pass(x, y)
    opt.step()


def _snapshot(model, opt, ledger, gen):
    return {
        "model": copy.deepcopy(model.state_dict()),
        "optimizer": copy.deepcopy(opt.original_optimizer.state_dict()),
        "global_state": copy.deepcopy(opt.global_state),
        "ledger": ledger.to_dict(),
        "generator": gen.get_state().clone(),
        "steps": opt.steps,
    }


def _assert_equal(a, b, where="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _assert_equal(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (u, v) in enumerate(zip(a, b)):
            _assert_equal(u, v, f"{where}[{i}]")
    elif hasattr(a, "__attrs_attrs__"):
        assert type(a) is type(b), where
        for f in a.__attrs_attrs__:
            _assert_equal(getattr(a, f.name), getattr(b, f.name), f"{where}.{f.name}")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.mark.parametrize("query", ["gaussian", "adaptive"])
@pytest.mark.parametrize("optim", ["adam", "momentum"])
@pytest.mark.parametrize("how", ["fit_batch", "by_hand"])
def test_refused_step_leaves_no_trace(how, optim, query):
    model, opt, ledger, gen = _build(optim, query)
    x, y = _batch()
    take = opt.fit_batch if how == "fit_batch" else (lambda a, b: _by_hand_step(opt, a, b))
    for _ in range(ALLOWED):
        take(x, y)
    assert len(ledger) == ALLOWED
    before = _snapshot(model, opt, ledger, gen)
    # the optimizer state is real: one entry per parameter, with moments / momentum buffers
    states = before["optimizer"]["state"]
    assert len(states) == 4
    key = "exp_avg" if optim == "adam" else "momentum_buffer"
    assert all(key in s and float(s[key].abs().sum()) > 0 for s in states.values())

    with pytest.raises(PrivacyBudgetExceeded):
        take(x, y)
    _assert_equal(_snapshot(model, opt, ledger, gen), before)

    # the same as a twin run that never tried the refused step (its generators included)
    model2, opt2, ledger2, gen2 = _build(optim, query)
    take2 = opt2.fit_batch if how == "fit_batch" else (lambda a, b: _by_hand_step(opt2, a, b))
    for _ in range(ALLOWED):
        take2(x, y)
    _assert_equal(_snapshot(model2, opt2, ledger2, gen2), before)


def test_refused_first_step_draws_nothing():
    """The first step has no earlier event to pre-check: it is refused in ``step()`` after the
    noise was drawn, and the generator is rewound."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    ledger = PrivacyLedger(N, Q)
    gen = torch.Generator().manual_seed(5)
    opt = DPGaussianOptimizer(
        torch.optim.Adam(model.parameters(), lr=0.1), model, ce, 1.0, SIGMA, ledger=ledger, generator=gen,
        target_epsilon=1e-3, target_delta=DELTA, accountant=RdpAccountant(),
    )
    before = _snapshot(model, opt, ledger, gen)
    x, y = _batch()
    with pytest.raises(PrivacyBudgetExceeded):
        opt.fit_batch(x, y)
    _assert_equal(_snapshot(model, opt, ledger, gen), before)
    assert opt.original_optimizer.state_dict()["state"] == {}
    for p in model.parameters():
        assert p.grad is None


def test_validation_is_not_skipped_when_its_module_cannot_be_imported(monkeypatch):
    """Model validation is part of the guarantee: an ImportError must not turn it off."""
    monkeypatch.setitem(sys.modules, "pytorch_privacy.optimizer.validation", None)  # import fails
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    with pytest.raises((ValueError, ImportError)) as exc:
        DPGaussianOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, ce, 1.0, 1.0, expected_batch_size=9)
    if isinstance(exc.value, ValueError):
        assert "BatchNorm" in str(exc.value)


# -- moved from the former tests/test_review_findings.py (grouped by subject) -----------------
def _rf_ce(out, y):
    return nn.functional.cross_entropy(out, y, reduction="none")


def _rf_batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g), torch.randint(0, 2, (n,), generator=g)


def test_refused_step_does_not_advance_the_noise_generator():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    gen = torch.Generator().manual_seed(1)
    opt = DPGaussianOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), model, _rf_ce, 1.0, 1.0,
        ledger=PrivacyLedger(64, 0.125), target_epsilon=1e-3, target_delta=1e-5, generator=gen,
    )
    before = gen.get_state().clone()
    x, y = _rf_batch()
    opt.zero_grad()
    opt.backward_pass(x, y)
    with pytest.raises(PrivacyBudgetExceeded):
        opt.step()
    assert torch.equal(gen.get_state(), before), "the refused step drew noise from the query's generator"
    assert len(opt.ledger) == 0 and opt.steps == 0


def test_refused_adaptive_step_keeps_generator_and_clip():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    gen = torch.Generator().manual_seed(1)
    query = QuantileAdaptiveClipSumQuery(1.0, 1.0, 0.5, 0.2, 2.0, 8.0, generator=gen)
    opt = DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), model, _rf_ce, query,
        ledger=PrivacyLedger(64, 0.125), target_epsilon=1e-3, target_delta=1e-5,
    )
    before = gen.get_state().clone()
    clip = float(opt.global_state.sum_state.l2_norm_clip)
    x, y = _rf_batch()
    with pytest.raises(PrivacyBudgetExceeded):
        opt.fit_batch(x, y)
    assert torch.equal(gen.get_state(), before)
    assert float(opt.global_state.sum_state.l2_norm_clip) == clip


def test_refused_step_does_not_count_dropped_records():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = DPGaussianOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), model, _rf_ce, 1.0, 1.0,
        ledger=PrivacyLedger(64, 0.125), target_epsilon=1e-3, target_delta=1e-5,
        generator=torch.Generator().manual_seed(1),
    )
    x, y = _rf_batch()
    x[0, 0] = float("nan")
    with pytest.raises(PrivacyBudgetExceeded):
        opt.fit_batch(x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing was dropped from a step that never happened
        assert opt.dropped_records == 0
