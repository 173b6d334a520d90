"""Regression tests for issues found in the privacy review (see the review report)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from pytorch_privacy.analysis import RdpAccountant
from pytorch_privacy.dp_query import PrivacyLedger
from pytorch_privacy.dp_query.events import GaussianEvent, ShuffledEvent
from pytorch_privacy.dp_query.quantile_adaptive_clip_sum_query import QuantileAdaptiveClipSumQuery
from pytorch_privacy.optimizer import DPGaussianOptimizer, DPOptimizer, PrivacyBudgetExceeded


def ce(out, y):
    return nn.functional.cross_entropy(out, y, reduction="none")


def _batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g), torch.randint(0, 2, (n,), generator=g)


# -- F1: a step refused by the budget must leave no trace, including the noise generator ------
def test_refused_step_does_not_advance_the_noise_generator():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    gen = torch.Generator().manual_seed(1)
    opt = DPGaussianOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), model, ce, 1.0, 1.0,
        ledger=PrivacyLedger(64, 0.125), target_epsilon=1e-3, target_delta=1e-5, generator=gen,
    )
    before = gen.get_state().clone()
    x, y = _batch()
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
        torch.optim.SGD(model.parameters(), lr=0.1), model, ce, query,
        ledger=PrivacyLedger(64, 0.125), target_epsilon=1e-3, target_delta=1e-5,
    )
    before = gen.get_state().clone()
    clip = float(opt.global_state.sum_state.l2_norm_clip)
    x, y = _batch()
    with pytest.raises(PrivacyBudgetExceeded):
        opt.fit_batch(x, y)
    assert torch.equal(gen.get_state(), before)
    assert float(opt.global_state.sum_state.l2_norm_clip) == clip


# -- F2: shuffled ledgers must not under-count epochs -----------------------------------------
def test_shuffled_epochs_are_not_undercounted_with_fixed_size_batches():
    # N=10, batch 3: fixed-size batches (drop_last) give 3 steps per epoch.  After 12 steps every
    # record has been used in 4 epochs, so the ledger must account at least 4 un-amplified events.
    ledger = PrivacyLedger(10, sampling="shuffle", batch_size=3)
    ledger.record_sample(GaussianEvent(1.0), 12)
    ev = ledger.to_event()
    assert isinstance(ev, ShuffledEvent)
    epochs = -(-ev.steps // ev.steps_per_epoch)
    assert epochs >= 4
    acc = RdpAccountant(neighboring_relation="replace_one").compose(ev)
    four = RdpAccountant(neighboring_relation="replace_one").compose(GaussianEvent(1.0), 4)
    assert (acc.rdp >= four.rdp * (1 - 1e-12)).all()


def test_refused_step_does_not_count_dropped_records():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = DPGaussianOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), model, ce, 1.0, 1.0,
        ledger=PrivacyLedger(64, 0.125), target_epsilon=1e-3, target_delta=1e-5,
        generator=torch.Generator().manual_seed(1),
    )
    x, y = _batch()
    x[0, 0] = float("nan")
    with pytest.raises(PrivacyBudgetExceeded):
        opt.fit_batch(x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing was dropped from a step that never happened
        assert opt.dropped_records == 0
