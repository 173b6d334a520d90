"""RdpAccountant: online composition, event semantics, relations, ledgers, peers."""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytorch_privacy.analysis import PrivacyAccountant, RdpAccountant
from pytorch_privacy.analysis.conversion import get_privacy_spent
from pytorch_privacy.analysis.rdp import DEFAULT_ORDERS, compute_rdp, compute_rdp_sample_without_replacement
from pytorch_privacy.analysis.rdp_accountant import compute_rdp_from_event, compute_rdp_from_ledger
from pytorch_privacy.dp_query.events import (
    ComposedEvent,
    GaussianEvent,
    LaplaceEvent,
    NonPrivateEvent,
    NoOpEvent,
    PoissonSampledEvent,
    SampledWithoutReplacementEvent,
    SelfComposedEvent,
    ShuffledEvent,
    UnsupportedEvent,
)
from pytorch_privacy.dp_query.privacy_ledger import PrivacyLedger

ORDERS = [1.5, 2.0, 2.5, 4.0, 8.0, 16.0, 32.0, 64.0]
SAMPLED = PoissonSampledEvent(0.01, GaussianEvent(1.1))


def acc(**kw):
    return RdpAccountant(orders=ORDERS, **kw)


# -- interface ------------------------------------------------------------------------------
def test_is_a_privacy_accountant():
    a = RdpAccountant()
    assert isinstance(a, PrivacyAccountant)
    np.testing.assert_array_equal(a.orders, DEFAULT_ORDERS)
    assert a.neighboring_relation == "add_or_remove_one"
    assert a.get_epsilon(1e-5) == 0.0 and a.get_delta(1.0) == 0.0


def test_compose_returns_self_and_adds():
    a = acc()
    assert a.compose(SAMPLED, 10) is a
    a.compose(SAMPLED, 5)
    np.testing.assert_allclose(a.rdp, compute_rdp(0.01, 1.1, 15, ORDERS), rtol=1e-14)


def test_online_equals_batch_and_compute_rdp():
    a = acc()
    for _ in range(1000):
        a.compose(SAMPLED)
    np.testing.assert_allclose(a.rdp, compute_rdp(0.01, 1.1, 1000, ORDERS), rtol=1e-12)
    eps, order = a.get_epsilon_and_order(1e-5)
    e2, _, o2 = get_privacy_spent(ORDERS, compute_rdp(0.01, 1.1, 1000, ORDERS), target_delta=1e-5)
    assert eps == pytest.approx(e2, rel=1e-12) and order == o2
    assert a.get_epsilon(1e-5) == eps
    assert a.get_delta(eps) == pytest.approx(1e-5, rel=1e-6)
    d, o3 = a.get_delta_and_order(eps)
    assert d == a.get_delta(eps) and o3 in ORDERS


def test_constant_work_per_step():
    a = RdpAccountant()  # full default grid
    a.compose(SAMPLED)  # computes and caches
    n = 20000
    t = time.perf_counter()
    for _ in range(n):
        a.compose(SAMPLED)
    per_step = (time.perf_counter() - t) / n
    assert per_step < 1e-4, per_step  # a dict lookup and a vector add, not an RDP evaluation
    np.testing.assert_allclose(a.rdp, compute_rdp(0.01, 1.1, n + 1), rtol=1e-10)


def test_cache_is_per_distinct_event(monkeypatch):
    a = acc()
    calls = []
    orig = a._compute

    def spy(event, orders, cached):
        calls.append(event)
        return orig(event, orders, cached)

    monkeypatch.setattr(a, "_compute", spy)
    for _ in range(50):
        a.compose(PoissonSampledEvent(0.01, GaussianEvent(1.1)))  # equal, not identical, objects
    assert len([c for c in calls if isinstance(c, PoissonSampledEvent)]) == 1


