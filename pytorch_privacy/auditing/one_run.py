"""The one-run audit (Steinke, Nasr, Jagielski 2023, "Privacy Auditing with One (1) Training Run",
NeurIPS 2023, arXiv:2305.08846): an empirical *lower* bound on epsilon from a single training run.

The game
--------
``m`` canaries; each is included in the training set independently with probability 1/2 (the
secret bits ``S_i``).  After training the auditor scores every canary, guesses "in" for the
``k+`` highest scores and "out" for the ``k-`` lowest, abstains on the rest (``r = k+ + k-``
guesses), and counts the correct guesses ``W``.

The analysis
------------
If training is ``epsilon``-DP with respect to each canary (add/remove), ``W`` is stochastically
dominated by ``Binomial(r, p)`` with ``p = e^eps / (1 + e^eps)`` (the accuracy of randomized
response): one run behaves, for the auditor, like ``r`` independent ``eps``-DP coin guesses,
without the group-privacy cost of inserting many canaries.  With ``delta > 0`` their analysis
(the bound their p-value computation evaluates) adds a term::

    P[W >= v] <= P[Bin(r, p) >= v] + 2 m delta * max_{1 <= i <= v} P[v - i <= Bin(r, p) < v] / i

The lower bound at confidence ``1 - beta`` is the largest ``eps`` whose tail probability at the
observed ``v`` is still at most ``beta``: every smaller ``eps`` is rejected at level ``beta``
(:func:`one_run_epsilon_lower_bound`).

Choosing ``k`` after looking at the results would void the confidence; :func:`one_run_audit`
either uses the ``k+``/``k-`` you fix in advance, or tries a fixed grid of them and pays for the
choice with a Bonferroni correction (each setting is tested at ``beta / len(grid)``), so the
reported bound keeps its stated confidence.

This module needs numpy and scipy only (no torch); :func:`audit_training` (the whole audit of a
user's model) imports the torch parts lazily.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

__all__ = [
    "one_run_p_value",
    "one_run_epsilon_lower_bound",
    "guesses_from_scores",
    "OneRunAuditResult",
    "one_run_audit",
    "audit_training",
    "claimed_epsilons",
    "DEFAULT_GUESS_FRACTIONS",
]

#: the fractions of ``m`` tried as ``k+ = k-`` when no guess count is fixed (Bonferroni over them)
DEFAULT_GUESS_FRACTIONS: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.2, 0.35, 0.5)

#: the most canaries the analysis accepts (its delta > 0 term costs memory and time linear in m)
MAX_CANARIES = 10_000_000

_EPS_MAX = 60.0  # beyond this, logistic(eps) is 1 to double precision


def _check_counts(m: int, r: int, v: int) -> None:
    for name, x in (("m", m), ("r", r), ("v", v)):
        if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
            raise TypeError(f"{name} must be an integer, got {type(x).__name__}")
    if m > MAX_CANARIES:
        raise ValueError(f"m={m} canaries: the analysis supports at most {MAX_CANARIES:,} (its cost is linear in m)")
    if not 0 <= v <= r <= m:
        raise ValueError(
            f"need 0 <= v <= r <= m (correct guesses <= guesses <= canaries), got v={v}, r={r}, m={m}"
        )


def _check_delta_conf(delta: float, confidence: float) -> None:
    if not (isinstance(delta, (int, float)) and 0 <= delta <= 1):
        raise ValueError(f"delta must be a number in [0, 1], got {delta!r}")
    if not (isinstance(confidence, (int, float)) and 0 < confidence < 1):
        raise ValueError(f"confidence must be in (0, 1) (e.g. 0.95), got {confidence!r}")


def one_run_p_value(m: int, r: int, v: int, epsilon: float, delta: float = 0.0) -> float:
    """Upper bound on ``P[W >= v]`` for an ``(epsilon, delta)``-DP mechanism in the one-run game
    with ``m`` canaries and ``r`` guesses (Steinke et al. 2023: the binomial tail for
    ``delta = 0``, plus their ``2 m delta`` term for ``delta > 0``).  Values are capped at 1."""
    _check_counts(m, r, v)
    if not (isinstance(epsilon, (int, float)) and epsilon >= 0 and not math.isnan(epsilon)):
        raise ValueError(f"epsilon must be a number >= 0, got {epsilon!r}")
    _check_delta_conf(delta, 0.5)
    from scipy.stats import binom

    if v == 0:
        return 1.0
    p = 1.0 / (1.0 + math.exp(-min(float(epsilon), _EPS_MAX)))
    tail = float(binom.sf(v - 1, r, p))  # P[Bin(r, p) >= v]
    if delta == 0:
        return min(tail, 1.0)
    return float(min(tail + 2.0 * m * delta * _alpha(r, v, p), 1.0))


def _alpha(r: int, v: int, p: float) -> float:
    """``max_{1 <= i <= v} P[v - i <= Bin(r, p) < v] / i``, rounded up, in ``O(sqrt(r))``.

    The pmf is evaluated only on ``[lo, hi]``, ``mean -+ 40 sd``: for ``j = v - i`` in that range
    the ratio's numerator is the window's sum plus at most ``P[hi < Bin < v]``; outside it only
    ``P[Bin < lo]`` can join, and ``i >= 1``.  Adding both (each below 1e-300 when the window is
    cut) to the maximum over the window bounds the exact value from above, so the p-value stays
    conservative."""
    from scipy.stats import binom

    sd = math.sqrt(r * p * (1.0 - p))
    lo = max(0, int(math.floor(r * p - 40.0 * sd)) - 1)
    hi = min(v - 1, int(math.ceil(r * p + 40.0 * sd)) + 1)
    upper = float(binom.sf(hi, r, p) - binom.sf(v - 1, r, p)) if hi < v - 1 else 0.0  # P[hi < Bin < v]
    slack = max(upper, 0.0) + (float(binom.cdf(lo - 1, r, p)) if lo > 0 else 0.0)
    if hi < lo:
        return slack
    j = np.arange(hi, lo - 1, -1)  # v-1 >= hi >= j >= lo, so i = v - j >= 1
    ratios = np.cumsum(binom.pmf(j, r, p)) / (v - j)
    return float(ratios.max()) + slack


def one_run_epsilon_lower_bound(
    m: int, r: int, v: int, *, delta: float = 0.0, confidence: float = 0.95, tol: float = 1e-7
) -> float:
    """The largest ``eps`` with :func:`one_run_p_value` ``(m, r, v, eps, delta) <= 1 - confidence``:
    with that confidence the mechanism is not ``(eps', delta)``-DP for any ``eps' <`` the returned
    value.  0 when even ``eps = 0`` is not rejected; bisection to ``tol`` (the bound is rounded
    down, never up)."""
    _check_counts(m, r, v)
    _check_delta_conf(delta, confidence)
    beta = 1.0 - confidence
    if one_run_p_value(m, r, v, 0.0, delta) > beta:
        return 0.0
    if one_run_p_value(m, r, v, _EPS_MAX, delta) <= beta:
        return _EPS_MAX  # every guess right and the delta term negligible: capped
    lo, hi = 0.0, 1.0
    while one_run_p_value(m, r, v, hi, delta) <= beta:
        lo, hi = hi, min(2.0 * hi, _EPS_MAX)
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if one_run_p_value(m, r, v, mid, delta) <= beta:
            lo = mid
        else:
            hi = mid
    return lo


def _as_array(x: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, without importing torch
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-dimensional (one entry per canary), got shape {a.shape}")
    return a


def guesses_from_scores(scores: Any, k_plus: int, k_minus: int) -> np.ndarray:
    """``+1`` (guess "in") for the ``k_plus`` highest scores, ``-1`` for the ``k_minus`` lowest,
    ``0`` (abstain) otherwise.  Ties are broken by position (a stable sort), which depends on the
    scores and the canary order only, never on the secret bits."""
    s = _as_array(scores, "scores").astype(float)
    m = len(s)
    if k_plus < 0 or k_minus < 0 or k_plus + k_minus > m:
        raise ValueError(f"need k_plus, k_minus >= 0 and k_plus + k_minus <= m={m}, got {k_plus}, {k_minus}")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN; score every canary with a finite number")
    order = np.argsort(-s, kind="stable")
    g = np.zeros(m, dtype=np.int8)
    g[order[:k_plus]] = 1
    if k_minus:
        g[order[m - k_minus:]] = -1
    return g


@dataclass(frozen=True)
class OneRunAuditResult:
    """The outcome of a one-run audit.

    ``epsilon_lower_bound``: with probability at least ``confidence`` (over the canaries' random
    inclusion and the training randomness) the trained mechanism is not ``(eps, delta)``-DP for any
    smaller ``eps``.  ``k_plus``, ``k_minus``, ``guesses``, ``correct``: the guess setting that gave
    it; ``settings_tried``: how many settings shared the confidence (Bonferroni).
    """

    epsilon_lower_bound: float
    delta: float
    confidence: float
    m: int
    k_plus: int
    k_minus: int
    guesses: int
    correct: int
    settings_tried: int
    scores: np.ndarray = field(repr=False)
    included: np.ndarray = field(repr=False)
    extra: dict = field(default_factory=dict, repr=False)

    @property
    def accuracy(self) -> float:
        """Fraction of the guesses made that were right (``nan`` without guesses)."""
        return self.correct / self.guesses if self.guesses else math.nan

    def summary(self) -> str:
        """One line: the bound, its confidence and delta, and the guesses behind it."""
        return (
            f"empirical epsilon >= {self.epsilon_lower_bound:.3f} ({100 * self.confidence:g}% confidence, "
            f"delta {self.delta:g}; {self.correct}/{self.guesses} guesses right, m={self.m} canaries)"
        )


def _grid(m: int, fractions: Sequence[float]) -> list[tuple[int, int]]:
    """``k+ = k- = round(f m)`` (at least 1, at most ``m // 2``); one canary: a single guess "in"."""
    if m < 2:
        return [(1, 0)]
    ks = sorted({max(1, min(m // 2, int(round(f * m)))) for f in fractions if 0 < f <= 0.5})
    return [(k, k) for k in ks]


def one_run_audit(
    scores: Any,
    included: Any,
    *,
    delta: float = 0.0,
    confidence: float = 0.95,
    k_plus: int | None = None,
    k_minus: int | None = None,
    fractions: Sequence[float] = DEFAULT_GUESS_FRACTIONS,
) -> OneRunAuditResult:
    """The one-run audit of canary ``scores`` (higher = more likely included) against the secret
    inclusion bits ``included`` (bool, one per canary).

    With ``k_plus``/``k_minus`` given, that single setting is evaluated at ``confidence``.
    Otherwise every ``k+ = k- = round(f m)`` for ``f`` in ``fractions`` is tried, each at
    ``1 - (1 - confidence) / len(grid)`` (Bonferroni), and the largest bound is reported: it holds
    at ``confidence`` because the grid is fixed before the scores are seen.
    """
    s = _as_array(scores, "scores").astype(float)
    inc = _as_array(included, "included").astype(bool)
    if len(s) != len(inc):
        raise ValueError(f"scores ({len(s)}) and included ({len(inc)}) must have one entry per canary")
    m = len(s)
    if m == 0:
        raise ValueError("no canaries: the audit needs m >= 1 scores")
    _check_delta_conf(delta, confidence)
    if (k_plus is None) != (k_minus is None):
        raise ValueError("give both k_plus and k_minus, or neither (then a Bonferroni grid is used)")
    settings = [(int(k_plus), int(k_minus))] if k_plus is not None else _grid(m, fractions)
    if not settings:
        raise ValueError("fractions gave no guess setting; use values in (0, 0.5]")
    level = 1.0 - (1.0 - confidence) / len(settings)
    truth = np.where(inc, 1, -1)
    best = None
    for kp, km in settings:
        g = guesses_from_scores(s, kp, km)
        r, v = int(np.count_nonzero(g)), int(np.count_nonzero(g == truth))
        eps = one_run_epsilon_lower_bound(m, r, v, delta=delta, confidence=level)
        if best is None or eps > best[0]:
            best = (eps, kp, km, r, v)
    eps, kp, km, r, v = best
    return OneRunAuditResult(eps, float(delta), float(confidence), m, kp, km, r, v, len(settings), s, inc)


def claimed_epsilons(ledger: Any, delta: float) -> dict[str, float]:
    """The ledger's upper bounds at ``delta``: ``{"rdp": ..., "pld": ...}`` (``inf`` for a
    non-private run; a bound the accountant cannot compute is left out)."""
    from ..analysis import RdpAccountant, compute_pld_from_ledger

    out: dict[str, float] = {}
    if len(ledger) == 0:
        return {"rdp": 0.0, "pld": 0.0}
    try:
        out["rdp"] = float(RdpAccountant().compose_ledger(ledger).get_epsilon(delta))
    except (ValueError, OverflowError, ZeroDivisionError):
        out["rdp"] = math.inf
    try:
        out["pld"] = float(compute_pld_from_ledger(ledger).get_epsilon(delta))
    except (ValueError, OverflowError, ZeroDivisionError):
        pass
    return out


def audit_training(
    model: Any,
    make_optimizer: Any,
    x: Any,
    y: Any,
    *,
    sample_rate: float,
    steps: int | None = None,
    epochs: float | None = None,
    m: int = 1000,
    kind: str = "dirac",
    input_canaries: Any = None,
    score: str = "gradient",
    l2_norm_clip: float | None = None,
    delta: float = 1e-5,
    confidence: float = 0.95,
    seed: int = 0,
    k_plus: int | None = None,
    k_minus: int | None = None,
) -> OneRunAuditResult:
    """The one-run audit of a user's own model and optimizer: train once with ``m`` canaries
    (each in with probability 1/2), score them, and bound epsilon from below.

    Args:
        model: the ``nn.Module`` to train (trained in place).
        make_optimizer: ``make_optimizer(model, ledger) -> DPOptimizer``: build your private
            optimizer (e.g. ``DPGaussianOptimizer(SGD(...), model, loss_fn, C, sigma,
            ledger=ledger)``) around the ledger given, whose population is the real data plus the
            included canaries and whose rate is ``sample_rate``.
        x, y: the training data (tensors; one row an example).
        sample_rate: Poisson rate ``q`` of every record, real or canary.
        steps / epochs: training length (``epochs`` means ``ceil(epochs / q)`` steps).
        m, kind: gradient canaries (:class:`~.canaries.GradientCanaries`, ``"dirac"`` or
            ``"random"``); or ``input_canaries=`` an :class:`~.canaries.InputCanaries` instead.
        score: ``"gradient"`` (white-box: all released gradients) or ``"update"`` (first and last
            model only).
        l2_norm_clip: the canaries' norm; default ``optimizer.l2_norm_clip``.
        delta, confidence, k_plus, k_minus: as for :func:`one_run_audit`.

    Returns the :class:`OneRunAuditResult`; ``extra`` holds the ledger's claimed upper bounds
    (``"claimed": {"rdp": ..., "pld": ...}``), ``"steps"`` and the ``"ledger"``.
    """
    from ..dp_query.privacy_ledger import PrivacyLedger
    from .canaries import GradientCanaries, train_with_canaries

    if (steps is None) == (epochs is None):
        raise ValueError("give the training length as steps= or epochs=, not both or neither")
    if not (isinstance(sample_rate, (int, float)) and 0 < sample_rate <= 1):
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    steps = int(steps) if steps is not None else int(math.ceil(epochs / sample_rate))
    gc = None
    if input_canaries is None:
        gc = GradientCanaries(model, m, l2_norm_clip=1.0, kind=kind, seed=seed)  # norm set below
        n_in = gc.num_included
    else:
        n_in = input_canaries.num_included
    ledger = PrivacyLedger(len(y) + n_in, sample_rate, metadata={"audit": "one-run", "canaries": gc.m if gc else input_canaries.m})
    opt = make_optimizer(model, ledger)
    if gc is not None:
        clip = l2_norm_clip if l2_norm_clip is not None else getattr(opt, "l2_norm_clip", None)
        if clip is None:
            raise ValueError("the optimizer has no l2_norm_clip attribute: pass l2_norm_clip= (its clip norm C)")
        gc.l2_norm_clip = float(clip)
    scores = train_with_canaries(
        model, opt, x, y, sample_rate=sample_rate, steps=steps, gradient_canaries=gc,
        input_canaries=input_canaries, score=score, seed=seed + 7,
    )
    included = (gc or input_canaries).included
    res = one_run_audit(scores, included, delta=delta, confidence=confidence, k_plus=k_plus, k_minus=k_minus)
    res.extra.update(claimed=claimed_epsilons(ledger, delta), steps=steps, ledger=ledger)
    return res
