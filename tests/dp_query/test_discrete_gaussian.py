"""Exact discrete Gaussian / discrete Laplace samplers: empirical pmf against the exact pmf
(chi-square), variance, symmetry, the exact fallback of the Bernoulli draws, owned randomness.

Every statistical test is seeded (deterministic); with a correct sampler each would fail for a
fraction ``ALPHA`` of seeds.
"""

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from scipy import stats

from pytorch_privacy.dp_query import discrete_gaussian as dg
from pytorch_privacy.dp_query.discrete_gaussian import as_fraction, sample_discrete_gaussian, sample_discrete_laplace
from pytorch_privacy.dp_query.randomness import RandomSource

ALPHA = 1e-4  # significance level of every statistical test below
N = 40_000


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _dg_pmf(sigma2: float, support: np.ndarray) -> np.ndarray:
    half = int(60 * math.sqrt(sigma2) + 60)
    allx = np.arange(-half, half + 1)
    z = np.exp(-(allx.astype(float) ** 2) / (2 * sigma2)).sum()
    return np.exp(-(support.astype(float) ** 2) / (2 * sigma2)) / z


def _dlap_pmf(scale: float, support: np.ndarray) -> np.ndarray:
    r = math.exp(-1.0 / scale)
    return (1 - r) / (1 + r) * r ** np.abs(support)


def _chi2_pvalue(samples: np.ndarray, pmf) -> float:
    """Chi-square goodness of fit: one bin per value with expected count >= 5, tails merged."""
    n = samples.size
    k = 0
    while pmf(np.array([k + 1]))[0] * n >= 5:
        k += 1
    support = np.arange(-k, k + 1)
    expected = pmf(support) * n
    observed = np.array([(samples == v).sum() for v in support], dtype=float)
    tail_exp = n - expected.sum()
    obs = np.append(observed, n - observed.sum())
    exp = np.append(expected, tail_exp)
    if tail_exp < 1e-9:
        obs, exp = obs[:-1], exp[:-1]
        exp = exp * obs.sum() / exp.sum()
    return stats.chisquare(obs, exp).pvalue


@pytest.mark.parametrize(
    "kwargs,sigma2,seed",
    [
        ({"sigma": 0.5}, 0.25, 1),
        ({"sigma": None, "sigma_squared": Fraction(1, 3)}, 1 / 3, 2),
        ({"sigma": 1.0}, 1.0, 3),
        ({"sigma": 2.7}, 2.7**2, 4),
        ({"sigma": 9}, 81.0, 5),
    ],
)
def test_discrete_gaussian_pmf_chi_square(kwargs, sigma2, seed):
    x = sample_discrete_gaussian(shape=(N,), generator=_gen(seed), **kwargs).numpy()
    assert _chi2_pvalue(x, lambda s: _dg_pmf(sigma2, s)) > ALPHA


@pytest.mark.parametrize("scale,seed", [(1, 11), (2.5, 12), (Fraction(2, 3), 13), (0.1, 14)])
def test_discrete_laplace_pmf_chi_square(scale, seed):
    x = sample_discrete_laplace(scale, (N,), _gen(seed)).numpy()
    assert _chi2_pvalue(x, lambda s: _dlap_pmf(float(scale), s)) > ALPHA


@pytest.mark.parametrize("sigma,seed", [(0.7, 21), (3.0, 22), (40.0, 23)])
def test_discrete_gaussian_variance_mean_and_symmetry(sigma, seed):
    x = sample_discrete_gaussian(sigma, (N,), _gen(seed)).numpy().astype(float)
    half = int(60 * sigma + 60)
    allx = np.arange(-half, half + 1).astype(float)
    w = np.exp(-(allx**2) / (2 * sigma**2))
    var = (w * allx**2).sum() / w.sum()  # the exact variance (slightly below sigma^2 at small sigma)
    fourth = (w * allx**4).sum() / w.sum()
    se_var = math.sqrt((fourth - var**2) / N)
    z = stats.norm.isf(ALPHA / 2)
    assert abs(x.var() - var) < z * se_var
    assert abs(x.mean()) < z * math.sqrt(var / N)
    # symmetry: among the non-zero draws, the sign is a fair coin
    nz = x[x != 0]
    assert stats.binomtest(int((nz > 0).sum()), nz.size).pvalue > ALPHA


def test_small_sigma_variance_is_below_sigma_squared():
    # sigma = 0.5: the variance is 0.2157..., well below sigma^2 = 0.25 (the lattice matters)
    x = sample_discrete_gaussian(0.5, (N,), _gen(31)).numpy().astype(float)
    assert x.var() < 0.23


def test_shapes_dtype_device_and_zero_sigma():
    x = sample_discrete_gaussian(1.5, (3, 4, 5), _gen(0))
    assert x.shape == (3, 4, 5) and x.dtype == torch.int64
    z = sample_discrete_gaussian(0.0, (2, 3))
    assert z.dtype == torch.int64 and not z.any()
    assert sample_discrete_gaussian(2.0, (0,)).shape == (0,)
    assert sample_discrete_laplace(3, 7).shape == (7,)


def test_seeded_reproducible_and_global_rng_untouched():
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    a = sample_discrete_gaussian(3.3, (500,), _gen(7))
    b = sample_discrete_gaussian(3.3, (500,), _gen(7))
    assert torch.equal(a, b)
    assert torch.equal(before, torch.random.get_rng_state())
    # a RandomSource's state advances: the next draw differs
    src = RandomSource(_gen(7))
    c = sample_discrete_gaussian(3.3, (500,), src)
    d = sample_discrete_gaussian(3.3, (500,), src)
    assert torch.equal(a, c) and not torch.equal(c, d)


