"""Restart indicators and RestartQuery: TF Privacy's expected sequences (restart_query_test.py),
events after restarts, state round trip, errors."""

from __future__ import annotations

import pytest
import torch

from pytorch_privacy.dp_query.gaussian_query import GaussianSumQuery
from pytorch_privacy.dp_query.restart_query import (
    EpochRestartIndicator,
    PeriodicRoundRestartIndicator,
    PeriodicTimeRestartIndicator,
    RestartQuery,
)
from pytorch_privacy.dp_query.tree_aggregation_query import TreeCumulativeSumQuery, TreeResidualSumQuery
from pytorch_privacy.dp_query.tree_events import TreeAggregationStepEvent
from pytorch_privacy.optimizer.checkpoint import from_plain, to_plain


def _flags(indicator, steps):
    state = indicator.initialize()
    out = []
    for _ in range(steps):
        flag, state = indicator.next(state)
        out.append(flag)
    return out


@pytest.mark.parametrize("period", [1, 2, 4, 5])
def test_round_indicator(period):
    assert _flags(PeriodicRoundRestartIndicator(period), 20) == [s % period == period - 1 for s in range(20)]


@pytest.mark.parametrize("period, warmup", [(2, 1), (4, 3), (5, 2)])
def test_round_indicator_warmup(period, warmup):
    assert _flags(PeriodicRoundRestartIndicator(period, warmup), 20) == [s % period == warmup - 1 for s in range(20)]


def test_epoch_indicator():
    assert _flags(EpochRestartIndicator(3), 9) == [False, False, True] * 3
    assert _flags(EpochRestartIndicator(2, epochs_per_tree=2), 8) == [False, False, False, True] * 2


def test_indicator_errors():
    for p in (0, -1):
        with pytest.raises(ValueError, match="Restart period should be equal or larger than 1"):
            PeriodicRoundRestartIndicator(p)
    for w in (0, -1, 2, 3):
        with pytest.raises(ValueError, match=r"Warmup must be between 1 and `period`-1=1"):
            PeriodicRoundRestartIndicator(2, w)
    with pytest.raises(TypeError):
        PeriodicRoundRestartIndicator(2.5)
    for s in (0, -1.0):
        with pytest.raises(ValueError, match="Restart period_seconds should be larger than 0"):
            PeriodicTimeRestartIndicator(s)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        EpochRestartIndicator(0)


def test_time_indicator():
    """TF's timestamps: 23.5 h period; restarts at 1 day and at 23.51 h after the last restart."""
    times = iter([1627018868.452365, 1627022468.452365, 1627105268.452365, 1627112468.452365,
                  1627189508.452365, 1627189904.452365])  # fmt: skip
    ind = PeriodicTimeRestartIndicator(3600 * 23.5, clock=lambda: next(times))
    assert _flags(ind, 5) == [False, True, False, False, True]


CASES = [(0.0, 1.0, 1), (0.0, 1.0, 2), (0.0, 1.0, 5), (1.0, 1.0, 5), (1.0, 2.0, 2), (1.0, 5.0, 6)]


def _step(q, gs, value):
    params = q.derive_sample_params(gs)
    s = q.accumulate_record(params, q.initial_sample_state(torch.tensor(value)), torch.tensor(value))
    return q.get_noised_result(s, gs)


@pytest.mark.parametrize("scalar, node, period", CASES)
def test_cumulative_restarts(scalar, node, period):
    q = RestartQuery(
        TreeCumulativeSumQuery(scalar + 1.0, lambda: node, use_efficient=False), PeriodicRoundRestartIndicator(period)
    )
    gs = q.initial_global_state()
    for i in range(20):
        r, gs, _ = _step(q, gs, scalar)
        want = scalar * (i + 1) + i // period * node * bin(period).count("1") + node * bin(i % period + 1).count("1")
        assert float(r) == want


@pytest.mark.parametrize("scalar, node, period", CASES)
def test_residual_restarts(scalar, node, period):
    q = RestartQuery(
        TreeResidualSumQuery(scalar + 1.0, lambda: node, use_efficient=False), PeriodicRoundRestartIndicator(period)
    )
    gs = q.initial_global_state()
    for i in range(20):
        r, gs, _ = _step(q, gs, scalar)
        assert float(r) == scalar + node * (bin(i % period + 1).count("1") - bin(i % period).count("1"))


