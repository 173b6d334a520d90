"""RDP of the subsampled Gaussian: limits, validation, properties, speed, WOR bound."""

from __future__ import annotations

import math
import time
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytorch_privacy.analysis import rdp as rdp_mod
from pytorch_privacy.analysis.rdp import (
    DEFAULT_ORDERS,
    compute_heterogeneous_rdp,
    compute_rdp,
    compute_rdp_sample_without_replacement,
)

FRAC = [1.01, 1.1, 1.5, 2.5, 7.3, 32.7]
INTS = [2, 3, 8, 32, 128]
MIXED = sorted(FRAC + INTS)

qs = st.floats(min_value=1e-5, max_value=1.0)
sigmas = st.floats(min_value=0.5, max_value=20.0)
orders_st = st.floats(min_value=1.01, max_value=64.0)


# -- limits ---------------------------------------------------------------------------------
def test_q_one_is_plain_gaussian():
    o = np.array(MIXED, dtype=float)
    for s in (0.6, 1.1, 4.0):
        np.testing.assert_allclose(compute_rdp(1.0, s, 7, o), 7 * o / (2 * s * s), rtol=1e-15)


def test_q_zero_is_zero():
    assert np.all(compute_rdp(0.0, 1.1, 100, MIXED) == 0.0)
    assert np.all(compute_rdp(0.0, 0.0, 100, MIXED) == 0.0)  # nothing sampled: no loss, no warning


def test_zero_noise_is_infinite_with_warning():
    with pytest.warns(RuntimeWarning, match="infinite privacy loss"):
        r = compute_rdp(0.01, 0.0, 10, MIXED)
    assert np.all(np.isinf(r))


def test_zero_steps_is_zero():
    assert np.all(compute_rdp(0.3, 1.0, 0, MIXED) == 0.0)


def test_infinite_noise_is_zero():
    assert np.all(compute_rdp(0.3, math.inf, 10, MIXED) == 0.0)


def test_q_to_one_continuity():
    o = np.array(MIXED)
    a = compute_rdp(1.0 - 1e-9, 1.1, 1, o)
    b = compute_rdp(1.0, 1.1, 1, o)
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_small_q_matches_second_order_expansion():
    # RDP ~ q^2 * C(alpha, 2) * (e^{1/s^2} - 1) / (alpha - 1) as q -> 0, at every order
    q, s = 1e-7, 1.1
    o = np.array(FRAC[:4] + [2.0, 3.0])
    approx = q * q * o * (o - 1) / 2 * math.expm1(1 / s**2) / (o - 1)
    np.testing.assert_allclose(compute_rdp(q, s, 1, o), approx, rtol=1e-5)


def test_scalar_order_gives_scalar():
    r = compute_rdp(0.01, 1.1, 3, 2.5)
    assert np.ndim(r) == 0
    assert float(r) == pytest.approx(float(compute_rdp(0.01, 1.1, 3, [2.5])[0]), rel=1e-15)


def test_finite_where_series_is_not():
    # the fractional-order series of TF Privacy / dp-accounting gives inf for q >= 0.05 below
    # order 2 at small sigma; the true value is finite
    r = compute_rdp(0.5, 0.6, 1, [1.01, 1.1, 1.5, 1.9])
    assert np.all(np.isfinite(r)) and np.all(r > 0)


def test_tiny_q_keeps_relative_precision():
    # A - 1 ~ 1e-21: computed without cancellation, not rounded to 0
    r = compute_rdp(1e-10, 1.0, 1, [1.01, 1.5, 2.0])
    assert np.all(r > 0)
    approx = 1e-20 * np.array([1.01, 1.5, 2.0]) / 2 * math.expm1(1.0)
    np.testing.assert_allclose(r, approx, rtol=1e-6)


def test_very_small_noise_fractional_orders_are_exact_not_interpolated():
    # fractional orders below sigma = 0.1 used to be the chord between the integer orders
    # (convexity): at order 2.5 that was 50 nats too high; now the exact integral is used, which
    # lies strictly below the chord (log A is strictly convex in the order)
    o_int = compute_rdp(0.01, 0.05, 1, [2.0, 3.0])
    frac = compute_rdp(0.01, 0.05, 1, [2.5])[0]
    assert np.all(np.isfinite(o_int)) and np.isfinite(frac)
    chord = 0.5 * (o_int[0] * 1 + o_int[1] * 2) / 1.5
    assert 0 < float(frac) < chord - 30.0


# -- validation -----------------------------------------------------------------------------
@pytest.mark.parametrize("q", [-0.1, 1.1, float("nan"), "0.1", True])
def test_bad_q(q):
    with pytest.raises(ValueError, match="q"):
        compute_rdp(q, 1.0, 1, [2.0])


@pytest.mark.parametrize("s", [-1.0, float("nan"), None])
def test_bad_noise(s):
    with pytest.raises(ValueError, match="noise_multiplier"):
        compute_rdp(0.1, s, 1, [2.0])


@pytest.mark.parametrize("orders", [[1.0], [0.5, 2.0], [-float("inf")], [float("nan")], [], [[2.0, 3.0]]])
def test_bad_orders(orders):
    with pytest.raises(ValueError, match="order"):
        compute_rdp(0.1, 1.0, 1, orders)


@pytest.mark.parametrize("steps", [-1, 1.5, "3", True])
def test_bad_steps(steps):
    with pytest.raises(ValueError, match="steps"):
        compute_rdp(0.1, 1.0, steps, [2.0])