def test_secure_mode():
    x = sample_discrete_gaussian(2.0, (4000,), secure_mode=True).numpy().astype(float)
    assert abs(x.var() - 4.0) < 0.6 and abs(x.mean()) < 0.2
    y = sample_discrete_laplace(2.0, (100,), RandomSource(secure_mode=True))
    assert y.dtype == torch.int64
    with pytest.raises(ValueError, match="secure"):
        sample_discrete_gaussian(2.0, (3,), _gen(0), secure_mode=True)


@pytest.mark.parametrize(
    "call,exc",
    [
        (lambda: sample_discrete_gaussian(-1.0, (3,)), ValueError),
        (lambda: sample_discrete_gaussian(float("nan"), (3,)), ValueError),
        (lambda: sample_discrete_gaussian(True, (3,)), TypeError),
        (lambda: sample_discrete_gaussian("2", (3,)), TypeError),
        (lambda: sample_discrete_gaussian(1.0, (3,), sigma_squared=1), ValueError),
        (lambda: sample_discrete_gaussian(None, (3,)), ValueError),
        (lambda: sample_discrete_gaussian(1e-4, (3,)), ValueError),
        (lambda: sample_discrete_gaussian(1e13, (3,)), ValueError),
        (lambda: sample_discrete_gaussian(1.0, (-1,)), ValueError),
        (lambda: sample_discrete_laplace(0, (3,)), ValueError),
        (lambda: sample_discrete_laplace(1e19, (3,)), ValueError),
    ],
)
def test_bad_arguments(call, exc):
    with pytest.raises(exc):
        call()


def test_as_fraction_is_exact():
    assert as_fraction("x", 0.1) == Fraction(3602879701896397, 36028797018963968)
    assert as_fraction("x", torch.tensor(2.5)) == Fraction(5, 2)


# -- the exact Bernoulli machinery -----------------------------------------------------------
def test_bernoulli_exact_fallback_matches_probability():
    # err = 1 sends every draw to the exact rational comparison; its frequency must be p
    src = RandomSource(_gen(41))
    n = 3000
    p = Fraction(1, 3) + Fraction(1, 2**70)  # not a float, not dyadic
    got = dg._bernoulli(src, np.full(n, 0.9), np.full(n, 1.0), lambda j: [p] * len(j))
    assert stats.binomtest(int(got.sum()), n, float(p)).pvalue > ALPHA


def test_bernoulli_fast_path_decisions_agree_with_exact_comparison():
    # near a dyadic boundary the float path must defer to the exact one: replay the same 53-bit
    # draws and compare every decision with the exact comparison of the interval
    n = 20000
    k0 = 2**52 + 12345
    p_exact = Fraction(k0, 2**53) + Fraction(1, 2**80)  # just above the boundary k0 / 2^53
    p_f = float(p_exact)
    calls = []

    def exact(j):
        calls.append(len(j))
        return [p_exact] * len(j)

    seed = 43
    got = dg._bernoulli(RandomSource(_gen(seed)), np.full(n, p_f), np.full(n, 2.0**-60), exact)
    ks = dg._random_bits(RandomSource(_gen(seed)), n, 53)
    decided = (ks + 1 <= k0) | (ks >= k0 + 1)
    want = ks + 1 <= k0
    np.testing.assert_array_equal(got[decided], want[decided])


@pytest.mark.parametrize("gamma,seed", [(Fraction(3, 10), 51), (Fraction(17, 10), 52), (Fraction(21, 5), 53)])
def test_bernoulli_exp_neg_frequency_with_forced_exact_path(gamma, seed):
    n = 6000
    src = RandomSource(_gen(seed))
    g = np.full(n, float(gamma))
    fast = dg._bernoulli_exp_neg(src, g, np.full(n, 1e-12), lambda j: [gamma] * len(j))
    forced = dg._bernoulli_exp_neg(src, g, np.full(n, 0.5), lambda j: [gamma] * len(j))
    for got in (fast, forced):
        assert stats.binomtest(int(got.sum()), n, math.exp(-float(gamma))).pvalue > ALPHA


def test_acceptance_gamma_error_bound_holds_against_exact_rationals():
    rng = np.random.default_rng(0)
    worst = 0.0
    for _ in range(300):
        s2 = as_fraction("s2", float(np.exp(rng.uniform(math.log(2.0**-20), math.log(2.0**60)))))
        t = math.isqrt(s2.numerator // s2.denominator) + 1
        c = s2 / t
        # |y| around c (cancellation), and spread over the likely range
        near = [max(0, math.floor(c) + d) for d in (-1, 0, 1)]
        ay = np.array(near + [int(v) for v in rng.integers(0, 40 * t + 2, size=5)], dtype=np.int64)
        g, err = dg._acceptance_gamma(ay, float(s2), float(c))
        for yi, gi, ei in zip(ay.tolist(), g.tolist(), err.tolist()):
            exact = (Fraction(yi) - c) ** 2 / (2 * s2)
            diff = abs(Fraction(gi) - exact)
            assert diff <= Fraction(ei)
            worst = max(worst, float(diff / Fraction(ei)))
    assert worst < 0.05  # the bound has a wide margin


def test_uniform_below_is_uniform():
    src = RandomSource(_gen(61))
    u = dg._uniform_below(src, 5, 20000)
    assert u.min() == 0 and u.max() == 4
    assert stats.chisquare(np.bincount(u, minlength=5)).pvalue > ALPHA
