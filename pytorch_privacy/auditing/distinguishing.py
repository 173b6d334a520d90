"""The multi-run distinguishing audit (Jagielski, Ullman, Oprea 2020; Nasr et al. 2021) for small
models: train ``R`` times on ``D`` and ``R`` times on ``D' = D + {canary}``, score the canary on
every trained model, threshold the scores, and turn the resulting confusion matrix into an
epsilon lower bound with Clopper--Pearson intervals
(:func:`pytorch_privacy.auditing.statistics.epsilon_lower_bound`).

Each run is one draw of the mechanism on a fixed pair of neighbouring datasets, so the bound is
the textbook one: if training is ``(eps, delta)``-DP then every test satisfies
``TPR <= e^eps FPR + delta`` (and the symmetric inequality); the Clopper--Pearson lower bound on
``TPR`` and upper bound on ``FPR`` make it hold with the stated confidence.  It costs ``2R``
trainings; the one-run audit (:mod:`.one_run`) costs one but is looser.

The threshold must not be chosen on the runs it is evaluated on.  :func:`distinguishing_audit`
either uses the threshold you give, or splits the runs: the first ``selection_fraction`` of each
side picks the threshold that maximises the point estimate of epsilon, the rest evaluates it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .statistics import epsilon_from_rates, epsilon_lower_bound

__all__ = [
    "DistinguishingAuditResult",
    "distinguishing_audit",
    "distinguishing_bound",
    "best_threshold",
    "gradient_canary_run",
]


@dataclass(frozen=True)
class DistinguishingAuditResult:
    """``epsilon_lower_bound`` holds with probability ``>= confidence``; ``tp, fn, fp, tn`` are
    the evaluation runs' confusion counts at ``threshold`` (score ``>= threshold``: "canary in")."""

    epsilon_lower_bound: float
    delta: float
    confidence: float
    threshold: float
    tp: int
    fn: int
    fp: int
    tn: int
    scores_in: np.ndarray = field(repr=False)
    scores_out: np.ndarray = field(repr=False)

    def summary(self) -> str:
        """One line: the bound, its confidence and delta, and the evaluation runs' rates."""
        return (
            f"empirical epsilon >= {self.epsilon_lower_bound:.3f} ({100 * self.confidence:g}% confidence, delta "
            f"{self.delta:g}; TPR {self.tp}/{self.tp + self.fn}, FPR {self.fp}/{self.fp + self.tn})"
        )


