"""Calibration: the noise (or the training length) that meets a target (epsilon, delta).

Both functions account DP-SGD exactly like :func:`.compute_dp_sgd_privacy_lib.compute_dp_sgd_privacy`:
Poisson sampling with ``q = batch_size / n``, add-or-remove-one neighbours,
``steps = ceil(epochs * n / batch_size)``, exact RDP (:func:`.rdp.compute_rdp`) and the tight
conversion with the order optimised continuously (:func:`.conversion.refine_epsilon`).  So
``compute_dp_sgd_privacy(n, b, compute_noise(n, b, eps, epochs, delta), epochs, delta)[0] <= eps``.

Epsilon is strictly decreasing in the noise multiplier and non-decreasing in the number of steps,
so both searches are bisections.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

from ._checks import check_sigma
from .compute_dp_sgd_privacy_lib import check_plan, epsilon_for, warn_large_delta

__all__ = ["compute_noise", "compute_epochs", "smallest_noise"]


def _check_target(target_epsilon) -> float:
    if (
        isinstance(target_epsilon, bool)
        or not isinstance(target_epsilon, numbers.Real)
        or not 0.0 < float(target_epsilon) < math.inf
    ):
        raise ValueError(f"target_epsilon must be a finite number > 0, got {target_epsilon!r}")
    return float(target_epsilon)


def compute_noise(
    n: int,
    batch_size: int,
    target_epsilon: float,
    epochs: float | None = None,
    delta: float = 1e-5,
    *,
    steps: int | None = None,
    orders: Sequence[float] | None = None,
    rtol: float = 1e-4,
    max_noise: float = 1e4,
) -> float:
    """Smallest noise multiplier (to relative precision ``rtol``) meeting ``target_epsilon``.

    Args:
        n: dataset size N.
        batch_size: expected batch size (``q = batch_size / n``).
        target_epsilon: the budget, > 0.
        epochs: number of epochs (``steps = ceil(epochs * n / batch_size)``), or give ``steps``.
        delta: target delta in (0, 1).
        steps: number of steps instead of ``epochs``.
        orders: RDP orders to start from (default :data:`.rdp.DEFAULT_ORDERS`).
        rtol: relative width of the final bracket; the upper end is returned, so the result
            always meets the target and ``result * (1 - rtol)`` does not.
        max_noise: give up (``ValueError``) if even this noise does not meet the target.

    Warns (``UserWarning``) when ``delta >= 1/n``.

    Returns:
        The noise multiplier ``s``: epsilon at ``s`` is ``<= target_epsilon``, at ``s*(1-rtol)``
        it is larger.
    """
    target = _check_target(target_epsilon)
    q, t, delta = check_plan(n, batch_size, epochs, delta, steps)
    warn_large_delta(n, delta)
    if not 0.0 < rtol < 0.5:
        raise ValueError(f"rtol must be in (0, 0.5), got {rtol!r}")

    def eps_at(sigma: float) -> float:
        return epsilon_for(q, sigma, t, delta, orders)[0]

    return smallest_noise(
        eps_at, target, rtol=rtol, max_noise=max_noise, plan=f"q={q:.4g}, steps={t}, delta={delta:g}"
    )


def smallest_noise(
    eps_at, target_epsilon: float, *, rtol: float = 1e-4, start: float = 1.0, factor: float = 2.0,
    max_noise: float = 1e4, plan: str = "",
) -> float:
    """The smallest noise multiplier ``s`` (to relative ``rtol``) with ``eps_at(s) <= target_epsilon``,
    for any ``eps_at`` decreasing in the noise: grow (or shrink) from ``start`` by ``factor`` to a
    bracket, then bisect.  ``ValueError`` (naming ``plan``) when even ``max_noise`` is not enough,
    or when every noise down to 1e-3 meets the target."""
    hi = start
    while not eps_at(hi) <= target_epsilon:
        hi *= factor
        if hi > max_noise:
            raise ValueError(
                f"target_epsilon={target_epsilon:g} is not reached even with noise_multiplier={max_noise:g} "
                f"({plan}); raise the budget or max_noise, or train less"
            )
    lo = hi / factor
    while eps_at(lo) <= target_epsilon:  # eps is finite for every positive noise: walk down
        hi, lo = lo, lo / factor
        if lo < 1e-3:
            raise ValueError(
                f"target_epsilon={target_epsilon:g} is met by every noise_multiplier down to {hi:g}; "
                "the budget is too large to calibrate against"
            )
    while hi - lo > rtol * hi:
        mid = 0.5 * (lo + hi)
        if eps_at(mid) <= target_epsilon:
            hi = mid
        else:
            lo = mid
    return hi


def compute_epochs(
    n: int,
    batch_size: int,
    noise_multiplier: float,
    target_epsilon: float,
    delta: float = 1e-5,
    *,
    unit: str = "epochs",
    orders: Sequence[float] | None = None,
    max_steps: int = 10**12,
) -> int:
    """The longest training that stays within ``target_epsilon``.

    Args:
        n, batch_size, noise_multiplier, delta: the training plan (Poisson sampling,
            ``q = batch_size / n``).
        target_epsilon: the budget, > 0.
        unit: ``"epochs"`` (default): the largest whole number of epochs ``E`` with
            ``steps = ceil(E * n / batch_size)`` within budget; ``"steps"``: the largest number of
            steps.

    Raises:
        ValueError: if not even one epoch (one step) fits the budget, or the budget is not
            exhausted within ``max_steps`` steps.
    """
    target = _check_target(target_epsilon)
    if unit not in ("epochs", "steps"):
        raise ValueError(f"unit must be 'epochs' or 'steps', got {unit!r}")
    q, _, delta = check_plan(n, batch_size, None, delta, 1)
    warn_large_delta(n, delta)
    sigma = check_sigma(noise_multiplier)
    if not sigma > 0:
        raise ValueError(f"noise_multiplier must be > 0 to spend a finite budget, got {noise_multiplier!r}")
    per_epoch = n / batch_size

    def steps_of(k: int) -> int:
        return k if unit == "steps" else math.ceil(k * per_epoch)

    def fits(k: int) -> bool:
        return epsilon_for(q, sigma, steps_of(k), delta, orders)[0] <= target

    if not fits(1):
        one = "one step" if unit == "steps" else f"one epoch ({steps_of(1)} steps)"
        raise ValueError(
            f"target_epsilon={target} is exceeded by {one} with noise_multiplier={sigma} "
            f"(q={q:.4g}, delta={delta:g}); add noise or raise the budget"
        )
    lo, hi = 1, 2
    while fits(hi):
        lo, hi = hi, hi * 2
        if steps_of(hi) > max_steps:
            raise ValueError(f"the budget is not exhausted within {max_steps} steps; nothing to limit")
    while hi - lo > 1:  # invariant: fits(lo), not fits(hi)
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo
