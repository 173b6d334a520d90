"""Results of membership-inference attacks: ROC metrics, the epsilon lower bound with its
threshold chosen on a held-out split, and a summary table.  numpy only (no torch)."""

from __future__ import annotations

import math
from typing import Sequence

import attrs
import numpy as np

from .statistics import auc, epsilon_lower_bound, epsilon_lower_bound_per_threshold, roc_curve, tpr_at_fpr

__all__ = ["AttackResult", "AttackResults", "evaluate_scores"]

DEFAULT_FPRS: tuple[float, ...] = (1e-3, 1e-2)


@attrs.frozen(eq=False)
class AttackResult:
    """One attack on one slice.  Scores: higher means "member".

    Attributes:
        attack: the attack's name (an :class:`~.membership_inference.AttackType` value).
        slice: which examples (``"all"``, ``"class=3"``, ``"loss percentile 0-10"``...).
        n_members, n_nonmembers: examples scored (for trained attackers, the attacker's
            held-out part only).
        auc: area under the ROC curve (0.5 = chance).
        advantage: attacker advantage ``max_t (TPR - FPR)`` (Yeom et al. 2018).
        tpr_at_fpr: ``{fpr: tpr}`` at low false positive rates, interpolated on the ROC curve.
            With fewer than ``1/fpr`` non-members the value is an interpolation between the
            curve's first points and says little.
        epsilon_lower_bound: epsilon implied at ``delta`` with ``confidence`` (Clopper--Pearson,
            :func:`~.statistics.epsilon_lower_bound`) by the threshold chosen on one random half of
            the scores and evaluated on the other half: a valid bound (given a random
            member/non-member split), at the price of half the data.
        epsilon_optimistic: the largest per-threshold Clopper--Pearson bound over all scores,
            with the threshold chosen on the same scores: optimistic (not a valid bound), shown
            for comparison with tools that report it.
        epsilon_threshold: the held-out threshold (predict member when ``score >= threshold``).
        fpr, tpr, thresholds: the ROC curve (:func:`~.statistics.roc_curve`).
        member_scores, nonmember_scores: the scores behind it.
    """

    attack: str
    slice: str
    n_members: int
    n_nonmembers: int
    auc: float
    advantage: float
    tpr_at_fpr: dict
    epsilon_lower_bound: float
    epsilon_optimistic: float
    epsilon_threshold: float
    delta: float
    confidence: float
    fpr: np.ndarray = attrs.field(repr=False)
    tpr: np.ndarray = attrs.field(repr=False)
    thresholds: np.ndarray = attrs.field(repr=False)
    member_scores: np.ndarray = attrs.field(repr=False)
    nonmember_scores: np.ndarray = attrs.field(repr=False)

    def to_dict(self, arrays: bool = False) -> dict:
        """Plain-Python view (JSON-serialisable); ``arrays=True`` adds the ROC curve and scores."""
        out = {
            "attack": self.attack,
            "slice": self.slice,
            "n_members": self.n_members,
            "n_nonmembers": self.n_nonmembers,
            "auc": self.auc,
            "advantage": self.advantage,
            "tpr_at_fpr": {repr(k): v for k, v in self.tpr_at_fpr.items()},
            "epsilon_lower_bound": self.epsilon_lower_bound,
            "epsilon_optimistic": self.epsilon_optimistic,
            "epsilon_threshold": self.epsilon_threshold,
            "delta": self.delta,
            "confidence": self.confidence,
        }
        if arrays:
            for name in ("fpr", "tpr", "thresholds", "member_scores", "nonmember_scores"):
                out[name] = [float(v) for v in getattr(self, name)]
        return out

    def __str__(self) -> str:
        lows = ", ".join(f"TPR@{k:g}={v:.3f}" for k, v in self.tpr_at_fpr.items())
        return (
            f"{self.attack} on {self.slice} ({self.n_members} in / {self.n_nonmembers} out): "
            f"AUC={self.auc:.3f}, advantage={self.advantage:.3f}, {lows}, "
            f"epsilon >= {self.epsilon_lower_bound:.3f} at delta={self.delta:g} "
            f"({self.confidence:.0%} confidence)"
        )