@given(counts=st.lists(st.integers(0, 10**4), min_size=1, max_size=5))
@settings(max_examples=20)
def test_composition_adds(counts):
    a = acc()
    for c in counts:
        a.compose(SAMPLED, c)
    np.testing.assert_allclose(a.rdp, compute_rdp(0.01, 1.1, sum(counts), ORDERS), rtol=1e-12)


def test_copy_is_independent():
    a = acc().compose(SAMPLED, 10)
    b = a.copy()
    b.compose(SAMPLED, 10)
    assert np.all(b.rdp > a.rdp)


@pytest.mark.parametrize("count", [-1, 1.5, True, "2"])
def test_bad_count(count):
    with pytest.raises(ValueError, match="count"):
        acc().compose(SAMPLED, count)


def test_bad_relation_and_orders():
    with pytest.raises(ValueError, match="neighboring_relation"):
        RdpAccountant(neighboring_relation="swap")
    with pytest.raises(ValueError, match="order"):
        RdpAccountant(orders=[1.0, 2.0])


def test_bad_delta_eps():
    a = acc().compose(SAMPLED, 10)
    with pytest.raises(ValueError, match="delta"):
        a.get_epsilon(0.0)
    with pytest.raises(ValueError, match="eps"):
        a.get_delta(-1.0)


# -- event semantics ------------------------------------------------------------------------
def test_gaussian_add_remove_and_replace_one():
    o = np.array(ORDERS)
    np.testing.assert_allclose(acc().compose(GaussianEvent(2.0), 3).rdp, 3 * o / 8, rtol=1e-15)
    # replace-one: sensitivity 2 * clip -> 2 alpha / sigma^2
    np.testing.assert_allclose(acc(neighboring_relation="replace_one").compose(GaussianEvent(2.0)).rdp, 2 * o / 4, rtol=1e-15)


def test_noop_and_empty_compositions():
    a = acc().compose(NoOpEvent(), 100).compose(ComposedEvent([])).compose(SelfComposedEvent(SAMPLED, 0))
    assert np.all(a.rdp == 0)
    assert a.get_epsilon(1e-5) == 0.0
    assert np.all(acc().compose(PoissonSampledEvent(0.3, NoOpEvent())).rdp == 0)


def test_nonprivate_is_infinite_with_warning():
    a = acc()
    assert a.supports(NonPrivateEvent())
    with pytest.warns(RuntimeWarning, match="infinite privacy loss"):
        a.compose(NonPrivateEvent())
    with pytest.warns(RuntimeWarning, match="infinite"):
        assert a.get_epsilon(1e-5) == math.inf
    with pytest.warns(RuntimeWarning, match="infinite"):
        acc().compose(PoissonSampledEvent(0.1, GaussianEvent(0.0)))


def test_unsupported_event():
    a = acc()
    ev = UnsupportedEvent("a custom mechanism")
    assert not a.supports(ev)
    with pytest.raises(ValueError, match="a custom mechanism"):
        a.compose(ev)
    with pytest.raises(ValueError, match="Unsupported"):
        a.compose(ComposedEvent([SAMPLED, ev]))
    assert np.all(a.rdp == 0)  # nothing was half-composed
    with pytest.raises(TypeError):
        a.compose("not an event")


def test_sampled_event_needs_gaussian_inside():
    with pytest.raises(ValueError, match="Gaussian"):
        acc().compose(PoissonSampledEvent(0.1, LaplaceEvent(1.0)))


def test_composed_gaussians_inside_sampling():
    # two Gaussian queries on one sample = one Gaussian with s = (s1^-2 + s2^-2)^-1/2
    ev = PoissonSampledEvent(0.02, ComposedEvent([GaussianEvent(2.0), SelfComposedEvent(GaussianEvent(4.0), 4)]))
    eff = (2.0**-2 + 4 * 4.0**-2) ** -0.5
    np.testing.assert_allclose(acc().compose(ev).rdp, compute_rdp(0.02, eff, 1, ORDERS), rtol=1e-14)


