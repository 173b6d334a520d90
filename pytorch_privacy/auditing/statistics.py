"""Statistics of empirical privacy bounds: exact binomial intervals, the hypothesis-testing
bound on epsilon, and ROC helpers.  numpy/scipy only (no torch), so an audit's numbers can be
recomputed from saved scores alone.

* :func:`clopper_pearson` -- exact (Clopper--Pearson 1934) confidence interval for a binomial
  proportion, from beta quantiles.
* :func:`epsilon_from_rates` -- the smallest epsilon that an (epsilon, delta)-DP mechanism must
  have for a test with the given true/false positive rates to exist (Kairouz, Oh, Viswanath 2015).
* :func:`epsilon_lower_bound` -- the same bound made statistically valid: Clopper--Pearson lower
  bound on the TPR and upper bound on the FPR (Jagielski, Ullman, Oprea 2020; Nasr et al. 2021).
* :func:`roc_curve`, :func:`auc`, :func:`roc_auc_score`, :func:`tpr_at_fpr`,
  :func:`confusion_counts` -- ROC helpers with scikit-learn's conventions, so scikit-learn stays a
  test-only dependency.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from scipy import stats

__all__ = [
    "clopper_pearson",
    "epsilon_from_rates",
    "epsilon_lower_bound",
    "epsilon_lower_bound_per_threshold",
    "confusion_counts",
    "roc_curve",
    "auc",
    "roc_auc_score",
    "tpr_at_fpr",
]

Side = Literal["two-sided", "lower", "upper"]
_SIDES = ("two-sided", "lower", "upper")


def _check_confidence(confidence: float) -> float:
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float, np.floating)):
        raise TypeError(f"confidence must be a float in (0, 1), got {type(confidence).__name__}")
    c = float(confidence)
    if not (0.0 < c < 1.0):
        raise ValueError(f"confidence must be in (0, 1) (e.g. 0.95), got {confidence!r}")
    return c


def _check_count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        if isinstance(value, (float, np.floating)) and float(value).is_integer():
            value = int(value)
        else:
            raise TypeError(f"{name} must be a non-negative integer count, got {value!r}")
    v = int(value)
    if v < 0:
        raise ValueError(f"{name} must be >= 0, got {v}")
    return v


def clopper_pearson(
    successes: int, trials: int, confidence: float = 0.95, side: Side = "two-sided"
) -> tuple[float, float]:
    """Exact (Clopper--Pearson) confidence interval ``(lower, upper)`` for a binomial proportion.

    With ``k`` successes in ``n`` trials and ``alpha = 1 - confidence``:

    * ``"two-sided"``: ``lower = B(alpha/2; k, n-k+1)``, ``upper = B(1-alpha/2; k+1, n-k)``;
    * ``"lower"``: one-sided, ``lower = B(alpha; k, n-k+1)``, ``upper = 1``;
    * ``"upper"``: one-sided, ``lower = 0``, ``upper = B(1-alpha; k+1, n-k)``;

    where ``B(q; a, b)`` is the ``q``-quantile of the Beta(a, b) distribution, with ``lower = 0``
    when ``k = 0`` and ``upper = 1`` when ``k = n``.  The interval covers the true proportion with
    probability at least ``confidence`` for every proportion (it is conservative, never
    anti-conservative).  The two-sided interval equals ``scipy.stats.binomtest(k, n).proportion_ci(
    confidence, method="exact")``.
    """
    k = _check_count("successes", successes)
    n = _check_count("trials", trials)
    if n == 0:
        raise ValueError("trials must be >= 1: no interval for a proportion of zero trials")
    if k > n:
        raise ValueError(f"successes ({k}) must not exceed trials ({n})")
    c = _check_confidence(confidence)
    if side not in _SIDES:
        raise ValueError(f"side must be one of {_SIDES}, got {side!r}")
    alpha = 1.0 - c
    tail = alpha / 2.0 if side == "two-sided" else alpha
    lower, upper = 0.0, 1.0
    if side != "upper" and k > 0:
        lower = float(stats.beta.ppf(tail, k, n - k + 1))
    if side != "lower" and k < n:
        upper = float(stats.beta.ppf(1.0 - tail, k + 1, n - k))
    return lower, upper


def _check_rate(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a float in [0, 1], got {type(value).__name__}")
    v = float(value)
    if not (0.0 <= v <= 1.0):
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return v


def epsilon_from_rates(tpr: float, fpr: float, delta: float = 0.0) -> float:
    """The epsilon lower bound implied by a test with true/false positive rates ``(tpr, fpr)``.

    Any test distinguishing the outputs of an (epsilon, delta)-DP mechanism on neighbouring
    datasets satisfies ``TPR <= e^eps FPR + delta`` and ``1 - FPR <= e^eps (1 - TPR) + delta``
    (Kairouz, Oh, Viswanath 2015, Thm. 2.1), hence::

        eps >= max(log((TPR - delta) / FPR), log((1 - FPR - delta) / (1 - TPR)), 0)

    A term whose numerator is <= 0 gives no bound.  Returns ``inf`` when a denominator is 0 and
    its numerator is positive (a perfect test at this delta: no finite epsilon explains it).
    These are *population* rates; for rates measured on finitely many trials use
    :func:`epsilon_lower_bound`, which accounts for sampling error.
    """
    t = _check_rate("tpr", tpr)
    f = _check_rate("fpr", fpr)
    d = _check_rate("delta", delta)
    best = 0.0
    for num, den in ((t - d, f), (1.0 - f - d, 1.0 - t)):
        if num <= 0.0:
            continue
        if den <= 0.0:
            return math.inf
        best = max(best, math.log(num / den))
    return best


def epsilon_lower_bound(
    tp: int, fn: int, fp: int, tn: int, delta: float = 0.0, confidence: float = 0.95
) -> float:
    """A lower bound on epsilon that holds with probability >= ``confidence``.

    From a confusion matrix (``tp + fn`` trials with the target in, ``fp + tn`` with it out):
    ``TPR_lo`` is the one-sided Clopper--Pearson lower bound on the true positive rate and
    ``FPR_hi`` the one-sided upper bound on the false positive rate, each at confidence
    ``1 - (1 - confidence)/2``; by the union bound both hold together with probability at least
    ``confidence``.  Because :func:`epsilon_from_rates` increases with TPR and decreases with FPR,
    on that event the true epsilon is at least ``epsilon_from_rates(TPR_lo, FPR_hi, delta)``,
    which is returned (Jagielski, Ullman, Oprea 2020; Nasr et al. 2021).

    The guarantee assumes the threshold that produced the confusion matrix was fixed before
    these trials were seen; a threshold chosen to maximise the bound on the same trials makes it
    optimistic (select on one split, evaluate on another).
    """
    tp, fn, fp, tn = (_check_count(n, v) for n, v in (("tp", tp), ("fn", fn), ("fp", fp), ("tn", tn)))
    if tp + fn == 0 or fp + tn == 0:
        raise ValueError(
            f"need trials on both sides: tp+fn={tp + fn} (target in), fp+tn={fp + tn} (target out)"
        )
    c = _check_confidence(confidence)
    _check_rate("delta", delta)
    each = 1.0 - (1.0 - c) / 2.0
    tpr_lo, _ = clopper_pearson(tp, tp + fn, each, side="lower")
    _, fpr_hi = clopper_pearson(fp, fp + tn, each, side="upper")
    return epsilon_from_rates(tpr_lo, fpr_hi, delta)


def _binary_inputs(y_true, y_score) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    s = np.asarray(y_score)
    if y.ndim != 1 or s.ndim != 1:
        raise ValueError(f"y_true and y_score must be 1-D, got shapes {y.shape} and {s.shape}")
    if y.shape != s.shape:
        raise ValueError(f"y_true and y_score must have the same length, got {y.size} and {s.size}")
    if y.dtype.kind not in "biuf" or s.dtype.kind not in "biuf":
        raise TypeError("y_true and y_score must be numeric (labels 0/1 or booleans, real scores)")
    s = s.astype(np.float64)
    if not np.all(np.isfinite(s)):
        raise ValueError("y_score contains NaN or infinite values")
    yv = y.astype(np.float64)
    if not np.all((yv == 0) | (yv == 1)):
        raise ValueError("y_true must contain only 0/1 (or False/True) labels")
    yb = yv.astype(bool)
    if yb.all() or (~yb).all():
        raise ValueError("y_true must contain both classes (members and non-members)")
    return yb, s


def confusion_counts(y_true, y_score) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(thresholds, tp, fp)`` for every distinct score, predicting positive when ``score >= t``.

    ``thresholds`` are the distinct scores in decreasing order; ``tp[i]`` / ``fp[i]`` count the
    positives / negatives with score ``>= thresholds[i]`` (tied scores enter together).
    """
    y, s = _binary_inputs(y_true, y_score)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last_of_run = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]
    tp = np.cumsum(y)[last_of_run]
    fp = (last_of_run + 1) - tp
    return s[last_of_run], tp.astype(np.int64), fp.astype(np.int64)


