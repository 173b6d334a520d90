r"""Rényi differential privacy (RDP) of subsampled Gaussian mechanisms, exact at every order.

A mechanism is :math:`(\alpha, \varepsilon)`-RDP (Mironov 2017, "Rényi Differential Privacy") when
the Rényi divergence of order :math:`\alpha` between its output distributions on any two
neighbouring datasets is at most :math:`\varepsilon`.  RDP composes additively, so the RDP of
``steps`` identical steps is ``steps`` times the RDP of one step; :mod:`.conversion` turns an RDP
curve into an :math:`(\varepsilon, \delta)` guarantee.

Poisson-subsampled Gaussian (add-or-remove-one neighbours)
----------------------------------------------------------
Each record is included independently with probability ``q`` and the sum of the (clipped,
sensitivity-1) records receives :math:`\mathcal N(0, \sigma^2)` noise.  With
:math:`P = (1-q)\mathcal N(0,\sigma^2) + q\mathcal N(1,\sigma^2)` and :math:`Q = \mathcal N(0,\sigma^2)`,
Mironov, Talwar and Zhang (2019, "Rényi Differential Privacy of the Sampled Gaussian Mechanism")
show that the RDP at order :math:`\alpha > 1` is :math:`D_\alpha(P\|Q)` (the direction
:math:`D_\alpha(Q\|P)` is never larger; the tests re-check this numerically):

.. math::

    \varepsilon(\alpha) = \frac{1}{\alpha-1}\log A_\alpha, \qquad
    A_\alpha = \mathbb E_{x\sim Q}\big[(P(x)/Q(x))^{\alpha}\big]
             = \mathbb E_{x\sim\mathcal N(0,\sigma^2)}
               \Big[\big(1 - q + q\,e^{(2x-1)/(2\sigma^2)}\big)^{\alpha}\Big].

*Integer orders* use the binomial expansion, which is exact and has only positive terms once
:math:`1` is subtracted:

.. math::

    A_\alpha - 1 = \sum_{k=2}^{\alpha} \binom{\alpha}{k} (1-q)^{\alpha-k} q^k
                   \big(e^{k(k-1)/(2\sigma^2)} - 1\big),

summed in log space.

*Fractional orders* are computed by numerical quadrature, not by the infinite series used by
TF Privacy / Opacus / dp-accounting.  That series adds the absolute values of alternating terms,
so it is an upper bound: measured against this module (dp-accounting 0.6) it is about 1 % high at
order 2.5, up to 14 % at order 1.9 and up to 2.4x at order 1.1, and it does not converge (``inf``)
for ``q >= 0.05`` at orders below 2 when ``sigma`` is small.  With :math:`u(x) = q\,(e^{(2x-1)/(2\sigma^2)} - 1)` (so that
:math:`\mathbb E[u] = 0`),

.. math::

    A_\alpha - 1 = \mathbb E\big[g(u)\big], \qquad g(u) = (1+u)^\alpha - 1 - \alpha u \ \ge 0,

and :math:`\log g` is evaluated stably (a Taylor series for small :math:`\alpha|u|`, the direct form
in between, and a log form for huge values).  The integral is a trapezoidal sum of
:math:`\exp(\log\phi_\sigma(x) + \log g(u(x)))` (``logsumexp``) on a uniform grid of step
:math:`h = \min(\sigma, \sigma^2)/3`.  The grid covers the part of
:math:`[-K\sigma - 2,\ \alpha + 2 + K\sigma]`, :math:`K = \sqrt{2(\alpha\log 2 + 80)}` (outside which
the integrand carries less than :math:`e^{-80}` of the mass), where a coarse pre-scan (step
:math:`\sigma/2`) finds the integrand within :math:`e^{-90}` of its peak.  The integrand is
analytic in the strip :math:`|\mathrm{Im}\,x| < \pi\sigma^2` (the nearest singularities are the
branch points of :math:`(1+u)^\alpha` where :math:`1-q+q e^{L}=0`), so the trapezoidal rule
converges geometrically; with this :math:`h` the discretisation error bound is below
:math:`e^{-45}` relative for ``noise_multiplier >= 0.5``.  Measured against a 30-digit mpmath
integration (``tests/analysis/test_rdp_reference.py``) the relative error is below 1e-12.
Working with :math:`A_\alpha - 1` rather than :math:`A_\alpha` keeps full *relative* precision
when the RDP is tiny (``q = 1e-4``, order ``1.01``: :math:`A_\alpha - 1 \approx 10^{-11}`).
The quadrature runs in the standardised variable :math:`t = x/\sigma` (so :math:`\sigma^2` is never
formed and ``noise_multiplier`` up to the float maximum works); it costs :math:`O(1/\sigma)` points
per order.  Below ``noise_multiplier = 0.005`` fractional orders use a closed form instead
(:func:`_rdp_frac_small_noise`): an upper bound that equals the exact value to double precision
there (``tests/analysis/test_rdp_reference.py`` checks both against mpmath down to
``sigma = 0.001``).

Limits and the edges of the domain: ``q = 0`` gives 0; ``q = 1`` gives the plain Gaussian
:math:`\alpha/(2\sigma^2)`; ``noise_multiplier = 0`` with ``q > 0`` gives ``inf`` (with a warning).
Order ``inf`` (the max-divergence) is accepted and gives ``inf`` for any ``q > 0`` (the Gaussian's
privacy loss is unbounded), as TF Privacy does.  Orders above :data:`MAX_EXACT_ORDER` (1e4) use the
closed-form upper bound :math:`A_\alpha \le 1 + q(e^{\alpha(\alpha-1)/(2\sigma^2)} - 1)`
(convexity of :math:`x^\alpha`), above the exact value by at most about :math:`|\log q|`.  Values
beyond the float range are ``inf`` (``noise_multiplier`` below ~1e-154, or ``steps`` times the
per-step RDP overflowing); per-step values below ~1e-308 (``noise_multiplier`` above ~1e150)
underflow to 0.

Sampling without replacement (replace-one neighbours)
-----------------------------------------------------
See :func:`compute_rdp_sample_without_replacement` (Wang, Balle, Kasiviswanathan 2019) and its
note on the sensitivity convention.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence

import numpy as np
from scipy import special

from ._checks import check_orders, check_q, check_sigma, check_steps
from ._numerics import log_expm1 as _log_expm1
from .orders import DEFAULT_ORDERS

__all__ = [
    "DEFAULT_ORDERS",
    "compute_rdp",
    "compute_heterogeneous_rdp",
    "poisson_rdp_one_step",
]


_LOG_2PI_HALF = 0.5 * math.log(2.0 * math.pi)
_GRID_MIN_SIGMA = 0.005  # below this, fractional orders use the closed-form small-noise bound
#: Orders above this use a closed-form (Jensen) upper bound instead of the exact series/integral.
MAX_EXACT_ORDER = 10_000.0
_MARGIN = 40.0  # the small-noise bound splits the privacy loss at log((1-q)/q) +- _MARGIN


def _warn_infinite(reason: str) -> None:
    warnings.warn(f"infinite privacy loss: {reason}", RuntimeWarning, stacklevel=3)


# --------------------------------------------------------------------------------------------
# Poisson-subsampled Gaussian, one step
# --------------------------------------------------------------------------------------------
def _log_a_minus_1_int(q: float, sigma: float, alphas: np.ndarray) -> np.ndarray:
    """log(A_alpha - 1) for integer orders alpha >= 2 by the exact binomial expansion."""
    out = np.empty(alphas.shape, dtype=float)
    logq, log1mq = math.log(q), math.log1p(-q)
    # chunk so that the (orders x terms) matrix stays small even for huge integer orders
    order_idx = np.argsort(alphas)
    chunk: list[int] = []

    def flush(idx: list[int]) -> None:
        a = alphas[idx]
        amax = int(a.max())
        k = np.arange(2, amax + 1, dtype=float)
        mu = 1.0 / sigma
        le = _log_expm1(k * (k - 1.0) * (0.5 * mu * mu))
        A = a[:, None]
        with np.errstate(invalid="ignore"):
            terms = (
                special.gammaln(A + 1.0)
                - special.gammaln(k + 1.0)
                - special.gammaln(np.maximum(A - k, 0.0) + 1.0)
                + (A - k) * log1mq
                + k * logq
                + le
            )
        terms = np.where(k[None, :] <= A, terms, -np.inf)
        out[idx] = special.logsumexp(terms, axis=1)

    budget = 0
    for i in order_idx:
        chunk.append(int(i))
        budget = len(chunk) * int(alphas[i])
        if budget > 2_000_000:
            flush(chunk)
            chunk = []
    if chunk:
        flush(chunk)
    return out


def _log_g(u: np.ndarray, log1pu: np.ndarray, L: np.ndarray, alpha: np.ndarray, logq: float, log_abs_u=None) -> np.ndarray:
    r"""log of g(u) = (1+u)^alpha - 1 - alpha*u >= 0, stable for every u > -1.

    ``log1pu = log(1+u)`` and ``L`` (with ``u = q (e^L - 1)``) are passed in so that huge ``u``
    never has to be formed; ``log_abs_u`` (optional) keeps ``|u|`` below the float range.
    """
    if log_abs_u is None:
        with np.errstate(divide="ignore"):
            log_abs_u = np.log(np.abs(u))
    with np.errstate(all="ignore"):
        au = alpha * np.abs(u)
        small = au < 0.1
        # (a) Taylor series sum_{k>=2} C(alpha,k) u^k = u^2 * S; consecutive terms shrink by
        #     |alpha-k| |u| / (k+1) <= max(alpha|u|/3, |u|) < 0.1, so 13 terms reach 1e-16
        us = np.where(small, u, 0.0)
        nterms = 14
        coefs = [alpha * (alpha - 1.0) / 2.0]
        for k in range(2, nterms + 1):
            coefs.append(coefs[-1] * (alpha - k) / (k + 1.0))
        s = coefs[-1]
        for c in reversed(coefs[:-1]):
            s = c + us * s
        log_small = 2.0 * np.where(small, log_abs_u, 0.0) + np.log(s)
        # (b) direct: (1+u)^alpha - 1 - alpha*u where a = alpha*log(1+u) < 600
        a = alpha * log1pu
        mid = ~small & (a < 600.0)
        # written as (1+u) expm1((alpha-1) log(1+u)) - (alpha-1) u: both terms are O(alpha-1), so
        # orders near 1 (alpha - 1 = 1e-12) keep their relative precision
        um = np.where(mid, u, 0.0)
        l1 = np.where(mid, log1pu, 0.0)
        log_mid = np.log(np.exp(l1) * np.expm1((alpha - 1.0) * l1) - (alpha - 1.0) * um)
        # (c) huge: g = (1+u) [expm1(X) + (alpha-1) expm1(-l1)] with l1 = log(1+u), X = (alpha-1) l1
        #     (the same regrouping as (b), so orders near 1 do not cancel); here u > 0
        big = ~small & ~mid
        l1 = np.where(big, log1pu, 1.0)
        X = (alpha - 1.0) * l1
        Xs = np.minimum(X, 700.0)
        log_big_mod = l1 + np.log(np.expm1(Xs) + (alpha - 1.0) * np.expm1(-l1))
        log_big_huge = l1 + X + np.log1p(-np.exp(-np.maximum(X, 700.0)) * (1.0 - (alpha - 1.0) * np.expm1(-l1)))
        log_big = np.where(X < 700.0, log_big_mod, log_big_huge)
        return np.where(small, log_small, np.where(mid, log_mid, log_big))


_STEP_DIV = 3.0  # fine trapezoid step = min(sigma, sigma^2) / _STEP_DIV
_TRIM_NATS = 90.0  # the fine grid covers where the integrand is within e^-90 of its peak


def _frac_window(sigma: float, alpha: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A window in ``t = x / sigma`` that holds all but a fraction e^-80 of the integrand's mass."""
    K = np.sqrt(2.0 * (alpha * math.log(2.0) + 80.0))
    return -K - 2.0 / sigma, (alpha + 2.0) / sigma + K


