"""Small log-space helpers shared by the analysis modules (numpy only)."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["log_expm1", "log1mexp", "logsubexp"]


def log_expm1(y) -> np.ndarray:
    """log(exp(y) - 1) for y > 0, stable for all magnitudes (``inf`` at ``inf``, ``-inf`` at 0)."""
    y = np.asarray(y, dtype=float)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        big = y > 1.0
        return np.where(big, y + np.log1p(-np.exp(-np.where(big, y, 1.0))), np.log(np.expm1(np.where(big, 1.0, y))))


def log1mexp(x) -> np.ndarray:
    """log(1 - exp(x)) for x <= 0, accurate everywhere (Maechler 2012); ``-inf`` for x >= 0."""
    x = np.asarray(x, dtype=float)
    out = np.full(x.shape, -np.inf)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        a = x > -math.log(2.0)
        out[a] = np.log(-np.expm1(x[a]))
        b = ~a
        out[b] = np.log1p(-np.exp(x[b]))
    out[x >= 0] = -np.inf
    return out


def logsubexp(a, b) -> np.ndarray:
    """log(exp(a) - exp(b)) for a >= b (elementwise); -inf where equal."""
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    with np.errstate(invalid="ignore"):
        d = np.where(np.isneginf(a), -np.inf, b - a)
    out = a + log1mexp(np.minimum(d, 0.0))
    return np.where(np.isneginf(a), -np.inf, out)