def test_self_composed_and_composed():
    ev = ComposedEvent([SelfComposedEvent(SAMPLED, 7), GaussianEvent(3.0), SAMPLED])
    ref = compute_rdp(0.01, 1.1, 8, ORDERS) + np.array(ORDERS) / 18
    np.testing.assert_allclose(acc().compose(ev, 2).rdp, 2 * ref, rtol=1e-14)


def test_relations_are_not_mixed():
    wor = SampledWithoutReplacementEvent(1000, 10, GaussianEvent(1.1))
    shuf = ShuffledEvent(10, 25, GaussianEvent(1.1))
    with pytest.raises(ValueError, match="replace-one"):
        acc().compose(wor)
    with pytest.raises(ValueError, match="replace-one"):
        acc().compose(shuf)
    with pytest.raises(ValueError, match="add-or-remove-one"):
        acc(neighboring_relation="replace_one").compose(SAMPLED)
    assert not acc().supports(wor) and not acc(neighboring_relation="replace_one").supports(SAMPLED)
    assert acc(neighboring_relation="replace_one").supports(wor)


def test_sampled_without_replacement():
    ev = SampledWithoutReplacementEvent(1000, 10, GaussianEvent(1.1))
    r = acc(neighboring_relation="replace_one").compose(ev, 5).rdp
    np.testing.assert_allclose(r, compute_rdp_sample_without_replacement(0.01, 1.1, 5, ORDERS), rtol=1e-14)


def test_shuffled_is_one_unamplified_step_per_epoch():
    a = acc(neighboring_relation="replace_one")
    a.compose(ShuffledEvent(steps_per_epoch=10, steps=25, event=GaussianEvent(2.0)))
    # ceil(25 / 10) = 3 epochs, each one replace-one Gaussian (2 alpha / s^2)
    np.testing.assert_allclose(a.rdp, 3 * 2 * np.array(ORDERS) / 4, rtol=1e-15)
    assert np.all(acc(neighboring_relation="replace_one").compose(ShuffledEvent(10, 0, GaussianEvent(1.0))).rdp == 0)


def test_laplace():
    o = np.array(ORDERS)
    b = 2.0
    ref = np.log(o / (2 * o - 1) * np.exp((o - 1) / b) + (o - 1) / (2 * o - 1) * np.exp(-o / b)) / (o - 1)
    np.testing.assert_allclose(acc().compose(LaplaceEvent(b)).rdp, ref, rtol=1e-13)
    # never above pure eps = 1/b
    assert np.all(ref <= 1 / b)


# -- events and ledgers ---------------------------------------------------------------------
def test_compute_rdp_from_event_picks_relation():
    o = ORDERS
    np.testing.assert_allclose(compute_rdp_from_event(SelfComposedEvent(SAMPLED, 100), o), compute_rdp(0.01, 1.1, 100, o))
    shuf = ShuffledEvent(10, 20, GaussianEvent(2.0))
    np.testing.assert_allclose(compute_rdp_from_event(shuf, o), 2 * 2 * np.array(o) / 4)
    with pytest.raises(ValueError):
        compute_rdp_from_event(shuf, o, neighboring_relation="add_or_remove_one")
    with pytest.raises(ValueError, match="mixes"):
        compute_rdp_from_event(ComposedEvent([SAMPLED, shuf]), o)
    with pytest.warns(RuntimeWarning, match="infinite"):
        assert np.all(np.isinf(compute_rdp_from_event(GaussianEvent(0.0), o)))


def test_ledger_of_identical_steps_equals_compute_rdp():
    ledger = PrivacyLedger(60000, 256 / 60000)
    for _ in range(300):
        ledger.record_gaussian_sample(1.1)
    np.testing.assert_allclose(compute_rdp_from_ledger(ledger, ORDERS), compute_rdp(256 / 60000, 1.1, 300, ORDERS), rtol=1e-14)
    a = acc().compose_ledger(ledger)
    np.testing.assert_allclose(a.rdp, compute_rdp(256 / 60000, 1.1, 300, ORDERS), rtol=1e-14)