def _log_integrand(t: np.ndarray, alpha: np.ndarray, q: float, sigma: float) -> np.ndarray:
    """log( phi(t) * g(u) ) on a (orders x points) grid, in the standardised variable ``t = x / sigma``.

    The privacy loss is ``L = (2x - 1) / (2 sigma^2) = mu t - mu^2 / 2`` with ``mu = 1 / sigma``;
    writing it this way never forms ``sigma^2`` (which overflows for ``sigma >= 1e154``).
    """
    logq, log1mq = math.log(q), math.log1p(-q)
    mu = 1.0 / sigma
    L = mu * t - 0.5 * mu * mu
    with np.errstate(over="ignore", divide="ignore"):
        # u = q (e^L - 1), formed without overflowing e^L when q is tiny (u may be inf only where
        # alpha*log(1+u) is huge, and that branch of _log_g does not use u)
        em1 = np.expm1(np.minimum(L, 700.0))
        u = np.where(L > 700.0, np.exp(np.minimum(logq + L, 709.0)), q * em1)
        log_abs_u = logq + np.where(L > 700.0, L, np.log(np.abs(em1)))
    log1pu = np.logaddexp(log1mq, logq + L)
    log_phi = -0.5 * t * t - _LOG_2PI_HALF
    return log_phi + _log_g(u, log1pu, L, alpha, logq, log_abs_u)