def _scores(x: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    a = np.asarray(x, dtype=float).reshape(-1)
    if a.size == 0:
        raise ValueError(f"{name} is empty: the audit needs runs with and without the canary")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or inf; every run must give a finite canary score")
    return a


def best_threshold(scores_in: Any, scores_out: Any, delta: float = 0.0) -> float:
    """The threshold maximising the *point estimate* ``epsilon_from_rates(TPR, FPR, delta)`` of the
    test ``score >= threshold`` on these runs.  Candidates are the midpoints between consecutive
    distinct observed scores (a threshold at an observed score over-fits the runs it was chosen
    on); among equally good candidates the middle one is taken.  A rate of 0 or 1 is moved half a
    run inwards (an infinite estimate would make every perfect split tie).  Use it on runs kept
    apart from the evaluation."""
    si, so = _scores(scores_in, "scores_in"), _scores(scores_out, "scores_out")
    u = np.unique(np.concatenate([si, so]))
    cands = (u[:-1] + u[1:]) / 2 if len(u) > 1 else u
    est = []
    for t in cands:
        tpr = min(max(float((si >= t).mean()), 0.5 / len(si)), 1 - 0.5 / len(si))
        fpr = min(max(float((so >= t).mean()), 0.5 / len(so)), 1 - 0.5 / len(so))
        est.append(epsilon_from_rates(tpr, fpr, delta))
    est = np.asarray(est)
    best = np.flatnonzero(est >= est.max() - 1e-12)
    return float(cands[best[len(best) // 2]])


def distinguishing_bound(
    scores_in: Any, scores_out: Any, threshold: float, *, delta: float = 0.0, confidence: float = 0.95
) -> DistinguishingAuditResult:
    """The Clopper--Pearson epsilon lower bound of the test ``score >= threshold`` on runs with
    (``scores_in``) and without (``scores_out``) the canary; ``threshold`` fixed in advance."""
    si, so = _scores(scores_in, "scores_in"), _scores(scores_out, "scores_out")
    if not isinstance(threshold, (int, float)) or math.isnan(threshold):
        raise ValueError(f"threshold must be a number, got {threshold!r}")
    tp, fp = int((si >= threshold).sum()), int((so >= threshold).sum())
    tn, fn = len(so) - fp, len(si) - tp
    eps = epsilon_lower_bound(tp, fn, fp, tn, delta=delta, confidence=confidence)
    return DistinguishingAuditResult(float(eps), float(delta), float(confidence), float(threshold), tp, fn, fp, tn, si, so)


def distinguishing_audit(
    run: Callable[[bool, int], float],
    runs: int,
    *,
    delta: float = 0.0,
    confidence: float = 0.95,
    threshold: float | None = None,
    selection_fraction: float = 0.5,
    seed: int = 0,
) -> DistinguishingAuditResult:
    """Train ``runs`` times with the canary and ``runs`` times without, and bound epsilon.

    ``run(include_canary, seed) -> score``: one training run (seeded: model, noise and sampling)
    and the canary's score on its result (higher = "canary in"), e.g. :func:`gradient_canary_run`.
    Run ``i`` uses seed ``seed + i`` on both sides, so each pair differs only in the canary.
    ``threshold=None`` picks it on the first ``selection_fraction`` of the runs of each side
    (:func:`best_threshold`) and evaluates on the rest."""
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 2:
        raise ValueError(f"runs must be an integer >= 2 (per side), got {runs!r}")
    if threshold is None and not 0 < selection_fraction < 1:
        raise ValueError(f"selection_fraction must be in (0, 1), got {selection_fraction!r}")
    si = np.array([float(run(True, seed + i)) for i in range(runs)])
    so = np.array([float(run(False, seed + i)) for i in range(runs)])
    if threshold is None:
        k = min(max(1, int(round(selection_fraction * runs))), runs - 1)
        threshold = best_threshold(si[:k], so[:k], delta)
        si, so = si[k:], so[k:]
    return distinguishing_bound(si, so, threshold, delta=delta, confidence=confidence)


def gradient_canary_run(
    make_model: Callable[[int], Any],
    make_optimizer: Callable[[Any, Any, int], Any],
    x: Any,
    y: Any,
    *,
    sample_rate: float,
    steps: int,
    l2_norm_clip: float,
    kind: str = "dirac",
) -> Callable[[bool, int], float]:
    """A ``run(include_canary, seed)`` for :func:`distinguishing_audit`: a fresh model
    (``make_model(seed)``) trained ``steps`` Poisson-sampled steps on ``(x, y)`` by
    ``make_optimizer(model, ledger, seed)`` (a :class:`~pytorch_privacy.optimizer.DPOptimizer`),
    with one gradient canary of norm ``l2_norm_clip`` that, when included, is sampled at ``q``
    like every example; the score is the sum of the released gradients along the canary
    (white-box).  The canary's direction is the same in every run (its seed is fixed)."""
    from ..dp_query.privacy_ledger import PrivacyLedger
    from .canaries import GradientCanaries, train_with_canaries

    def run(include: bool, seed: int) -> float:
        model = make_model(seed)
        canary = GradientCanaries(
            model, 1, l2_norm_clip=l2_norm_clip, kind=kind, seed=0, included=[bool(include)], sampling_seed=10_000 + seed
        )
        ledger = PrivacyLedger(len(y) + int(include), sample_rate)
        opt = make_optimizer(model, ledger, seed)
        scores = train_with_canaries(
            model, opt, x, y, sample_rate=sample_rate, steps=steps, gradient_canaries=canary, seed=20_000 + seed
        )
        return float(scores[0])

    return run
