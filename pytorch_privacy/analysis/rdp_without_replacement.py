"""RDP of the Gaussian mechanism on a sample drawn *without replacement* (fixed size ``m`` out of
``n``, ``q = m/n``), for the replace-one neighbouring relation (Wang, Balle and Kasiviswanathan
2019, "Subsampled Renyi differential privacy and analytical moments accountant"), with the
closed-form chi moments of the Gaussian for small noise.  Split from :mod:`.rdp` (Poisson)."""

from __future__ import annotations

import math

import numpy as np
from scipy import special

from collections.abc import Sequence

from ._numerics import log_expm1 as _log_expm1
from .rdp import _LOG_2PI_HALF, MAX_EXACT_ORDER, _checked_plan, _shape_like, _times_steps, _with_infinite_orders

__all__ = ["compute_rdp_sample_without_replacement", "wor_rdp_one_step"]

_CHI_CLOSED_FORM_MU2 = 40.0  # mu^2 = 1/s^2 from which the chi moments use their closed-form bound


def _log_chi_moments_gaussian(sigma: float, lmax: int) -> np.ndarray:
    r"""log E_{N(0,s^2)}[(e^L - 1)^l] for l = 0..lmax, L = (2x-1)/(2 s^2) (the Pearson-Vajda
    chi^l moments of N(1,s^2) vs N(0,s^2)); exact forward differences of e^{j(j-1)/(2 s^2)}.

    Only even ``l`` are used (odd moments can be negative; they are returned as NaN).
    For ``mu^2 = 1/s^2 < 40`` they are computed by log-space trapezoidal quadrature (the
    alternating binomial sum cancels badly).  For ``mu^2 >= 40`` (small noise, where that
    quadrature would need ~lmax/s^2 points) they are bounded above in closed form,
    :math:`\chi^l \le e^{l(l-1)\mu^2/2} + (2^l - 1)e^{(l-1)(l-2)\mu^2/2}` (the largest term of the
    binomial sum plus the absolute values of the others), which is within a factor
    ``1 + 2^l e^{-40(l-1)}`` of the truth there.  Upper bounds keep the WBK19 bound valid.
    """
    out = np.full(lmax + 1, np.nan)
    out[0] = 0.0
    mu2 = (1.0 / sigma) * (1.0 / sigma)
    if lmax >= 2:
        out[2] = _log_expm1(np.array(mu2)) if mu2 > 1e-300 else 2.0 * math.log(1.0 / sigma)
    ls = np.arange(4, lmax + 1, 2, dtype=float)
    if ls.size == 0:
        return out
    if mu2 >= _CHI_CLOSED_FORM_MU2:
        with np.errstate(over="ignore"):
            out[ls.astype(int)] = ls * (ls - 1.0) * (0.5 * mu2) + np.log1p(
                np.exp(ls * math.log(2.0) - (ls - 1.0) * mu2)
            )
        return out
    # quadrature in t = x / s (so that s^2 is never formed): L = mu t - mu^2 / 2
    mu = 1.0 / sigma
    K = math.sqrt(2.0 * (float(ls.max()) * math.log(2.0) + 80.0))
    lo, hi = -K - 2.0 * mu, (float(ls.max()) + 2.0) * mu + K
    h = min(1.0, sigma) / 4.0
    n = int(math.ceil((hi - lo) / h)) + 1
    t = np.linspace(lo, hi, n)
    step = (hi - lo) / (n - 1)
    L = mu * t - 0.5 * mu2
    with np.errstate(divide="ignore"):
        log_abs = np.log(np.abs(np.expm1(np.minimum(L, 700.0))))
        log_abs = np.where(L > 700.0, L, log_abs)
    log_phi = -0.5 * t * t - _LOG_2PI_HALF
    for j in range(0, ls.size, 64):
        blk = ls[j:j + 64]
        out[blk.astype(int)] = special.logsumexp(blk[:, None] * log_abs[None, :] + log_phi[None, :], axis=1) + math.log(step)
    return out