def _grid_pass(q: float, sigma: float, alphas: np.ndarray, lo: np.ndarray, hi: np.ndarray, h: float, reduce):
    """Evaluate the integrand of each order on a uniform grid of step <= h over [lo_i, hi_i]
    (orders of similar grid size batched together) and apply ``reduce(x, logf, step)`` per batch."""
    npts = np.maximum(np.ceil((hi - lo) / h).astype(int) + 1, 3)
    order_idx = np.argsort(npts, kind="stable")
    start = 0
    while start < len(order_idx):
        n = int(npts[order_idx[start]])
        stop = start + 1
        while stop < len(order_idx) and npts[order_idx[stop]] <= 1.5 * n and (stop - start + 1) * 1.5 * n <= 300_000:
            stop += 1
        idx = order_idx[start:stop]
        N = int(npts[idx].max())
        t = np.linspace(0.0, 1.0, N)[None, :]
        x = lo[idx][:, None] + (hi[idx] - lo[idx])[:, None] * t
        step = (hi[idx] - lo[idx]) / (N - 1)
        reduce(idx, x, _log_integrand(x, alphas[idx][:, None], q, sigma), step)
        start = stop


def _log_a_minus_1_frac_grid(q: float, sigma: float, alphas: np.ndarray) -> np.ndarray:
    """log(A_alpha - 1) for fractional orders by log-space trapezoidal quadrature (vectorised).

    Works in ``t = x / sigma``.  A coarse pass (step 1/2, i.e. sigma/2 in x) over the a-priori
    window locates where the integrand is within e^-90 of its peak; the fine pass (step
    min(1, sigma)/3, i.e. min(sigma, sigma^2)/3 in x) integrates over that part only.
    """
    lo, hi = _frac_window(sigma, alphas)
    tlo, thi = lo.copy(), hi.copy()
    hc = 0.5  # sigma / 2 in x

    def trim(idx, x, lf, step):
        m = lf.max(axis=1, keepdims=True)
        keep = lf > m - _TRIM_NATS
        first = np.argmax(keep, axis=1)
        last = keep.shape[1] - 1 - np.argmax(keep[:, ::-1], axis=1)
        rows = np.arange(len(idx))
        tlo[idx] = np.maximum(x[rows, first] - 2.0 * step, lo[idx])
        thi[idx] = np.minimum(x[rows, last] + 2.0 * step, hi[idx])

    _grid_pass(q, sigma, alphas, lo, hi, hc, trim)
    out = np.empty(alphas.shape, dtype=float)

    def integrate(idx, x, lf, step):
        out[idx] = special.logsumexp(lf, axis=1) + np.log(step)

    _grid_pass(q, sigma, alphas, tlo, thi, min(1.0, sigma) / _STEP_DIV, integrate)
    return out