def test_empty_ledger_is_zero():
    ledger = PrivacyLedger(100, 0.1)
    assert np.all(compute_rdp_from_ledger(ledger, ORDERS) == 0)
    assert acc().compose_ledger(ledger).get_epsilon(1e-5) == 0.0


def test_heterogeneous_ledger():
    ledger = PrivacyLedger(1000, 0.01)
    ledger.record_gaussian_sample(1.0, count=100)
    ledger.set_sampling(1000, 0.05)
    ledger.record_gaussian_sample(2.0, count=50)
    ledger.set_sampling(1000, 0.01)
    ledger.record_gaussian_sample(1.0, count=10)
    ref = compute_rdp(0.01, 1.0, 110, ORDERS) + compute_rdp(0.05, 2.0, 50, ORDERS)
    np.testing.assert_allclose(compute_rdp_from_ledger(ledger, ORDERS), ref, rtol=1e-14)


def test_shuffled_ledger():
    ledger = PrivacyLedger(1000, sampling="shuffle", batch_size=100)
    ledger.record_gaussian_sample(2.0, count=35)  # 10 steps per epoch -> 4 epochs
    np.testing.assert_allclose(compute_rdp_from_ledger(ledger, ORDERS), 4 * 2 * np.array(ORDERS) / 4)


def test_million_step_ledgers_are_fast():
    ledger = PrivacyLedger(60000, 0.004)
    ledger.record_gaussian_sample(1.1, count=10**6)
    t = time.perf_counter()
    r = compute_rdp_from_ledger(ledger)
    assert time.perf_counter() - t < 0.5
    np.testing.assert_allclose(r, compute_rdp(0.004, 1.1, 10**6), rtol=1e-14)
    # many short runs of two alternating settings: grouped, not replayed
    ledger = PrivacyLedger(60000, 0.004)
    for i in range(20000):
        ledger.record_gaussian_sample(1.1 if i % 2 else 1.3, count=50)
    t = time.perf_counter()
    r = compute_rdp_from_ledger(ledger, ORDERS)
    assert time.perf_counter() - t < 2.0
    ref = compute_rdp(0.004, 1.1, 500000, ORDERS) + compute_rdp(0.004, 1.3, 500000, ORDERS)
    np.testing.assert_allclose(r, ref, rtol=1e-12)


# -- refinement -----------------------------------------------------------------------------
def test_refine_is_never_worse():
    plain = RdpAccountant().compose(PoissonSampledEvent(0.001, GaussianEvent(1.1)), 100)
    fine = RdpAccountant(refine=True).compose(PoissonSampledEvent(0.001, GaussianEvent(1.1)), 100)
    e0, e1 = plain.get_epsilon(1e-5), fine.get_epsilon(1e-5)
    assert e1 < 0.97 * e0  # on the RDP "cliff" the continuous order gains several per cent
    np.testing.assert_array_equal(plain.rdp, fine.rdp)


# -- peer: dp-accounting's RdpAccountant on the same events ---------------------------------
@pytest.fixture(scope="module")
def dpa():
    dp_accounting = pytest.importorskip("dp_accounting")
    logging.getLogger("absl").setLevel(logging.ERROR)
    return dp_accounting


