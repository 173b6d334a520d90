"""Argument validation shared by the analysis modules: one definition of each check.

Every check raises ``ValueError`` (``TypeError`` for :func:`check_real` and :func:`check_count`
given a non-number) with a message naming the argument, what it got and what it needs.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from .orders import DEFAULT_ORDERS

__all__ = [
    "check_q",
    "check_sigma",
    "check_steps",
    "check_orders",
    "check_delta",
    "check_eps",
    "check_count",
    "check_real",
]


def check_q(q) -> float:
    """A sampling probability in [0, 1]."""
    if isinstance(q, bool) or not isinstance(q, numbers.Real):
        raise ValueError(f"q (sampling probability) must be a real number in [0, 1], got {q!r}")
    q = float(q)
    if not 0.0 <= q <= 1.0:  # also rejects NaN
        raise ValueError(f"q (sampling probability) must be in [0, 1], got {q!r}")
    return q


def check_sigma(sigma) -> float:
    """A noise multiplier >= 0 (``inf`` allowed)."""
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real):
        raise ValueError(f"noise_multiplier must be a real number >= 0, got {sigma!r}")
    sigma = float(sigma)
    if not sigma >= 0.0:  # rejects negatives and NaN
        raise ValueError(f"noise_multiplier must be >= 0, got {sigma!r}")
    return sigma


def check_steps(steps) -> int:
    """A non-negative integer number of steps (an integral float is accepted)."""
    if isinstance(steps, bool):
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
    if isinstance(steps, numbers.Integral):
        steps = int(steps)
    elif isinstance(steps, numbers.Real) and float(steps).is_integer():
        steps = int(steps)
    else:
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
    if steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
    return steps


def check_orders(orders) -> np.ndarray:
    """Orders as a float array (``None``: :data:`DEFAULT_ORDERS`); each > 1, ``inf`` allowed."""
    if orders is None:
        return np.asarray(DEFAULT_ORDERS, dtype=float)
    try:
        arr = np.asarray(orders, dtype=float)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"orders must be real numbers > 1, got {orders!r}") from exc
    if arr.ndim > 1:
        raise ValueError(f"orders must be a scalar or a 1-D sequence, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError("orders must not be empty")
    if not np.all(arr > 1.0):  # also rejects NaN
        bad = arr[~(arr > 1.0)]
        raise ValueError(
            f"RDP orders must be > 1 (order 1 is KL, <= 1 is not used here; inf is allowed); got {bad.tolist()}"
        )
    return arr


def check_delta(delta, name: str = "target_delta") -> float:
    """A delta in the open interval (0, 1)."""
    if isinstance(delta, bool) or not isinstance(delta, numbers.Real) or not 0.0 < float(delta) < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {delta!r}")
    return float(delta)


def check_eps(eps, name: str = "target_eps") -> float:
    """An epsilon >= 0 (``inf`` allowed: it gives delta = 0)."""
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not 0.0 <= float(eps):
        raise ValueError(f"{name} must be a number >= 0 (inf allowed), got {eps!r}")
    return float(eps)


def check_count(count, name: str = "count") -> int:
    """A non-negative integer count (no floats, no bools)."""
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {count!r}")
    return int(count)


def check_real(name: str, x) -> float:
    """A real number that is not NaN (``TypeError`` for non-numbers)."""
    if isinstance(x, bool) or not isinstance(x, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number, got {x!r}")
    x = float(x)
    if math.isnan(x):
        raise ValueError(f"{name} must not be NaN")
    return x