def _log_g_scalar(u: float, alpha: np.ndarray, q: float) -> np.ndarray:
    """log g(u) for one moderate value ``u > -1`` at every order (``|u| <= e^41``)."""
    uu = np.full(alpha.shape, float(u))
    with np.errstate(divide="ignore"):
        L = np.full(alpha.shape, math.log1p(u / q) if u > -q else -1e3)
    return _log_g(uu, np.log1p(uu), L, alpha, math.log(q))


def _rdp_frac_small_noise(q: float, sigma: float, alphas: np.ndarray) -> np.ndarray:
    r"""RDP upper bound at orders ``alphas`` for ``sigma < 0.005``, in closed form (0 < q < 1).

    With the privacy loss :math:`L \sim \mathcal N(-\mu^2/2, \mu^2)` under :math:`Q`
    (:math:`\mu = 1/\sigma`), :math:`A_\alpha - 1 = \mathbb E[g(u)]` with :math:`u = q(e^L - 1)`.
    With :math:`c = \log((1-q)/q)`, split the line at :math:`c \pm 40`:

    * :math:`L \ge c + 40`: :math:`(1+u)^\alpha = q^\alpha e^{\alpha L}(1 + e^{c-L})^\alpha
      \le q^\alpha e^{\alpha L} e^{\alpha e^{-40}}` and :math:`-(1 + \alpha u) \le (\alpha q - 1)^+`,
      so this part is at most :math:`q^\alpha e^{\alpha e^{-40}} e^{\alpha(\alpha-1)\mu^2/2}
      \bar\Phi((c + 40)/\mu - (\alpha - \tfrac12)\mu) + (\alpha q - 1)^+\Pr[L \ge c + 40]`;
    * :math:`c - 40 \le L < c + 40`: :math:`g` is convex in :math:`u` with minimum 0 at 0, so it is
      at most its larger end value, times :math:`\Pr[L \ge c - 40]`;
    * :math:`L < c - 40`: at most :math:`\max(g(-q), g(u(c-40)))`.

    Every piece is an upper bound, so the sum is one.  For :math:`\mu \ge 200` the first piece
    dominates the others by a factor above :math:`e^{150}` at every order and every ``q``, so the
    bound equals the exact value to double precision up to the factor :math:`e^{\alpha e^{-40}}`
    (relative :math:`4\cdot 10^{-18}\alpha`).  ``tests/analysis/test_rdp_reference.py`` checks it
    against an mpmath integration and against the exact grid at the switch-over ``sigma = 0.005``.
    """
    mu = 1.0 / sigma
    mu2 = mu * mu
    logq, log1mq = math.log(q), math.log1p(-q)
    c = log1mq - logq
    a = alphas
    am1 = a - 1.0
    # L >= c + 40: E[g 1_R] <= e^A - e^B + (a q - 1)^+ P(R), with
    #   A = a log q + a e^-40 + E + log Phi-bar(z_a)   (E = a (a-1) mu^2 / 2, may overflow to inf)
    #   B = log a + log q + log Phi-bar(z_1)           (the exact E[a u 1_R] part, kept: it cancels
    #                                                   most of e^A when (a - 1) mu^2 is small)
    b_edge = c + _MARGIN
    t1 = a * logq + a * math.exp(-_MARGIN) + special.log_ndtr(-(b_edge / mu - (a - 0.5) * mu))
    B = np.log(a) + logq + special.log_ndtr(-(b_edge / mu - 0.5 * mu))
    with np.errstate(over="ignore", invalid="ignore"):
        E = a * am1 * (0.5 * mu2)
        # A - B without cancellation: (a-1) log q + a e^-40 - log a + E + (log Phi-bar differences)
        d = am1 * logq + a * math.exp(-_MARGIN) - np.log1p(am1) + E + (t1 - a * logq - a * math.exp(-_MARGIN)) - (B - np.log(a) - logq)
    pos = d > 0.0
    dd = np.where(pos, d, 1.0)
    head = np.where(pos, B + _log_expm1(dd), -np.inf)  # log(e^A - e^B)
    with np.errstate(divide="ignore"):
        head_minus_E = np.where(pos, t1 + np.log1p(-np.exp(-dd)), -np.inf)
    others = []
    pr_r = special.log_ndtr(-(b_edge / mu + 0.5 * mu))
    with np.errstate(divide="ignore"):
        others.append(np.log(np.maximum(a * q - 1.0, 0.0)) + pr_r)
    # c - 40 <= L < c + 40
    u_hi = (1.0 - q) * math.exp(_MARGIN) - q
    u_lo = (1.0 - q) * math.exp(-_MARGIN) - q
    g_lo = _log_g_scalar(u_lo, a, q)
    pr_m = special.log_ndtr(-((c - _MARGIN) / mu + 0.5 * mu))
    others.append(np.maximum(_log_g_scalar(u_hi, a, q), g_lo) + pr_m)
    # L < c - 40: u in [-q, u_lo]; g(u) <= max(g(-q), g(u_lo)) (convexity), and also
    # g(u) <= a (a-1)/2 u^2 max_xi (1+xi)^(a-2) (Taylor), with E[u^2 1{L < c-40}] <=
    # q^2 (e^{mu^2} Phi((c-40)/mu - 3mu/2) + 1)
    crude = np.maximum(_log_g_scalar(-q, a, q), g_lo)
    log_m = np.maximum((a - 2.0) * log1mq, (a - 2.0) * math.log1p(max(u_lo, -q)))
    log_u2 = 2.0 * logq + np.logaddexp(mu2 + special.log_ndtr((c - _MARGIN) / mu - 1.5 * mu), 0.0)
    taylor = np.log(a) + np.log(am1) - math.log(2.0) + log_m + log_u2
    others.append(np.minimum(crude, taylor))
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        rest = special.logsumexp(np.stack(others), axis=0)
        finite_head = np.isfinite(head)
        extra = np.where(
            finite_head, np.log1p(np.exp(np.minimum(rest - np.where(finite_head, head, 0.0), 700.0))), 0.0
        )
        log_am1 = np.where(np.isneginf(head), rest, head + extra)
        # log A = log_am1 + log1p(e^-log_am1); huge values are formed as a mu^2/2 + (...)/(a-1)
        huge = log_am1 > 700.0
        lh = np.where(huge, log_am1, 700.0)
        rdp_huge = a * (0.5 * mu2) + (head_minus_E + extra + np.log1p(np.exp(-lh))) / am1
        lam = np.where(huge, 0.0, log_am1)
        rdp_mod = np.where(lam < -30.0, np.exp(lam), np.logaddexp(0.0, lam)) / am1
    return np.where(huge, rdp_huge, rdp_mod)


