"""auditing.statistics: Clopper-Pearson against scipy's beta quantiles and binomtest, the
hypothesis-testing epsilon bound on hand-derived values, ROC/AUC against scikit-learn."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats

from pytorch_privacy.auditing.statistics import (
    auc,
    clopper_pearson,
    confusion_counts,
    epsilon_from_rates,
    epsilon_lower_bound,
    epsilon_lower_bound_per_threshold,
    roc_auc_score,
    roc_curve,
    tpr_at_fpr,
)


# ---------------------------------------------------------------- Clopper-Pearson


@pytest.mark.parametrize("k,n", [(1, 10), (7, 20), (50, 100), (999, 1000), (3, 5000)])
@pytest.mark.parametrize("conf", [0.9, 0.95, 0.99])
def test_clopper_pearson_equals_beta_quantiles(k, n, conf):
    a = 1 - conf
    lo, hi = clopper_pearson(k, n, conf)
    assert abs(lo - stats.beta.ppf(a / 2, k, n - k + 1)) <= 1e-12
    assert abs(hi - stats.beta.ppf(1 - a / 2, k + 1, n - k)) <= 1e-12
    lo1, one = clopper_pearson(k, n, conf, side="lower")
    assert one == 1.0 and abs(lo1 - stats.beta.ppf(a, k, n - k + 1)) <= 1e-12
    zero, hi1 = clopper_pearson(k, n, conf, side="upper")
    assert zero == 0.0 and abs(hi1 - stats.beta.ppf(1 - a, k + 1, n - k)) <= 1e-12


@pytest.mark.parametrize("k,n", [(0, 10), (10, 10), (4, 17), (250, 600)])
def test_clopper_pearson_equals_binomtest_exact(k, n):
    ci = stats.binomtest(k, n).proportion_ci(0.95, method="exact")
    lo, hi = clopper_pearson(k, n, 0.95)
    assert abs(lo - ci.low) <= 1e-12 and abs(hi - ci.high) <= 1e-12
    ci_g = stats.binomtest(k, n, alternative="greater").proportion_ci(0.95, method="exact")
    assert abs(clopper_pearson(k, n, 0.95, "lower")[0] - ci_g.low) <= 1e-12
    ci_l = stats.binomtest(k, n, alternative="less").proportion_ci(0.95, method="exact")
    assert abs(clopper_pearson(k, n, 0.95, "upper")[1] - ci_l.high) <= 1e-12


def test_clopper_pearson_edges_closed_forms():
    # k = 0: upper bound solves (1-p)^n = alpha/2; k = n: lower bound solves p^n = alpha/2.
    n = 20
    lo, hi = clopper_pearson(0, n, 0.95)
    assert lo == 0.0 and hi == pytest.approx(1 - 0.025 ** (1 / n), rel=1e-12)
    lo, hi = clopper_pearson(n, n, 0.95)
    assert hi == 1.0 and lo == pytest.approx(0.025 ** (1 / n), rel=1e-12)
    assert clopper_pearson(0, n, 0.95, "lower") == (0.0, 1.0)
    assert clopper_pearson(n, n, 0.95, "upper") == (0.0, 1.0)


@given(st.integers(1, 400).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))))
def test_clopper_pearson_contains_point_estimate_and_nests(kn):
    k, n = kn
    lo95, hi95 = clopper_pearson(k, n, 0.95)
    lo99, hi99 = clopper_pearson(k, n, 0.99)
    assert 0 <= lo99 <= lo95 <= k / n <= hi95 <= hi99 <= 1


@pytest.mark.parametrize("side", ["two-sided", "lower", "upper"])
def test_clopper_pearson_exact_coverage(side):
    # Exact intervals are conservative: the coverage sum_k Binom(k; n, p) 1[p in CI(k)] is at
    # least the confidence for every p (computed exactly, no simulation), on a grid of 199 p.
    n = 40
    cis = [clopper_pearson(k, n, 0.9, side) for k in range(n + 1)]
    for p in np.linspace(0.005, 0.995, 199):
        pmf = stats.binom.pmf(np.arange(n + 1), n, p)
        cover = sum(w for w, (lo, hi) in zip(pmf, cis) if lo <= p <= hi)
        assert cover >= 0.9 - 1e-12, (p, cover)


@pytest.mark.parametrize(
    "args,exc",
    [
        ((11, 10), ValueError),
        ((-1, 10), ValueError),
        ((0, 0), ValueError),
        ((1.5, 10), TypeError),
        ((True, 10), TypeError),
        ((1, 10, 1.0), ValueError),
        ((1, 10, 0.0), ValueError),
        ((1, 10, "0.95"), TypeError),
        ((1, 10, 0.95, "both"), ValueError),
    ],
)
def test_clopper_pearson_rejects_bad_input(args, exc):
    with pytest.raises(exc):
        clopper_pearson(*args)


# ---------------------------------------------------------------- epsilon bounds


def test_epsilon_from_rates_hand_values():
    assert epsilon_from_rates(0.5, 0.05, 0.0) == pytest.approx(math.log(10), rel=1e-15)
    # second term: (1 - 0.1) / (1 - 0.91) = 10
    assert epsilon_from_rates(0.91, 0.1) == pytest.approx(math.log(10), rel=1e-12)
    # delta: (0.5 - 0.1) / 0.04 = 10 beats (1 - 0.04 - 0.1) / 0.5 = 1.72
    assert epsilon_from_rates(0.5, 0.04, 0.1) == pytest.approx(math.log(10), rel=1e-12)
    assert epsilon_from_rates(0.3, 0.3) == 0.0  # chance
    assert epsilon_from_rates(0.1, 0.5) == 0.0  # worse than chance gives no bound
    assert epsilon_from_rates(0.05, 0.0, 0.05) == 0.0  # all of the TPR explained by delta
    assert epsilon_from_rates(0.5, 0.0) == math.inf
    assert epsilon_from_rates(1.0, 0.5) == math.inf


@given(st.floats(0, 1), st.floats(0, 1), st.floats(0, 0.5))
def test_epsilon_from_rates_is_tight_for_the_dp_region(tpr, fpr, delta):
    # The returned eps is the smallest for which (tpr, fpr) satisfies both DP constraints.
    eps = epsilon_from_rates(tpr, fpr, delta)
    assert eps >= 0
    if math.isfinite(eps):
        e = math.exp(eps) * (1 + 1e-9)
        assert tpr <= e * fpr + delta + 1e-12
        assert 1 - fpr <= e * (1 - tpr) + delta + 1e-12
        if eps > 1e-6:
            e = math.exp(eps) * (1 - 1e-6)
            assert tpr > e * fpr + delta or 1 - fpr > e * (1 - tpr) + delta


def test_epsilon_lower_bound_is_union_bounded_clopper_pearson():
    tp, fn, fp, tn = 900, 100, 10, 990
    lo = stats.beta.ppf(0.025, tp, fn + 1)  # one-sided at 97.5% each
    hi = stats.beta.ppf(0.975, fp + 1, tn)
    expect = max(math.log(lo / hi), math.log((1 - hi) / (1 - lo)))
    assert epsilon_lower_bound(tp, fn, fp, tn, 0.0, 0.95) == pytest.approx(expect, rel=1e-12)
    # below the point estimate, above 0, and shrinking with confidence
    assert 0 < expect < epsilon_from_rates(0.9, 0.01)
    assert epsilon_lower_bound(tp, fn, fp, tn, 0.0, 0.99) < expect
    # no false positives at all still gives a finite bound
    assert math.isfinite(epsilon_lower_bound(1000, 0, 0, 1000))


@pytest.mark.parametrize("delta", [0.0, 0.01])
def test_epsilon_lower_bound_per_threshold_equals_scalar(delta):
    rng = np.random.default_rng(3)
    mem = np.round(rng.normal(1.5, 1, 80), 1)
    non = np.round(rng.normal(0, 1, 70), 1)
    thr, eps = epsilon_lower_bound_per_threshold(mem, non, delta, 0.9)
    assert thr.size == np.unique(np.r_[mem, non]).size
    for t, e in zip(thr, eps):
        tp, fp = int((mem >= t).sum()), int((non >= t).sum())
        assert e == pytest.approx(epsilon_lower_bound(tp, 80 - tp, fp, 70 - fp, delta, 0.9), abs=1e-10)
    assert eps.max() > 0.5


def test_epsilon_lower_bound_rejects_bad_input():
    with pytest.raises(ValueError):
        epsilon_lower_bound(0, 0, 1, 1)
    with pytest.raises(ValueError):
        epsilon_lower_bound(1, 1, 1, 1, delta=1.5)
    with pytest.raises(ValueError):
        epsilon_lower_bound(1, -1, 1, 1)
    with pytest.raises(ValueError):
        epsilon_lower_bound(1, 1, 1, 1, confidence=1.0)


# ---------------------------------------------------------------- ROC / AUC

Y = np.array([1, 0, 1, 1, 0, 0, 1, 0, 1, 0, 0, 1])
S = np.array([0.9, 0.9, 0.8, 0.4, 0.4, 0.4, 0.35, 0.2, 0.2, 0.1, 0.05, 0.9])


@pytest.mark.parametrize("drop", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_roc_curve_matches_sklearn(drop, seed):
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 60) if seed else Y
    s = np.round(rng.normal(size=60) + y, 1) if seed else S  # rounding makes ties
    f1, t1, th1 = roc_curve(y, s, drop_intermediate=drop)
    f2, t2, th2 = metrics.roc_curve(y, s, drop_intermediate=drop)
    np.testing.assert_array_equal(th1, th2)
    np.testing.assert_allclose(f1, f2, rtol=0, atol=1e-15)
    np.testing.assert_allclose(t1, t2, rtol=0, atol=1e-15)
    assert roc_auc_score(y, s) == pytest.approx(metrics.roc_auc_score(y, s), abs=1e-14)
    assert auc(f1, t1) == pytest.approx(metrics.auc(f2, t2), abs=1e-14)


def test_auc_hand_values_with_ties():
    # pairs (pos, neg): 5 pos x 5 neg... count by hand on a small set
    y = [1, 1, 0, 0, 1, 0]
    s = [3, 2, 2, 1, 1, 0]
    # pos scores 3,2,1; neg 2,1,0. wins: 3>all (3); 2>1,0 and tie 2 (2.5); 1>0, tie 1 (1.5) -> 7/9
    assert roc_auc_score(y, s) == pytest.approx(7 / 9, abs=1e-15)
    assert auc([1, 0.5, 0], [1, 1, 0]) == pytest.approx(0.75)  # decreasing x


def test_confusion_counts_and_tpr_at_fpr():
    thr, tp, fp = confusion_counts(Y, S)
    np.testing.assert_array_equal(thr, [0.9, 0.8, 0.4, 0.35, 0.2, 0.1, 0.05])
    np.testing.assert_array_equal(tp, [2, 3, 4, 5, 6, 6, 6])
    np.testing.assert_array_equal(fp, [1, 1, 3, 3, 4, 5, 6])
    fpr, tpr, _ = roc_curve(Y, S, drop_intermediate=False)
    assert tpr_at_fpr(fpr, tpr, 0.0) == 0.0
    assert tpr_at_fpr(fpr, tpr, 1 / 6) == pytest.approx(3 / 6)  # largest tpr at that fpr
    # halfway between (1/6, 3/6) and (3/6, 4/6)
    assert tpr_at_fpr(fpr, tpr, 2 / 6) == pytest.approx(3.5 / 6)
    assert tpr_at_fpr(fpr, tpr, 1.0) == 1.0


def test_analytic_auc_of_gaussian_scores():
    # members' losses N(0,1), non-members' N(2,1); score = -loss. AUC = Phi(2/sqrt(2)) = 0.9214.
    # With 2000 + 2000 draws the AUC's SE is about sqrt(AUC(1-AUC)/2000 * ~1.5) < 0.0075;
    # tolerance 0.02 is > 2.6 SE (seeded, so deterministic).
    rng = np.random.default_rng(1)
    s = -np.r_[rng.normal(0, 1, 2000), rng.normal(2, 1, 2000)]
    y = np.r_[np.ones(2000), np.zeros(2000)]
    assert abs(roc_auc_score(y, s) - stats.norm.cdf(2 / math.sqrt(2))) < 0.02


@pytest.mark.parametrize(
    "y,s,exc",
    [
        ([1, 1], [0.1, 0.2], ValueError),
        ([1, 0], [0.1], ValueError),
        ([1, 2], [0.1, 0.2], ValueError),
        ([1, 0], [0.1, float("nan")], ValueError),
        ([[1, 0]], [[0.1, 0.2]], ValueError),
        (["a", "b"], [0.1, 0.2], TypeError),
    ],
)
def test_roc_rejects_bad_input(y, s, exc):
    with pytest.raises(exc):
        roc_curve(y, s)


def test_tpr_at_fpr_and_auc_reject_bad_input():
    with pytest.raises(ValueError):
        tpr_at_fpr([0, 1, 0.5], [0, 1, 1], 0.1)
    with pytest.raises(ValueError):
        tpr_at_fpr([0, 1], [0, 1], 1.5)
    with pytest.raises(ValueError):
        auc([0, 1, 0.5], [0, 1, 1])


def test_statistics_imports_without_torch():
    code = (
        "import sys\n"
        "import pytorch_privacy.auditing.statistics as s\n"
        "s.epsilon_lower_bound(90, 10, 5, 95)\n"
        "import pytorch_privacy.auditing.mia_results as r\n"
        "r.evaluate_scores([1.0, 2.0, 3.0], [0.0, 1.0, 0.5])\n"
        "assert not [m for m in sys.modules if m == 'torch' or m.startswith('torch.')]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


@given(
    st.lists(st.tuples(st.booleans(), st.integers(-3, 3)), min_size=2, max_size=30).filter(
        lambda v: any(b for b, _ in v) and not all(b for b, _ in v)
    ),
    st.booleans(),
)
def test_roc_matches_sklearn_on_random_tied_inputs(pairs, drop):
    metrics = pytest.importorskip("sklearn.metrics")
    y = np.array([int(b) for b, _ in pairs])
    s = np.array([float(v) for _, v in pairs])  # 7 distinct values: many ties
    f1, t1, th1 = roc_curve(y, s, drop_intermediate=drop)
    f2, t2, th2 = metrics.roc_curve(y, s, drop_intermediate=drop)
    np.testing.assert_array_equal(th1, th2)
    np.testing.assert_allclose(np.c_[f1, t1], np.c_[f2, t2], atol=1e-15)
    assert roc_auc_score(y, s) == pytest.approx(metrics.roc_auc_score(y, s), abs=1e-12)


@given(st.integers(0, 60), st.integers(0, 60), st.integers(0, 60), st.integers(0, 60), st.floats(0, 0.2), st.floats(0.5, 0.999))
def test_epsilon_lower_bound_is_finite_and_below_the_point_estimate(tp, fn, fp, tn, delta, conf):
    if tp + fn == 0 or fp + tn == 0:
        with pytest.raises(ValueError):
            epsilon_lower_bound(tp, fn, fp, tn, delta, conf)
        return
    eps = epsilon_lower_bound(tp, fn, fp, tn, delta, conf)
    assert math.isfinite(eps) and eps >= 0
    assert eps <= epsilon_from_rates(tp / (tp + fn), fp / (fp + tn), delta) + 1e-12
