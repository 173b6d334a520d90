"""The one-run audit's analysis (Steinke, Nasr, Jagielski 2023): the tail bound, the epsilon lower
bound, the guesses, and its coverage on a mechanism whose epsilon is known exactly."""

import math

import numpy as np
import pytest
from scipy.stats import binom

from pytorch_privacy.auditing.one_run import (
    guesses_from_scores,
    one_run_audit,
    one_run_epsilon_lower_bound,
    one_run_p_value,
)


def _all_correct_eps(r: int, beta: float = 0.05) -> float:
    """delta = 0, r guesses all right: the tail is P[Bin(r, p) >= r] = p^r, so the bound solves
    p^r = beta, i.e. eps = logit(beta^(1/r)) (the paper's binomial tail for pure DP)."""
    p = beta ** (1.0 / r)
    return math.log(p / (1.0 - p))


@pytest.mark.parametrize("r, expected", [(10, 1.051873), (100, 3.492965), (1000, 5.809068)])
def test_all_correct_guesses_give_the_closed_form_bound(r, expected):
    # the maximum epsilon r guesses can certify at 95% confidence (delta = 0): the quantity the
    # paper plots against the number of guesses; values worked by hand from p^r = 0.05
    assert _all_correct_eps(r) == pytest.approx(expected, abs=1e-6)
    assert one_run_epsilon_lower_bound(r, r, r, confidence=0.95) == pytest.approx(expected, abs=1e-5)


def _naive_p(m, r, v, eps, delta):
    """The paper's delta > 0 tail bound written out term by term with exact binomial pmfs (math.comb)."""
    p = math.exp(eps) / (1 + math.exp(eps))
    pmf = [math.comb(r, j) * p**j * (1 - p) ** (r - j) for j in range(r + 1)]
    tail = sum(pmf[v:])
    alpha = max((sum(pmf[v - i : v]) / i for i in range(1, v + 1)), default=0.0)
    return min(1.0, tail + 2 * m * delta * alpha)