def _rdp_jensen(q: float, sigma: float, alphas: np.ndarray) -> np.ndarray:
    r"""Closed-form upper bound for huge orders: by convexity of :math:`x^\alpha`,
    :math:`(1-q+qe^L)^\alpha \le 1-q+qe^{\alpha L}`, so
    :math:`A_\alpha \le 1 + q(e^{\alpha(\alpha-1)/(2\sigma^2)} - 1)`.  It exceeds the exact value by
    at most about :math:`|\log q|` (the amplification it gives up)."""
    mu = 1.0 / sigma
    a = alphas
    with np.errstate(over="ignore", invalid="ignore"):
        E = a * (a - 1.0) * (0.5 * mu * mu)
        small = E < 700.0
        r_small = np.log1p(q * np.expm1(np.where(small, E, 0.0))) / (a - 1.0)
        Eb = np.where(small, 700.0, E)
        r_big = a * (0.5 * mu * mu) + (math.log(q) + np.log1p(np.exp(math.log1p(-q) - math.log(q) - Eb))) / (a - 1.0)
    return np.where(small, r_small, r_big)


def _with_infinite_orders(fun):
    """Order ``inf`` (max-divergence): ``inf`` for a noisy mechanism that samples (the privacy loss of
    a Gaussian is unbounded), as TF Privacy returns; ``fun`` sees only the finite orders."""

    @functools.wraps(fun)
    def wrapper(q: float, sigma: float, orders: np.ndarray) -> np.ndarray:
        inf = np.isinf(orders)
        if not np.any(inf):
            return fun(q, sigma, orders)
        out = np.full(orders.shape, 0.0 if (q == 0.0 or math.isinf(sigma)) else math.inf)
        if not np.all(inf):
            out[~inf] = fun(q, sigma, orders[~inf])
        return out

    return wrapper


