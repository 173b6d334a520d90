"""Poisson sampling means *independent* inclusion: every index joins every batch with
probability ``q``, independently of every other index and of every other batch.

The amplification-by-subsampling bound the ledger is analysed with assumes exactly this.  A
sampler that draws a Binomial(N, q) batch size and then takes a contiguous block of indices has
the right batch sizes and (with wrap-around) the right inclusion rate per index, yet neighbours
are almost always drawn together: only the pairwise checks below see it.  So the checks are run
on the real loader (they must pass) and on such a block sampler (they must fail), both with fixed
seeds: the tests are deterministic, and their thresholds (family-wise error ``ALPHA`` = 1e-6 per
check, Bonferroni over indices and pairs; ``Z`` = 5 standard errors) are ones a correct sampler
passes with overwhelming probability.

Checks, over ``T`` batches of a population of ``N`` with rate ``q``:

* each index's inclusion count is Binomial(T, q) (two-sided binomial test per index);
* each pair's co-inclusion count is Binomial(T, q^2), for every pair of neighbouring indices, the
  wrap-around pair, and a fixed set of far pairs;
* the pooled correlation between neighbouring indices' indicators is 0;
* the batch sizes fit Binomial(N, q) (chi-square goodness of fit, tails merged);
* consecutive batches are independent (correlation of one batch's indicators with the next's).
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from scipy import stats
from torch.utils.data import TensorDataset

from pytorch_privacy.optimizer.distributed.sampler import DistributedDPDataLoader
from pytorch_privacy.optimizer.samplers import DPDataLoader, PoissonSampler

ALPHA = 1e-6
Z = 5.0
T = 4000
# (N, q): a larger population, and a small one where empty batches are common (P = 0.95^30 = 0.21)
CONFIGS = [(200, 0.1), (30, 0.05)]


def _loader_batches(N: int, q: float, seed: int) -> np.ndarray:
    """``[T, N]`` inclusion indicators of the batches a :class:`DPDataLoader` yields."""
    loader = DPDataLoader(TensorDataset(torch.arange(N)), q, steps=T, generator=torch.Generator().manual_seed(seed))
    X = np.zeros((T, N), dtype=bool)
    rows = 0
    for t, (idx,) in enumerate(loader):
        assert idx.dtype == torch.int64 and idx.dim() == 1
        assert len(set(idx.tolist())) == idx.numel(), "an index appears twice in one batch"
        X[t, idx.numpy()] = True
        rows += 1
    assert rows == T
    return X


def _distributed_batches(N: int, q: float, seed: int, world_size: int = 3, same_seed: bool = False) -> np.ndarray:
    """``[T, N]`` indicators of the *global* batches of ``world_size`` in-process ranks (each a
    :class:`DistributedDPDataLoader` with its own generator): the union of the ranks' batches,
    which must be a Poisson sample of the whole dataset; no index may be drawn by two ranks."""
    ds = TensorDataset(torch.arange(N))
    loaders = [
        DistributedDPDataLoader(
            ds, q, rank=r, world_size=world_size, steps=T,
            generator=torch.Generator().manual_seed(seed if same_seed else seed * world_size + r),
        )
        for r in range(world_size)
    ]
    X = np.zeros((T, N), dtype=bool)
    rows = 0
    for t, parts in enumerate(zip(*loaders)):
        for r, (idx,) in enumerate(parts):
            assert bool((idx % world_size == r).all()), f"rank {r} loaded an index it does not own"
            assert not X[t, idx.numpy()].any(), "an index drawn by two ranks in one step"
            X[t, idx.numpy()] = True
        rows += 1
    assert rows == T
    return X


def _block_batches(N: int, q: float, seed: int) -> np.ndarray:
    """The broken sampler: a Binomial(N, q) size, then a contiguous block (wrapping around)."""
    rng = np.random.default_rng(seed)
    X = np.zeros((T, N), dtype=bool)
    for t in range(T):
        m = rng.binomial(N, q)
        start = rng.integers(N)
        X[t, (start + np.arange(m)) % N] = True
    return X


def _pairs(N: int) -> list[tuple[int, int]]:
    """Every neighbouring pair, the wrap-around pair, and 50 fixed far pairs."""
    rnd = random.Random(1234)
    far = set()
    while len(far) < min(50, N * (N - 1) // 2 - N):
        i, j = sorted(rnd.sample(range(N), 2))
        if j - i > 1 and (i, j) != (0, N - 1):
            far.add((i, j))
    return [(i, i + 1) for i in range(N - 1)] + [(0, N - 1)] + sorted(far)


def _binom_pvalue(k: int, n: int, p: float) -> float:
    return float(stats.binomtest(int(k), n, p).pvalue)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Sized for one core; one intra-op thread also avoids thread-pool stalls on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- the checks (each raises AssertionError naming what failed) ------------------------------
def check_inclusion_rates(X: np.ndarray, q: float) -> None:
    T_, N = X.shape
    counts = X.sum(0)
    pmin = min(_binom_pvalue(c, T_, q) for c in counts)
    assert pmin > ALPHA / N, f"an index's inclusion rate is not q={q}: counts {counts.min()}..{counts.max()}, p={pmin:.3g}"


def check_pairwise_inclusion(X: np.ndarray, q: float) -> None:
    T_, N = X.shape
    pairs = _pairs(N)
    worst = min(pairs, key=lambda ij: _binom_pvalue((X[:, ij[0]] & X[:, ij[1]]).sum(), T_, q * q))
    k = int((X[:, worst[0]] & X[:, worst[1]]).sum())
    p = _binom_pvalue(k, T_, q * q)
    assert p > ALPHA / len(pairs), (
        f"pair {worst} joined {k} of {T_} batches together: frequency {k / T_:.4g}, q^2 = {q * q:.4g} (p={p:.3g})"
    )


def check_neighbours_uncorrelated(X: np.ndarray) -> None:
    T_, N = X.shape
    a, b = X[:, :-1].ravel().astype(float), X[:, 1:].ravel().astype(float)
    r = float(np.corrcoef(a, b)[0, 1])
    assert abs(r) < Z / math.sqrt(a.size), f"neighbouring indices are correlated: r = {r:.4g}"


def check_batch_sizes_binomial(X: np.ndarray, q: float) -> None:
    T_, N = X.shape
    sizes = X.sum(1)
    pmf = stats.binom.pmf(np.arange(N + 1), N, q)
    # merge the tails into the neighbouring bins until every bin expects >= 5 batches
    lo, hi = 0, N
    while T_ * pmf[: lo + 1].sum() < 5:
        lo += 1
    while T_ * pmf[hi:].sum() < 5:
        hi -= 1
    expected = np.concatenate([[pmf[: lo + 1].sum()], pmf[lo + 1 : hi], [pmf[hi:].sum()]]) * T_
    observed = np.concatenate(
        [[(sizes <= lo).sum()], [(sizes == s).sum() for s in range(lo + 1, hi)], [(sizes >= hi).sum()]]
    )
    assert observed.sum() == T_ and expected.sum() == pytest.approx(T_)
    p = float(stats.chisquare(observed, expected).pvalue)
    assert p > ALPHA, f"batch sizes do not fit Binomial({N}, {q}): chi-square p = {p:.3g}"


def check_batches_independent(X: np.ndarray) -> None:
    a, b = X[:-1].ravel().astype(float), X[1:].ravel().astype(float)
    r = float(np.corrcoef(a, b)[0, 1])
    assert abs(r) < Z / math.sqrt(a.size), f"consecutive batches are correlated: r = {r:.4g}"


CHECKS = {
    "inclusion_rates": lambda X, q: check_inclusion_rates(X, q),
    "pairwise_inclusion": lambda X, q: check_pairwise_inclusion(X, q),
    "neighbours_uncorrelated": lambda X, q: check_neighbours_uncorrelated(X),
    "batch_sizes_binomial": lambda X, q: check_batch_sizes_binomial(X, q),
    "batches_independent": lambda X, q: check_batches_independent(X),
}


@pytest.fixture(scope="module")
def loader_draws():
    return {(N, q): _loader_batches(N, q, seed=N) for N, q in CONFIGS}


@pytest.fixture(scope="module")
def distributed_draws():
    return {(N, q): _distributed_batches(N, q, seed=N) for N, q in CONFIGS}


@pytest.mark.parametrize("check", sorted(CHECKS))
@pytest.mark.parametrize("N,q", CONFIGS)
def test_poisson_loader_passes(loader_draws, N, q, check):
    CHECKS[check](loader_draws[(N, q)], q)


@pytest.mark.parametrize("check", sorted(CHECKS))
@pytest.mark.parametrize("N,q", CONFIGS)
def test_distributed_loader_world_batch_passes(distributed_draws, N, q, check):
    """Three ranks, each its own generator: the world's batch is a Poisson sample of the whole
    dataset (neighbouring indices live on different ranks, so this also checks that the ranks'
    draws are independent of one another)."""
    CHECKS[check](distributed_draws[(N, q)], q)


def test_pairwise_frequencies_are_q_squared(loader_draws):
    """The pooled co-inclusion frequency of neighbours and of far pairs is q^2 (not q)."""
    for (N, q), X in loader_draws.items():
        near = np.mean([(X[:, i] & X[:, i + 1]).mean() for i in range(N - 1)])
        assert near == pytest.approx(q * q, rel=Z / math.sqrt(T * (N - 1) * q * q)), (N, q, near)


def test_contiguous_block_sampler_is_caught():
    """The checks have power: a binomial-size contiguous block fails the pairwise ones, while
    its sizes and (thanks to wrap-around) its per-index rates look right."""
    for N, q in CONFIGS:
        X = _block_batches(N, q, seed=N)
        check_batch_sizes_binomial(X, q)
        check_inclusion_rates(X, q)
        for name in ("pairwise_inclusion", "neighbours_uncorrelated"):
            with pytest.raises(AssertionError):
                CHECKS[name](X, q)


def test_ranks_sharing_a_seed_are_caught():
    """Ranks whose generators share a seed draw the same mask over their owned indices, so
    index i (rank r) and i + 1 (rank r + 1) join together: the pairwise checks see it."""
    N, q = CONFIGS[0]
    X = _distributed_batches(N, q, seed=N, same_seed=True)
    check_inclusion_rates(X, q)
    for name in ("pairwise_inclusion", "neighbours_uncorrelated"):
        with pytest.raises(AssertionError):
            CHECKS[name](X, q)


def test_sampler_and_loader_draw_the_same_batches():
    """The loader's batches are its sampler's: same generator seed, same index sets."""
    N, q, steps = 50, 0.2, 30
    sampler = PoissonSampler(N, q, steps=steps, generator=torch.Generator().manual_seed(9))
    loader = DPDataLoader(TensorDataset(torch.arange(N)), q, steps=steps, generator=torch.Generator().manual_seed(9))
    got = [idx.tolist() for (idx,) in loader]
    assert got == list(sampler)
    assert loader.sample_rate == q and loader.expected_batch_size == pytest.approx(q * N)


def test_fixed_seed_is_deterministic_and_seeds_differ():
    a = _loader_batches(30, 0.05, seed=1)
    assert np.array_equal(a, _loader_batches(30, 0.05, seed=1))
    assert not np.array_equal(a, _loader_batches(30, 0.05, seed=2))
