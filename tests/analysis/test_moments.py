"""Moments accountant view (Abadi et al. 2016): log moments, tail bound, published figures."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytorch_privacy.analysis.conversion import get_privacy_spent
from pytorch_privacy.analysis.moments import DEFAULT_LAMBDAS, compute_log_moments, get_privacy_spent_moments
from pytorch_privacy.analysis.rdp import compute_rdp

LAMBDAS = np.arange(1, 33, dtype=float)  # Abadi et al. used integer lambda <= 32


@pytest.mark.parametrize("q,sigma,steps", [(0.01, 1.1, 100), (0.004, 0.8, 1), (0.2, 3.0, 5000), (1e-4, 4.0, 10**4)])
def test_log_moments_from_abadi_definition(q, sigma, steps):
    """Abadi et al. 2016 (Sec. 3.2): per step alpha(lambda) = max(log E_{z~mu}[(mu/mu_0)^lambda],
    log E_{z~mu_0}[(mu_0/mu)^lambda]), mu = (1-q) N(0, sigma^2) + q N(1, sigma^2), mu_0 =
    N(0, sigma^2); steps compose additively.  Computed here independently of the accountant:
    for integer lambda the first term (the larger, their Lemma 3) by the exact binomial expansion
    sum_k C(lambda+1, k) (1-q)^(lambda+1-k) q^k exp((k^2 - k) / (2 sigma^2)) in 40 digits; for
    fractional lambda both terms by 30-digit quadrature."""
    import mpmath as mp

    lam = np.arange(1, 33, dtype=float)
    with mp.workdps(40):
        qq, ss = mp.mpf(q), mp.mpf(sigma)
        ref = [
            float(steps * mp.log(mp.fsum(
                mp.binomial(int(l) + 1, k) * (1 - qq) ** (int(l) + 1 - k) * qq**k * mp.exp((k * k - k) / (2 * ss * ss))
                for k in range(int(l) + 2)
            )))
            for l in lam
        ]
    np.testing.assert_allclose(compute_log_moments(q, sigma, steps, lam), ref, rtol=1e-10)

    frac = np.array([0.5, 2.7])
    with mp.workdps(30):
        qq, ss = mp.mpf(q), mp.mpf(sigma)
        mu0 = lambda z: mp.npdf(z, 0, ss)  # noqa: E731
        mu = lambda z: (1 - qq) * mp.npdf(z, 0, ss) + qq * mp.npdf(z, 1, ss)  # noqa: E731
        cuts = [-mp.inf, -6 * ss, 0, 1, 1 + 6 * ss, mp.inf]
        ref = [
            float(steps * max(
                mp.log(mp.quad(lambda z: mu(z) * (mu(z) / mu0(z)) ** l, cuts)),
                mp.log(mp.quad(lambda z: mu0(z) * (mu0(z) / mu(z)) ** l, cuts)),
            ))
            for l in frac
        ]
    np.testing.assert_allclose(compute_log_moments(q, sigma, steps, frac), ref, rtol=1e-8)


@pytest.mark.peer
def test_log_moments_are_dp_accounting_rdp_at_lambda_plus_one():
    """alpha(lambda) = lambda * RDP(lambda + 1), with the RDP from dp-accounting (integer lambda,
    where its formula is exact; for fractional orders it returns an upper bound)."""
    dpa = pytest.importorskip("dp_accounting.rdp.rdp_privacy_accountant")
    lam = np.array([1.0, 2.0, 6.0, 17.0, 31.0])
    for q, sigma, steps in [(0.01, 1.1, 100), (0.2, 3.0, 5000), (1e-4, 0.9, 10**4)]:
        theirs = lam * steps * np.asarray(dpa._compute_rdp_poisson_subsampled_gaussian(q, sigma, lam + 1))
        np.testing.assert_allclose(compute_log_moments(q, sigma, steps, lam), theirs, rtol=1e-9)


def test_classic_conversion_is_mironov_basic():
    lam = LAMBDAS
    lm = compute_log_moments(0.02, 1.3, 500, lam)
    eps, delta, opt = get_privacy_spent_moments(lam, lm, target_delta=1e-5)
    rdp = compute_rdp(0.02, 1.3, 500, lam + 1)
    assert eps == pytest.approx(np.min(rdp + math.log(1e5) / lam), rel=1e-12)
    assert delta == 1e-5 and opt in lam


@given(q=st.floats(1e-4, 0.3), s=st.floats(0.6, 8.0), t=st.integers(1, 10**5), d=st.floats(1e-10, 1e-2))
@settings(max_examples=25)
def test_tight_never_worse_than_moments(q, s, t, d):
    lam = LAMBDAS
    classic = get_privacy_spent_moments(lam, compute_log_moments(q, s, t, lam), target_delta=d)[0]
    tight = get_privacy_spent(lam + 1, compute_rdp(q, s, t, lam + 1), target_delta=d)[0]
    assert tight <= classic * (1 + 1e-12)


@given(e=st.floats(0.01, 10), q=st.floats(1e-4, 0.3), s=st.floats(0.6, 8.0))
@settings(max_examples=20)
def test_tail_bound_round_trip(e, q, s):
    lam = LAMBDAS
    lm = compute_log_moments(q, s, 1000, lam)
    _, delta, _ = get_privacy_spent_moments(lam, lm, target_eps=e)
    if 0 < delta < 1:
        eps, _, _ = get_privacy_spent_moments(lam, lm, target_delta=delta)
        assert eps <= e * (1 + 1e-9)


def test_abadi_2016_figure():
    # Abadi et al. 2016, Sec. 3.1: q = 0.01, sigma = 4, delta = 1e-5, T = 10000 steps:
    # "eps ~ 1.26 using the moments accountant"
    lm = compute_log_moments(0.01, 4.0, 10000, LAMBDAS)
    eps, _, _ = get_privacy_spent_moments(LAMBDAS, lm, target_delta=1e-5)
    assert eps == pytest.approx(1.26, abs=0.005)


def test_tf_privacy_readme_figure_is_the_classic_conversion():
    # TF Privacy README: N=60000, batch 256, sigma 1.1, 60 epochs, delta 1e-5 -> "eps = 3.01";
    # that is the classic (moments) conversion; the tight one gives ~2.60
    q, steps = 256 / 60000, math.ceil(60 * 60000 / 256)
    lam = np.asarray(DEFAULT_LAMBDAS)
    classic = get_privacy_spent_moments(lam, compute_log_moments(q, 1.1, steps, lam), target_delta=1e-5)[0]
    assert classic == pytest.approx(3.01, abs=0.01)


def test_validation():
    with pytest.raises(ValueError, match="exactly one"):
        get_privacy_spent_moments(LAMBDAS, np.ones(32))
    with pytest.raises(ValueError, match="lambda"):
        compute_log_moments(0.1, 1.0, 1, [0.0, 1.0])
    with pytest.raises(ValueError, match="same length"):
        get_privacy_spent_moments([1.0, 2.0], [0.1], target_delta=1e-5)
    with pytest.raises(ValueError, match="delta"):
        get_privacy_spent_moments([1.0], [0.1], target_delta=1.0)
    with pytest.raises(ValueError, match=">= 0"):
        get_privacy_spent_moments([1.0], [-0.1], target_delta=1e-5)


def test_infinite_warns():
    with pytest.warns(RuntimeWarning, match="infinite"):
        eps, _, _ = get_privacy_spent_moments([1.0, 2.0], [np.inf, np.inf], target_delta=1e-5)
    assert eps == math.inf