@_with_infinite_orders
def _rdp_poisson_gaussian_one_step(q: float, sigma: float, orders: np.ndarray) -> np.ndarray:
    """RDP of one step of the Poisson-subsampled Gaussian at ``orders`` (already validated)."""
    if q == 0.0 or math.isinf(sigma):
        return np.zeros(orders.shape)
    if sigma == 0.0:
        return np.full(orders.shape, np.inf)
    mu = 1.0 / sigma
    if not math.isfinite(mu * mu):
        # sigma < ~1e-154: the RDP (about a mu^2/2 + a log(q)/(a-1)) exceeds the float range
        return np.full(orders.shape, np.inf)
    if q == 1.0:
        with np.errstate(over="ignore"):
            return orders * (0.5 * mu * mu)
    out = np.empty(orders.shape, dtype=float)
    big = orders > MAX_EXACT_ORDER
    # fractional orders whose quadrature would need > ~2e5 points ((a + 4)/sigma > 1e5, only for
    # sigma < 0.1) also take the closed-form bound: there it exceeds the exact value by at most
    # |log q| * 2 sigma^2 / a < 2e-6 |log q| relative
    is_frac = orders != np.round(orders)
    if sigma >= _GRID_MIN_SIGMA:
        big |= is_frac & ((orders + 4.0) / sigma > 1e5)
    if np.any(big):
        out[big] = _rdp_jensen(q, sigma, orders[big])
    is_int = (orders == np.round(orders)) & ~big
    frac = ~is_int & ~big
    exact = is_int.copy()
    log_am1 = np.zeros(orders.shape, dtype=float)
    if np.any(is_int):
        log_am1[is_int] = _log_a_minus_1_int(q, sigma, orders[is_int])
    if np.any(frac):
        if sigma >= _GRID_MIN_SIGMA:
            log_am1[frac] = _log_a_minus_1_frac_grid(q, sigma, orders[frac])
            exact |= frac
        else:
            out[frac] = _rdp_frac_small_noise(q, sigma, orders[frac])
    if np.any(exact):
        la = log_am1[exact]
        with np.errstate(over="ignore", under="ignore"):
            log_a = np.where(la < -30.0, np.exp(la), np.logaddexp(0.0, la))
        out[exact] = log_a / (orders[exact] - 1.0)
    return out


