"""Privacy loss distribution (PLD) accountant: tight (epsilon, delta) for composed mechanisms.

The privacy loss of a pair of output distributions ``(P, Q)`` is ``L = log(dP/dQ)(X)`` with
``X ~ P``.  Its *hockey-stick curve* ``delta(eps) = E_P[(1 - exp(eps - L))_+]`` is the smallest
delta for which the pair is (eps, delta)-indistinguishable.  Composing mechanisms adds their
independent privacy losses, so the PLD of a composition is the convolution of the PLDs
(Meiser and Mohammadi 2018; Sommer, Meiser, Mohammadi 2019; Koskela, Jalko, Honkela 2020).

How this module computes it
---------------------------
1. **Per-step curves.**  Every supported event is reduced to the hockey-stick curve of a
   *dominating pair* (Zhu, Dong, Wang 2022), in closed form and in log space.
   ``noise_multiplier`` is relative to the clip norm, i.e. the add/remove sensitivity (the
   convention of the whole package), so replacing a record moves a sum by up to 2.

   * Gaussian mechanism, shift ``s``: ``Phi(mu/2 - eps/mu) - e^eps Phi(-mu/2 - eps/mu)`` with
     ``mu = s / sigma`` (Balle and Wang 2018).  Laplace: ``1 - exp((eps - s/b)/2)`` on
     ``|eps| <= s/b``.  Un-sampled: ``s = 1`` under add/remove, ``s = 2`` under replace-one.
   * Poisson subsampling, add/remove-one: the *remove* pair ``(q B1 + (1-q) B0, B0)`` and the
     *add* pair ``(B0, q B1 + (1-q) B0)``, with curves ``q d(log(1 + (e^eps - 1)/q))`` and
     ``(1 - e^eps (1-q)) d(log(q e^eps / (1 - e^eps (1-q))))`` in terms of the base curve ``d``
     (Balle, Barthe, Gaboardi 2018; Zhu et al. 2022).  For one pair of neighbouring datasets
     the direction is the same at every step, so each direction is composed on its own and the
     answer is the **maximum over the two directions** (as in dp-accounting).  A direction whose
     Chernoff bound is already below the other's exact answer is skipped.
   * Poisson subsampling of the Gaussian, replace-one: the symmetric mixture pair
     ``((1-q) N(0) + q N(-1), (1-q) N(0) + q N(1))`` (the replaced record at opposite ends of
     the clip ball), whose curve has a closed form through ``asinh``; this is the pair of
     dp-accounting's replace-one accountant and the tests check numerically that it dominates
     every other placement of the two records.  Laplace under replace-one uses the advanced
     joint convexity bound (Balle et al. 2018, Thm. 2) ``q [(1-b) d1(e0) + b d2(e0)]``,
     ``e^e0 = 1 + (e^eps - 1)/q``, ``b = e^eps / e^e0`` (shifts 1 and 2), valid but looser.
   * Sampling without replacement (replace-one): Balle et al.'s Theorem 10,
     ``q d2(log(1 + (e^eps - 1)/q))`` for ``eps >= 0`` (shift 2; attained by a concrete pair of
     datasets, so tight), and the dual identity ``delta(eps) = 1 - e^eps + e^eps delta(-eps)``
     of a symmetric relation below 0.
   * ``ShuffledEvent``: shuffling is **not** Poisson sampling and no amplification is claimed;
     it is accounted as ``ceil(steps / steps_per_epoch)`` compositions of the un-amplified event
     (one per epoch, parallel composition over its disjoint batches), under replace-one.

2. **Pessimistic discretisation ("connect the dots", Doroshenko, Ghazi, Kamath, Kumar,
   Manurangsi 2022).**  The curve is evaluated at grid points ``eps_k = k h`` and a discrete
   PLD on them is built whose curve is the chord interpolation of the true one in ``e^eps``.
   The true curve is convex in ``e^eps``, so the discrete curve lies above it everywhere: the
   discrete PLD dominates the mechanism and every reported epsilon or delta is an upper bound
   (dominance is preserved by composition).  Mass below the grid is lumped onto its first point
   (moved up); the curve value at the last point (below ``1e-200``) becomes mass at +infinity,
   counted in delta.  The grid is uniform (spacing ``h``) where the curve or its reverse
   exceeds ``1e-16``, i.e. where the mass is; in the tails beyond, each cell is as wide as lets
   the curve change by at most ``e^0.25`` (connect-the-dots is valid on any grid), so a fine
   ``h`` costs little and even single-step tails queried at delta = 1e-150 stay within ~1e-4.
   ``h`` is chosen from the per-step loss variance so that the pessimism is about ``1e-4``
   relative: finer than dp-accounting's fixed ``1e-4`` for small sampling rates (which makes
   it ~5% tighter at q = 1e-4), coarser for large per-step losses.  For very long
   heterogeneous compositions it is relaxed towards ``1e-3`` to bound the FFT work.

3. **Composition in the Fourier domain with exponential tilting.**  Each group of identical
   steps contributes one transform raised to the power ``count`` (accumulated as
   ``count * log|X|`` and ``count * arg X``, exact for integer counts), never step by step;
   heterogeneous groups multiply their transforms on a common grid (several groups per
   batched, threaded FFT); frequencies whose magnitude has underflowed are dropped from further
   work.  Every PMF is first tilted by
   ``exp(theta * loss)`` (an Esscher transform: the tilt of a convolution is the convolution of
   the tilts), with ``theta`` at the saddle point of the Chernoff bound for the requested
   (eps, delta).  The tail that decides delta then sits at the centre of the grid, so delta =
   1e-12 or 1e-100 is computed with floating-point *relative* accuracy instead of drowning in
   FFT round-off (dp-accounting's fixed-grid answer at delta = 1e-12 for the reference case
   below is 5% too high), and the grid only needs to cover the tilted bulk.

4. **No silent truncation.**  The composition window is the tilted mean +- a multiple of the
   tilted standard deviation, *verified* by Chernoff bounds computed from the discrete PMFs and
   widened until less than ``1e-15`` of the tilted mass escapes on each side.  Escaped mass
   above the window is added to delta, wrapped-around mass can only increase delta, and a
   bound on the FFT round-off (estimated from the negative entries of the inverse transform) is
   added too.  When an answer falls where the tilt is not accurate (the error terms exceed 1e-3
   of it) the tilt is re-centred and the composition redone.

Reference: ``q = 256/60000, sigma = 1.1, 14062 steps, delta = 1e-5`` gives 2.3818 (exact
value about 2.3816; dp-accounting 2.3817, RDP 2.60) in about 0.1 s; at delta = 1e-12, 4.1748
(PRV 4.1745 +- 0.01; dp-accounting 4.373).  ``benchmarks/bench_pld.py`` compares more cases.

Everything is numpy/scipy; no torch.

References: Meiser & Mohammadi, "Tight on budget? Tight bounds for r-fold approximate
differential privacy", CCS 2018.  Sommer, Meiser, Mohammadi, "Privacy loss classes: the central
limit theorem in differential privacy", PETS 2019.  Koskela, Jalko, Honkela, "Computing tight
differential privacy guarantees using FFT", AISTATS 2020.  Koskela, Jalko, Prediger, Honkela,
"Tight differential privacy for discrete-valued mechanisms and for the subsampled Gaussian
mechanism using FFT", AISTATS 2021.  Doroshenko, Ghazi, Kamath, Kumar, Manurangsi, "Connect the
dots: tighter discrete approximations of privacy loss distributions", PETS 2022.  Zhu, Dong,
Wang, "Optimal accounting of differential privacy via characteristic function", AISTATS 2022.
Balle, Barthe, Gaboardi, "Privacy amplification by subsampling: tight analyses via couplings
and divergences", NeurIPS 2018.  Balle & Wang, "Improving the Gaussian mechanism for
differential privacy: analytical calibration and optimal denoising", ICML 2018.  Lebeda,
Regehr, Kamath, Steinke, "Avoiding pitfalls for privacy accounting of subsampled mechanisms
under composition", 2024.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
from scipy import fft as _fft
from scipy import optimize as _opt
from scipy import special as _sp

from ..dp_query.events import (
    equivalent_gaussian_noise_multiplier,
    ADD_OR_REMOVE_ONE,
    REPLACE_ONE,
    ComposedEvent,
    DpEvent,
    GaussianEvent,
    LaplaceEvent,
    NoOpEvent,
    NonPrivateEvent,
    PoissonSampledEvent,
    SampledWithoutReplacementEvent,
    SelfComposedEvent,
    ShuffledEvent,
    UnsupportedEvent,
    neighbouring_relation,
)
from .accountant_base import PrivacyAccountant

__all__ = ["PLDAccountant", "pld_epsilon", "pld_delta", "compute_pld_from_ledger"]

_RELATIONS = (ADD_OR_REMOVE_ONE, REPLACE_ONE)

#: per-step curve value below which the loss grid stops (the rest goes to the +inf mass)
_TAIL = 1e-200
_LOG_TAIL = math.log(_TAIL)
#: ... or, if that lies beyond _MAX_LOSS, at _MAX_LOSS provided the curve is below this there
_LOG_TAIL_MAX = math.log(1e-20)
#: the per-step loss grid never extends beyond +-this (exp overflows near 709)
_MAX_LOSS = 600.0
#: tilted mass allowed to escape the composition window on either side (Chernoff-verified)
_ESCAPE = 1e-15
#: default relative discretisation pessimism, relaxed up to _RELAXED_TOL for long compositions
_DEFAULT_TOL = 1e-4
_RELAXED_TOL = 1e-3
_WORK = 1 << 24  # FFT points summed over groups and directions the auto spacing aims at ...
_WORK_GRID_MIN, _WORK_GRID_MAX = 1 << 18, 1 << 20  # ... keeping one FFT between these sizes
#: threads for batched FFTs (groups are transformed several at a time)
_FFT_WORKERS = max(1, min(2, os.cpu_count() or 1))
#: largest FFT length (about 128 MiB per real array)
_MAX_FFT = 1 << 24
#: largest uniform part of a per-step grid; beyond it the spacing is coarsened
_MAX_STEP_POINTS = 1 << 21
#: the per-step grid is uniform where the curve (or its reverse) is above this ...
_CORE = 1e-16
_LOG_CORE = math.log(_CORE)
#: ... and beyond, each cell changes the curve by at most a factor e^_KAPPA
_KAPPA = 0.25
#: Most steps (summed over every composed event) a :class:`PLDAccountant` accepts.  Beyond, the
#: composed loss needs grids too fine or too wide for a few seconds of FFT work (1e12 steps took
#: ~20 s and 1e15 overflowed); :class:`~pytorch_privacy.analysis.RdpAccountant` has no such limit.
MAX_STEPS = 10**10


# ----------------------------------------------------------------------------------------
# small numerical helpers
# ----------------------------------------------------------------------------------------
def _log1mexp(x):
    """log(1 - exp(x)) for x <= 0, accurate everywhere (Maechler 2012)."""
    x = np.asarray(x, dtype=float)
    out = np.full(x.shape, -np.inf)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        a = x > -math.log(2.0)
        out[a] = np.log(-np.expm1(x[a]))
        b = ~a
        out[b] = np.log1p(-np.exp(x[b]))
    out[x >= 0] = -np.inf
    return out


def _logsubexp(a, b):
    """log(exp(a) - exp(b)) for a >= b (elementwise); -inf where equal."""
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    with np.errstate(invalid="ignore"):
        d = np.where(np.isneginf(a), -np.inf, b - a)
    out = a + _log1mexp(np.minimum(d, 0.0))
    return np.where(np.isneginf(a), -np.inf, out)


def _log_expm1(x):
    """log(exp(x) - 1) for x > 0."""
    x = np.asarray(x, dtype=float)
    with np.errstate(divide="ignore", over="ignore"):
        return np.where(x > 30.0, x + np.log1p(-np.exp(-np.minimum(x, 700.0))), np.log(np.expm1(np.minimum(x, 700.0))))


# ----------------------------------------------------------------------------------------
# hockey-stick curves of dominating pairs
# ----------------------------------------------------------------------------------------
class _Base:
    """A symmetric additive-noise pair (noise centred at 0 vs. at ``sensitivity``).

    Symmetric noise makes the pair's curve equal to its swap's, so only ``log_delta`` for
    ``eps >= 0`` is needed; negative ``eps`` follow from the dual identity.
    """

    max_loss = math.inf

    def log_delta(self, eps):  # eps >= 0
        raise NotImplementedError

    def log_delta_all(self, eps):
        """log delta(eps) for any real eps (dual identity for eps < 0)."""
        eps = np.asarray(eps, dtype=float)
        out = np.empty(eps.shape)
        pos = eps >= 0
        out[pos] = self.log_delta(eps[pos])
        neg = ~pos
        if neg.any():
            e = eps[neg]
            # delta(e) = 1 - e^e + e^e delta(-e)
            out[neg] = np.logaddexp(_log1mexp(e), e + self.log_delta(-e))
        return out


class _GaussBase(_Base):
    def __init__(self, sigma: float, sensitivity: float):
        self.mu = sensitivity / sigma

    def log_delta(self, eps):
        eps = np.asarray(eps, dtype=float)
        mu = self.mu
        la = _sp.log_ndtr(mu / 2 - eps / mu)
        lb = eps + _sp.log_ndtr(-mu / 2 - eps / mu)
        return _logsubexp(la, np.minimum(lb, la))


class _LaplaceBase(_Base):
    def __init__(self, scale: float, sensitivity: float):
        self.e0 = sensitivity / scale
        self.max_loss = self.e0

    def log_delta(self, eps):
        eps = np.asarray(eps, dtype=float)
        with np.errstate(divide="ignore"):
            return np.where(eps >= self.e0, -np.inf, _log1mexp(np.minimum((eps - self.e0) / 2, 0.0)))


class _Curve:
    """Hockey-stick curve of a dominating pair, split at eps = 0.

    ``log_delta(eps)`` for eps >= 0 and ``log_phi(eps) = eps + log delta_swap(-eps)`` for
    eps <= 0, where ``delta(eps) = 1 - e^eps + phi(eps)``.  Working with ``phi`` below zero keeps
    the second differences of the connect-the-dots construction free of cancellation.
    """

    lo_support = -math.inf  # losses are >= this
    hi_support = math.inf  # losses are <= this

    def log_delta(self, eps):
        raise NotImplementedError

    def log_phi(self, eps):
        raise NotImplementedError


class _Plain(_Curve):
    """An un-sampled symmetric mechanism."""

    def __init__(self, base: _Base):
        self.base = base
        self.hi_support = base.max_loss
        self.lo_support = -base.max_loss

    def log_delta(self, eps):
        return self.base.log_delta(eps)

    def log_phi(self, eps):
        eps = np.asarray(eps, dtype=float)
        return eps + self.base.log_delta(-eps)


def _remove_log_delta(base: _Base, q: float, eps):
    """Curve of (q B1 + (1-q) B0, B0) at any real eps."""
    eps = np.asarray(eps, dtype=float)
    out = np.empty(eps.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.expm1(np.minimum(eps, 700.0)) + q  # e^eps - 1 + q
        ok = t > 0
        big = eps > 700.0
        u = np.where(ok, np.log(np.where(ok, t, 1.0)) - math.log(q), 0.0)
        u = np.where(big, eps - math.log(q), u)
        out[ok | big] = math.log(q) + base.log_delta_all(u[ok | big])
        rest = ~(ok | big)
        out[rest] = _log1mexp(np.minimum(eps[rest], 0.0))
    return out


def _add_log_delta(base: _Base, q: float, eps):
    """Curve of (B0, q B1 + (1-q) B0) at any real eps (0 beyond -log(1-q))."""
    eps = np.asarray(eps, dtype=float)
    out = np.full(eps.shape, -np.inf)
    l1q = math.log1p(-q)
    ok = eps + l1q < 0
    if ok.any():
        e = eps[ok]
        ls = _log1mexp(e + l1q)  # log(1 - e^eps (1-q))
        u = math.log(q) + e - ls
        out[ok] = ls + base.log_delta_all(u)
    return out


class _Remove(_Curve):
    def __init__(self, base: _Base, q: float):
        self.base, self.q = base, q
        self.lo_support = math.log1p(-q)
        if base.max_loss < math.inf:
            self.hi_support = math.log1p(q * math.expm1(base.max_loss))

    def log_delta(self, eps):
        return _remove_log_delta(self.base, self.q, eps)

    def log_phi(self, eps):
        eps = np.asarray(eps, dtype=float)
        return eps + _add_log_delta(self.base, self.q, -eps)


class _Add(_Curve):
    def __init__(self, base: _Base, q: float):
        self.base, self.q = base, q
        self.hi_support = -math.log1p(-q)
        if base.max_loss < math.inf:
            self.lo_support = -math.log1p(q * math.expm1(base.max_loss))

    def log_delta(self, eps):
        return _add_log_delta(self.base, self.q, eps)

    def log_phi(self, eps):
        eps = np.asarray(eps, dtype=float)
        return eps + _remove_log_delta(self.base, self.q, -eps)


class _Substitution(_Curve):
    """Self-dual replace-one curve ``q [(1-b) d1(e0) + b d2(e0)]`` for eps >= 0, dual below.

    Advanced joint convexity (Balle, Barthe, Gaboardi 2018, Thm. 2) for a mixture that shares
    the component without the record, then joint convexity in the second argument; with
    ``d1 = d2`` (sampling without replacement) it is their Theorem 10.  See the module docstring.
    """

    def __init__(self, base1: _Base, base2: _Base, q: float):
        self.b1, self.b2, self.q = base1, base2, q
        if base2.max_loss < math.inf:
            m = math.log1p(q * math.expm1(base2.max_loss))
            self.hi_support, self.lo_support = m, -m

    def log_delta(self, eps):
        eps = np.asarray(eps, dtype=float)
        q = self.q
        # log alpha with alpha = 1 + (e^eps - 1)/q, and log beta = eps - log alpha (<= 0)
        small = np.minimum(eps, 30.0)
        large = np.maximum(eps, 30.0)
        la = np.where(
            eps <= 30.0,
            np.log1p(np.expm1(small) / q),
            large + np.log1p((q - 1.0) * np.exp(-large)) - math.log(q),
        )
        lb = np.minimum(eps - la, 0.0)
        d1 = self.b1.log_delta(la)
        d2 = d1 if self.b1 is self.b2 else self.b2.log_delta(la)
        return math.log(q) + np.logaddexp(_log1mexp(lb) + d1, lb + d2)

    def log_phi(self, eps):
        eps = np.asarray(eps, dtype=float)
        return eps + self.log_delta(-eps)


class _SymmetricMixture(_Curve):
    """Poisson-subsampled Gaussian under replace-one: ``((1-q) N(0) + q N(-1), (1-q) N(0) + q N(1))``.

    The replaced record is absent with probability ``1-q`` and at opposite ends of the unit
    ball otherwise.  The loss ``log P/Q`` is decreasing in the output ``x`` and exceeds ``eps``
    below ``x_eps = -sigma^2 (eps/2 + asinh((1-q) sinh(eps/2) e^{1/(2 sigma^2)} / q))``, so
    ``delta(eps) = q [Phi(a+) - e^eps Phi(a-)] - (1-q)(e^eps - 1) Phi(a0)`` with
    ``a0 = x_eps/sigma``, ``a+- = (x_eps +- 1)/sigma``.  The pair is self-dual (mirror image).
    This is the pair of dp-accounting's replace-one accountant; that it dominates every other
    position of the two records (any norms <= 1, any angle) is checked numerically in the tests
    (see also Lebeda et al. 2024).
    """

    def __init__(self, sigma: float, q: float):
        self.s, self.q = sigma, q

    def log_delta(self, eps):
        eps = np.asarray(eps, dtype=float)
        s, q = self.s, self.q
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            # asinh(r) with log r = log(1-q) + log sinh(eps/2) + 1/(2 s^2) - log q
            half = eps / 2.0
            log_sinh = np.where(half > 20.0, half - math.log(2.0), np.log(np.sinh(np.minimum(half, 20.0))))
            log_r = math.log1p(-q) + log_sinh + 0.5 / (s * s) - math.log(q)
            asinh = np.where(log_r > 30.0, log_r + math.log(2.0), np.arcsinh(np.exp(np.minimum(log_r, 30.0))))
            x = -s * s * (half + asinh)
            l1 = math.log(q) + _sp.log_ndtr((x + 1.0) / s)
            l2 = math.log(q) + eps + _sp.log_ndtr((x - 1.0) / s)
            l3 = math.log1p(-q) + _log_expm1(np.maximum(eps, 1e-300)) + _sp.log_ndtr(x / s)
            l3 = np.where(eps > 0, l3, -np.inf)
            ssum = np.exp(l2 - l1) + np.exp(l3 - l1)
            out = l1 + np.log1p(-np.minimum(ssum, 1.0))
            # where the three-term cancellation leaves no accurate digits, drop the subtracted
            # (1-q)(e^eps - 1) Phi(a0) >= 0 term: an upper bound, so still pessimistic
            lost = ~(ssum < 1.0 - 1e-8)
            if lost.any():
                alt = l1 + np.log1p(-np.minimum(np.exp(l2 - l1), 1.0 - 1e-8))
                out = np.where(lost, alt, out)
        return np.where(np.isnan(out), l1 if np.ndim(l1) else -np.inf, out)

    def log_phi(self, eps):
        eps = np.asarray(eps, dtype=float)
        return eps + self.log_delta(-eps)


# ----------------------------------------------------------------------------------------
# loss moments (only used to choose the grid spacing)
# ----------------------------------------------------------------------------------------
def _mixture_loss_variance(kind: str, scale: float, sens: float, q: float, direction: str) -> float:
    """Variance of the privacy loss under P for the (sub-sampled) additive noise pair.

    Plain trapezoid quadrature over the output; only used to pick the grid spacing.
    """
    if kind == "gaussian":
        if q >= 1.0:
            return (sens / scale) ** 2
        w = 14.0 * scale
        x = np.linspace(-w - sens, sens + w, 8001)
        l0 = -0.5 * (x / scale) ** 2
        l1 = -0.5 * ((x - sens) / scale) ** 2
    else:
        w = 50.0 * scale
        x = np.linspace(-w - sens, sens + w, 20001)
        l0 = -np.abs(x) / scale
        l1 = -np.abs(x - sens) / scale
    if q >= 1.0:
        lp, lq = l1, l0
    elif direction == "replace":  # (1-q) B0 + q B(-s) vs (1-q) B0 + q B(+s)
        lm = -0.5 * ((x + sens) / scale) ** 2 if kind == "gaussian" else -np.abs(x + sens) / scale
        lp = np.logaddexp(math.log1p(-q) + l0, math.log(q) + lm)
        lq = np.logaddexp(math.log1p(-q) + l0, math.log(q) + l1)
    else:
        mix = np.logaddexp(math.log1p(-q) + l0, math.log(q) + l1)
        lp, lq = (mix, l0) if direction == "remove" else (l0, mix)
    loss = lp - lq
    dens = np.exp(lp - lp.max())
    dens /= dens.sum()  # uniform grid: the trapezoid weights cancel up to the (negligible) ends
    m1 = float(np.dot(dens, loss))
    m2 = float(np.dot(dens, (loss - m1) ** 2))
    return max(m2, 0.0)


# ----------------------------------------------------------------------------------------
# per-step specifications (hashable) and their curves
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Spec:
    """One kind of step.  ``sampling``: 'none', 'poisson', 'wor'; ``relation`` fixes sensitivities."""

    kind: str  # 'gaussian' | 'laplace'
    scale: float
    sampling: str
    q: float
    relation: str

    @property
    def symmetric(self) -> bool:
        return not (self.sampling == "poisson" and self.relation == ADD_OR_REMOVE_ONE)

    def _base(self, sens: float) -> _Base:
        return _GaussBase(self.scale, sens) if self.kind == "gaussian" else _LaplaceBase(self.scale, sens)

    def curve(self, direction: str) -> _Curve:
        if self.relation == ADD_OR_REMOVE_ONE:
            b1 = self._base(1.0)
            if self.sampling == "none":
                return _Plain(b1)
            # poisson (wor is refused under add/remove)
            return _Remove(b1, self.q) if direction == "remove" else _Add(b1, self.q)
        b2 = self._base(2.0)
        if self.sampling == "none":
            return _Plain(b2)
        if self.sampling == "wor":
            return _Substitution(b2, b2, self.q)
        if self.kind == "gaussian":
            return _SymmetricMixture(self.scale, self.q)
        return _Substitution(self._base(1.0), b2, self.q)

    def variance(self, direction: str) -> float:
        if self.relation == ADD_OR_REMOVE_ONE:
            q = 1.0 if self.sampling == "none" else self.q
            return _mixture_loss_variance(self.kind, self.scale, 1.0, q, direction)
        if self.sampling == "none":
            return _mixture_loss_variance(self.kind, self.scale, 2.0, 1.0, direction)
        if self.sampling == "wor":
            return _mixture_loss_variance(self.kind, self.scale, 2.0, self.q, "remove")
        return _mixture_loss_variance(self.kind, self.scale, 1.0, self.q, "replace")


# ----------------------------------------------------------------------------------------
# connect-the-dots discretisation
# ----------------------------------------------------------------------------------------
@dataclass
class _PMF:
    """A discrete PLD: masses at the grid points ``ks * h`` (increasing integers) plus +inf."""

    h: float
    ks: np.ndarray
    mass: np.ndarray
    p_inf: float

    def __post_init__(self):
        keep = self.mass > 0
        if not keep.any():  # pragma: no cover - a curve always has finite mass
            raise ValueError("empty privacy loss distribution")
        self.ks = np.ascontiguousarray(self.ks[keep])
        self.mass = np.ascontiguousarray(self.mass[keep])
        self.loss = self.h * self.ks
        self.logm = np.log(self.mass)
        tot = float(self.mass.sum())
        mu = float(np.dot(self.mass, self.loss)) / tot
        self.var = float(np.dot(self.mass, (self.loss - mu) ** 2)) / tot


def _edges(fun, sign: float, h: float, levels: tuple[float, ...]) -> list[float]:
    """For each log level, a point ``x`` (``sign * x >= 0``) with ``fun(x) <= level``, close to
    the smallest such point.  ``fun`` is evaluated on vectors: one geometric scan brackets every
    crossing, then one linear refinement per level locates it to ``max(h, 1e-3)``-ish.
    """
    xs = np.concatenate(([0.0], np.geomspace(1e-4, _MAX_LOSS, 200))) * sign
    v = fun(xs)
    out = []
    for level in levels:
        below = np.nonzero(v <= level)[0]
        if below.size == 0:
            if v[-1] <= _LOG_TAIL_MAX:  # truncate at the representable limit (rest goes to +inf)
                out.append(float(xs[-1]))
                continue
            raise ValueError(
                "per-step privacy loss exceeds the numerically representable range (one step's "
                f"hockey-stick curve is still above {math.exp(level):g} at |eps| = {_MAX_LOSS:g}); "
                "the mechanism is practically non-private (noise multiplier far too small)"
            )
        i = int(below[0])
        if i == 0:
            out.append(0.0)
            continue
        lo, hi = xs[i - 1], xs[i]
        n = int(min(max(abs(hi - lo) / max(h, 1e-3), 2), 257))
        grid = np.linspace(lo, hi, n + 1)
        j = np.nonzero(fun(grid) <= level)[0]
        out.append(float(grid[j[0]]) if j.size else float(hi))
    return out


def _tail_points(fun, start: int, stop: int, h: float, sign: int) -> np.ndarray:
    """Integer grid points from ``start`` (exclusive) to ``stop`` (inclusive) in a tail,
    increasing for ``sign = 1`` (upper tail), decreasing-then-sorted for ``sign = -1``.

    The spacing is ``max(h, _KAPPA / |d log fun / d eps|)``: each cell changes the curve by at
    most a factor ``e^_KAPPA``, which keeps the chord (connect-the-dots) interpolation within
    about ``_KAPPA^2 / 8`` of the curve, relative, however far out the tail is queried.
    """
    if sign * (stop - start) <= 0:
        return np.zeros(0, dtype=np.int64)
    e = np.linspace(start * h, stop * h, 2001)
    v = fun(e)
    finite = np.isfinite(v)
    slope = np.abs(np.gradient(np.where(finite, v, np.nan), e))
    slope = np.where(np.isfinite(slope), slope, np.inf)  # near the support end: stay fine
    width = np.maximum(h, _KAPPA / np.maximum(slope, 1e-12))
    # cumulative number of points; place one at each integer
    cells = np.concatenate(([0.0], np.cumsum(np.abs(np.diff(e)) / np.minimum(width[1:], width[:-1]))))
    n = int(math.ceil(cells[-1]))
    pos = np.interp(np.arange(1, n + 1), cells, e) if n > 0 else np.zeros(0)
    ks = (np.ceil(pos / h - 1e-9) if sign > 0 else np.floor(pos / h + 1e-9)).astype(np.int64)
    ks = np.unique(ks)  # sorted increasing
    ks = ks[sign * (ks - start) > 0]
    if ks.size == 0 or sign * (ks[-1 if sign > 0 else 0] - stop) < 0:
        ks = np.append(ks, stop) if sign > 0 else np.insert(ks, 0, stop)
    return ks


def _grid(curve: _Curve, h: float) -> np.ndarray:
    """Grid points (integers, increasing, containing 0) for the discretisation of ``curve``.

    Uniform spacing ``h`` where the curve (or its reverse) is above ``_CORE`` (where the mass
    is); beyond, slope-adapted spacing (``_tail_points``) out to where it falls below ``_TAIL``
    (or to the end of a bounded support).
    """
    core_hi, hi = _edges(curve.log_delta, 1.0, h, (_LOG_CORE, _LOG_TAIL))
    core_lo, lo = _edges(curve.log_phi, -1.0, h, (_LOG_CORE, _LOG_TAIL))
    hi = min(hi, curve.hi_support)
    lo = max(lo, curve.lo_support)
    core_hi, core_lo = min(core_hi, hi), max(core_lo, lo)
    k_hi = max(int(math.ceil(hi / h - 1e-9)), 1)
    k_lo = min(int(math.floor(lo / h + 1e-9)), -1)
    kb = min(max(int(math.ceil(core_hi / h)), 1), k_hi)
    ka = max(min(int(math.floor(core_lo / h)), -1), k_lo)
    if kb - ka + 1 > _MAX_STEP_POINTS:
        raise _GridTooFine(kb - ka + 1)
    parts = [
        _tail_points(curve.log_phi, ka, k_lo, h, -1),
        np.arange(ka, kb + 1, dtype=np.int64),
        _tail_points(curve.log_delta, kb, k_hi, h, 1),
    ]
    return np.concatenate(parts)


def _discretise(curve: _Curve, h: float) -> _PMF:
    """Connect-the-dots PMF of ``curve`` on the grid ``k h`` (Doroshenko et al. 2022).

    With ``D(y) = delta(log y)`` convex and decreasing, the PMF puts mass
    ``p_i = y_i (s_i - s_{i-1})`` at ``eps_i`` where ``s_i`` is the chord slope of ``D`` on
    ``[y_i, y_{i+1}]`` (zero after the last point, whose curve value becomes the mass at +inf;
    the first point collects all mass below it).  Its curve is the chord interpolation of
    ``D``, hence above ``D``: the PMF dominates the pair.  Below ``eps = 0`` the same
    differences are taken of ``phi = D - (1 - y)`` (the linear part has no second difference),
    which avoids cancellation.
    """
    ks = _grid(curve, h)
    eps = ks * h
    neg = ks <= 0
    pos = ks >= 0
    F = np.empty(ks.size)
    F[neg] = np.exp(curve.log_phi(eps[neg]))
    F[pos] = np.exp(curve.log_delta(eps[pos]))  # at k = 0 both agree (phi(0) = delta(0))
    dF = np.diff(F)
    w = np.diff(eps)
    right = np.append(dF / np.expm1(w), 0.0)  # y_i * (chord slope right of i); 0 after the end
    left = np.concatenate(([0.0], dF / -np.expm1(-w)))  # y_i * (chord slope left of i)
    mass = right - left
    i0 = int(np.searchsorted(ks, 0))
    mass[i0] += 1.0  # the linear part 1 - y of D changes form at eps = 0 (y = 1)
    mass[0] = dF[0] / math.expm1(w[0]) - F[0]  # everything below the grid
    p_inf = float(F[-1])  # exactly 0 when the grid reaches the end of a bounded support
    scale = max(float(np.max(np.abs(mass))), 1e-300)
    if np.any(mass < -1e-9 * scale):
        mass = _convex_ctd(F, ks, h)
    mass = np.maximum(mass, 0.0)
    # masses below 1e-250 would only produce denormal arithmetic later; move them to +inf
    # (pessimistic; far below the 1e-200 tail already counted there)
    tiny = mass < 1e-250
    if tiny.any():
        p_inf += float(mass[tiny].sum())
        mass[tiny] = 0.0
    total = float(mass.sum()) + p_inf
    if not abs(total - 1.0) < 1e-6:
        raise FloatingPointError(f"discretised privacy loss distribution has total mass {total!r}")
    return _PMF(h=h, ks=ks, mass=mass, p_inf=p_inf)


def _convex_ctd(F, ks, h):
    """Masses from the lower convex hull of the curve samples (only for non-convex bounds).

    The greatest convex minorant of samples of an upper bound still lies above the true
    (convex) curve's chord interpolation, so the result remains pessimistic.
    """
    y = np.exp(ks * h)
    D = np.where(ks <= 0, 1.0 - y + F, F)
    pts: list[int] = []
    for i in range(ks.size):
        while len(pts) >= 2:
            a, b = pts[-2], pts[-1]
            # keep b only if it lies strictly below the chord a -> i
            if (D[b] - D[a]) * (y[i] - y[a]) < (D[i] - D[a]) * (y[b] - y[a]):
                break
            pts.pop()
        pts.append(i)
    idx = np.array(pts)
    Dh = np.interp(y, y[idx], D[idx])
    slopes = np.diff(Dh) / np.diff(y)
    mass = np.empty(ks.size)
    mass[1:-1] = y[1:-1] * (slopes[1:] - slopes[:-1])
    mass[-1] = -y[-1] * slopes[-1]
    mass[0] = 1.0 - Dh[0] + y[0] * slopes[0]
    return mass


class _GridTooFine(Exception):
    def __init__(self, n):
        self.n = n


# ----------------------------------------------------------------------------------------
# composition
# ----------------------------------------------------------------------------------------
def _solve_increasing(fun, t0: float, lo: float = 0.0, hi: float = math.inf, rtol: float = 1e-3) -> float:
    """Root of an increasing function ``fun(t) -> (value, derivative)`` on ``(lo, hi)``.

    Safeguarded Newton: expands the bracket geometrically from ``t0`` and falls back to
    bisection whenever a Newton step leaves it.  Returns the bracket end if there is no root.
    """
    t = t0
    for _ in range(200):
        v, dv = fun(t)
        if v > 0:
            hi = t
        else:
            lo = t
        if hi - lo <= rtol * max(hi if hi < math.inf else t, 1e-12):
            break
        nt = t - v / dv if dv > 0 else math.nan
        if not (lo < nt < hi) or math.isnan(nt):
            nt = 0.5 * (lo + hi) if hi < math.inf else max(2.0 * t, t + 1.0)
        if abs(nt - t) <= 0.25 * rtol * max(t, 1e-12):
            t = nt
            break
        t = nt
    return t


class _Direction:
    """All groups of one direction on a common grid; answers delta(eps) / eps(delta)."""

    def __init__(self, groups: list[tuple[_PMF, int]], h: float, max_fft: int):
        self.h = h
        self.max_fft = max_fft
        self.groups = groups
        self.counts = np.array([float(c) for _, c in groups])
        # concatenated atoms for fast cumulants
        self._loss = np.concatenate([p.loss for p, _ in groups])
        self._logm = np.concatenate([p.logm for p, _ in groups])
        sizes = [p.mass.size for p, _ in groups]
        self._starts = np.concatenate(([0], np.cumsum(sizes)[:-1])).astype(np.intp)
        self._gid = np.repeat(np.arange(len(groups)), sizes)
        log_fin = sum(c * math.log1p(-p.p_inf) for p, c in groups if p.p_inf > 0)
        self.p_inf = float(-math.expm1(log_fin))
        self.s_min = float(sum(c * p.loss[0] for p, c in groups))
        self.s_max = float(sum(c * p.loss[-1] for p, c in groups))
        self._snap: _Snapshot | None = None
        self._kcache: dict[float, tuple] = {}

    # -- cumulants of the composed (finite part of the) PLD ----------------------------------
    def cumulants(self, theta: float, order: int = 2):
        """``K(theta) = log E[e^{theta S}]`` of the composed finite part and its derivatives."""
        hit = self._kcache.get(theta)
        if hit is not None and (order < 2 or hit[2] is not None):
            return hit
        a = self._logm + theta * self._loss
        gmax = np.maximum.reduceat(a, self._starts)
        w = np.exp(np.maximum(a - gmax[self._gid], -700.0))  # (no denormals)
        s0 = np.add.reduceat(w, self._starts)
        K = float(np.dot(self.counts, gmax + np.log(s0)))
        if order == 0:
            return K, None, None
        s1 = np.add.reduceat(w * self._loss, self._starts) / s0
        K1 = float(np.dot(self.counts, s1))
        K2 = None
        if order >= 2:
            s2 = np.add.reduceat(w * (self._loss - s1[self._gid]) ** 2, self._starts) / s0
            K2 = float(np.dot(self.counts, s2))
        if len(self._kcache) > 256:
            self._kcache.clear()
        self._kcache[theta] = (K, K1, K2)
        return K, K1, K2

    def K(self, theta: float) -> float:
        return self.cumulants(theta, 0)[0]

    # -- tilt selection -------------------------------------------------------------------
    @staticmethod
    def _log_c(t: float) -> float:
        # max_u (1 - e^-u) e^{-t u} = t^t / (1+t)^(1+t)
        return (t * math.log(t) if t > 0 else 0.0) - (1.0 + t) * math.log1p(t)

    def chernoff_eps(self, delta: float) -> tuple[float, float]:
        """``(t, eps_bound)``: the tilt minimising the Chernoff bound on eps at ``delta``.

        ``delta(eps) <= p_inf + c_t exp(K(t) - t eps)`` with ``c_t = t^t / (1+t)^(1+t)``; the
        minimiser is the saddle point, ``eps_bound`` a valid (RDP-like) upper bound.
        """
        ld = math.log(delta - self.p_inf)

        def g(t):  # derivative of t^2 * f(t), f(t) = (K + log c_t - ld) / t
            K, K1, K2 = self.cumulants(t)
            return t * (K1 + math.log(t / (1.0 + t))) - K - self._log_c(t) + ld, t * K2 + 1.0 / (1.0 + t)

        t = _solve_increasing(g, 1.0, lo=1e-9, hi=1e6, rtol=1e-2)
        return t, (self.K(t) + self._log_c(t) - ld) / t

    def chernoff_delta(self, eps: float) -> tuple[float, float]:
        """``(t, delta_bound)``: the tilt minimising the Chernoff bound on delta at ``eps``."""

        def g(t):
            _, K1, K2 = self.cumulants(t)
            return K1 + math.log(t / (1.0 + t)) - eps, K2 + 1.0 / (t * (1.0 + t))

        t = _solve_increasing(g, 1.0, lo=1e-9, hi=1e6, rtol=1e-2)
        bound = self.p_inf + math.exp(min(self.K(t) - t * eps + self._log_c(t), 0.0))
        return (t if t > 1e-6 else 0.0), min(bound, 1.0)

    def tilt_for_mean(self, x: float, lo: float = 0.0) -> float:
        """The tilt at which the tilted mean of the composition is ``x`` (0 if below the mean)."""
        if self.cumulants(0.0, 1)[1] >= x:
            return 0.0

        def g(t):
            _, K1, K2 = self.cumulants(t)
            return K1 - x, K2

        return _solve_increasing(g, max(lo, 1e-3), lo=0.0, hi=1e6, rtol=1e-3)

    # -- the composition itself -----------------------------------------------------------
    def snapshot(self, theta: float) -> "_Snapshot":
        h = self.h
        K0, m, v = self.cumulants(theta)
        sd = math.sqrt(max(v, 0.0))
        lo, hi, esc_hi, esc_lo = self._window(theta, K0, m, sd)
        n = int(math.ceil((hi - lo) / h)) + 2
        N = int(_fft.next_fast_len(max(n, 64), real=True))
        if N > self.max_fft:
            raise _GridTooFine(N)
        W0 = int(math.floor(lo / h)) - (N - n) // 2
        M = N // 2 + 1
        # log of the composed transform, magnitude and phase kept apart; frequencies whose
        # magnitude has underflowed (below e^-745) stay zero and are not computed again
        log_mag = np.zeros(M)
        phase = np.zeros(M)
        live = M
        order = np.argsort(-self.counts * np.array([p.var for p, _ in self.groups]), kind="stable")
        chunk = int(max(1, min(16, (1 << 24) // N)))  # groups transformed together (threads)
        for c0 in range(0, order.size, chunk):
            idx = order[c0 : c0 + chunk]
            arr = np.zeros((idx.size, N))
            for r, gi in enumerate(idx):
                p = self.groups[gi][0]
                a = p.logm + theta * p.loss
                w = np.exp(np.maximum(a - a.max(), -700.0))
                w /= w.sum()
                pos = p.ks % N
                if p.ks[-1] - p.ks[0] < N:  # positions are distinct: plain scatter
                    arr[r, pos] = w
                else:  # fold onto the circle (what wraps is bounded by the window check)
                    arr[r] = np.bincount(pos, weights=w, minlength=N)
            X = _fft.rfft(arr, axis=1, workers=_FFT_WORKERS)[:, :live]
            cnt = self.counts[idx][:, None]
            with np.errstate(divide="ignore"):
                log_mag[:live] += ((0.5 * cnt) * np.log(X.real * X.real + X.imag * X.imag)).sum(axis=0)
            phase[:live] += (cnt * np.arctan2(X.imag, X.real)).sum(axis=0)
            dead = np.nonzero(log_mag[:live] < -760.0)[0]
            if dead.size and dead[0] > 0 and np.all(log_mag[dead[0] : live] < -760.0):
                live = int(dead[0])
        Y = np.zeros(M, dtype=complex)
        keep = np.nonzero(log_mag[:live] > -700.0)[0]  # the rest is 0 to double precision
        Y[keep] = np.exp(log_mag[keep] + 1j * np.mod(phase[keep], 2.0 * math.pi))
        C = _fft.irfft(Y, n=N)
        return _Snapshot(self, theta, K0, m, sd, W0, N, C, esc_hi, esc_lo)

    def _window(self, theta, K0, m, sd):
        """Window [lo, hi] holding all but ``_ESCAPE`` of the tilted mass on each side.

        Verified with Chernoff bounds from the discrete PMFs themselves,
        ``P~(S >= x) <= exp(K(theta + t) - K(theta) - t x)``, widening until they hold.
        Returns ``(lo, hi, escaped_above, escaped_below)`` (tilted probabilities).
        """
        h = self.h
        sd = max(sd, h)
        bounds = []
        for sign, edge in ((1.0, self.s_max), (-1.0, self.s_min)):
            z = 8.0
            for _ in range(60):
                x = m + sign * z * sd
                if sign * (x - edge) >= 0:
                    x, b = edge, 0.0
                    break
                b = math.exp(self._log_chernoff(theta, K0, x, sign, z / sd))
                if b <= _ESCAPE:
                    break
                z *= 1.3
            else:
                raise ValueError("could not bound the tail of the composed privacy loss distribution")
            bounds.append((x, b))
        (hi, esc_hi), (lo, esc_lo) = bounds
        return lo - 2 * h, hi + 2 * h, esc_hi, esc_lo

    def _log_chernoff(self, theta, K0, x, sign, t0) -> float:
        """log min_t [K(theta + sign t) - K(theta) - sign t x]: the tilted tail beyond x."""

        def g(t):  # derivative in t of the exponent, increasing
            _, K1, K2 = self.cumulants(theta + sign * t)
            return sign * (K1 - x), K2

        t = _solve_increasing(g, t0, lo=0.0, hi=1e6, rtol=1e-2)
        return min(self.K(theta + sign * t) - K0 - sign * t * x, 0.0)

    # -- queries --------------------------------------------------------------------------
    def _single(self) -> "_SingleStep | None":
        if len(self.groups) == 1 and self.groups[0][1] == 1:
            if not hasattr(self, "_single_step"):
                self._single_step = _SingleStep(self.groups[0][0])
            return self._single_step
        return None

    def delta(self, eps: float, theta: float | None = None, ub: float = 1.0) -> float:
        """delta(eps) to 1e-3 relative (an upper bound); ``ub`` is a known valid upper bound."""
        one = self._single()
        if one is not None:
            return one.delta(eps)
        best = None  # (upper, lower) with the smallest upper bound seen
        snap = self._snap
        if snap is not None:
            r = snap.delta_bounds(eps)
            if r is not None and r[0] - r[1] <= 1e-3 * r[0]:
                return r[0]
        if theta is None:
            theta = self.chernoff_delta(eps)[0]
        for _ in range(6):
            snap = self.snapshot(theta)
            r = snap.delta_bounds(eps)
            if r is not None:
                if r[0] - r[1] <= 1e-3 * r[0]:
                    self._snap = snap
                    return r[0]
                if best is None or r[0] < best[0]:
                    best = r
            theta = self.tilt_for_mean(eps, theta)
        # no tilt resolves it to 1e-3 (a multi-modal loss at a tiny delta): the best upper bound
        # is still an answer if it is within 1% or negligible in absolute terms
        if best is not None:
            up = min(best[0], ub)
            if up - best[1] <= max(1e-2 * up, 1e-18):
                return up
        lo_txt = f"{best[1]:.3g}" if best else "0"
        raise ValueError(
            f"could not resolve delta(eps={eps:g}) to 1%: the composed privacy loss is too irregular "
            f"at this epsilon for FFT accounting (few steps of a rare, large loss); the answer lies "
            f"between {lo_txt} and {min(best[0], ub) if best else ub:.3g}, and the latter is a valid "
            "upper bound"
        )

    def epsilon(self, delta: float, theta: float | None = None, ub: float = math.inf) -> float:
        """eps(delta) to 1e-4 relative (an upper bound); ``ub`` is a known valid upper bound."""
        one = self._single()
        if one is not None:
            return one.epsilon(delta)

        def tight(up, low):
            return up - low <= 1e-4 * max(up, 1e-2)

        snap = self._snap
        if snap is not None:
            up, low, _ = snap.epsilon_bounds(delta)
            if up is not None and tight(up, low):
                return up
        if theta is None:
            theta = self.chernoff_eps(delta)[0]
        best = None
        for _ in range(6):
            snap = self.snapshot(theta)
            up, low, want = snap.epsilon_bounds(delta)
            if up is not None:
                if tight(up, low):
                    self._snap = snap
                    return up
                if best is None or up - low < best[0] - best[1]:
                    best = (up, low)
            theta = self.tilt_for_mean(want, theta)
        if best is not None:
            up = min(best[0], ub)
            if up - best[1] <= 1e-2 * max(up, 1e-2):
                return up
        lo_txt = f"{best[1]:.4g}" if best else "0"
        raise ValueError(
            f"could not resolve epsilon(delta={delta:g}) to 1%: the composed privacy loss is too "
            f"irregular at this delta for FFT accounting (few steps of a rare, large loss); the "
            f"answer lies between {lo_txt} and {min(best[0], ub) if best else ub:.4g}, and the "
            "latter is a valid upper bound"
        )


def _suffix_sums(P: np.ndarray, h: float) -> tuple[np.ndarray, np.ndarray]:
    """``A_j = sum_{k>j} P_k`` and ``B_j = sum_{k>j} P_k exp(-(k-j) h)``.

    ``B`` is accumulated in blocks spanning at most 30 units of loss so that the scaling
    factors stay within floating-point range.
    """
    N = P.size
    S = np.cumsum(P[::-1])[::-1]
    A = np.append(S[1:], 0.0)
    B = np.empty(N)
    L = max(1, int(30.0 / h))
    carry = 0.0  # sum_{k >= end} P_k exp(-(k - end) h)
    for start in range(((N - 1) // L) * L, -1, -L):
        end = min(start + L, N)
        idx = np.arange(end - start)
        with np.errstate(under="ignore"):
            g = P[start:end] * np.exp(-idx * h)
            cs = np.cumsum(g[::-1])[::-1]
            inner = np.append(cs[1:], 0.0) * np.exp(idx * h)
            B[start:end] = inner + carry * np.exp(-(end - start - idx) * h)
            carry = cs[0] + carry * math.exp(-(end - start) * h)
    return A, B


class _Snapshot:
    """The composed PMF at one tilt, untilted on its window, with its error terms.

    ``delta`` at the grid point ``e_j`` is ``p_inf + escaped + A_j - B_j + noise_j`` where
    ``A``/``B`` are the suffix sums of the untilted PMF (``_suffix_sums``), ``escaped`` bounds
    the mass above the window and ``noise_j`` bounds the FFT round-off.  ``err_j`` (round-off
    plus what may have wrapped around) measures the possible *over*-estimate; an answer whose
    ``err`` exceeds 1e-3 of itself is refused so that the caller re-centres the tilt.
    """

    def __init__(self, d: _Direction, theta, K0, m, sd, W0, N, C, esc_hi, esc_lo):
        self.d, self.theta, self.K0, self.m, self.sd = d, theta, K0, m, sd
        h = d.h
        self.h, self.W0, self.N = h, W0, N
        Cw = np.roll(C, -(W0 % N))  # Cw[i] is absolute grid index W0 + i
        Cw[np.abs(Cw) < 1e-300] = 0.0  # no denormals
        neg = Cw < 0
        eta = float(-Cw[neg].min()) if neg.any() else 0.0
        peak = float(Cw.max())
        self.eta = eta = max(4.0 * eta, 64.0 * np.finfo(float).eps * peak)
        Cw = np.maximum(Cw, 0.0)
        # below the tilted peak, untilting multiplies round-off by large factors: entries at
        # the noise level are dropped there, and their possible true value (<= 1e4 eta) is
        # counted in the error bound instead
        ipk = int(np.argmax(Cw))
        drop = np.zeros(N, dtype=bool)
        if theta > 0:
            drop[:ipk] = Cw[:ipk] < 1e4 * eta
        ks = W0 + np.arange(N)
        log_fac = np.minimum(K0 - theta * h * ks, 600.0)  # untilting factor (log)
        with np.errstate(over="ignore", under="ignore"):
            fac = np.exp(np.maximum(log_fac, -700.0))
            P = Cw * fac
        P[drop] = 0.0
        P[P < 1e-290] = 0.0  # below any resolvable delta; avoids denormal arithmetic
        A, B = _suffix_sums(P, h)
        # error bound: sum_{k>j} eta_k fac_k (1 - e^{-(k-j)h}) with eta_k = eta, or 1e4 eta + eta
        # where dropped
        w_noise = eta * fac * np.where(drop, 1e4 + 1.0, 1.0)
        NA, NB = _suffix_sums(w_noise, h)
        noise = np.maximum(NA - NB, 0.0)
        top = (W0 + N) * h
        self.esc = math.exp(min(K0 - theta * top, 700.0)) * esc_hi if esc_hi > 0 else 0.0
        with np.errstate(over="ignore", under="ignore"):
            wrap = (esc_lo + esc_hi) * fac  # tilted mass that may have wrapped into the window
        self.const = d.p_inf + self.esc
        self.esc_lo = esc_lo if theta == 0 else 0.0  # (untilted) mass below the window
        self.P = P
        self.A, self.B, self.noise = A, B, noise
        self.grid = self.const + np.maximum(A - B, 0.0) + noise
        self.err = noise + wrap
        self.e0 = W0 * h  # eps of window index 0

    def _index(self, eps: float) -> int:
        return int(math.floor(eps / self.h + 1e-9)) - self.W0

    def _below(self):
        """(sum P, sum P e^-(s - e0)) over the window: delta below the window in closed form."""
        if not hasattr(self, "_below_sums"):
            s = self.e0 + self.h * np.arange(self.N)
            with np.errstate(under="ignore"):
                self._below_sums = (float(self.P.sum()), float(np.dot(self.P, np.exp(self.e0 - s))))
        return self._below_sums

    def delta_bounds(self, eps: float) -> tuple[float, float] | None:
        """``(upper, lower)`` bounds on delta(eps) from this snapshot, or None outside it.

        ``upper`` is the reported (pessimistic) value; the true delta of the discrete PLD is at
        least ``lower`` (round-off and wrapped mass removed).
        """
        j = self._index(eps)
        if j < 0 and self.theta == 0:
            # below the untilted window every atom exceeds eps; what lies below the window
            # (at most esc_lo) is added whole
            A, B = self._below()
            core = max(A - math.exp(eps - self.e0) * B, 0.0)
            up = self.const + self.esc_lo + self.noise[0] + core
            return min(up, 1.0), min(self.d.p_inf + max(core - self.err[0], 0.0), 1.0)
        if j < 0 or j >= self.N - 1:
            return None
        # within the cell: A_j - e^(eps - e_j) B_j (the bounds at e_j cover the whole cell)
        x = eps - (self.e0 + j * self.h)
        core = max(self.A[j] - math.exp(x) * self.B[j], 0.0)
        up = self.const + self.noise[j] + core
        return min(up, 1.0), min(self.d.p_inf + max(core - self.err[j], 0.0), 1.0)

    def epsilon_bounds(self, delta: float) -> tuple[float | None, float | None, float]:
        """``(eps_up, eps_low, want)``: eps where the upper / lower delta bound equals ``delta``.

        ``eps_up`` is the reported (pessimistic) answer; ``None`` when the answer is outside this
        snapshot, ``want`` is then where the next tilt should be centred.
        """
        h, N = self.h, self.N
        up_grid = self.grid[: N - 1]
        low_grid = self.d.p_inf + np.maximum(self.A - self.B - self.err, 0.0)[: N - 1]

        def solve(grid, offset):
            ok = np.nonzero(grid >= delta)[0]
            if ok.size == 0:
                return "below", None
            j = int(ok[-1])
            if j >= N - 2:
                return "above", self.e0 + j * h
            e_j = self.e0 + j * h
            num = offset[j] + self.A[j] - delta
            B = self.B[j]
            eps = e_j + h if (B <= 0 or num <= 0) else e_j + math.log(num / B)
            return "in", float(min(max(eps, e_j), e_j + h))

        where, eps_up = solve(up_grid, self.const + self.noise)
        if where == "below":
            if self.e0 <= 0.0:
                return 0.0, 0.0, 0.0
            if self.theta == 0:  # below the untilted window: solve in closed form
                A, B = self._below()
                num = self.const + self.esc_lo + self.noise[0] + A - delta
                eps = self.e0 + math.log(num / B) if (num > 0 and B > 0) else 0.0
                num_low = self.d.p_inf - self.err[0] + A - delta
                low = self.e0 + math.log(num_low / B) if (num_low > 0 and B > 0) else 0.0
                return float(min(max(eps, 0.0), self.e0)), float(min(max(low, 0.0), self.e0)), self.e0
            return None, None, self.e0
        if where == "above":
            return None, None, eps_up
        lw, eps_low = solve(low_grid, self.d.p_inf - self.err)
        if lw != "in":
            eps_low = 0.0 if lw == "below" and self.e0 <= 0.0 else -math.inf
        return eps_up, eps_low, eps_up


class _SingleStep:
    """Exact queries on one discrete PLD (a direction made of a single step): no FFT."""

    def __init__(self, pmf: _PMF):
        self.pmf = pmf
        m, ell = pmf.mass, pmf.loss
        self.ell = ell
        self.A = np.append(np.cumsum(m[::-1])[::-1][1:], 0.0)  # sum_{k>i} m_k
        shift = float(ell.max())
        S = np.cumsum((m * np.exp(shift - ell))[::-1])[::-1]  # sum_{k>=i} m_k e^{shift - l_k}
        with np.errstate(divide="ignore"):
            self.logS = np.log(np.append(S[1:], 0.0)) - shift  # log sum_{k>i} m_k e^{-l_k}
        self.logS_all = math.log(S[0]) - shift
        self.total = float(m.sum())
        with np.errstate(over="ignore"):
            self.at = pmf.p_inf + np.maximum(self.A - np.exp(self.logS + ell), 0.0)  # delta(l_i)

    def delta(self, eps: float) -> float:
        i = int(np.searchsorted(self.ell, eps, side="right")) - 1
        if i < 0:  # below every atom
            return float(min(self.pmf.p_inf + max(self.total - math.exp(eps + self.logS_all), 0.0), 1.0))
        return float(self.pmf.p_inf + max(self.A[i] - math.exp(eps + self.logS[i]), 0.0))

    def epsilon(self, delta: float) -> float:
        ok = np.nonzero(self.at >= delta)[0]
        if ok.size == 0:  # below the first atom
            num = self.pmf.p_inf + self.total - delta
            return float(min(max(math.log(num) - self.logS_all, 0.0), self.ell[0])) if num > 0 else 0.0
        i = int(ok[-1])
        if i >= self.ell.size - 1:
            return float(self.ell[-1])
        num = self.pmf.p_inf + self.A[i] - delta
        eps = self.ell[i + 1] if num <= 0 else math.log(num) - self.logS[i]
        return float(max(min(eps, self.ell[i + 1]), self.ell[i], 0.0))


# ----------------------------------------------------------------------------------------
# event parsing
# ----------------------------------------------------------------------------------------
class _Parsed:
    def __init__(self):
        self.specs: dict[_Spec, int] = {}
        self.non_private = False

    def add(self, spec: _Spec, count: int):
        if count > 0:
            self.specs[spec] = self.specs.get(spec, 0) + count


def _base_kind(ev: DpEvent):
    if isinstance(ev, GaussianEvent):
        return "gaussian", ev.noise_multiplier
    if isinstance(ev, LaplaceEvent):
        return "laplace", ev.noise_multiplier
    if isinstance(ev, (ComposedEvent, SelfComposedEvent)):
        # several Gaussian releases of one sample = one Gaussian (exact; see the helper)
        z = equivalent_gaussian_noise_multiplier(ev)
        return None if z is None else ("gaussian", z)
    return None


def _releases_nothing(ev: DpEvent) -> bool:
    """NoOp, or infinite noise (the output is independent of the data)."""
    if isinstance(ev, NoOpEvent):
        return True
    base = _base_kind(ev)
    return base is not None and math.isinf(base[1])


def _parse_sampled(event: DpEvent, q: float, sampling: str, count: int, relation: str, out: _Parsed) -> None:
    """A sampling event (rate ``q``, ``sampling`` in {"poisson", "wor"}) around a base mechanism."""
    inner = event.event
    if q == 0 or _releases_nothing(inner):
        return
    if isinstance(inner, NonPrivateEvent):
        out.non_private = True
        return
    base = _base_kind(inner)
    if base is None:
        raise ValueError(
            f"the PLD accountant supports {type(event).__name__} of a GaussianEvent or LaplaceEvent "
            f"(or compositions of Gaussians on the same sample) only, got {inner!r}"
        )
    kind, scale = base
    if scale == 0:
        out.non_private = True
    elif q >= 1.0:
        out.add(_Spec(kind, scale, "none", 1.0, relation), count)
    else:
        out.add(_Spec(kind, scale, sampling, q, relation), count)


def _parse(event: DpEvent, count: int, relation: str, out: _Parsed) -> None:
    if not isinstance(event, DpEvent):
        raise TypeError(f"expected a DpEvent, got {type(event).__name__}")
    if count == 0 or _releases_nothing(event):
        return
    if isinstance(event, NonPrivateEvent):
        out.non_private = True
        return
    if isinstance(event, UnsupportedEvent):
        raise ValueError(f"the PLD accountant cannot account {event!r}" + (f": {event.reason}" if event.reason else ""))
    if isinstance(event, SelfComposedEvent):
        _parse(event.event, count * event.count, relation, out)
        return
    if isinstance(event, ComposedEvent):
        for e in event.events:
            _parse(e, count, relation, out)
        return
    base = _base_kind(event)
    if base is not None:
        kind, scale = base
        if scale == 0:
            out.non_private = True
        else:
            out.add(_Spec(kind, scale, "none", 1.0, relation), count)
        return
    if isinstance(event, PoissonSampledEvent):
        _parse_sampled(event, event.sampling_probability, "poisson", count, relation, out)
        return
    if isinstance(event, SampledWithoutReplacementEvent):
        if relation != REPLACE_ONE:
            raise ValueError(
                "SampledWithoutReplacementEvent is stated under the replace-one relation; use "
                "PLDAccountant(neighboring_relation='replace_one')"
            )
        q = event.sample_size / event.source_dataset_size if event.sample_size else 0.0
        _parse_sampled(event, q, "wor", count, relation, out)
        return
    if isinstance(event, ShuffledEvent):
        if relation != REPLACE_ONE:
            raise ValueError(
                "ShuffledEvent is accounted under the replace-one relation; use "
                "PLDAccountant(neighboring_relation='replace_one')"
            )
        if event.steps == 0:
            return
        if event.steps_per_epoch == 0:
            raise ValueError("ShuffledEvent with steps_per_epoch=0 is malformed")
        epochs = -(-event.steps // event.steps_per_epoch)
        # one un-amplified event per (started) epoch: no amplification is claimed
        _parse(event.event, count * epochs, relation, out)
        return
    raise ValueError(f"the PLD accountant does not support {type(event).__name__}: {event!r}")


def _check_relation(event: DpEvent, relation: str) -> None:
    rel = neighbouring_relation(event)  # raises ValueError on a mix inside the event
    if rel == REPLACE_ONE and relation == ADD_OR_REMOVE_ONE:
        raise ValueError(
            "event is stated under the replace-one relation but this PLDAccountant uses "
            "add_or_remove_one; create PLDAccountant(neighboring_relation='replace_one')"
        )


# ----------------------------------------------------------------------------------------
# the accountant
# ----------------------------------------------------------------------------------------
def _check_count(count) -> int:
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
        raise ValueError(f"count must be a non-negative integer, got {count!r}")
    return int(count)


def _check_real(name, x) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number, got {x!r}")
    x = float(x)
    if math.isnan(x):
        raise ValueError(f"{name} must not be NaN")
    return x


class PLDAccountant(PrivacyAccountant):
    """Tight (epsilon, delta) by privacy loss distributions (see the module docstring).

    Args:
        neighboring_relation: ``"add_or_remove_one"`` (default) or ``"replace_one"``.
            ``SampledWithoutReplacementEvent`` and ``ShuffledEvent`` are stated under
            replace-one and need ``"replace_one"``; ``PoissonSampledEvent`` is accounted under
            either.  ``noise_multiplier`` is always relative to the clip norm (the add/remove
            sensitivity), so under replace-one an un-sampled mechanism has sensitivity 2.
        value_discretization_interval: grid spacing ``h`` of the privacy loss.  ``None``
            (default) picks it from the per-step loss variance ``v`` averaged over the steps,
            ``h = sqrt(12 * tol * v)`` rounded down to a power of ``2**(1/4)`` (so a slightly
            different count reuses the cached per-step PLDs).
        discretization_tolerance: ``tol`` above, the target relative pessimism of the
            discretisation.  ``None`` (default): ``1e-4``, relaxed towards ``1e-3`` only for
            very long heterogeneous compositions, to bound the FFT work.
        max_grid_size: largest FFT grid.  In auto mode a larger need coarsens ``h`` (the result
            stays an upper bound, slightly less tight); with a fixed ``h`` it raises ``ValueError``.

    ``compose`` only records ``(event, count)`` grouped by event (constant work, usable online
    during training); the PLD is built on the first ``get_epsilon`` / ``get_delta`` after a
    change and cached, together with the last composition, so repeated queries are cheap.
    Every answer is an upper bound: the true epsilon (delta) is never above the reported one.

    Example::

        acc = PLDAccountant()
        acc.compose(PoissonSampledEvent(256 / 60000, GaussianEvent(1.1)), 14062)
        acc.get_epsilon(1e-5)   # ~2.3818 (RDP: 2.60)
    """

    def __init__(
        self,
        neighboring_relation: str = ADD_OR_REMOVE_ONE,
        value_discretization_interval: float | None = None,
        *,
        discretization_tolerance: float | None = None,
        max_grid_size: int = _MAX_FFT,
    ):
        if neighboring_relation not in _RELATIONS:
            raise ValueError(f"neighboring_relation must be one of {_RELATIONS}, got {neighboring_relation!r}")
        if value_discretization_interval is not None:
            h = _check_real("value_discretization_interval", value_discretization_interval)
            if not (0 < h <= 1.0) or math.isinf(h):
                raise ValueError(f"value_discretization_interval must be in (0, 1], got {value_discretization_interval!r}")
        tol = None
        if discretization_tolerance is not None:
            tol = _check_real("discretization_tolerance", discretization_tolerance)
            if not 0 < tol < 0.1:
                raise ValueError(f"discretization_tolerance must be in (0, 0.1), got {discretization_tolerance!r}")
        self.neighboring_relation = neighboring_relation
        self.value_discretization_interval = value_discretization_interval
        self.discretization_tolerance = tol
        self.max_grid_size = int(max_grid_size)
        self._parsed = _Parsed()
        self._pmf_cache: dict[tuple, _PMF] = {}
        self._dirs: dict[str, _Direction] | None = None
        self._h: float | None = None
        self._coarsen = 0  # grid coarsenings forced by an over-large window (auto mode)

    # -- PrivacyAccountant ----------------------------------------------------------------
    def supports(self, event: DpEvent) -> bool:
        try:
            _check_relation(event, self.neighboring_relation)
            _parse(event, 1, self.neighboring_relation, _Parsed())
        except (ValueError, TypeError):
            return False
        return True

    def compose(self, event: DpEvent, count: int = 1) -> "PLDAccountant":
        count = _check_count(count)
        if not isinstance(event, DpEvent):
            raise TypeError(f"event must be a DpEvent, got {type(event).__name__}")
        _check_relation(event, self.neighboring_relation)
        staged = _Parsed()
        _parse(event, count, self.neighboring_relation, staged)  # validates before changing state
        total = sum(self._parsed.specs.values()) + sum(staged.specs.values())
        if total > MAX_STEPS:
            raise ValueError(
                f"PLDAccountant accepts at most {MAX_STEPS:.0e} composed steps; this composition would "
                f"hold {total}. Use RdpAccountant (no limit, slightly looser) for such long runs"
            )
        for spec, c in staged.specs.items():
            self._parsed.add(spec, c)
        self._parsed.non_private |= staged.non_private
        if staged.specs:
            self._dirs = None
            self._coarsen = 0
        return self

    def _with_coarsening(self, fun):
        """Run ``fun(dirs)``; in auto mode, coarsen the grid when a window would be too large."""
        for _ in range(60):
            dirs = self._build()
            try:
                return fun(dirs)
            except _GridTooFine as exc:
                if self.value_discretization_interval is not None:
                    raise ValueError(
                        f"the composed privacy loss needs a grid of {exc.n} points (more than "
                        f"max_grid_size={self.max_grid_size}); pass a larger "
                        "value_discretization_interval (or leave it None to choose one automatically)"
                    ) from None
                self._coarsen += max(1, math.ceil(math.log2(max(exc.n, 1) / self._max_fft())))
                self._dirs = None
        raise FloatingPointError("could not find a workable discretisation interval")  # pragma: no cover

    def get_epsilon(self, target_delta: float) -> float:
        delta = _check_real("target_delta", target_delta)
        if not 0.0 <= delta <= 1.0:
            raise ValueError(f"target_delta must be in [0, 1], got {target_delta!r}")
        if self._parsed.non_private:
            return 0.0 if delta >= 1.0 else math.inf
        if delta >= 1.0 or not self._parsed.specs:
            return 0.0
        return self._with_coarsening(lambda dirs: self._epsilon(dirs, delta))

    def _epsilon(self, dirs, delta: float) -> float:
        if delta == 0.0:  # pure DP: the largest finite loss, unless there is mass at +inf
            return max(d.s_max if d.p_inf == 0.0 else math.inf for d in dirs.values())
        floor = max(d.p_inf for d in dirs.values())
        if delta <= 1e3 * floor:
            raise ValueError(
                f"target_delta={delta:g} is below the resolution of this accountant (1000 x {floor:.3g}: "
                f"the per-step privacy loss is truncated where its curve drops below {_TAIL:g} and "
                "that mass is counted in delta); use a larger target_delta"
            )
        # a direction whose Chernoff bound is below an exact answer cannot be the maximum
        bounds = {name: d.chernoff_eps(delta) for name, d in dirs.items()}
        eps = 0.0
        for name in sorted(dirs, key=lambda n: -bounds[n][1]):
            theta, ub = bounds[name]
            if ub <= eps:
                continue
            eps = max(eps, dirs[name].epsilon(delta, theta, ub))
        return float(eps)

    def get_delta(self, target_epsilon: float) -> float:
        eps = _check_real("target_epsilon", target_epsilon)
        if eps < 0:
            raise ValueError(f"target_epsilon must be >= 0, got {target_epsilon!r}")
        if self._parsed.non_private:
            return 1.0
        if not self._parsed.specs:
            return 0.0
        return self._with_coarsening(lambda dirs: self._delta(dirs, eps))

    def _delta(self, dirs, eps: float) -> float:
        if math.isinf(eps):
            return max(d.p_inf for d in dirs.values())
        bounds = {name: d.chernoff_delta(eps) for name, d in dirs.items()}
        out = 0.0
        for name in sorted(dirs, key=lambda n: -bounds[n][1]):
            theta, ub = bounds[name]
            d = dirs[name]
            if ub <= out:
                continue
            if eps >= d.s_max:
                out = max(out, d.p_inf)
            elif ub <= 2.0 * d.p_inf or ub < 1e-190:
                out = max(out, ub)  # already at the resolution floor: the Chernoff bound is it
            else:
                out = max(out, d.delta(eps, theta, ub))
        return float(min(out, 1.0))

    # -- internals ------------------------------------------------------------------------
    def _directions(self) -> list[str]:
        if all(s.symmetric for s in self._parsed.specs):
            return ["remove"]
        return ["remove", "add"]

    def _auto_h(self) -> float:
        if self.value_discretization_interval is not None:
            return float(self.value_discretization_interval)
        tot_v = 0.0
        tot_n = 0
        for spec, c in self._parsed.specs.items():
            dirs = ["remove"] if spec.symmetric else ["remove", "add"]
            tot_v += c * min(spec.variance(d) for d in dirs)
            tot_n += c
        vbar = max(tot_v / tot_n, 1e-300)
        tol = self.discretization_tolerance
        h = math.sqrt(12.0 * (tol or _DEFAULT_TOL) * vbar)
        if tol is None:
            # very long compositions: relax towards _RELAXED_TOL to bound the FFT work
            h_budget = 30.0 * math.sqrt(tot_v) / self._work_grid()
            h = max(h, min(h_budget, math.sqrt(12.0 * _RELAXED_TOL * vbar)))
        h = min(h, 0.05)
        # an un-sampled Laplace loss has heavy atoms at the ends of its support, which the grid
        # can only round up: keep that rounding below 0.1% (sub-sampled ones are light, and
        # their spread already makes h small against the support)
        ends = [
            s.curve("remove").hi_support for s in self._parsed.specs if s.kind == "laplace" and s.sampling == "none"
        ]
        ends = [e for e in ends if 0 < e < math.inf]
        if ends:
            h = min(h, 1e-3 * min(ends))
        # quantise to a power of 2^(1/4) (rounding down: finer) so the cache survives small changes
        h = 2.0 ** (math.floor(4.0 * math.log2(h)) / 4.0)
        return max(h, 1e-9)

    def _max_fft(self) -> int:
        """Largest window: ``max_grid_size``, or twice the work budget in fully automatic mode."""
        if self.value_discretization_interval is None and self.discretization_tolerance is None:
            return min(self.max_grid_size, 2 * self._work_grid())
        return self.max_grid_size

    def _work_grid(self) -> int:
        """FFT size the automatic spacing aims at: ``_WORK`` points over all transforms."""
        n_ffts = sum(1 if s.symmetric else 2 for s in self._parsed.specs)
        return min(max(_WORK // max(n_ffts, 1), _WORK_GRID_MIN), _WORK_GRID_MAX)

    def _pmf(self, spec: _Spec, direction: str, h: float) -> _PMF:
        key = (spec, direction if not spec.symmetric else "sym", h)
        p = self._pmf_cache.get(key)
        if p is None:
            p = _discretise(spec.curve(direction), h)
            if len(self._pmf_cache) > 4096:
                self._pmf_cache.clear()
            self._pmf_cache[key] = p
        return p

    def _build(self) -> dict[str, "_Direction"]:
        if self._dirs is not None:
            return self._dirs
        h = self._auto_h() * 2.0**self._coarsen
        # in auto mode a window far beyond the work budget means the tilted loss is much wider
        # than the per-step variance suggested (rare large losses): coarsen instead
        max_fft = self._max_fft()
        for _ in range(40):
            try:
                dirs = {}
                for direction in self._directions():
                    groups = [(self._pmf(s, direction, h), c) for s, c in self._parsed.specs.items()]
                    dirs[direction] = _Direction(groups, h, max_fft)
                break
            except _GridTooFine:
                if self.value_discretization_interval is not None:
                    raise ValueError(
                        f"value_discretization_interval={h:g} needs more than {_MAX_STEP_POINTS} grid "
                        "points for one step; use a larger interval"
                    ) from None
                h *= 2.0
        self._h = h
        self._dirs = dirs
        return dirs

    @property
    def discretization_interval(self) -> float | None:
        """The grid spacing used by the last computation (``None`` before any)."""
        return self._h

    def __repr__(self) -> str:
        n = sum(self._parsed.specs.values())
        return (
            f"PLDAccountant(neighboring_relation={self.neighboring_relation!r}, "
            f"groups={len(self._parsed.specs)}, steps={n}, non_private={self._parsed.non_private})"
        )


# ----------------------------------------------------------------------------------------
# conveniences
# ----------------------------------------------------------------------------------------
def _dpsgd_accountant(q, noise_multiplier, steps, **kwargs) -> PLDAccountant:
    steps = _check_count(steps)
    acc = PLDAccountant(**kwargs)
    acc.compose(PoissonSampledEvent(q, GaussianEvent(noise_multiplier)), steps)
    return acc


def pld_epsilon(q: float, noise_multiplier: float, steps: int, delta: float, **kwargs) -> float:
    """Tight epsilon of ``steps`` steps of the Poisson-subsampled Gaussian (DP-SGD), add/remove.

    ``kwargs`` go to :class:`PLDAccountant`.  Example: ``pld_epsilon(256/60000, 1.1, 14062, 1e-5)``
    is about 2.38 (RDP gives 2.60).
    """
    return _dpsgd_accountant(q, noise_multiplier, steps, **kwargs).get_epsilon(delta)


def pld_delta(q: float, noise_multiplier: float, steps: int, epsilon: float, **kwargs) -> float:
    """Tight delta of ``steps`` steps of the Poisson-subsampled Gaussian at ``epsilon``."""
    return _dpsgd_accountant(q, noise_multiplier, steps, **kwargs).get_delta(epsilon)


def compute_pld_from_ledger(ledger, **kwargs) -> PLDAccountant:
    """A :class:`PLDAccountant` holding every sample of ``ledger`` (grouped, not replayed).

    The neighbouring relation defaults to the one the ledger's sampling events are stated under
    (replace-one for shuffled or without-replacement sampling, else add/remove).
    """
    event = ledger.to_event()
    if "neighboring_relation" not in kwargs:
        kwargs["neighboring_relation"] = neighbouring_relation(event) or ADD_OR_REMOVE_ONE
    acc = PLDAccountant(**kwargs)
    acc.compose(event)
    return acc
