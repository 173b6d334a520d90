"""Pessimistic "connect the dots" discretisation of a hockey-stick curve into a PMF on a loss grid
(Doroshenko, Ghazi, Kamath, Kumar, Manurangsi 2022).

Part of :mod:`pytorch_privacy.analysis.pld` (see the package docstring for the method).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .constants import _KAPPA, _LOG_CORE, _LOG_TAIL, _LOG_TAIL_MAX, _MAX_LOSS, _MAX_STEP_POINTS
from .curves import _Curve


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