def _times_steps(one: np.ndarray, steps: int) -> np.ndarray:
    """``steps * one`` for any integer ``steps`` (``0 * x = 0``; overflow gives ``inf``)."""
    s = float(steps) if steps < 2**1023 else math.inf
    with np.errstate(over="ignore", invalid="ignore"):
        return np.where(one == 0.0, 0.0, one * s)


@functools.lru_cache(maxsize=512)
def _cached_one_step(q: float, sigma: float, orders_key: tuple[float, ...]) -> np.ndarray:
    out = _rdp_poisson_gaussian_one_step(q, sigma, np.asarray(orders_key, dtype=float))
    out.setflags(write=False)
    return out


def poisson_rdp_one_step(q: float, sigma: float, orders: np.ndarray) -> np.ndarray:
    """RDP of one Poisson-subsampled Gaussian step at ``orders`` (validated input; cached)."""
    return np.array(_cached_one_step(q, sigma, tuple(orders.tolist())))


_rdp_one_step_array = poisson_rdp_one_step


def _shape_like(orders_in, values: np.ndarray) -> np.ndarray:
    if orders_in is not None and np.ndim(orders_in) == 0:
        return np.asarray(values.reshape(()))
    return values


def _checked_plan(q, noise_multiplier, steps, orders) -> tuple[float, float, int, np.ndarray]:
    """Validated ``(q, sigma, steps, orders as a 1-d array)``; warns when no noise makes the RDP
    infinite."""
    q = check_q(q)
    sigma = check_sigma(noise_multiplier)
    steps = check_steps(steps)
    arr = np.atleast_1d(check_orders(orders))
    if sigma == 0.0 and q > 0.0 and steps > 0:
        _warn_infinite("noise_multiplier is 0 (no noise), so the RDP is infinite at every order")
    return q, sigma, steps, arr