# -- properties -----------------------------------------------------------------------------
@given(q1=qs, q2=qs, s=sigmas, a=orders_st)
def test_monotone_in_q(q1, q2, s, a):
    lo, hi = sorted((q1, q2))
    r_lo, r_hi = compute_rdp(lo, s, 1, [a])[0], compute_rdp(hi, s, 1, [a])[0]
    assert r_lo <= r_hi * (1 + 1e-12)


@given(q=qs, s1=sigmas, s2=sigmas, a=orders_st)
def test_monotone_decreasing_in_noise(q, s1, s2, a):
    lo, hi = sorted((s1, s2))
    assert compute_rdp(q, hi, 1, [a])[0] <= compute_rdp(q, lo, 1, [a])[0] * (1 + 1e-12)


@given(q=qs, s=sigmas, a1=orders_st, a2=orders_st)
def test_monotone_in_order(q, s, a1, a2):
    lo, hi = sorted((a1, a2))
    r = compute_rdp(q, s, 1, [lo, hi])
    assert r[0] <= r[1] * (1 + 1e-12)


@given(q=qs, s=sigmas, t1=st.integers(0, 10**6), t2=st.integers(0, 10**6))
def test_monotone_in_steps_and_composition_adds(q, s, t1, t2):
    o = [1.5, 2.0, 7.3]
    a, b, ab = compute_rdp(q, s, t1, o), compute_rdp(q, s, t2, o), compute_rdp(q, s, t1 + t2, o)
    np.testing.assert_allclose(ab, a + b, rtol=1e-12)
    if t1 <= t2:
        assert np.all(a <= b)


@given(q=qs, s=sigmas)
@settings(max_examples=15)
def test_cumulant_is_convex_in_order(q, s):
    # (alpha - 1) * RDP(alpha) is a cumulant generating function: convex in alpha
    o = np.linspace(1.05, 12.0, 23)
    c = (o - 1) * compute_rdp(q, s, 1, o)
    second = c[2:] - 2 * c[1:-1] + c[:-2]
    assert np.all(second >= -1e-9 * np.abs(c[1:-1]) - 1e-300)


@given(q=st.floats(1e-4, 0.999), s=sigmas)
@settings(max_examples=15)
def test_between_plain_gaussian_and_zero(q, s):
    o = np.array(MIXED)
    r = compute_rdp(q, s, 1, o)
    assert np.all(r > 0) and np.all(r <= o / (2 * s * s) * (1 + 1e-12))


def test_default_orders():
    o = np.array(DEFAULT_ORDERS)
    assert np.all(np.diff(o) > 0) and o[0] > 1 and o[-1] >= 512
    frac = o[o != np.round(o)]
    assert frac.size >= 90 and frac.max() < 16
    assert np.all(np.isfinite(compute_rdp(0.01, 1.1, 1)))


def test_speed_100_orders():
    o = np.concatenate([1 + np.geomspace(0.01, 15, 60), np.arange(16, 56)])  # 100 orders, 60 fractional
    compute_rdp(0.004, 1.1, 1, o)  # warm up imports
    times = []
    for s in (0.6 + 1e-6, 1.1 + 1e-6, 4.0 + 1e-6):  # distinct values defeat the cache
        t = time.perf_counter()
        rdp_mod._rdp_poisson_gaussian_one_step(0.004, s, o)
        times.append(time.perf_counter() - t)
    assert min(times) < 0.05, times


def test_heterogeneous_is_sum():
    o = MIXED
    r = compute_heterogeneous_rdp([0.01, 0.1, 1.0], [1.1, 2.0, 5.0], [100, 20, 3], o)
    ref = compute_rdp(0.01, 1.1, 100, o) + compute_rdp(0.1, 2.0, 20, o) + compute_rdp(1.0, 5.0, 3, o)
    np.testing.assert_allclose(r, ref, rtol=1e-15)
    with pytest.raises(ValueError, match="same length"):
        compute_heterogeneous_rdp([0.1], [1.0, 2.0], [1], o)


# -- sampling without replacement -----------------------------------------------------------
def test_wor_limits_and_convention():
    o = np.array(MIXED)
    # q = 1: Gaussian with replace-one sensitivity 2 * clip: 2 alpha / s^2
    np.testing.assert_allclose(compute_rdp_sample_without_replacement(1.0, 1.1, 3, o), 3 * 2 * o / 1.21, rtol=1e-15)
    assert np.all(compute_rdp_sample_without_replacement(0.0, 1.1, 3, o) == 0)
    with pytest.warns(RuntimeWarning, match="infinite"):
        assert np.all(np.isinf(compute_rdp_sample_without_replacement(0.1, 0.0, 3, o)))
    with pytest.raises(ValueError):
        compute_rdp_sample_without_replacement(1.5, 1.0, 1, o)


@given(q=st.floats(1e-4, 0.5), s=st.floats(0.6, 10.0))
@settings(max_examples=15)
def test_wor_bound_properties(q, s):
    o = np.array([1.5, 2.0, 3.0, 4.5, 8.0, 16.0])
    r = compute_rdp_sample_without_replacement(q, s, 1, o)
    assert np.all(np.isfinite(r)) and np.all(r >= 0)
    # never worse than no amplification (replace-one Gaussian)
    assert np.all(r <= 2 * o / s**2 * (1 + 1e-9))
    # monotone in order on the integers
    assert np.all(np.diff(r[[1, 2, 4, 5]]) >= -1e-12)


def test_wor_warns_nothing_for_normal_input():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compute_rdp_sample_without_replacement(0.01, 1.1, 10)
        compute_rdp(0.01, 1.1, 10)
