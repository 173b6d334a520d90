r"""Optimised banded Toeplitz strategies for Toeplitz workloads (numpy/scipy only).

For a lower-triangular Toeplitz workload ``A`` (coefficients ``a``) and a ``b``-banded Toeplitz
strategy ``C`` (coefficients ``c``), ``B = A C^{-1}`` is lower-triangular Toeplitz with coefficients
``e = a * d`` where ``d = c^{-1}`` (power-series inverse), i.e. ``e`` is the impulse response of the
filter ``a(x) / c(x)``.  The error of the mechanism ``B (C G + Z)`` with the noise scaled to the
sensitivity is, up to ``sigma^2`` and the participation factor (``sens^2 = k ||c||^2`` whenever
``b <= min_separation``: banded columns do not interact),

.. math::

    \text{total}: \ \|c\|^2 \|B\|_F^2 = \|c\|^2 \sum_{t<n} (n - t)\, e_t^2, \qquad
    \text{max}: \ \|c\|^2 \max_t \|B_{t,:}\|^2 = \|c\|^2 \sum_{t<n} e_t^2

(Choquette-Choo et al. 2023, "(Amplified) Banded Matrix Factorization", Sec. 5; Kalinin and
Lampert 2024, "Banded Square Root Matrix Factorization").  Both are scale invariant in ``c``, so
``c_0 = 1`` is fixed and the other ``b - 1`` coefficients are optimised by L-BFGS with the exact
gradient: ``de/dc_j = -(e * d)`` shifted by ``j``.  The result is normalised to ``||c|| = 1``
(column norm 1: ``sigma`` is then DP-SGD's noise multiplier for one participation).

The optimisation is cached under the user cache directory (``$PYTORCH_PRIVACY_CACHE_DIR``, else
``$XDG_CACHE_HOME/pytorch_privacy``, else ``~/.cache/pytorch_privacy``), keyed by
``(n, bands, workload, momentum, objective)``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import optimize, signal

from .matrix_factorization import BandedToeplitzStrategy

__all__ = [
    "optimize_banded_toeplitz",
    "banded_toeplitz_loss",
    "sqrt_prefix_sum_coefficients",
    "workload_filter",
    "cache_dir",
    "OBJECTIVES",
    "WORKLOADS",
]

#: ``"total"``: sum of squared errors of all ``n`` prefix sums; ``"max"``: the largest one.
OBJECTIVES = ("total", "max")
#: Toeplitz workloads: prefix sums, and prefix sums of heavy-ball momentum.
WORKLOADS = ("prefix", "momentum")
_CACHE_VERSION = 1


def workload_filter(workload: str = "prefix", momentum: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """``(numerator, denominator)`` of the workload as a filter: ``a(x) = num(x) / den(x)``:
    prefix sums ``1 / (1 - x)``, momentum ``1 / ((1 - x)(1 - momentum x))``."""
    if workload == "prefix":
        return np.array([1.0]), np.array([1.0, -1.0])
    if workload == "momentum":
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
            raise ValueError(f"momentum must be a number in [0, 1), got {momentum!r}")
        return np.array([1.0]), np.convolve([1.0, -1.0], [1.0, -float(momentum)])
    raise ValueError(f"workload must be one of {WORKLOADS}, got {workload!r}")


def _weights(n: int, objective: str) -> np.ndarray:
    if objective == "total":
        return (n - np.arange(n)).astype(float)
    if objective == "max":
        return np.ones(n)
    raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")


def _impulse(num: np.ndarray, den: np.ndarray, n: int) -> np.ndarray:
    x = np.zeros(n)
    x[0] = 1.0
    return signal.lfilter(num, den, x)


def banded_toeplitz_loss(
    coefficients, n: int, *, workload: str = "prefix", momentum: float = 0.0, objective: str = "total"
) -> tuple[float, np.ndarray]:
    """``(loss, gradient)`` of the scale-invariant error above for strategy coefficients ``c``
    (``c_0 != 0``) over ``n`` steps.  The loss equals ``max_j ||C e_j||^2 * ||A C^{-1}||_F^2`` (total)
    or ``max_j ||C e_j||^2 * max_t ||(A C^{-1})_t||^2`` (max) for the dense matrices."""
    c = np.asarray(coefficients, dtype=float)
    num, den = workload_filter(workload, momentum)
    w = _weights(n, objective)
    e = _impulse(num, np.convolve(den, c), n)
    d = _impulse([1.0], c, n)
    h = np.convolve(e, d)[:n]  # de_t / dc_j = -h_{t-j}
    l0 = float(np.sum(w * e * e))
    norm2 = float(np.dot(c, c))
    we = w * e
    g0 = np.array([-2.0 * float(np.dot(we[j:], h[: n - j])) for j in range(min(c.size, n))] + [0.0] * max(0, c.size - n))
    return norm2 * l0, 2.0 * c * l0 + norm2 * g0


def sqrt_prefix_sum_coefficients(n: int) -> np.ndarray:
    """The coefficients of ``A^{1/2}`` for prefix sums, ``binom(2k, k) / 4^k`` (Fichtenberger,
    Henzinger, Upadhyay 2023): the square-root factorisation ``A = C C``, a strong baseline."""
    k = np.arange(1, n)
    return np.concatenate([[1.0], np.cumprod((2 * k - 1) / (2 * k))])


def cache_dir() -> Path:
    """Where optimised strategies are cached (see the module docstring)."""
    env = os.environ.get("PYTORCH_PRIVACY_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "pytorch_privacy"


def _cache_path(n: int, bands: int, workload: str, momentum: float, objective: str) -> Path:
    tag = f"{workload}" + (f"{momentum:.6g}" if workload == "momentum" else "")
    return cache_dir() / "matrix_factorization" / f"banded_n{n}_b{bands}_{tag}_{objective}.json"


def _read_cache(path: Path, key: dict) -> np.ndarray | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("key") != key or data.get("version") != _CACHE_VERSION:
        return None
    coef = data.get("coefficients")
    if not isinstance(coef, list) or len(coef) != key["bands"]:
        return None
    arr = np.asarray(coef, dtype=float)
    return arr if np.all(np.isfinite(arr)) and arr[0] != 0 else None


def _write_cache(path: Path, key: dict, coef: np.ndarray, loss: float) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({"version": _CACHE_VERSION, "key": key, "coefficients": coef.tolist(), "loss": loss}, f)
        os.replace(tmp, path)
    except OSError as exc:  # a read-only home must not break training
        print(f"pytorch_privacy: could not cache the strategy at {path}: {exc}", file=sys.stderr)


def _check_int(name: str, v, lo: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    return int(v)


def optimize_banded_toeplitz(
    n: int,
    bands: int,
    *,
    workload: str = "prefix",
    momentum: float = 0.0,
    objective: str = "total",
    cache: bool = True,
    progress: bool = True,
    max_iter: int = 2000,
) -> BandedToeplitzStrategy:
    """A ``bands``-banded Toeplitz strategy minimising the ``objective`` error of ``workload`` over
    ``n`` steps, normalised to column norm 1.

    Args:
        n: number of steps (the workload size), >= 1.
        bands: number of bands ``b`` in ``[1, n]`` (1 is DP-SGD).  Train with a minimum separation of
            at least ``b`` (e.g. at most as many bands as steps per epoch) to keep the exact banded
            sensitivity.
        workload: ``"prefix"`` (SGD) or ``"momentum"`` (with ``momentum`` in ``[0, 1)``).
        objective: ``"total"`` (sum of the squared errors of all prefix sums) or ``"max"``.
        cache: read and write the result under :func:`cache_dir` (the optimisation of ``n`` in the
            thousands takes seconds to minutes).
        progress: print a line to stderr when an optimisation starts and ends.
        max_iter: L-BFGS iterations.

    Starts from the truncated square-root factorisation (:func:`sqrt_prefix_sum_coefficients`).
    """
    n = _check_int("n", n)
    bands = _check_int("bands", bands)
    if bands > n:
        raise ValueError(f"bands ({bands}) cannot exceed n ({n})")
    workload_filter(workload, momentum)  # validates both
    _weights(1, objective)
    key = {"n": n, "bands": bands, "workload": workload, "momentum": float(momentum) if workload == "momentum" else 0.0,
           "objective": objective}
    path = _cache_path(n, bands, workload, momentum, objective)
    if cache:
        coef = _read_cache(path, key)
        if coef is not None:
            return BandedToeplitzStrategy(coef / np.linalg.norm(coef))
    if bands == 1:
        coef, loss = np.array([1.0]), banded_toeplitz_loss([1.0], n, workload=workload, momentum=momentum, objective=objective)[0]
    else:
        coef, loss = _lbfgs(n, bands, workload, momentum, objective, max_iter, progress)
    if cache:
        _write_cache(path, key, coef, loss)
    return BandedToeplitzStrategy(coef / np.linalg.norm(coef))


def _lbfgs(n: int, bands: int, workload: str, momentum: float, objective: str, max_iter: int, progress: bool):
    start = time.perf_counter()
    if progress:
        print(f"pytorch_privacy: optimising a {bands}-banded Toeplitz strategy for n={n} ({workload}, {objective} error)...",
              file=sys.stderr, flush=True)
    init = sqrt_prefix_sum_coefficients(bands)

    def fun(x):
        c = np.concatenate([[1.0], x])
        loss, grad = banded_toeplitz_loss(c, n, workload=workload, momentum=momentum, objective=objective)
        if not math.isfinite(loss):
            return 1e300, np.zeros_like(x)
        return loss, grad[1:]

    best = optimize.minimize(fun, init[1:], jac=True, method="L-BFGS-B", options={"maxiter": max_iter})
    coef = np.concatenate([[1.0], best.x])
    if progress:
        print(f"pytorch_privacy: done in {time.perf_counter() - start:.1f} s (loss {best.fun:.6g})", file=sys.stderr, flush=True)
    return coef, float(best.fun)
