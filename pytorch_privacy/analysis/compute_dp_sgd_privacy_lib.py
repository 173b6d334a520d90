r"""Privacy of a DP-SGD training run (the library half; the script is
:mod:`pytorch_privacy.analysis.compute_dp_sgd_privacy`).

Assumptions: every step samples each of the ``N`` records independently with probability
``q = batch_size / N`` (**Poisson sampling**), neighbouring datasets differ by adding or removing
one record, and the run has ``steps = ceil(epochs * N / batch_size)`` steps.  The epsilon uses the
exact RDP of the subsampled Gaussian (Mironov, Talwar, Zhang 2019) and the tight RDP-to-DP
conversion (Balle et al. 2020; Canonne, Kamath, Steinke 2020) with the order optimised
continuously; :func:`classic_epsilon` gives the moments-accountant figure (Abadi et al. 2016).
:mod:`.calibration` uses the same plan checks and accounting.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Sequence

import numpy as np

from ._checks import check_delta, check_sigma
from .conversion import get_privacy_spent, refine_epsilon
from .moments import DEFAULT_LAMBDAS, compute_log_moments, get_privacy_spent_moments
from .orders import DEFAULT_ORDERS
from .rdp import compute_rdp

__all__ = ["compute_dp_sgd_privacy", "check_plan", "epsilon_for", "warn_large_delta", "classic_epsilon"]


def check_plan(n, batch_size, epochs, delta, steps=None) -> tuple[float, int, float]:
    """Validate a training plan; returns ``(q, steps, delta)``."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n <= 0:
        raise ValueError(f"n (dataset size N) must be a positive integer, got {n!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if batch_size > n:
        raise ValueError(f"batch_size ({batch_size}) must not exceed n ({n})")
    if (epochs is None) == (steps is None):
        raise ValueError("give exactly one of epochs and steps")
    if steps is not None:
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
            raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
        t = int(steps)
    else:
        if isinstance(epochs, bool) or not isinstance(epochs, numbers.Real) or not 0 <= float(epochs) < math.inf:
            raise ValueError(f"epochs must be a finite number >= 0, got {epochs!r}")
        t = int(math.ceil(float(epochs) * n / batch_size))
    return batch_size / n, t, check_delta(delta)


def warn_large_delta(n: int, delta: float, stacklevel: int = 3) -> None:
    """Warn when ``delta >= 1/n``: such a delta allows releasing one record outright."""
    if delta >= 1.0 / n:
        warnings.warn(
            f"delta = {delta:g} is not below 1/N = {1.0 / n:.3g}: a mechanism that publishes one random "
            "record in the clear meets it. Choose delta well below 1/N (e.g. 1/N^1.1)",
            UserWarning,
            stacklevel=stacklevel,
        )


def epsilon_for(q: float, sigma: float, steps: int, delta: float, orders=None, refine: bool = True):
    orders = DEFAULT_ORDERS if orders is None else orders

    def rdp_at(o):
        return compute_rdp(q, sigma, steps, o)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        if refine:
            return refine_epsilon(rdp_at, orders, delta)
        eps, _, order = get_privacy_spent(orders, rdp_at(np.asarray(orders, dtype=float)), target_delta=delta)
        return eps, order


def compute_dp_sgd_privacy(
    n: int,
    batch_size: int,
    noise_multiplier: float,
    epochs: float,
    delta: float,
    *,
    orders: Sequence[float] | None = None,
    refine: bool = True,
) -> tuple[float, float]:
    """Epsilon of DP-SGD with Poisson sampling ``q = batch_size / n`` for ``epochs`` epochs.

    Returns ``(eps, opt_order)``.  Warns (``UserWarning``) when ``delta >= 1/n``.  ``refine=False`` keeps to the grid ``orders`` (default
    :data:`.rdp.DEFAULT_ORDERS`) instead of optimising the order continuously around it.
    ``eps`` is ``inf`` (with a warning) when ``noise_multiplier`` is 0.
    """
    q, steps, delta = check_plan(n, batch_size, epochs, delta)
    sigma = check_sigma(noise_multiplier)
    warn_large_delta(n, delta)
    if sigma == 0.0 and steps > 0:
        warnings.warn("infinite privacy loss: noise_multiplier is 0 (no noise)", RuntimeWarning, stacklevel=2)
        return math.inf, float((DEFAULT_ORDERS if orders is None else orders)[0])
    eps, order = epsilon_for(q, sigma, steps, delta, orders, refine)
    return float(eps), float(order)


def classic_epsilon(q: float, sigma: float, steps: int, delta: float) -> tuple[float, float]:
    lam = np.asarray(DEFAULT_LAMBDAS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        eps, _, opt_lambda = get_privacy_spent_moments(
            lam, compute_log_moments(q, sigma, steps, lam), target_delta=delta
        )
    return eps, opt_lambda
