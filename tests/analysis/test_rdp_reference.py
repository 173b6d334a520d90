"""compute_rdp against an independent high-precision integration (mpmath, 30 digits).

The reference integrates the Rényi divergence of the sampled Gaussian mixture
``P = (1-q) N(0, s^2) + q N(1, s^2)`` against ``Q = N(0, s^2)`` directly in x with ``mpmath.quad``
(tanh-sinh, 30 significant digits), in both directions:

* ``D_a(P || Q)``: ``E_Q[(P/Q)^a] - 1 = int Q(x) ((P/Q)^a - 1 - a (P/Q - 1)) dx``
* ``D_a(Q || P)``: ``int P(x) ((Q/P)^a - 1 - a (Q/P - 1)) dx``

(subtracting the mean-zero term ``a (ratio - 1)`` keeps 30-digit relative precision when the
divergence is ~1e-11).  Under add/remove neighbours the RDP is the larger of the two; Mironov,
Talwar, Zhang (2019) prove the first dominates, which is checked here too.  mpmath is used only
here, never by the library.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from pytorch_privacy.analysis.rdp import compute_rdp

mp = pytest.importorskip("mpmath")

TOL = 1e-6  # the contract: relative error <= 1e-6 (+1e-15 * steps absolute)


def reference_rdp(q: float, sigma: float, alpha: float, direction: str = "PQ", dps: int = 30) -> float:
    """D_alpha(P||Q) (direction "PQ") or D_alpha(Q||P) ("QP") by mpmath quadrature."""
    with mp.workdps(dps):
        q_, s, a = mp.mpf(q), mp.mpf(sigma), mp.mpf(alpha)
        c = 1 / (s * mp.sqrt(2 * mp.pi))

        def dens0(x):
            return c * mp.exp(-x * x / (2 * s * s))

        def dens1(x):
            return c * mp.exp(-(x - 1) ** 2 / (2 * s * s))

        if direction == "PQ":

            def f(x):
                r = (1 - q_) + q_ * mp.exp((2 * x - 1) / (2 * s * s))  # P/Q
                return dens0(x) * (r**a - 1 - a * (r - 1))

        else:

            def f(x):
                p = (1 - q_) * dens0(x) + q_ * dens1(x)
                r = dens0(x) / p  # Q/P
                return p * (r**a - 1 - a * (r - 1))

        # locate where the integrand lives (within e^-90 of its peak) by a coarse scan, then
        # integrate that window in pieces of about two standard deviations
        K = math.sqrt(2 * (alpha * math.log(2) + 100))
        xs = np.linspace(-K * sigma - 3, alpha + K * sigma + 3, 400)
        with mp.workdps(15):
            logs = [float(mp.log(abs(f(mp.mpf(float(x)))) + mp.mpf(10) ** -100000)) for x in xs]
        top = max(logs)
        keep = [x for x, v in zip(xs, logs) if v > top - 90]
        step = xs[1] - xs[0]
        lo, hi = min(keep) - 2 * step, max(keep) + 2 * step
        n = min(40, max(4, int((hi - lo) / (2 * sigma))))
        pts = [mp.mpf(lo) + (mp.mpf(hi) - mp.mpf(lo)) * i / n for i in range(n + 1)]
        am1 = mp.quad(f, pts)
        return float(mp.log1p(am1) / (a - 1))


def _check(q, sigma, alpha, steps=1):
    ref = steps * reference_rdp(q, sigma, alpha)
    ours = float(compute_rdp(q, sigma, steps, [alpha])[0])
    assert math.isfinite(ours)
    assert abs(ours - ref) <= TOL * ref + 1e-15 * steps, (q, sigma, alpha, ours, ref)
    return abs(ours - ref) / ref


# A fast subset covering every q, sigma and order of the full grid at least once.
FAST_CASES = [
    (1e-4, 0.6, 1.1),
    (1e-4, 4.0, 256.5),
    (1e-4, 1.1, 7.3),
    (0.01, 0.6, 2.5),
    (0.01, 1.1, 32.7),
    (0.01, 4.0, 1.5),
    (0.05, 0.6, 1.5),  # the series gives inf here
    (0.05, 1.1, 1.1),
    (0.05, 4.0, 7.3),
    (0.5, 0.6, 7.3),
    (0.5, 1.1, 2.5),
    (0.5, 4.0, 32.7),
    (1.0, 1.1, 1.5),
    (0.1, 4.0, 1.1),  # the series is 2.4x too high here
    (0.01, 0.5, 1.01),
    (0.3, 0.5, 3.0),  # integer order: binomial path
]


@pytest.mark.parametrize("q,sigma,alpha", FAST_CASES)
def test_matches_mpmath(q, sigma, alpha):
    _check(q, sigma, alpha)


def test_matches_mpmath_with_steps():
    _check(0.01, 1.1, 2.5, steps=10**6)


@pytest.mark.parametrize("q,sigma,alpha", [(0.05, 1.1, 1.5), (0.5, 0.6, 2.5), (1e-4, 4.0, 7.3)])
def test_add_direction_dominates(q, sigma, alpha):
    pq = reference_rdp(q, sigma, alpha, "PQ")
    qp = reference_rdp(q, sigma, alpha, "QP")
    assert qp <= pq * (1 + 1e-12)


GRID_Q = [1e-4, 0.01, 0.05, 0.5, 1.0]
GRID_SIGMA = [0.6, 1.1, 4.0]
GRID_ORDERS = [1.1, 1.5, 2.5, 7.3, 32.7, 256.5]


@pytest.mark.slow
@pytest.mark.parametrize("q", GRID_Q)
@pytest.mark.parametrize("sigma", GRID_SIGMA)
def test_full_grid_matches_mpmath(q, sigma):
    worst = max(_check(q, sigma, a) for a in GRID_ORDERS + [2, 3, 64, 512])
    assert worst < TOL


@pytest.mark.slow
@pytest.mark.parametrize("q", GRID_Q[:-1])
@pytest.mark.parametrize("sigma", GRID_SIGMA)
def test_full_grid_add_direction_dominates(q, sigma):
    for a in GRID_ORDERS[:-1]:
        assert reference_rdp(q, sigma, a, "QP") <= reference_rdp(q, sigma, a, "PQ") * (1 + 1e-12)


# Below sigma = 0.1 fractional orders used to be the chord between the integer orders (an upper
# bound up to ~10^4 times too high).  Now they are exact: the grid down to sigma = 0.005, a closed
# form below (see rdp._rdp_frac_small_noise).  The contract there: never below the truth (beyond
# rounding) and within 1e-6 of it.
SMALL_NOISE_CASES = [
    (0.01, 0.095, 1.01),
    (0.5, 0.095, 1.01),
    (1e-4, 0.05, 1.5),
    (0.9, 0.02, 3.5),
    (0.01, 0.01, 1.01),
    (0.3, 0.006, 2.5),
    (0.01, 0.004, 1.01),  # closed form from here on
    (1e-6, 0.004, 1.5),
    (0.5, 0.002, 7.3),
    (0.99, 0.001, 1.01),
    (1e-10, 0.003, 15.5),
]


@pytest.mark.parametrize("q,sigma,alpha", SMALL_NOISE_CASES)
def test_small_noise_fractional_orders_match_mpmath(q, sigma, alpha):
    ref = reference_rdp(q, sigma, alpha)
    ours = float(compute_rdp(q, sigma, 1, [alpha])[0])
    assert ours >= ref * (1 - 1e-12), (ours, ref)
    assert ours <= ref * (1 + 1e-6), (ours, ref)