@pytest.mark.parametrize("m, r, v", [(10, 10, 9), (50, 20, 15), (100, 60, 40), (200, 100, 70)])
@pytest.mark.parametrize("eps", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("delta", [0.0, 1e-5, 1e-2])
def test_p_value_matches_the_theorem_term_by_term(m, r, v, eps, delta):
    assert one_run_p_value(m, r, v, eps, delta) == pytest.approx(_naive_p(m, r, v, eps, delta), rel=1e-9, abs=1e-12)


def test_bound_is_where_the_tail_crosses_beta():
    m, r, v, delta = 1000, 200, 170, 1e-5
    eps = one_run_epsilon_lower_bound(m, r, v, delta=delta, confidence=0.95)
    assert eps > 0
    assert one_run_p_value(m, r, v, eps, delta) <= 0.05 < one_run_p_value(m, r, v, eps + 1e-4, delta)


def test_delta_only_lowers_the_bound_and_no_signal_gives_zero():
    b0 = one_run_epsilon_lower_bound(1000, 400, 330)
    b1 = one_run_epsilon_lower_bound(1000, 400, 330, delta=1e-5)
    b2 = one_run_epsilon_lower_bound(1000, 400, 330, delta=1e-3)
    assert b0 >= b1 >= b2 >= 0 and b0 > b2
    assert one_run_epsilon_lower_bound(1000, 400, 200) == 0.0  # half right: chance
    # with delta = 0 the bound for half right is below the trivial 0 test: P[Bin(400, 1/2) >= 200] > 0.05
    assert binom.sf(199, 400, 0.5) > 0.05


def test_coverage_on_randomized_response_with_known_epsilon():
    """Randomized response on every canary bit is exactly eps-DP per canary and makes W exactly
    Binomial(m, e^eps/(1+e^eps)): the 95% lower bound may exceed eps in at most 5% of runs.
    Over 200 seeded runs the count of violations is Binomial(200, <=0.05); 25 or more has
    probability < 1e-4."""
    eps, m = 1.0, 500
    p = math.exp(eps) / (1 + math.exp(eps))
    rng = np.random.default_rng(1234)
    bounds = []
    for _ in range(200):
        inc = rng.random(m) < 0.5
        flip = rng.random(m) >= p
        reported = np.where(flip, ~inc, inc)
        scores = reported.astype(float) + 1e-9 * rng.random(m)  # ties broken at random
        res = one_run_audit(scores, inc, k_plus=int(reported.sum()), k_minus=m - int(reported.sum()))
        bounds.append(res.epsilon_lower_bound)
    bounds = np.array(bounds)
    assert (bounds > eps).sum() < 25
    assert bounds.mean() > 0.5  # and the audit is not vacuous: it certifies a good part of eps


def test_guesses_from_scores():
    g = guesses_from_scores([0.1, 5.0, -3.0, 2.0, 0.0], 2, 1)
    assert g.tolist() == [0, 1, -1, 1, 0]
    with pytest.raises(ValueError, match="k_plus"):
        guesses_from_scores([1.0, 2.0], 2, 1)
    with pytest.raises(ValueError, match="NaN"):
        guesses_from_scores([1.0, float("nan")], 1, 0)


def test_separated_scores_give_a_large_bound_and_random_scores_none():
    rng = np.random.default_rng(0)
    m = 1000
    inc = rng.random(m) < 0.5
    res = one_run_audit(inc + 0.01 * rng.random(m), inc, delta=1e-5)
    assert res.correct == res.guesses == 2 * res.k_plus
    assert res.epsilon_lower_bound > 4 and res.settings_tried == 7
    assert "empirical epsilon >= " in res.summary()
    zeros = sum(one_run_audit(rng.random(m), rng.random(m) < 0.5, delta=1e-5).epsilon_lower_bound == 0 for _ in range(20))
    assert zeros >= 17  # each run is nonzero with probability <= 5%


def test_argument_errors():
    with pytest.raises(ValueError, match="one entry per canary"):
        one_run_audit([1.0, 2.0], [True])
    with pytest.raises(ValueError, match="both k_plus and k_minus"):
        one_run_audit([1.0, 2.0], [True, False], k_plus=1)
    with pytest.raises(ValueError, match="delta"):
        one_run_audit([1.0, 2.0], [True, False], delta=2.0)
    with pytest.raises(ValueError, match="v <= r <= m"):
        one_run_p_value(5, 6, 3, 1.0)
    with pytest.raises(ValueError, match="confidence"):
        one_run_epsilon_lower_bound(5, 5, 5, confidence=1.0)
    with pytest.raises(ValueError, match="at most 10,000,000"):
        one_run_p_value(10**9, 10**9, 10**9, 1.0, 1e-5)


def test_saved_scores_are_audited_without_torch():
    """The analysis reads scores and bits only: it imports and runs with torch blocked."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ImportError('torch blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from pytorch_privacy.auditing.one_run import one_run_audit\n"
        "from pytorch_privacy.auditing.distinguishing import distinguishing_bound\n"
        "r = one_run_audit([3.0, 2.0, 1.0, 0.0] * 50, [True, True, False, False] * 50, delta=1e-5)\n"
        "assert r.correct == r.guesses and r.epsilon_lower_bound > 1\n"
        "assert distinguishing_bound([1.0] * 20, [0.0] * 20, 0.5).tp == 20\n"
        "assert 'torch' not in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=40, deadline=None)
@given(
    scores=st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=300),
    seed=st.integers(0, 2**16),
    delta=st.sampled_from([0.0, 1e-6, 1e-2]),
)
def test_any_scores_give_a_finite_bound_within_the_ceiling(scores, seed, delta):
    """Every input gives a bound in [0, the all-correct ceiling of that many guesses]."""
    inc = np.random.default_rng(seed).random(len(scores)) < 0.5
    res = one_run_audit(scores, inc, delta=delta)
    assert 0.0 <= res.epsilon_lower_bound < 60 and math.isfinite(res.epsilon_lower_bound)
    ceiling = one_run_epsilon_lower_bound(len(scores), res.guesses, res.guesses, delta=delta,
                                          confidence=1 - 0.05 / res.settings_tried)
    assert res.epsilon_lower_bound <= ceiling + 1e-9


@pytest.mark.parametrize("eps", [0.1, 0.4, 1.0, 3.0])
def test_p_value_for_many_guesses_matches_the_full_sum(eps):
    """r = 5000 guesses: the implementation evaluates the pmf on mean -+ 40 sd only; the full sum
    over i = 1..v (scipy pmfs, every term) must agree."""
    m, r, v, delta = 20000, 5000, 3000, 1e-5
    p = math.exp(eps) / (1 + math.exp(eps))
    pmf = binom.pmf(np.arange(v - 1, -1, -1), r, p)
    alpha = float((np.cumsum(pmf) / np.arange(1, v + 1)).max())
    full = min(1.0, float(binom.sf(v - 1, r, p)) + 2 * m * delta * alpha)
    assert one_run_p_value(m, r, v, eps, delta) == pytest.approx(full, rel=1e-9, abs=1e-300)
