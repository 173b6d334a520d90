"""The multi-run distinguishing audit: Clopper--Pearson bounds on a mechanism with known epsilon
(coverage), the threshold kept apart from the evaluation runs, and DP-SGD runs of a small model."""

import math

import numpy as np
import pytest
import torch
from scipy.optimize import brentq
from scipy.stats import beta, norm
from torch import nn

from pytorch_privacy.auditing.distinguishing import (
    best_threshold,
    distinguishing_audit,
    distinguishing_bound,
    gradient_canary_run,
)
from pytorch_privacy.optimizer import DPGaussianOptimizer


def _gdp_epsilon(mu: float, delta: float) -> float:
    """The exact epsilon at delta of a mu-GDP mechanism (Dong, Roth, Su 2019, Cor. 2.13):
    delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)."""
    f = lambda e: norm.cdf(-e / mu + mu / 2) - math.exp(e) * norm.cdf(-e / mu - mu / 2) - delta  # noqa: E731
    return brentq(f, 0.0, 100.0)


def test_bound_uses_clopper_pearson_quantiles():
    si, so = np.array([3.0] * 18 + [0.0] * 2), np.array([0.0] * 19 + [3.0])
    res = distinguishing_bound(si, so, 1.0, confidence=0.9)
    assert (res.tp, res.fn, res.fp, res.tn) == (18, 2, 1, 19)
    # each rate at 1 - 0.1/2 = 0.95 one-sided: TPR_lo = Beta(0.05; 18, 3), FPR_hi = Beta(0.95; 2, 19)
    tpr_lo, fpr_hi = beta.ppf(0.05, 18, 3), beta.ppf(0.95, 2, 19)
    expected = max(math.log(tpr_lo / fpr_hi), math.log((1 - fpr_hi) / (1 - tpr_lo)))
    assert res.epsilon_lower_bound == pytest.approx(expected, rel=1e-9)


def test_coverage_on_a_gaussian_mechanism_with_known_epsilon():
    """Scores N(mu * in, 1) are exactly a mu-GDP mechanism.  At a threshold fixed in advance the
    95% bound may exceed the true epsilon in at most 5% of audits; over 100 seeded audits, 13 or
    more violations has probability < 1e-3.  The audit is also informative (mean bound > 0.5)."""
    mu, delta, runs = 2.0, 1e-5, 400
    true_eps = _gdp_epsilon(mu, delta)
    rng = np.random.default_rng(7)
    bounds = np.array([
        distinguishing_bound(rng.normal(mu, 1, runs), rng.normal(0, 1, runs), mu / 2 + 1.0, delta=delta).epsilon_lower_bound
        for _ in range(100)
    ])
    assert (bounds > true_eps).sum() < 13, (true_eps, bounds.max())
    assert bounds.mean() > 0.5


def test_threshold_is_chosen_on_runs_kept_apart():
    calls = []

    def run(include, seed):
        calls.append((include, seed))
        return float(include) + 0.01 * seed

    res = distinguishing_audit(run, 10, selection_fraction=0.4, seed=100)
    assert sorted(calls) == sorted([(b, 100 + i) for b in (True, False) for i in range(10)])
    assert res.tp + res.fn == 6 and res.fp + res.tn == 6  # 4 runs a side chose the threshold
    # first 4 runs a side: in-scores 2.00..2.03, out-scores 1.00..1.03: the midpoint separating them
    assert res.tp == 6 and res.fp == 0 and res.threshold == pytest.approx(1.515)
    assert best_threshold([2.0, 3.0, 4.0], [0.0, 1.0, 1.5]) == 1.75  # the separating midpoint


def _mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 2))


def _run(sigma, steps=8):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 64, generator=g), torch.randint(0, 2, (30,), generator=g)

    def make_opt(model, ledger, seed):
        return DPGaussianOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1), model, nn.CrossEntropyLoss(reduction="none"),
            l2_norm_clip=1.0, noise_multiplier=sigma, ledger=ledger, generator=torch.Generator().manual_seed(seed),
        )

    return gradient_canary_run(_mlp, make_opt, x, y, sample_rate=0.5, steps=steps, l2_norm_clip=1.0, kind="random")


@pytest.mark.slow
def test_dp_sgd_without_noise_is_caught(one_thread):
    """sigma = 0: the canary (a random direction in 1,074 dimensions, drawn ~4 of 8 steps) separates
    the runs; 15 evaluation runs a side all right give eps >= log(0.782/0.218) = 1.28 at 95%."""
    res = distinguishing_audit(_run(0.0), 30, delta=1e-5)
    assert res.epsilon_lower_bound > 1.0, res.summary()


@pytest.mark.slow
def test_dp_sgd_at_sigma_one_stays_below_its_claim(one_thread):
    from pytorch_privacy.analysis import compute_pld_from_ledger
    from pytorch_privacy.dp_query import GaussianEvent, PrivacyLedger

    res = distinguishing_audit(_run(1.0), 30, delta=1e-5, seed=1)
    ledger = PrivacyLedger(31, 0.5)
    ledger.record_sample(GaussianEvent(1.0), 8)
    assert res.epsilon_lower_bound <= compute_pld_from_ledger(ledger).get_epsilon(1e-5)


def test_errors():
    with pytest.raises(ValueError, match="runs"):
        distinguishing_audit(lambda i, s: 0.0, 1)
    with pytest.raises(ValueError, match="finite"):
        distinguishing_bound([1.0, float("nan")], [0.0], 0.5)
    with pytest.raises(ValueError, match="empty"):
        distinguishing_bound([], [0.0], 0.5)
