"""RDP -> (eps, delta): validation, properties, agreement with dp-accounting, refinement."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytorch_privacy.analysis.conversion import get_privacy_spent, refine_epsilon
from pytorch_privacy.analysis.rdp import DEFAULT_ORDERS, compute_rdp

ORDERS = [1.5, 2.0, 3.0, 5.0, 8.0, 16.0, 32.0, 64.0]


def _rdp(q=0.01, s=1.1, t=1000, orders=ORDERS):
    return compute_rdp(q, s, t, orders)


# -- validation -----------------------------------------------------------------------------
def test_exactly_one_target():
    with pytest.raises(ValueError, match="exactly one"):
        get_privacy_spent(ORDERS, _rdp())
    with pytest.raises(ValueError, match="exactly one"):
        get_privacy_spent(ORDERS, _rdp(), target_eps=1.0, target_delta=1e-5)


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, 1.5, float("nan")])
def test_bad_delta(delta):
    with pytest.raises(ValueError, match="delta"):
        get_privacy_spent(ORDERS, _rdp(), target_delta=delta)


@pytest.mark.parametrize("eps", [-0.1, float("nan"), "1.0", True])
def test_bad_eps(eps):
    with pytest.raises(ValueError, match="eps"):
        get_privacy_spent(ORDERS, _rdp(), target_eps=eps)


def test_bad_orders_and_rdp():
    with pytest.raises(ValueError, match="order"):
        get_privacy_spent([1.0, 2.0], [0.1, 0.2], target_delta=1e-5)
    with pytest.raises(ValueError, match="same length"):
        get_privacy_spent([2.0, 3.0], [0.1], target_delta=1e-5)
    with pytest.raises(ValueError, match=">= 0"):
        get_privacy_spent([2.0, 3.0], [0.1, -0.2], target_delta=1e-5)


# -- special values -------------------------------------------------------------------------
def test_zero_rdp_is_zero_loss():
    eps, delta, _ = get_privacy_spent(ORDERS, np.zeros(len(ORDERS)), target_delta=1e-5)
    assert eps == 0.0 and delta == 1e-5
    _, d, _ = get_privacy_spent(ORDERS, np.zeros(len(ORDERS)), target_eps=0.0)
    assert d == 0.0


def test_infinite_rdp_warns():
    inf = np.full(len(ORDERS), np.inf)
    with pytest.warns(RuntimeWarning, match="infinite"):
        eps, _, _ = get_privacy_spent(ORDERS, inf, target_delta=1e-5)
    assert eps == math.inf
    with pytest.warns(RuntimeWarning, match="infinite"):
        _, delta, _ = get_privacy_spent(ORDERS, inf, target_eps=1.0)
    assert delta == 1.0


def test_tiny_rdp_delta():
    _, d, _ = get_privacy_spent([2.0, 3.0], [1e-74, 2e-74], target_eps=0.0)
    assert d == pytest.approx(math.sqrt(1e-74), rel=1e-6)  # the KL / total-variation rule


def test_partly_infinite_rdp_is_finite():
    r = _rdp()
    r[-2:] = np.inf
    eps, _, order = get_privacy_spent(ORDERS, r, target_delta=1e-5)
    assert math.isfinite(eps) and order < ORDERS[-2]


def test_returns_the_target():
    eps, delta, order = get_privacy_spent(ORDERS, _rdp(), target_delta=1e-6)
    assert delta == 1e-6 and order in ORDERS and eps > 0
    e2, d2, o2 = get_privacy_spent(ORDERS, _rdp(), target_eps=eps)
    assert e2 == eps and d2 == pytest.approx(1e-6, rel=1e-9) and o2 == order


def test_tighter_than_classic():
    o = np.array(ORDERS)
    r = _rdp()
    classic = np.min(r + math.log(1e5) / (o - 1))
    assert get_privacy_spent(o, r, target_delta=1e-5)[0] < classic


# -- properties -----------------------------------------------------------------------------
@given(d1=st.floats(1e-12, 0.5), d2=st.floats(1e-12, 0.5), q=st.floats(1e-4, 0.2), s=st.floats(0.6, 5))
@settings(max_examples=25)
def test_eps_decreasing_in_delta(d1, d2, q, s):
    r = _rdp(q, s, 500)
    lo, hi = sorted((d1, d2))
    assert get_privacy_spent(ORDERS, r, target_delta=hi)[0] <= get_privacy_spent(ORDERS, r, target_delta=lo)[0]


@given(e1=st.floats(0, 20), e2=st.floats(0, 20), q=st.floats(1e-4, 0.2), s=st.floats(0.6, 5))
@settings(max_examples=25)
def test_delta_decreasing_in_eps(e1, e2, q, s):
    r = _rdp(q, s, 500)
    lo, hi = sorted((e1, e2))
    assert get_privacy_spent(ORDERS, r, target_eps=hi)[1] <= get_privacy_spent(ORDERS, r, target_eps=lo)[1]


@given(delta=st.floats(1e-10, 0.1), q=st.floats(1e-4, 0.5), s=st.floats(0.6, 5), t=st.integers(1, 10**4))
@settings(max_examples=25)
def test_round_trip(delta, q, s, t):
    r = _rdp(q, s, t)
    eps, _, order = get_privacy_spent(ORDERS, r, target_delta=delta)
    if eps > 0:
        _, d, _ = get_privacy_spent(ORDERS, r, target_eps=eps)
        assert d <= delta * (1 + 1e-9)


# -- agreement with dp-accounting on identical RDP ------------------------------------------
@pytest.fixture(scope="module")
def dpa():
    mod = pytest.importorskip("dp_accounting.rdp.rdp_privacy_accountant")
    logging.getLogger("absl").setLevel(logging.ERROR)
    return mod


# dp-accounting evaluates the KL rule as log1p(-exp(-r)): a math domain error for r < ~1e-16
# and ~1e-16/r relative error above; ours uses expm1 (see test_tiny_rdp_delta).  So r >= 1e-6.
rdp_curves = st.lists(st.one_of(st.just(0.0), st.floats(1e-6, 50.0)), min_size=1, max_size=12)
orders_lists = st.lists(st.floats(1.011, 300.0), min_size=12, max_size=12, unique=True)


@pytest.mark.peer
@given(orders=orders_lists, rdp=rdp_curves, delta=st.floats(1e-12, 0.9))
@settings(max_examples=60)
def test_epsilon_agrees_with_dp_accounting(dpa, orders, rdp, delta):
    orders = orders[: len(rdp)]
    ours = get_privacy_spent(orders, rdp, target_delta=delta)[0]
    theirs = dpa.compute_epsilon(orders, rdp, delta)[0]
    assert ours == pytest.approx(theirs, rel=1e-9, abs=1e-12)


@pytest.mark.peer
@given(orders=orders_lists, rdp=rdp_curves, eps=st.floats(0.0, 30.0))
@settings(max_examples=60)
def test_delta_agrees_with_dp_accounting(dpa, orders, rdp, eps):
    orders = orders[: len(rdp)]
    ours = get_privacy_spent(orders, rdp, target_eps=eps)[1]
    theirs = dpa.compute_delta(orders, rdp, eps)[0]
    assert ours == pytest.approx(theirs, rel=1e-9, abs=1e-300)


@pytest.mark.peer
def test_agrees_with_dp_accounting_on_real_curves(dpa):
    o = [a for a in DEFAULT_ORDERS if a > 1.01]
    for q, s, t, d in [(256 / 60000, 1.1, 14063, 1e-5), (0.01, 4.0, 10000, 1e-5), (0.1, 0.8, 100, 1e-8)]:
        r = compute_rdp(q, s, t, o)
        assert get_privacy_spent(o, r, target_delta=d)[0] == pytest.approx(dpa.compute_epsilon(o, r, d)[0], rel=1e-9)
        assert get_privacy_spent(o, r, target_eps=1.0)[1] == pytest.approx(dpa.compute_delta(o, r, 1.0)[0], rel=1e-9)


# -- refinement -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "q,s,t,delta",
    [(0.001, 1.1, 100, 1e-5), (0.001, 2.0, 10000, 1e-8), (256 / 60000, 1.1, 14063, 1e-5), (0.1, 0.8, 100, 1e-8)],
)
def test_refine_never_worse_and_near_continuous_optimum(q, s, t, delta):
    grid = np.array(DEFAULT_ORDERS)
    eps_grid = get_privacy_spent(grid, compute_rdp(q, s, t, grid), target_delta=delta)[0]
    eps, order = refine_epsilon(lambda o: compute_rdp(q, s, t, o), grid, delta)
    assert eps <= eps_grid
    # brute-force the continuous optimum on a fine grid around the refined order
    fine = np.linspace(max(1.001, order * 0.97), order * 1.03, 301)
    brute = get_privacy_spent(fine, compute_rdp(q, s, t, fine), target_delta=delta)[0]
    assert eps <= brute * (1 + 1e-4)


def test_refine_gains_on_the_cliff():
    # q=0.001, sigma=1.1, 100 steps: the optimum (~16.7) sits on the steep rise of the RDP curve,
    # between the integer grid orders, where a fixed grid loses several per cent
    q, s, t, d = 0.001, 1.1, 100, 1e-5
    grid = np.array(DEFAULT_ORDERS)
    eps_grid = get_privacy_spent(grid, compute_rdp(q, s, t, grid), target_delta=d)[0]
    eps, order = refine_epsilon(lambda o: compute_rdp(q, s, t, o), grid, d)
    assert eps < 0.97 * eps_grid and 16 < order < 17