@attrs.frozen(eq=False)
class AttackResults:
    """All attacks on all slices; ``str()`` is a summary table, :meth:`to_dict` a plain view."""

    results: tuple[AttackResult, ...]
    skipped: tuple[str, ...] = ()

    def __iter__(self):
        return iter(self.results)

    def __len__(self) -> int:
        return len(self.results)

    def get(self, attack: str, slice: str = "all") -> AttackResult:
        """The result of ``attack`` (name or :class:`AttackType`) on ``slice``."""
        name = getattr(attack, "value", attack)
        for r in self.results:
            if r.attack == name and r.slice == slice:
                return r
        raise KeyError(f"no result for attack {name!r} on slice {slice!r}; have "
                       f"{sorted({(r.attack, r.slice) for r in self.results})}")

    def best(self, metric: str = "auc") -> AttackResult:
        """The result with the largest ``metric`` (``auc``, ``advantage``, ``epsilon_lower_bound``)."""
        if metric not in ("auc", "advantage", "epsilon_lower_bound", "epsilon_optimistic"):
            raise ValueError(f"metric must be auc, advantage, epsilon_lower_bound or epsilon_optimistic, got {metric!r}")
        if not self.results:
            raise ValueError("no results (every slice was skipped)")
        return max(self.results, key=lambda r: getattr(r, metric))

    @property
    def max_epsilon_lower_bound(self) -> float:
        """The largest held-out bound.  Each bound holds at its own confidence; the maximum over
        k results holds at ``1 - k (1 - confidence)`` (union bound)."""
        return max((r.epsilon_lower_bound for r in self.results), default=0.0)

    def to_dict(self, arrays: bool = False) -> dict:
        """``{"results": [AttackResult.to_dict(arrays), ...], "skipped": [...]}`` (JSON-serialisable)."""
        return {"results": [r.to_dict(arrays) for r in self.results], "skipped": list(self.skipped)}

    def summary(self) -> str:
        """A fixed-width table, one row per (attack, slice)."""
        fprs = sorted({k for r in self.results for k in r.tpr_at_fpr})
        head = ["attack", "slice", "in", "out", "AUC", "adv"] + [f"TPR@{f:g}" for f in fprs] + ["eps>=", "eps(opt)"]
        rows = [head]
        for r in self.results:
            rows.append(
                [r.attack, r.slice, str(r.n_members), str(r.n_nonmembers), f"{r.auc:.3f}", f"{r.advantage:.3f}"]
                + [f"{r.tpr_at_fpr.get(f, math.nan):.3f}" for f in fprs]
                + [f"{r.epsilon_lower_bound:.3f}", f"{r.epsilon_optimistic:.3f}"]
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "-" * len(lines[0]))
        if self.results:
            r0 = self.results[0]
            lines.append(
                f"eps>=: Clopper-Pearson lower bound at delta={r0.delta:g}, {r0.confidence:.0%} confidence, "
                "threshold chosen on a held-out half; eps(opt): threshold chosen on the same data (optimistic)"
            )
        lines.extend(f"skipped: {s}" for s in self.skipped)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def _held_out_epsilon(
    member: np.ndarray, nonmember: np.ndarray, delta: float, confidence: float, rng: np.random.Generator
) -> tuple[float, float]:
    """Choose the threshold on a random half of each group, bound epsilon on the other half."""
    pm, pn = rng.permutation(member.size), rng.permutation(nonmember.size)
    sel_m, ev_m = member[pm[: member.size // 2]], member[pm[member.size // 2 :]]
    sel_n, ev_n = nonmember[pn[: nonmember.size // 2]], nonmember[pn[nonmember.size // 2 :]]
    thr, eps = epsilon_lower_bound_per_threshold(sel_m, sel_n, delta, confidence)
    t = float(thr[int(np.argmax(eps))])
    tp, fp = int((ev_m >= t).sum()), int((ev_n >= t).sum())
    return epsilon_lower_bound(tp, ev_m.size - tp, fp, ev_n.size - fp, delta, confidence), t


def evaluate_scores(
    member_scores,
    nonmember_scores,
    attack: str = "scores",
    slice: str = "all",
    delta: float = 1e-5,
    confidence: float = 0.95,
    fprs: Sequence[float] = DEFAULT_FPRS,
    seed: int = 0,
) -> AttackResult:
    """Metrics of membership scores (higher = member): ROC, AUC, advantage, TPR at low FPR, and
    the epsilon lower bound (held-out threshold) at ``delta`` with ``confidence``.

    The bound is about the training algorithm and assumes each example's membership was decided
    at random (members and non-members drawn from the same distribution, e.g. a random split);
    compare it with the ledger's epsilon at the same delta.  Reading the examples of one training
    run as independent trials is the usual membership-inference heuristic, not a theorem: for a
    bound with a proof from one run use the one-run audit (Steinke, Nasr, Jagielski 2023), for
    one from many runs the distinguishing audit.
    """
    m = np.asarray(member_scores, dtype=np.float64).ravel()
    n = np.asarray(nonmember_scores, dtype=np.float64).ravel()
    if m.size < 2 or n.size < 2:
        raise ValueError(f"need >= 2 member and >= 2 non-member scores, got {m.size} and {n.size}")
    if not (np.all(np.isfinite(m)) and np.all(np.isfinite(n))):
        raise ValueError("scores must be finite (no NaN or inf)")
    y = np.r_[np.ones(m.size), np.zeros(n.size)]
    s = np.r_[m, n]
    fpr, tpr, thr = roc_curve(y, s)
    _, opt = epsilon_lower_bound_per_threshold(m, n, delta, confidence)
    eps, t = _held_out_epsilon(m, n, delta, confidence, np.random.default_rng(seed))
    return AttackResult(
        attack=attack,
        slice=slice,
        n_members=int(m.size),
        n_nonmembers=int(n.size),
        auc=auc(fpr, tpr),
        advantage=float(np.max(tpr - fpr)),
        tpr_at_fpr={float(f): tpr_at_fpr(fpr, tpr, f) for f in fprs},
        epsilon_lower_bound=float(eps),
        epsilon_optimistic=float(opt.max()),
        epsilon_threshold=t,
        delta=float(delta),
        confidence=float(confidence),
        fpr=fpr,
        tpr=tpr,
        thresholds=thr,
        member_scores=m,
        nonmember_scores=n,
    )