def roc_curve(y_true, y_score, drop_intermediate: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, thresholds)`` of the ROC curve, with scikit-learn's conventions.

    The curve starts at ``(0, 0)`` with threshold ``+inf``; each further point predicts positive
    when ``score >= threshold``.  With ``drop_intermediate`` a point is dropped when it lies on the
    straight segment between its neighbours with equal steps (both second differences of the
    counts are zero), as scikit-learn does; the area is unchanged.
    """
    thr, tp, fp = confusion_counts(y_true, y_score)
    if drop_intermediate and tp.size > 2:
        keep = np.r_[True, (np.diff(fp, 2) != 0) | (np.diff(tp, 2) != 0), True]
        thr, tp, fp = thr[keep], tp[keep], fp[keep]
    tp = np.r_[0, tp]
    fp = np.r_[0, fp]
    thr = np.r_[np.inf, thr]
    return fp / fp[-1], tp / tp[-1], thr


def auc(x, y) -> float:
    """Area under a curve by the trapezoidal rule; ``x`` must be monotone (either direction)."""
    xa = np.asarray(x, dtype=np.float64)
    ya = np.asarray(y, dtype=np.float64)
    if xa.ndim != 1 or xa.shape != ya.shape or xa.size < 2:
        raise ValueError(f"x and y must be 1-D of equal length >= 2, got {xa.shape} and {ya.shape}")
    if not (np.all(np.isfinite(xa)) and np.all(np.isfinite(ya))):
        raise ValueError("x and y must be finite")
    dx = np.diff(xa)
    if np.all(dx >= 0):
        sign = 1.0
    elif np.all(dx <= 0):
        sign = -1.0
    else:
        raise ValueError("x must be monotonic (increasing or decreasing) for the area to be defined")
    return float(sign * np.sum(dx * (ya[1:] + ya[:-1]) / 2.0))


def roc_auc_score(y_true, y_score) -> float:
    """Area under the ROC curve: the probability that a random positive scores above a random
    negative, ties counting one half (Mann--Whitney U / (n_pos n_neg))."""
    fpr, tpr, _ = roc_curve(y_true, y_score, drop_intermediate=False)
    return auc(fpr, tpr)


def tpr_at_fpr(fpr, tpr, target_fpr: float) -> float:
    """The TPR at ``target_fpr``, linearly interpolated on an ROC curve (``fpr`` non-decreasing).

    Linear interpolation between two ROC points is achievable by randomising between their
    thresholds, so the value is a TPR some test attains at exactly ``target_fpr``.
    """
    f = np.asarray(fpr, dtype=np.float64)
    t = np.asarray(tpr, dtype=np.float64)
    if f.ndim != 1 or f.shape != t.shape or f.size < 2:
        raise ValueError("fpr and tpr must be 1-D arrays of equal length >= 2 (an ROC curve)")
    if np.any(np.diff(f) < 0):
        raise ValueError("fpr must be non-decreasing (as returned by roc_curve)")
    target = _check_rate("target_fpr", target_fpr)
    hi = int(np.searchsorted(f, target, side="right"))  # first index with fpr > target
    if hi == 0:
        raise ValueError(f"target_fpr {target} is below the curve's smallest fpr {f[0]}")
    if f[hi - 1] == target or hi == f.size:
        # Among points at this fpr take the largest tpr (the best test at that false positive rate).
        return float(np.max(t[f == f[hi - 1]]))
    f0, f1, t0, t1 = f[hi - 1], f[hi], t[hi - 1], t[hi]
    return float(t0 + (t1 - t0) * (target - f0) / (f1 - f0))


def epsilon_lower_bound_per_threshold(
    member_scores, nonmember_scores, delta: float = 0.0, confidence: float = 0.95
) -> tuple[np.ndarray, np.ndarray]:
    """``(thresholds, bounds)``: :func:`epsilon_lower_bound` for the test "member if
    ``score >= t``" at every distinct score ``t`` (vectorised; equal to the scalar function).

    Each bound holds at ``confidence`` for its own threshold fixed in advance; the *maximum* over
    thresholds is optimistic (a multiple-comparison effect).  To report one bound, choose the
    threshold on one split of the trials and call :func:`epsilon_lower_bound` on the counts of
    another.
    """
    m = np.asarray(member_scores, dtype=np.float64).ravel()
    n = np.asarray(nonmember_scores, dtype=np.float64).ravel()
    if m.size == 0 or n.size == 0:
        raise ValueError("need at least one member and one non-member score")
    c = _check_confidence(confidence)
    d = _check_rate("delta", delta)
    thr, tp, fp = confusion_counts(np.r_[np.ones(m.size), np.zeros(n.size)], np.r_[m, n])
    tail = (1.0 - c) / 2.0
    tpr_lo = np.where(tp > 0, stats.beta.ppf(tail, np.maximum(tp, 1), m.size - tp + 1), 0.0)
    fpr_hi = np.where(fp < n.size, stats.beta.ppf(1.0 - tail, fp + 1, np.maximum(n.size - fp, 1)), 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.where(tpr_lo - d > 0, np.log(np.maximum(tpr_lo - d, 1e-300) / fpr_hi), 0.0)
        b = np.where(1 - fpr_hi - d > 0, np.log(np.maximum(1 - fpr_hi - d, 1e-300) / (1 - tpr_lo)), 0.0)
    return thr, np.maximum(np.maximum(a, b), 0.0)