def _to_dpa(dp_accounting, ev, replace_one=False):
    E = dp_accounting.dp_event
    if isinstance(ev, GaussianEvent):
        # dp-accounting's noise multiplier is relative to the sensitivity under the relation
        return E.GaussianDpEvent(ev.noise_multiplier / (2.0 if replace_one else 1.0))
    if isinstance(ev, PoissonSampledEvent):
        return E.PoissonSampledDpEvent(ev.sampling_probability, _to_dpa(dp_accounting, ev.event, replace_one))
    if isinstance(ev, SampledWithoutReplacementEvent):
        return E.SampledWithoutReplacementDpEvent(
            ev.source_dataset_size, ev.sample_size, _to_dpa(dp_accounting, ev.event, replace_one)
        )
    if isinstance(ev, SelfComposedEvent):
        return E.SelfComposedDpEvent(_to_dpa(dp_accounting, ev.event, replace_one), ev.count)
    if isinstance(ev, ComposedEvent):
        return E.ComposedDpEvent([_to_dpa(dp_accounting, e, replace_one) for e in ev.events])
    if isinstance(ev, LaplaceEvent):
        return E.LaplaceDpEvent(ev.noise_multiplier / (2.0 if replace_one else 1.0))
    raise AssertionError(ev)


INT_GRID = [2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 64.0, 128.0, 256.0]


@pytest.mark.peer
@given(
    q1=st.floats(1e-4, 0.5), s1=st.floats(0.6, 10), t1=st.integers(1, 10**4),
    q2=st.floats(1e-4, 0.5), s2=st.floats(0.6, 10), t2=st.integers(0, 10**3),
    sg=st.floats(5, 100), b=st.floats(1, 50),
)
@settings(max_examples=20)
def test_matches_dp_accounting_add_remove(dpa, q1, s1, t1, q2, s2, t2, sg, b):
    ev = ComposedEvent([
        SelfComposedEvent(PoissonSampledEvent(q1, GaussianEvent(s1)), t1),
        PoissonSampledEvent(q2, ComposedEvent([GaussianEvent(s2), GaussianEvent(2 * s2)])),
        GaussianEvent(sg),
        LaplaceEvent(b),
    ])
    ours = RdpAccountant(orders=INT_GRID).compose(ev, 1 + t2)
    theirs = dpa.rdp.RdpAccountant(orders=INT_GRID).compose(_to_dpa(dpa, ev), 1 + t2)
    np.testing.assert_allclose(ours.rdp, theirs.rdp, rtol=1e-9, atol=1e-15 * (t1 + 1) * (t2 + 1))
    assert ours.get_epsilon(1e-5) == pytest.approx(theirs.get_epsilon(1e-5), rel=1e-9)


@pytest.mark.peer
@given(n=st.integers(100, 10**5), frac=st.floats(1e-3, 0.2), s=st.floats(0.8, 10), t=st.integers(1, 1000))
@settings(max_examples=15)
def test_matches_dp_accounting_replace_one(dpa, n, frac, s, t):
    m = max(1, int(frac * n))
    ev = SelfComposedEvent(SampledWithoutReplacementEvent(n, m, GaussianEvent(s)), t)
    o = [2.0, 3.0, 4.0, 8.0, 16.0, 32.0]
    ours = RdpAccountant(orders=o, neighboring_relation="replace_one").compose(ev)
    NR = dpa.privacy_accountant.NeighboringRelation
    theirs = dpa.rdp.RdpAccountant(orders=o, neighboring_relation=NR.REPLACE_ONE).compose(_to_dpa(dpa, ev, True))
    cap = t * 2 * np.array(o) / s**2  # ours is capped by the un-amplified Gaussian
    np.testing.assert_allclose(ours.rdp, np.minimum(theirs.rdp, cap), rtol=1e-9)


@pytest.mark.peer
def test_dp_accounting_refuses_the_same_relations(dpa):
    NR = dpa.privacy_accountant.NeighboringRelation
    wor = SampledWithoutReplacementEvent(1000, 10, GaussianEvent(1.1))
    assert not dpa.rdp.RdpAccountant().supports(_to_dpa(dpa, wor))
    assert not RdpAccountant().supports(wor)
    assert not dpa.rdp.RdpAccountant(neighboring_relation=NR.REPLACE_ONE).supports(_to_dpa(dpa, SAMPLED))
    assert not RdpAccountant(neighboring_relation="replace_one").supports(SAMPLED)
