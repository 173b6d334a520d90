"""Distributed Poisson sampling: each example joins a step with probability q, drawn by exactly
one rank; ranks' batches are disjoint; empty local batches come out as empty tensors."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import binomtest
from torch.utils.data import TensorDataset

from pytorch_privacy.optimizer import DPDataLoader, PoissonSampler
from pytorch_privacy.optimizer.consistency import loader_sampling
from pytorch_privacy.optimizer.distributed import DistributedDPDataLoader, DistributedPoissonSampler


def _samplers(n, q, world, steps=1):
    return [
        DistributedPoissonSampler(n, q, rank=r, world_size=world, steps=steps,
                                  generator=torch.Generator().manual_seed(1000 + r))
        for r in range(world)
    ]


def test_each_example_is_drawn_with_probability_q_by_exactly_one_rank():
    n, q, world, steps = 50, 0.2, 3, 2000
    samplers = _samplers(n, q, world)
    counts = torch.zeros(n, dtype=torch.long)
    owner_seen = {}
    for _ in range(steps):
        drawn = [s.sample() for s in samplers]
        allidx = torch.cat(drawn)
        assert allidx.numel() == allidx.unique().numel(), "an example was drawn by two ranks in one step"
        for r, idx in enumerate(drawn):
            assert bool((idx % world == r).all())  # a rank only draws the indices it owns
            for i in idx.tolist():
                owner_seen.setdefault(i, set()).add(r)
        counts += torch.bincount(allidx, minlength=n)
    assert all(len(v) == 1 for v in owner_seen.values())
    assert len(owner_seen) == n  # every example is reachable
    # per-example binomial test; Bonferroni over the n examples at overall level 1e-3
    pvals = [binomtest(int(c), steps, q).pvalue for c in counts]
    assert min(pvals) > 1e-3 / n, (min(pvals), counts.tolist())
    # and the pooled total: sum over examples of Binomial(steps, q)
    total = int(counts.sum())
    assert binomtest(total, steps * n, q).pvalue > 1e-3
    # a wrong rate is detected by the same test (the test has power)
    assert binomtest(total, steps * n, q * 1.1).pvalue < 1e-3


def test_ranks_draw_independently_of_each_other():
    # indices 0 (rank 0) and 1 (rank 1) are both in a step with probability q^2, not q
    n, q, steps = 2, 0.5, 4000
    s0, s1 = _samplers(n, q, 2)
    both = sum(1 for _ in range(steps) if s0.sample().numel() and s1.sample().numel())
    assert binomtest(both, steps, q * q).pvalue > 1e-3


def test_loader_accounts_global_n_and_q_and_yields_empty_local_batches():
    n, q = 9, 0.3
    data = TensorDataset(torch.arange(n, dtype=torch.float32).reshape(n, 1), torch.arange(n))
    loaders = [DistributedDPDataLoader(data, q, rank=r, world_size=4, steps=200,
                                       generator=torch.Generator().manual_seed(r)) for r in range(4)]
    ref = DPDataLoader(data, q)
    for ld in loaders:
        assert loader_sampling(ld) == loader_sampling(ref)  # global N and q
        assert ld.expected_batch_size == pytest.approx(q * n)
    assert loaders[0].poisson_sampler.local_expected_batch_size == pytest.approx(q * 3)  # owns 0, 4, 8
    empties = 0
    for batches in zip(*loaders):
        ys = [y for _, y in batches]
        for r, y in enumerate(ys):
            assert bool((y % 4 == r).all())
            empties += y.numel() == 0
        assert batches[0][0].shape[1:] == (1,)
    assert empties > 0  # rank 3 owns indices 3 and 7: empty with probability 0.49
    assert all(len(ld) == 200 for ld in loaders)


def test_state_dict_resumes_and_refuses_another_rank():
    s = DistributedPoissonSampler(100, 0.1, rank=1, world_size=2, generator=torch.Generator().manual_seed(0))
    state = s.state_dict()
    a = [s.sample() for _ in range(3)]
    s.load_state_dict(state)
    b = [s.sample() for _ in range(3)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    other = DistributedPoissonSampler(100, 0.1, rank=0, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        other.load_state_dict(state)
    # a single-process state restored on every rank would make every rank's inclusions alike
    single = PoissonSampler(100, 0.1).state_dict()
    with pytest.raises(ValueError, match="single-process"):
        other.load_state_dict(single)
    alone = DistributedPoissonSampler(100, 0.1, rank=0, world_size=1)
    alone.load_state_dict(single)  # one process: the same thing


@pytest.mark.parametrize("rank,world", [(2, 2), (-1, 2), (0, 0)])
def test_bad_rank_or_world_size_is_refused(rank, world):
    with pytest.raises(ValueError, match="rank"):
        DistributedPoissonSampler(10, 0.5, rank=rank, world_size=world)


def test_loader_refuses_batch_size_options():
    data = TensorDataset(torch.zeros(4, 1))
    with pytest.raises(ValueError, match="batch_size"):
        DistributedDPDataLoader(data, 0.5, rank=0, world_size=1, batch_size=2)
