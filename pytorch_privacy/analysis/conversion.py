r"""From an RDP curve to an :math:`(\varepsilon, \delta)` guarantee (the tight conversion).

A mechanism that is :math:`(\alpha, r)`-RDP is :math:`(\varepsilon, \delta)`-DP with

.. math::

    \varepsilon = r + \log\!\Big(1 - \frac1\alpha\Big) - \frac{\log\delta + \log\alpha}{\alpha - 1}
    \qquad\Longleftrightarrow\qquad
    \log\delta = (\alpha - 1)\Big(r - \varepsilon + \log\!\Big(1 - \frac1\alpha\Big)\Big) - \log\alpha,

(Balle, Barthe, Gaboardi, Hsu, Sato 2020, "Hypothesis Testing Interpretations and Rényi
Differential Privacy", Theorem 21; Canonne, Kamath, Steinke 2020, "The Discrete Gaussian for
Differential Privacy", Proposition 12).  This is tighter than Mironov's classic
:math:`\varepsilon = r + \log(1/\delta)/(\alpha-1)` (the moments-accountant bound, see
:mod:`.moments`).  In addition, since :math:`D_\alpha` is non-decreasing in :math:`\alpha`,
:math:`r(\alpha) \ge` KL, and :math:`\delta(0) = \mathrm{TV} \le \sqrt{1 - e^{-\mathrm{KL}}}`
(Bretagnolle-Huber), every order also certifies :math:`\delta \le \sqrt{1 - e^{-r}}` at
:math:`\varepsilon = 0`.  The answer is the minimum over the given orders.

Semantics follow dp-accounting's ``compute_epsilon`` / ``compute_delta`` (same formulas, same KL
rule, epsilon clipped at 0, delta at 1), with two deliberate differences:

* dp-accounting skips the formula at orders :math:`\le 1.01` as a numerical precaution; it is
  valid (and evaluated stably here) for every :math:`\alpha > 1`, so we keep those orders.  The
  two agree whenever the optimum is at an order above 1.01, i.e. in every practical setting.
* invalid input raises ``ValueError`` (``delta`` must be in (0, 1), RDP values must be >= 0)
  instead of being clipped or logged.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import numpy as np

from ._checks import check_delta, check_eps, check_orders

__all__ = ["get_privacy_spent", "eps_from_rdp", "delta_from_rdp", "refine_epsilon"]


def _check_rdp(orders: np.ndarray, rdp) -> np.ndarray:
    try:
        r = np.atleast_1d(np.asarray(rdp, dtype=float))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"rdp must be real numbers, got {rdp!r}") from exc
    if r.shape != orders.shape:
        raise ValueError(f"orders and rdp must have the same length, got {orders.shape} and {r.shape}")
    if np.any(np.isnan(r)) or np.any(r < 0):
        raise ValueError(f"RDP values must be >= 0 (and not NaN), got {r[np.isnan(r) | (r < 0)].tolist()}")
    return r


def eps_from_rdp(orders: np.ndarray, rdp: np.ndarray, delta: float) -> np.ndarray:
    """Per-order epsilon of the tight conversion (no validation; ``inf`` where ``rdp`` is).

    At order ``inf`` (max-divergence) the formula's limit is ``rdp`` itself (pure DP).
    """
    fin = np.isfinite(orders)
    o = np.where(fin, orders, 2.0)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        eps = rdp + np.log1p(-1.0 / o) - (math.log(delta) + np.log(o)) / (o - 1.0)
        # KL / total-variation rule: delta >= sqrt(1 - exp(-r))  =>  eps = 0
        kl_ok = delta * delta + np.expm1(-rdp) > 0.0
    eps = np.where(fin, eps, rdp)
    eps = np.where(kl_ok, 0.0, eps)
    eps = np.where(np.isinf(rdp), np.inf, eps)
    return np.maximum(eps, 0.0)


def delta_from_rdp(orders: np.ndarray, rdp: np.ndarray, eps: float) -> np.ndarray:
    """Per-order log(delta) of the tight conversion combined with the KL rule (no validation).

    At order ``inf`` an ``(inf, r)``-RDP mechanism is ``(r, 0)``-DP: ``log delta = -inf`` once
    ``eps >= r``.  ``eps = inf`` gives ``delta = 0`` at every order with finite RDP.
    """
    fin = np.isfinite(orders)
    o = np.where(fin, orders, 2.0)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        log_delta = (o - 1.0) * (rdp - eps + np.log1p(-1.0 / o)) - np.log(o)
        log_kl = np.where(rdp > 0, 0.5 * np.log(-np.expm1(-rdp)), -np.inf)
    log_delta = np.where(fin, log_delta, np.where(rdp <= eps, -np.inf, 0.0))
    if math.isinf(eps):
        log_delta = np.full(orders.shape, -np.inf)
    log_delta = np.minimum(log_delta, log_kl)
    log_delta = np.where(np.isinf(rdp), 0.0, log_delta)
    return np.minimum(log_delta, 0.0)


def get_privacy_spent(
    orders: Sequence[float] | float,
    rdp: Sequence[float] | float,
    target_eps: float | None = None,
    target_delta: float | None = None,
) -> tuple[float, float, float]:
    """Best :math:`(\\varepsilon, \\delta)` over the orders for an RDP curve; exactly one target.

    Args:
        orders: RDP orders (each > 1; ``inf``, the max-divergence, is allowed as in TF Privacy).
        rdp: RDP values at ``orders`` (>= 0; ``inf`` allowed).
        target_eps: compute the smallest delta for this epsilon (>= 0; ``inf`` gives delta 0
            unless the RDP is infinite at every order), or
        target_delta: compute the smallest epsilon for this delta, in (0, 1).

    Returns:
        ``(eps, delta, opt_order)``: one of the first two is the given target; ``opt_order`` is
        the order achieving the optimum.  ``eps = inf`` / ``delta = 1`` (with a
        ``RuntimeWarning``) when the RDP is infinite at every order (no noise, non-private step).
    """
    if (target_eps is None) == (target_delta is None):
        raise ValueError("give exactly one of target_eps and target_delta")
    o = np.atleast_1d(check_orders(orders))
    r = _check_rdp(o, rdp)
    if target_delta is not None:
        delta = check_delta(target_delta)
        eps = eps_from_rdp(o, r, delta)
        i = int(np.argmin(eps))
        if math.isinf(eps[i]):
            warnings.warn(
                "infinite privacy loss: the RDP is infinite at every order (zero noise or a "
                "non-private step); no finite epsilon exists",
                RuntimeWarning,
                stacklevel=2,
            )
        return float(eps[i]), delta, float(o[i])
    eps = check_eps(target_eps)
    log_delta = delta_from_rdp(o, r, eps)
    i = int(np.argmin(log_delta))
    if np.all(np.isinf(r)):
        warnings.warn(
            "infinite privacy loss: the RDP is infinite at every order (zero noise or a "
            "non-private step); delta is 1",
            RuntimeWarning,
            stacklevel=2,
        )
    return eps, float(min(math.exp(log_delta[i]), 1.0)), float(o[i])


def refine_epsilon(
    rdp_at: Callable[[np.ndarray], np.ndarray],
    orders: Sequence[float],
    delta: float,
    rounds: int = 3,
    points: int = 15,
) -> tuple[float, float]:
    """Epsilon optimised over a *continuous* order, for a mechanism whose RDP can be evaluated
    at any order.

    The optimum of the tight conversion often sits on the steep rise ("cliff") of the RDP curve
    of a subsampled Gaussian, where a fixed grid of orders can lose a few per cent.  Starting
    from the best grid order, this evaluates ``points`` orders in the bracket between its grid
    neighbours and narrows the bracket ``rounds`` times (resolution ~1e-4 of the grid spacing).
    Every order gives a valid bound, so the result is valid and never above the grid answer.

    Args:
        rdp_at: total RDP at an array of orders (e.g. ``lambda o: compute_rdp(q, s, T, o)``).
        orders: the starting grid (each > 1).
        delta: target delta in (0, 1).

    Returns:
        ``(eps, order)``.
    """
    delta = check_delta(delta)
    o = np.sort(np.atleast_1d(check_orders(orders)))
    e = eps_from_rdp(o, np.atleast_1d(np.asarray(rdp_at(o), dtype=float)), delta)
    i = int(np.argmin(e))
    best_eps, best_order = float(e[i]), float(o[i])
    if math.isinf(best_eps) or best_eps == 0.0 or math.isinf(best_order):
        return best_eps, best_order
    lo = float(o[i - 1]) if i > 0 else 1.0 + (float(o[0]) - 1.0) / 4.0
    hi = float(o[i + 1]) if i + 1 < o.size and math.isfinite(o[i + 1]) else 2.0 * float(o[i])
    for _ in range(rounds):
        cand = np.linspace(lo, hi, points + 2)[1:-1]
        ec = eps_from_rdp(cand, np.atleast_1d(np.asarray(rdp_at(cand), dtype=float)), delta)
        j = int(np.argmin(ec))
        if ec[j] < best_eps:
            best_eps, best_order = float(ec[j]), float(cand[j])
        width = (hi - lo) / (points + 1)
        lo, hi = max(best_order - width, 1.0 + 1e-9), best_order + width
    return best_eps, best_order
