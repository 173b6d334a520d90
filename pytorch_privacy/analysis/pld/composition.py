"""Composition of discretised PLDs: tilted FFT convolution powers, verified windows and the
(epsilon, delta) read-out with certified error terms.

Part of :mod:`pytorch_privacy.analysis.pld` (see the package docstring for the method).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import fft as _fft

from .constants import _ESCAPE, _FFT_WORKERS
from .discretisation import _GridTooFine, _PMF


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