def compute_rdp(q: float, noise_multiplier: float, steps: int, orders: Sequence[float] | float | None = None) -> np.ndarray:
    r"""RDP of ``steps`` steps of the Poisson-subsampled Gaussian mechanism (add-or-remove-one).

    Exact (up to ~1e-10 relative) at integer and fractional orders; see the module docstring
    for the formula (Mironov, Talwar, Zhang 2019) and the numerical method.

    Args:
        q: sampling probability in [0, 1] (expected batch size / dataset size).
        noise_multiplier: noise stddev / L2 sensitivity (the clip norm), >= 0.
        steps: number of steps (compositions), a non-negative integer.
        orders: RDP orders, each > 1 (``inf`` allowed); default :data:`DEFAULT_ORDERS`.

    Returns:
        The RDP at each order (same shape as ``orders``; 0-d for a scalar order).  ``inf``
        (with a ``RuntimeWarning``) when ``noise_multiplier == 0`` and ``q > 0``; ``inf`` at order
        ``inf`` and wherever the value exceeds the float range (see the module docstring).
        Runs in well under a second and a few MB for every input in this domain.
    """
    q, sigma, steps, arr = _checked_plan(q, noise_multiplier, steps, orders)
    if steps == 0:
        return _shape_like(orders, np.zeros(arr.shape))
    one = _rdp_one_step_array(q, sigma, arr)
    return _shape_like(orders, _times_steps(one, steps))


def compute_heterogeneous_rdp(
    qs: Sequence[float],
    noise_multipliers: Sequence[float],
    steps_list: Sequence[int],
    orders: Sequence[float] | float | None = None,
) -> np.ndarray:
    """RDP of a sequence of training phases: ``sum_i compute_rdp(qs[i], noise_multipliers[i], steps_list[i], orders)``."""
    qs, sigmas, steps_list = list(qs), list(noise_multipliers), list(steps_list)
    if not (len(qs) == len(sigmas) == len(steps_list)):
        raise ValueError(
            f"qs, noise_multipliers and steps_list must have the same length, got "
            f"{len(qs)}, {len(sigmas)}, {len(steps_list)}"
        )
    arr = np.atleast_1d(check_orders(orders))
    total = np.zeros(arr.shape)
    for q, s, t in zip(qs, sigmas, steps_list):
        total = total + np.atleast_1d(compute_rdp(q, s, t, arr))
    return _shape_like(orders, total)




def __getattr__(name: str):
    # compute_rdp_from_event / compute_rdp_from_ledger moved to .rdp_accountant (they need the
    # accountant, which needs this module); the old path works for one release, with a warning
    if name in ("compute_rdp_from_event", "compute_rdp_from_ledger"):
        warnings.warn(
            f"pytorch_privacy.analysis.rdp.{name} moved to pytorch_privacy.analysis.rdp_accountant "
            "(also importable from pytorch_privacy.analysis)",
            DeprecationWarning,
            stacklevel=2,
        )
        from . import rdp_accountant

        return getattr(rdp_accountant, name)
    if name in ("compute_rdp_sample_without_replacement", "wor_rdp_one_step"):
        # the without-replacement (replace-one) RDP lives in .rdp_without_replacement
        from . import rdp_without_replacement

        return getattr(rdp_without_replacement, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