@pytest.mark.parametrize("eff", [True, False])
def test_restart_resets_the_tree_and_marks_the_event(eff):
    """Each tree after a restart releases exactly what a fresh query with the same noise stream
    would, and its first step records starts_tree=1."""
    inner = TreeResidualSumQuery.build_l2_gaussian_query(1.0, 0.8, generator=torch.Generator().manual_seed(2), use_efficient=eff)
    q = RestartQuery(inner, EpochRestartIndicator(4))
    gs = q.initial_global_state()
    events, out = [], []
    for i in range(10):
        r, gs, ev = _step(q, gs, 0.5)
        events.append(ev)
        out.append(r)
        assert gs.inner_query_state.tree_state.num_steps == (i + 1) % 4
    assert [e.starts_tree for e in events] == [1, 0, 0, 0, 1, 0, 0, 0, 1, 0]
    assert all(e == TreeAggregationStepEvent(0.8, e.starts_tree) for e in events)
    # the second tree equals a fresh tree fed by the generator state where the first one ended
    g = torch.Generator().manual_seed(2)
    ref = TreeResidualSumQuery.build_l2_gaussian_query(1.0, 0.8, generator=g, use_efficient=eff)
    rgs = ref.initial_global_state()
    for _ in range(4):
        _, rgs, _ = _step(ref, rgs, 0.5)
    rgs = ref.initial_global_state()
    for i in range(4, 8):
        r, rgs, _ = _step(ref, rgs, 0.5)
        assert torch.equal(r, out[i])


def test_round_trip_and_forced_reset():
    q = RestartQuery(TreeCumulativeSumQuery(2.0, lambda: 1.0, use_efficient=False), PeriodicRoundRestartIndicator(3))
    gs = q.initial_global_state()
    for _ in range(4):
        _, gs, _ = _step(q, gs, 1.0)
    gs2 = from_plain(q.initial_global_state(), to_plain(gs))
    a = [float(_step(q, gs, 1.0)[0])]
    b = [float(_step(q, gs2, 1.0)[0])]
    assert a == b
    r, gs, ev = _step(q, gs, 1.0)
    gs = q.reset_state(r, gs)
    assert gs.inner_query_state.tree_state.num_steps == 0 and gs.indicator_state == 5
    assert q.derive_metrics(gs)["tree_agg_dpftrl_clip"] == 2.0


def test_restart_query_errors():
    with pytest.raises(ValueError, match="reset_state"):
        RestartQuery(GaussianSumQuery(1.0, 1.0), PeriodicRoundRestartIndicator(2))
    with pytest.raises(TypeError, match="RestartIndicator"):
        RestartQuery(TreeResidualSumQuery(1.0, lambda: 0.0), 3)
    with pytest.raises(TypeError, match="DPQuery"):
        RestartQuery(object(), PeriodicRoundRestartIndicator(2))


def test_ledger_records_one_run_per_tree_part():
    """Through QueryWithLedger, 10 steps restarted every 4 give runs (1 start, 3 more) x 2 and
    (1 start, 1 more): the ledger grows with restarts, not steps, and survives JSON."""
    from pytorch_privacy.dp_query.privacy_ledger import PrivacyLedger
    from pytorch_privacy.dp_query.query_with_ledger import QueryWithLedger

    ledger = PrivacyLedger(100, sampling="shuffle", batch_size=25)
    inner = TreeResidualSumQuery.build_l2_gaussian_query(1.0, 2.0, generator=torch.Generator().manual_seed(0))
    q = QueryWithLedger(RestartQuery(inner, EpochRestartIndicator(4)), ledger)
    gs = q.initial_global_state()
    for _ in range(10):
        _, gs, _ = _step(q, gs, 0.3)
    runs = [(r.count, r.event.starts_tree) for r in ledger.runs]
    assert runs == [(1, 1), (3, 0), (1, 1), (3, 0), (1, 1), (1, 0)]
    again = PrivacyLedger.from_json(ledger.to_json())
    assert [r.event for r in again.runs] == [r.event for r in ledger.runs]


def test_ledger_of_restarted_tree_is_accounted():
    """End to end: 3 epochs of 4 shuffled batches, one tree per epoch, z = 2.  Each record is in
    one leaf per tree; the 3 nodes above it (4 leaves: levels 0, 1, 2) are released, so one tree
    is a Gaussian mechanism with squared sensitivity 3 (add/remove) or 3 * 4 (replace-one, the
    relation of shuffled ledgers): RDP(alpha) = 3 trees * alpha * 12 / (2 z^2) = 4.5 alpha."""
    import numpy as np

    from pytorch_privacy.analysis import compute_rdp_from_ledger
    from pytorch_privacy.dp_query.privacy_ledger import PrivacyLedger
    from pytorch_privacy.dp_query.query_with_ledger import QueryWithLedger

    ledger = PrivacyLedger(100, sampling="shuffle", batch_size=25)
    inner = TreeResidualSumQuery.build_l2_gaussian_query(1.0, 2.0, generator=torch.Generator().manual_seed(0))
    q = QueryWithLedger(RestartQuery(inner, EpochRestartIndicator(4)), ledger)
    gs = q.initial_global_state()
    for _ in range(12):
        params = q.derive_sample_params(gs)
        s = q.accumulate_records(params, q.initial_sample_state(torch.zeros(3)), torch.ones(25, 3))
        _, gs, _ = q.get_noised_result(s, gs)
    orders = np.array([2.0, 4.0, 8.0])
    np.testing.assert_allclose(compute_rdp_from_ledger(ledger, orders), 4.5 * orders, rtol=1e-12)
