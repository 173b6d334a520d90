r"""RDP of the discrete and distributed sum mechanisms (numpy only, no torch).

Registered with :func:`~.rdp_accountant.register_rdp_rule` for the events of
:mod:`pytorch_privacy.dp_query.distributed_events`, so an :class:`~.rdp_accountant.RdpAccountant`
accounts them like any other event.

Sensitivity convention (as for the Gaussian): an event states bounds on *one record's* L2 / L1
norm in the integer domain; under add-or-remove-one they are the sensitivities, under
replace-one they are doubled.

Discrete Gaussian (Canonne, Kamath, Steinke 2020, "The Discrete Gaussian for Differential Privacy", Theorem 14)
    Adding ``N_Z(0, sigma^2)`` independently to each coordinate of an integer-valued query of L2
    sensitivity :math:`\Delta` is :math:`\rho`-zCDP with :math:`\rho = \Delta^2 / (2\sigma^2)`, i.e.
    :math:`(\alpha, \alpha\Delta^2/(2\sigma^2))`-RDP for every :math:`\alpha > 1`: the bound of the
    continuous Gaussian.

Distributed discrete Gaussian (Kairouz, Liu, Steinke 2021, "The Distributed Discrete Gaussian Mechanism for Federated Learning with Secure Aggregation", Theorem 1 and Proposition 14)
    ``n`` clients each add ``N_Z(0, sigma^2)`` per coordinate; the sum of the shares is close to,
    but not exactly, ``N_Z(0, n sigma^2)``.  With :math:`\Delta_2, \Delta_1` the L2, L1
    sensitivities, ``d`` coordinates, :math:`s_p = \Delta_p / (\sqrt n \sigma)` and

    .. math::  \tau = 10 \sum_{k=1}^{n-1} e^{-2\pi^2\sigma^2 k/(k+1)},

    the RDP at order :math:`\alpha` is at most

    .. math::  \min\Big\{\tfrac\alpha2 s_2^2 + \tau d,\;
               \tfrac\alpha2\big(s_2^2 + 2 s_1\tau + \tau^2 d\big),\;
               \tfrac\alpha2\big(s_2 + \sqrt d\,\tau\big)^2\Big\}.

    This module applies it for ``n >= 2`` and ``sigma >= 1`` only (a conservative restriction of
    the theorem's range; at ``sigma < 1`` the ``tau d`` terms exceed the plain bound for any
    realistic ``d`` anyway) and takes the minimum with :math:`\alpha\Delta_2^2/(2\sigma^2)`, the bound from the differing
    client's own share alone (the other shares and records are independent of it, so they are
    post-processing), which holds for every ``sigma > 0``.  At ``n = 1``, :math:`\tau = 0` and both
    reduce to the single discrete Gaussian.

Skellam (Agarwal, Kairouz, Liu 2021, "The Skellam Mechanism for Differentially Private Federated Learning", Theorem 3.5 / Corollary 3.6)
    Symmetric Skellam noise of variance :math:`\mu` per coordinate (``Poisson(mu/2) -
    Poisson(mu/2)``; the sum of independent shares of variances :math:`v_i` is Skellam of variance
    :math:`\sum v_i` exactly) on an integer query of sensitivities :math:`\Delta_1, \Delta_2` is
    :math:`(\alpha, \varepsilon(\alpha))`-RDP for integer :math:`\alpha > 1` with

    .. math::  \varepsilon(\alpha) = \frac{\alpha\Delta_2^2}{2\mu}
               + \min\Big\{\frac{(2\alpha-1)\Delta_2^2 + 6\Delta_1}{4\mu^2},\;
                           \frac{3\Delta_1}{2\mu}\Big\}.

Fractional orders of the two distributed bounds (stated for integer orders) are evaluated at
:math:`\lceil\alpha\rceil`: the Rényi divergence does not decrease with the order, so this is a
valid (slightly conservative) bound.  Order ``inf`` gives ``inf`` whenever something is released.

Neighbouring relations.  The single discrete Gaussian adds its noise centrally: add/remove-one
and replace-one both apply.  In the distributed mechanisms each record carries its own noise
share, so a dataset with one record fewer also has one noise share fewer: the output
distributions then differ in variance as well as in mean, which none of the bounds above covers.
Their events are therefore accounted under replace-one only (a fixed number of clients per
round, the setting of both papers); add-or-remove-one raises ``ValueError``.  Under Poisson
sampling these mechanisms are not Gaussian, and the accountant refuses
``PoissonSampledEvent`` around them (no amplification bound is claimed here).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np

from ..dp_query.distributed_events import (
    DiscreteGaussianEvent,
    DistributedDiscreteGaussianEvent,
    DistributedSkellamEvent,
)
from ..dp_query.events import ADD_OR_REMOVE_ONE, REPLACE_ONE
from ._checks import check_orders
from .rdp_accountant import register_rdp_rule

__all__ = [
    "discrete_gaussian_zcdp",
    "compute_rdp_discrete_gaussian",
    "ddg_tau",
    "compute_rdp_distributed_discrete_gaussian",
    "compute_rdp_skellam",
]

#: Above this many clients, :func:`ddg_tau` bounds the remaining (decreasing) terms of its sum by
#: their largest one instead of adding them one by one (an upper bound, so still valid).
_TAU_EXACT_TERMS = 1_000_000


def _nonneg(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    v = float(value)
    if not (math.isfinite(v) and v >= 0):
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
    return v


def _count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _orders(orders) -> np.ndarray:
    return np.atleast_1d(np.asarray(check_orders(orders), dtype=float))


def _degenerate(sens: float, noise: float, orders: np.ndarray) -> np.ndarray | None:
    """Zeros when nothing is released (sensitivity 0), ``inf`` without noise; else ``None``."""
    if sens == 0.0:
        return np.zeros(orders.shape)
    if noise == 0.0:
        return np.full(orders.shape, np.inf)
    return None


def _gauss_like(orders: np.ndarray, mu: float) -> np.ndarray:
    """``alpha * mu^2 / 2`` (``inf`` at order ``inf``)."""
    with np.errstate(over="ignore"):
        return np.where(np.isfinite(orders), orders * (0.5 * mu * mu), np.inf)


def discrete_gaussian_zcdp(l2_sensitivity: float, sigma: float) -> float:
    """``rho = l2_sensitivity^2 / (2 sigma^2)``: the zCDP of the discrete Gaussian mechanism
    (Canonne, Kamath, Steinke 2020, Theorem 14); ``inf`` for ``sigma = 0`` (and sensitivity > 0)."""
    d, s = _nonneg("l2_sensitivity", l2_sensitivity), _nonneg("sigma", sigma)
    if d == 0.0:
        return 0.0
    if s == 0.0:
        return math.inf
    with np.errstate(over="ignore"):
        return float(0.5 * np.float64(d / s) ** 2)


def compute_rdp_discrete_gaussian(l2_sensitivity: float, sigma: float, orders: Sequence[float] | float | None = None) -> np.ndarray:
    """RDP at ``orders`` of one discrete Gaussian release: ``alpha * Delta^2 / (2 sigma^2)``."""
    o = _orders(orders)
    d, s = _nonneg("l2_sensitivity", l2_sensitivity), _nonneg("sigma", sigma)
    deg = _degenerate(d, s, o)
    return deg if deg is not None else _gauss_like(o, d / s)


def ddg_tau(local_sigma: float, num_clients: int) -> float:
    """``tau = 10 * sum_{k=1}^{n-1} exp(-2 pi^2 sigma^2 k / (k + 1))`` (Kairouz, Liu, Steinke 2021,
    Theorem 1): how far the sum of ``n`` discrete Gaussians ``N_Z(0, sigma^2)`` is from
    ``N_Z(0, n sigma^2)``.  0 for one client."""
    s = _nonneg("local_sigma", local_sigma)
    n = _count("num_clients", num_clients)
    if n == 1:
        return 0.0
    c = 2.0 * math.pi**2 * s * s
    m = min(n - 1, _TAU_EXACT_TERMS)
    k = np.arange(1, m + 1, dtype=float)
    total = math.fsum(np.exp(-c * k / (k + 1.0)))
    if n - 1 > m:  # terms decrease with k: bound the rest by the last exact one
        total += (n - 1 - m) * math.exp(-c * m / (m + 1.0))
    return 10.0 * total


def compute_rdp_distributed_discrete_gaussian(
    l2_sensitivity: float,
    l1_sensitivity: float,
    local_sigma: float,
    num_clients: int,
    dimension: int,
    orders: Sequence[float] | float | None = None,
) -> np.ndarray:
    """RDP at ``orders`` of the sum of ``num_clients`` records each noised with
    ``N_Z(0, local_sigma^2)`` per coordinate (see the module docstring for the bound).

    ``l2_sensitivity`` / ``l1_sensitivity`` are the sensitivities of the sum (for replace-one
    neighbours, twice one record's norm bounds).
    """
    o = _orders(orders)
    d2, d1 = _nonneg("l2_sensitivity", l2_sensitivity), _nonneg("l1_sensitivity", l1_sensitivity)
    s = _nonneg("local_sigma", local_sigma)
    n, dim = _count("num_clients", num_clients), _count("dimension", dimension)
    deg = _degenerate(d2, s, o)
    if deg is not None:
        return deg
    single = _gauss_like(o, d2 / s)  # the differing client's own share alone
    if n == 1 or s < 1.0:
        return single
    tau = ddg_tau(s, n)
    a = np.where(np.isfinite(o), np.ceil(o), np.inf)
    s2 = np.float64(d2) / (math.sqrt(n) * s)
    s1 = np.float64(d1) / (math.sqrt(n) * s)
    tau = np.float64(tau)
    with np.errstate(over="ignore", invalid="ignore"):
        t1 = 0.5 * a * s2**2 + tau * dim
        t2 = 0.5 * a * (s2**2 + 2.0 * s1 * tau + tau**2 * dim)
        t3 = 0.5 * a * (s2 + math.sqrt(dim) * tau) ** 2
        kls = np.minimum(np.minimum(t1, t2), t3)
    return np.where(np.isfinite(o), np.minimum(single, kls), np.inf)


def compute_rdp_skellam(
    l1_sensitivity: float, l2_sensitivity: float, variance: float, orders: Sequence[float] | float | None = None
) -> np.ndarray:
    """RDP at ``orders`` of symmetric Skellam noise of total ``variance`` per coordinate on an
    integer query of sensitivities ``l1_sensitivity``, ``l2_sensitivity`` (Agarwal, Kairouz, Liu
    2021; fractional orders evaluated at ``ceil(order)``)."""
    o = _orders(orders)
    d1, d2 = _nonneg("l1_sensitivity", l1_sensitivity), _nonneg("l2_sensitivity", l2_sensitivity)
    mu = _nonneg("variance", variance)
    deg = _degenerate(max(d1, d2), mu, o)
    if deg is not None:
        return deg
    d1, d2, mu = np.float64(d1), np.float64(d2), np.float64(mu)
    a = np.where(np.isfinite(o), np.ceil(o), np.inf)
    with np.errstate(over="ignore", invalid="ignore"):
        base = a * d2 * d2 / (2.0 * mu)
        extra = np.minimum(((2.0 * a - 1.0) * d2 * d2 + 6.0 * d1) / (4.0 * mu * mu), 3.0 * d1 / (2.0 * mu))
        out = base + extra
    return np.where(np.isfinite(o), out, np.inf)


# ---------------------------------------------------------------------------------------------
# accountant rules
# ---------------------------------------------------------------------------------------------
def _factor(relation: str) -> float:
    return 2.0 if relation == REPLACE_ONE else 1.0


def _replace_one_only(event, relation: str) -> None:
    if relation != REPLACE_ONE:
        raise ValueError(
            f"{type(event).__name__} is accounted under replace-one neighbours only: each record "
            "carries its own noise share, so removing a record also removes noise, which the bounds "
            f"of Kairouz et al. / Agarwal et al. (2021) do not cover; this accountant uses {relation!r}. "
            "Use RdpAccountant(neighboring_relation='replace_one') (a fixed number of clients per "
            "round), or compute_rdp_from_event(event, neighboring_relation='replace_one')"
        )


@register_rdp_rule(DiscreteGaussianEvent)
def _discrete_gaussian_rule(event: DiscreteGaussianEvent, orders: np.ndarray, relation: str) -> np.ndarray:
    if relation not in (ADD_OR_REMOVE_ONE, REPLACE_ONE):
        raise ValueError(f"unknown neighbouring relation {relation!r}")
    return compute_rdp_discrete_gaussian(_factor(relation) * event.l2_sensitivity, event.sigma, orders)


@register_rdp_rule(DistributedDiscreteGaussianEvent)
def _ddg_rule(event: DistributedDiscreteGaussianEvent, orders: np.ndarray, relation: str) -> np.ndarray:
    _replace_one_only(event, relation)
    f = _factor(relation)
    return compute_rdp_distributed_discrete_gaussian(
        f * event.l2_sensitivity, f * event.l1_sensitivity, event.local_sigma, event.num_clients, event.dimension, orders
    )


@register_rdp_rule(DistributedSkellamEvent)
def _skellam_rule(event: DistributedSkellamEvent, orders: np.ndarray, relation: str) -> np.ndarray:
    _replace_one_only(event, relation)
    f = _factor(relation)
    variance = event.num_clients * event.local_variance
    return compute_rdp_skellam(f * event.l1_sensitivity, f * event.l2_sensitivity, variance, orders)
