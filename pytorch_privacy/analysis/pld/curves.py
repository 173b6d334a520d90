"""Hockey-stick curves of dominating pairs per event (closed forms, log space), the per-step loss
variance used to choose the grid, and the hashable per-step specifications (:class:`_Spec`).

Part of :mod:`pytorch_privacy.analysis.pld` (see the package docstring for the method).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import special as _sp

from ...dp_query.events import ADD_OR_REMOVE_ONE
from .._numerics import log1mexp, log_expm1, logsubexp


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
            out[neg] = np.logaddexp(log1mexp(e), e + self.log_delta(-e))
        return out


class _GaussBase(_Base):
    def __init__(self, sigma: float, sensitivity: float):
        self.mu = sensitivity / sigma

    def log_delta(self, eps):
        eps = np.asarray(eps, dtype=float)
        mu = self.mu
        la = _sp.log_ndtr(mu / 2 - eps / mu)
        lb = eps + _sp.log_ndtr(-mu / 2 - eps / mu)
        return logsubexp(la, np.minimum(lb, la))


class _LaplaceBase(_Base):
    def __init__(self, scale: float, sensitivity: float):
        self.e0 = sensitivity / scale
        self.max_loss = self.e0

    def log_delta(self, eps):
        eps = np.asarray(eps, dtype=float)
        with np.errstate(divide="ignore"):
            return np.where(eps >= self.e0, -np.inf, log1mexp(np.minimum((eps - self.e0) / 2, 0.0)))


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
        out[rest] = log1mexp(np.minimum(eps[rest], 0.0))
    return out


def _add_log_delta(base: _Base, q: float, eps):
    """Curve of (B0, q B1 + (1-q) B0) at any real eps (0 beyond -log(1-q))."""
    eps = np.asarray(eps, dtype=float)
    out = np.full(eps.shape, -np.inf)
    l1q = math.log1p(-q)
    ok = eps + l1q < 0
    if ok.any():
        e = eps[ok]
        ls = log1mexp(e + l1q)  # log(1 - e^eps (1-q))
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
        return math.log(q) + np.logaddexp(log1mexp(lb) + d1, lb + d2)

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
            l3 = math.log1p(-q) + log_expm1(np.maximum(eps, 1e-300)) + _sp.log_ndtr(x / s)
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
            return (sens / scale) * (sens / scale)  # inf (not OverflowError) for a vanishing scale
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
