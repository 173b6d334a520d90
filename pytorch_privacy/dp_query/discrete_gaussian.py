r"""Exact samplers of the discrete Gaussian and the discrete Laplace, vectorised (int64).

Canonne, Kamath, Steinke 2020, "The Discrete Gaussian for Differential Privacy", Section 5:

* **Bernoulli(exp(-gamma))** (Algorithm 1): for :math:`\gamma\in[0,1]`, draw
  :math:`A_k\sim\mathrm{Bernoulli}(\gamma/k)` for :math:`k = 1, 2, \dots` until the first
  :math:`A_k = 0`, and return 1 iff that :math:`k` is odd.  A larger :math:`\gamma` is split into
  :math:`m = \lfloor\gamma\rfloor + 1` equal pieces :math:`\gamma/m \le 1` and the result is the
  AND of the pieces (:math:`e^{-\gamma} = (e^{-\gamma/m})^m`).
* **discrete Laplace** :math:`P(x) \propto e^{-|x|/b}`, :math:`b = t/s` rational (Algorithm 2):
  :math:`U` uniform on :math:`\{0..t-1\}`, kept with probability :math:`e^{-U/t}`; :math:`V` the
  number of successes of Bernoulli(:math:`e^{-1}`) before the first failure;
  :math:`Y = \lfloor (U + tV)/s \rfloor`; a random sign, rejecting "negative zero".
* **discrete Gaussian** :math:`P(x)\propto e^{-x^2/(2\sigma^2)}` (Algorithm 3): with
  :math:`t = \lfloor\sigma\rfloor + 1`, draw :math:`Y` from the discrete Laplace of scale
  :math:`t` and accept it with probability :math:`\exp(-(|Y| - \sigma^2/t)^2/(2\sigma^2))`.

**Exactness.**  Every Bernoulli draw compares a uniform :math:`U\in[0,1)` with a rational
probability :math:`p` exactly.  The fast path draws 53 random bits :math:`k` (so
:math:`U\in[k/2^{53}, (k+1)/2^{53})`) and compares that interval with a float64 value
:math:`\tilde p` and a rigorous bound on :math:`|\tilde p - p|`; only when the interval and
:math:`[\tilde p - \text{err}, \tilde p + \text{err}]` overlap (a probability of order
:math:`2^{-44}` per draw at typical values) is the comparison redone in exact rational arithmetic
(:class:`fractions.Fraction`), refining :math:`U` with further random bits until it is decided.
So the output distribution is exactly the discrete Gaussian for the given rational
:math:`\sigma^2`; a float ``sigma`` is taken as the exact rational it represents, and
:math:`\sigma^2` is its exact square.  The random bits come from the caller's
:class:`~.randomness.RandomSource` (secure mode: the OS CSPRNG), never from torch's global RNG.

Limits: :math:`2^{-20} \le \sigma^2 \le 2^{80}` (``sigma = 0`` gives zeros); a discrete Laplace
scale :math:`t/s` with :math:`t \le 2^{62}`.  A draw of magnitude beyond :math:`2^{20} t` (a
probability below :math:`e^{-10^6}`) raises ``RuntimeError`` rather than lose exactness.
Sampling runs on the CPU and returns a torch int64 tensor on ``device``.  The vectorised
arithmetic (masks, gathers, int64/float64 comparisons) is done in numpy on the random bits the
source draws: these are many small operations, for which torch's intra-op threads cost more than
they save (1e5 draws took 0.2-0.3 s this way, and 10-15 s with torch ops on a loaded 2-core
machine).
"""

from __future__ import annotations

import math
import numbers
import os
from fractions import Fraction
from typing import Callable, Sequence

import numpy as np
import torch

from .randomness import RandomSource, as_random_source

__all__ = ["sample_discrete_gaussian", "sample_discrete_laplace", "as_fraction"]

_TWO_M53 = 2.0**-53
_MIN_S2 = Fraction(1, 2**20)
_MAX_S2 = Fraction(2**80)
_MAX_T = 2**62

ExactFn = Callable[[np.ndarray], Sequence[Fraction]]