def _wor_log_a_int(q: float, sigma_eff: float, alpha: int, log_chi: np.ndarray) -> float:
    """log of the WBK19 bound on exp((alpha-1) eps'(alpha)) for an integer order alpha >= 2."""
    logq = math.log(q)
    mu2 = (1.0 / sigma_eff) * (1.0 / sigma_eff)
    eps2 = mu2  # (2-1) * eps(2) with eps(j) = j / (2 s^2)
    # j = 2: min(4 (e^{eps(2)} - 1), 2 e^{eps(2)})   (Theorem 9 with eps(inf) = inf)
    t2 = min(math.log(4.0) + float(_log_expm1(np.array(eps2))), eps2 + math.log(2.0))
    log_c2 = float(special.gammaln(alpha + 1) - special.gammaln(3) - special.gammaln(alpha - 1))
    terms = [0.0, 2 * logq + log_c2 + t2]
    if alpha >= 3:
        j = np.arange(3, alpha + 1)
        with np.errstate(over="ignore"):
            b = math.log(2.0) + (j - 1.0) * j * (0.5 * mu2)  # 2 e^{(j-1) eps(j)}
        # Gaussian refinement: 4 sqrt(chi^{2 floor(j/2)} chi^{2 ceil(j/2)})
        lo_e, hi_e = 2 * (j // 2), 2 * ((j + 1) // 2)
        ok = hi_e < log_chi.size
        chi = np.full(j.shape, np.inf)
        chi[ok] = math.log(4.0) + 0.5 * (log_chi[lo_e[ok]] + log_chi[hi_e[ok]])
        b = np.minimum(b, chi)
        lc = special.gammaln(alpha + 1.0) - special.gammaln(j + 1.0) - special.gammaln(alpha - j + 1.0)
        terms.extend((j * logq + lc + b).tolist())
    return float(special.logsumexp(terms))


def compute_rdp_sample_without_replacement(
    q: float, noise_multiplier: float, steps: int, orders: Sequence[float] | float | None = None
) -> np.ndarray:
    r"""RDP upper bound for the Gaussian mechanism on a uniformly random fixed-size subset.

    Sampling without replacement of ``m = q n`` records out of ``n``; neighbouring relation
    **replace-one** (the dataset size ``n`` is public).  Bound of Wang, Balle and
    Kasiviswanathan (2019, "Subsampled Rényi Differential Privacy and Analytical Moments
    Accountant", Theorem 9 with :math:`\varepsilon(\infty) = \infty`, plus their sharper
    :math:`\chi^j`-moment term for the Gaussian): for integer :math:`\alpha \ge 2`

    .. math::

        e^{(\alpha-1)\varepsilon'(\alpha)} \le 1 + q^2\binom{\alpha}{2}
          \min\{4(e^{\varepsilon(2)}-1),\, 2e^{\varepsilon(2)}\}
          + \sum_{j=3}^{\alpha} q^j \binom{\alpha}{j}
          \min\{2 e^{(j-1)\varepsilon(j)},\, 4\sqrt{\chi^{2\lfloor j/2\rfloor}\chi^{2\lceil j/2\rceil}}\},

    where :math:`\varepsilon(j)` is the RDP of the base Gaussian mechanism and
    :math:`\chi^l = \mathbb E_{\mathcal N(0,s^2)}[(e^{L}-1)^l]`.  Fractional orders interpolate the
    cumulant :math:`(\alpha-1)\varepsilon'(\alpha)` linearly between the neighbouring integers
    (valid since it is convex in :math:`\alpha`; WBK19 Corollary 10).  This is an upper bound, not
    an exact value.  It is capped by the un-amplified replace-one Gaussian :math:`2\alpha/\sigma^2`
    (valid by joint convexity; WBK19's constants make their bound exceed it for large ``q``).

    Cost: the :math:`\chi^l` moments (``l <= 258``) come from a quadrature when
    ``noise_multiplier > 2/sqrt(40) ~ 0.316`` and from a closed-form upper bound below (exact to
    double precision there), so every input runs in well under a second and a few MB.  Orders
    above :data:`MAX_EXACT_ORDER` get the cap :math:`2\alpha/\sigma^2`; order ``inf`` gives ``inf``;
    ``noise_multiplier`` below ~1e-154 gives ``inf`` (the bound exceeds the float range).

    **Sensitivity convention.**  Throughout this package ``noise_multiplier`` is the noise stddev
    divided by the clip norm ``C``, which is the *add/remove* L2 sensitivity of a sum.  Replacing
    one record moves a clipped sum by up to ``2C``, so the base Gaussian here has RDP
    :math:`\varepsilon(\alpha) = \alpha / (2 (\sigma/2)^2) = 2\alpha/\sigma^2`.  (dp-accounting and
    TF Privacy instead read ``noise_multiplier`` relative to the sensitivity under the relation in
    use; our value equals theirs evaluated at ``noise_multiplier / 2``.)  For ``q = 1`` the result
    is exactly :math:`2\alpha/\sigma^2`.
    """
    q, sigma, steps, arr = _checked_plan(q, noise_multiplier, steps, orders)
    if steps == 0:
        return _shape_like(orders, np.zeros(arr.shape))
    return _shape_like(orders, _times_steps(wor_rdp_one_step(q, sigma, arr), steps))


@_with_infinite_orders
def wor_rdp_one_step(q: float, sigma: float, arr: np.ndarray) -> np.ndarray:
    """One step of :func:`compute_rdp_sample_without_replacement` (validated input, no warning)."""
    if q == 0.0 or math.isinf(sigma):
        return np.zeros(arr.shape)
    if sigma == 0.0:
        return np.full(arr.shape, np.inf)
    sigma_eff = sigma / 2.0  # replace-one sensitivity is 2 * clip norm
    mu2 = (2.0 / sigma) * (2.0 / sigma)
    if not math.isfinite(mu2):
        # sigma < ~1e-154: the bound (about a mu^2 / 2) exceeds the float range at every order
        return np.full(arr.shape, np.inf)
    with np.errstate(over="ignore"):
        cap = arr * (0.5 * mu2)  # the un-amplified replace-one Gaussian, 2 a / sigma^2
    if q == 1.0:
        return cap
    out = cap.copy()  # orders above MAX_EXACT_ORDER keep this valid bound
    exact = arr <= MAX_EXACT_ORDER
    if not np.any(exact):
        return out
    ceil_max = int(math.ceil(float(arr[exact].max())))
    # the chi-moment refinement is used for j <= 257 (beyond, Theorem 9's term alone: still valid)
    log_chi = _log_chi_moments_gaussian(sigma_eff, min(ceil_max + 1, 258))
    cache: dict[int, float] = {1: 0.0}

    def cgf(a: int) -> float:  # (a-1) * eps'(a)
        if a not in cache:
            cache[a] = _wor_log_a_int(q, sigma_eff, a, log_chi)
        return cache[a]

    for i, a in enumerate(arr):
        if not exact[i]:
            continue
        if float(a).is_integer():
            out[i] = cgf(int(a)) / (a - 1.0)
        else:
            fl, ce = math.floor(a), math.ceil(a)
            t = a - fl
            out[i] = ((1.0 - t) * cgf(fl) + t * cgf(ce)) / (a - 1.0)
    # never worse than no amplification (the subsampled mechanism is a mixture of coupled
    # replace-one pairs; joint convexity of exp((alpha-1) D_alpha))
    return np.minimum(out, cap)