def as_fraction(name: str, value) -> Fraction:
    """``value`` (an int, a float or a :class:`fractions.Fraction`) as the exact rational it is;
    finite and >= 0, else ``ValueError`` / ``TypeError``."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Rational, float, torch.Tensor)):
        raise TypeError(f"{name} must be an int, a float or a fractions.Fraction, got {type(value).__name__}")
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    f = Fraction(value)
    if f < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return f


# -- random bits ---------------------------------------------------------------------------------
def _random_bits(src: RandomSource, n: int, bits: int) -> np.ndarray:
    """``n`` independent uniform integers in ``[0, 2^bits)`` (int64, CPU), ``1 <= bits <= 62``."""
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if src.secure_mode:
        raw = np.frombuffer(os.urandom(8 * n), dtype=np.uint64) >> np.uint64(64 - bits)
        return raw.astype(np.int64)
    g = src.torch_generator("cpu")
    # the range is a power of two, so torch's 64-bit draw reduced modulo it is exactly uniform
    return torch.randint(0, 2**bits, (n,), generator=g, device=g.device, dtype=torch.int64).cpu().numpy()


def _uniform_below(src: RandomSource, bound: int, n: int) -> np.ndarray:
    """``n`` uniform integers in ``{0, ..., bound - 1}`` (rejection from ``2^bits``; exact)."""
    if bound == 1:
        return np.zeros(n, dtype=np.int64)
    bits = (bound - 1).bit_length()
    out = np.empty(n, dtype=np.int64)
    todo = np.arange(n)
    while todo.size:
        r = _random_bits(src, todo.size, bits)
        ok = r < bound
        out[todo[ok]] = r[ok]
        todo = todo[~ok]
    return out


# -- Bernoulli draws ----------------------------------------------------------------------------
def _exact_compare(src: RandomSource, k: int, p: Fraction) -> bool:
    """``U < p`` for ``U`` uniform on ``[k 2^-53, (k+1) 2^-53)``, refined with fresh bits."""
    num, bits = k, 53
    while True:
        if Fraction(num + 1, 1 << bits) <= p:
            return True
        if Fraction(num, 1 << bits) >= p:
            return False
        num = (num << 62) | int(_random_bits(src, 1, 62)[0])
        bits += 62


def _bernoulli(src: RandomSource, p: np.ndarray, err: np.ndarray, exact: ExactFn) -> np.ndarray:
    """Bernoulli(``p_i``) per element, exactly: ``p`` (float64) is within ``err`` of the true
    probabilities, which ``exact(indices)`` returns as Fractions for the rare undecided draws."""
    k = _random_bits(src, p.size, 53)
    kf = k.astype(np.float64)
    one = (kf + 1.0) * _TWO_M53 <= p - err
    zero = kf * _TWO_M53 >= p + err
    und = ~(one | zero)
    if und.any():
        idx = np.flatnonzero(und)
        for i, pi in zip(idx.tolist(), exact(idx)):
            one[i] = _exact_compare(src, int(k[i]), pi)
    return one


def _sub(exact: ExactFn, idx: np.ndarray, div: np.ndarray | None = None) -> ExactFn:
    """``exact`` restricted to ``idx`` (and divided elementwise by the integers ``div[idx]``)."""

    def fn(j: np.ndarray) -> list[Fraction]:
        sel = idx[j]
        vals = exact(sel)
        if div is None:
            return list(vals)
        return [v / int(d) for v, d in zip(vals, div[sel].tolist())]

    return fn


def _bernoulli_exp_neg_unit(src: RandomSource, g: np.ndarray, err: np.ndarray, exact: ExactFn) -> np.ndarray:
    """Bernoulli(``exp(-gamma_i)``) for ``gamma_i`` in [0, 1] (Canonne et al. Algorithm 1)."""
    n = g.size
    k = np.ones(n, dtype=np.int64)
    result = np.zeros(n, dtype=bool)
    active = np.arange(n)
    while active.size:
        kf = k[active].astype(np.float64)
        p = g[active] / kf
        perr = err[active] / kf + 2.0**-50 * p + 2.0**-70
        a = _bernoulli(src, p, perr, _sub(exact, active, k))
        stop = active[~a]
        result[stop] = (k[stop] % 2) == 1
        active = active[a]
        k[active] += 1
    return result


def _bernoulli_exp_neg(src: RandomSource, g: np.ndarray, err: np.ndarray, exact: ExactFn) -> np.ndarray:
    """Bernoulli(``exp(-gamma_i)``) for any ``gamma_i >= 0``: the AND of ``m_i`` draws of
    Bernoulli(``exp(-gamma_i / m_i)``), ``m_i = floor(gamma~_i + err_i) + 1 > gamma_i``."""
    n = g.size
    m = np.floor(g + err).astype(np.int64) + 1
    mf = m.astype(np.float64)
    piece, perr = g / mf, err / mf + 2.0**-50 * (g / mf)
    alive = np.ones(n, dtype=bool)
    done = np.zeros(n, dtype=np.int64)
    while True:
        act = np.flatnonzero(alive & (done < m))
        if not act.size:
            return alive
        b = _bernoulli_exp_neg_unit(src, piece[act], perr[act], _sub(exact, act, m))
        alive[act[~b]] = False
        done[act] += 1


def _bernoulli_exp_minus_one(src: RandomSource, n: int) -> np.ndarray:
    g = np.ones(n, dtype=np.float64)
    return _bernoulli_exp_neg_unit(src, g, np.zeros(n, dtype=np.float64), lambda j: [Fraction(1)] * len(j))


# -- discrete Laplace ---------------------------------------------------------------------------
def _dlap(src: RandomSource, t: int, s: int, n: int) -> np.ndarray:
    """``n`` draws of the discrete Laplace of scale ``t/s`` (Canonne et al. Algorithm 2)."""
    out = np.empty(n, dtype=np.int64)
    pending = np.arange(n)
    tf = float(t)
    while pending.size:
        c = pending.size
        u = _uniform_below(src, t, c)
        g = u.astype(np.float64) / tf
        keep = _bernoulli_exp_neg_unit(src, g, 2.0**-50 * g, lambda j, u=u: [Fraction(int(x), t) for x in u[j].tolist()])
        u = u[keep]
        v = np.zeros(u.size, dtype=np.int64)
        live = np.arange(u.size)
        while live.size:
            a = _bernoulli_exp_minus_one(src, live.size)
            live = live[a]
            v[live] += 1
        if u.size and int(v.max()) > (_MAX_T - t) // t:
            raise RuntimeError("discrete Laplace draw beyond 2^62 (probability below e^-1e6); draw again")
        x = u + t * v
        y = x // s if s <= _MAX_T else np.zeros_like(x)
        neg = _random_bits(src, y.size, 1) == 1
        ok = ~(neg & (y == 0))
        y = np.where(neg, -y, y)[ok]
        take = min(y.size, pending.size)
        out[pending[:take]] = y[:take]
        pending = pending[take:]
    return out


def _shape(shape) -> tuple[int, ...]:
    if isinstance(shape, int):
        shape = (shape,)
    shape = tuple(int(d) for d in shape)
    if any(d < 0 for d in shape):
        raise ValueError(f"shape must have non-negative sizes, got {shape}")
    return shape


def sample_discrete_laplace(
    scale, shape, generator: "torch.Generator | RandomSource | None" = None, *, secure_mode: bool = False, device="cpu"
) -> np.ndarray:
    """Exact draws of the discrete Laplace distribution ``P(x) = (1 - r)/(1 + r) * r^|x|``,
    ``r = exp(-1/scale)``, as an int64 tensor of ``shape`` (Canonne et al. 2020, Algorithm 2).

    ``scale`` > 0 is an int, float (its exact rational value) or :class:`fractions.Fraction`
    whose numerator is at most ``2^62``.  ``generator``: a ``torch.Generator`` or
    :class:`~.randomness.RandomSource` (default: a fresh OS-seeded source; never torch's global RNG).
    """
    b = as_fraction("scale", scale)
    if b == 0:
        raise ValueError("scale must be > 0 (the discrete Laplace of scale 0 is the point mass at 0)")
    if b.numerator > _MAX_T:
        raise ValueError(f"scale must have a numerator of at most 2^62 (scale < ~4.6e18), got {scale!r}")
    src = as_random_source(generator, secure_mode=secure_mode)
    shape = _shape(shape)
    y = _dlap(src, b.numerator, b.denominator, math.prod(shape))
    return torch.from_numpy(y).reshape(shape).to(device)


def _acceptance_gamma(ay: np.ndarray, s2f: float, cf: float) -> tuple[np.ndarray, np.ndarray]:
    """float64 ``gamma = (|y| - c)^2 / (2 sigma^2)`` (``c = sigma^2 / t``) and a bound on its error.

    From the float inputs ``s2f = fl(sigma^2)``, ``cf = fl(sigma^2 / t)`` (relative errors
    below ``2^-53``) and ``B = |y| + c``: the subtraction, square and division leave an absolute
    error below ``~5.5 * 2^-53 * B^2 / sigma^2``; the bound used, ``2^-44 (1 + B^2 / sigma^2)``,
    is over 90 times that (``tests/dp_query/test_discrete_gaussian.py`` checks it against exact
    rationals, cancellation cases included).
    """
    ayf = ay.astype(np.float64)
    a = ayf - cf
    g = a * a / (2.0 * s2f)
    big = ayf + cf
    return g, 2.0**-44 * (1.0 + big * big / s2f)


def _dgauss(src: RandomSource, sigma2: Fraction, n: int) -> np.ndarray:
    t = math.isqrt(sigma2.numerator // sigma2.denominator) + 1
    c = sigma2 / t
    s2f, cf = float(sigma2), float(c)
    out = np.empty(n, dtype=np.int64)
    pending = np.arange(n)
    while pending.size:
        draw = max(16, int(1.5 * pending.size))
        y = _dlap(src, t, 1, draw)
        ay = np.abs(y)
        if int(ay.max()) > (2**20) * t:
            raise RuntimeError("discrete Laplace draw beyond 2^20 times its scale (probability below e^-1e6)")
        g, err = _acceptance_gamma(ay, s2f, cf)

        def exact(j, ay=ay):
            return [(Fraction(int(v)) - c) ** 2 / (2 * sigma2) for v in ay[j].tolist()]

        acc = y[_bernoulli_exp_neg(src, g, err, exact)]
        take = min(acc.size, pending.size)
        out[pending[:take]] = acc[:take]
        pending = pending[take:]
    return out


def sample_discrete_gaussian(
    sigma,
    shape,
    generator: "torch.Generator | RandomSource | None" = None,
    *,
    sigma_squared=None,
    secure_mode: bool = False,
    device="cpu",
) -> np.ndarray:
    """Exact draws of the discrete Gaussian ``N_Z(0, sigma^2)``:
    ``P(x) = exp(-x^2 / (2 sigma^2)) / sum_y exp(-y^2 / (2 sigma^2))`` over the integers, as an
    int64 tensor of ``shape`` (Canonne, Kamath, Steinke 2020, Algorithm 3).

    Args:
        sigma: the scale (an int, float or Fraction, taken exactly; ``sigma^2`` is its exact
            square), or ``None`` with ``sigma_squared``.  ``0`` gives zeros.  Its variance is
            slightly below ``sigma^2`` (equal up to ``~1e-8`` relative from ``sigma = 1`` on).
        shape: the output shape.
        generator: a ``torch.Generator`` or :class:`~.randomness.RandomSource`; default a fresh
            OS-seeded source (never torch's global RNG).
        sigma_squared: the exact rational ``sigma^2`` instead of ``sigma`` (e.g. ``Fraction(1, 3)``).
        secure_mode: draw from the OS CSPRNG (when ``generator`` is ``None``).
        device: where the result goes (sampling runs on the CPU).
    """
    if (sigma is None) == (sigma_squared is None):
        raise ValueError("give exactly one of sigma and sigma_squared")
    s2 = as_fraction("sigma_squared", sigma_squared) if sigma is None else as_fraction("sigma", sigma) ** 2
    shape = _shape(shape)
    if s2 == 0:
        return torch.zeros(shape, dtype=torch.int64, device=device)
    if not _MIN_S2 <= s2 <= _MAX_S2:
        raise ValueError(
            f"sigma^2 must be 0 or in [2^-20, 2^80] (sigma between ~0.001 and ~1.1e12), got {float(s2):.6g}; "
            "below, the distribution is the point mass at 0 up to e^-500000"
        )
    src = as_random_source(generator, secure_mode=secure_mode)
    return torch.from_numpy(_dgauss(src, s2, math.prod(shape))).reshape(shape).to(device)
