"""Poisson sampling, empty batches, and physical-batch splitting."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pytorch_privacy.dp_query import PrivacyLedger
from pytorch_privacy.optimizer import DPDataLoader, DPGaussianOptimizer, PoissonSampler, split_into_physical_batches

from . import _dp_naive as naive

DT = torch.float64


def ce(out, y):
    return nn.functional.cross_entropy(out, y, reduction="none")


def test_poisson_sampler_expected_batch_size_and_independence():
    n, q, steps = 500, 0.03, 400
    s = PoissonSampler(n, q, steps=steps, generator=torch.Generator().manual_seed(0))
    assert len(s) == steps and s.expected_batch_size == pytest.approx(15.0)
    sizes = []
    counts = torch.zeros(n)
    for batch in s:
        assert len(set(batch)) == len(batch) and all(0 <= i < n for i in batch)
        sizes.append(len(batch))
        counts[batch] += 1
    sizes = torch.tensor(sizes, dtype=torch.float64)
    # Binomial(N, q): mean qN, variance qN(1-q)
    se = math.sqrt(n * q * (1 - q) / steps)
    assert abs(sizes.mean().item() - n * q) < 5 * se
    assert sizes.var().item() == pytest.approx(n * q * (1 - q), rel=0.25)
    # every index is included with probability q
    assert abs(counts.mean().item() / steps - q) < 5 * math.sqrt(q * (1 - q) / (steps * n))


def test_poisson_sampler_default_steps_reproducibility_and_state_dict():
    s = PoissonSampler(100, 0.1, generator=torch.Generator().manual_seed(5))
    assert len(s) == 10
    first = list(s)
    s2 = PoissonSampler(100, 0.1, generator=torch.Generator().manual_seed(5))
    assert list(s2) == first
    state = s.state_dict()
    nxt = list(s)
    s3 = PoissonSampler(100, 0.1, generator=torch.Generator().manual_seed(99))
    s3.load_state_dict(state)
    assert list(s3) == nxt
    torch.manual_seed(3)
    a = list(PoissonSampler(100, 0.1))
    torch.manual_seed(3)
    assert list(PoissonSampler(100, 0.1)) != a  # default generator seeded from OS entropy, not torch's RNG


@pytest.mark.parametrize("bad", [0, 1.5, -0.1, float("nan")])
def test_poisson_sampler_rejects_bad_rates(bad):
    with pytest.raises(ValueError, match="sample_rate"):
        PoissonSampler(10, bad)


def test_dp_data_loader_yields_empty_batches_with_the_right_structure():
    ds = TensorDataset(torch.randn(40, 3), torch.randint(0, 2, (40,)))
    loader = DPDataLoader(ds, 0.01, steps=30, generator=torch.Generator().manual_seed(0))
    batches = list(loader)
    assert len(batches) == 30
    empties = [b for b in batches if b[0].shape[0] == 0]
    assert empties, "with q*N = 0.4 most batches are empty"
    x, y = empties[0]
    assert x.shape == (0, 3) and y.shape == (0,) and y.dtype == torch.int64
    assert loader.expected_batch_size == pytest.approx(0.4)
    with pytest.raises(ValueError, match="batch_size"):
        DPDataLoader(ds, 0.1, batch_size=4)


def test_dp_data_loader_from_data_loader():
    ds = TensorDataset(torch.randn(40, 3), torch.randint(0, 2, (40,)))
    dl = DPDataLoader.from_data_loader(DataLoader(ds, batch_size=8), generator=torch.Generator().manual_seed(1))
    assert dl.sample_rate == pytest.approx(1 / 5) and len(dl) == 5
    assert sum(b[0].shape[0] for b in dl) > 0


def test_empty_batch_still_adds_noise_and_counts_a_step():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    ledger = PrivacyLedger(40, 0.01)
    opt = DPGaussianOptimizer(
        torch.optim.SGD(model.parameters(), lr=1.0), model, ce, 1.0, 1.0, ledger=ledger,
        generator=torch.Generator().manual_seed(0),
    )
    before = naive.snapshot(model)
    loss = opt.fit_batch(torch.zeros(0, 3), torch.zeros(0, dtype=torch.int64))
    assert loss.item() == 0.0
    assert len(ledger) == 1 and opt.steps == 1
    assert all(not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())
    assert all(p.grad is not None for p in model.parameters())


def test_training_loop_over_a_dp_data_loader():
    torch.manual_seed(0)
    ds = TensorDataset(torch.randn(60, 3), torch.randint(0, 2, (60,)))
    loader = DPDataLoader(ds, 0.05, generator=torch.Generator().manual_seed(0))
    model = nn.Linear(3, 2)
    ledger = PrivacyLedger(len(ds), loader.sample_rate)
    opt = DPGaussianOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, ce, 1.0, 1.0, ledger=ledger)
    assert opt.denominator == pytest.approx(3.0)
    for x, y in loader:
        opt.fit_batch(x, y)
    assert len(ledger) == len(loader) == 20


def test_split_into_physical_batches_partitions_in_order():
    x = {"a": torch.arange(10), "b": torch.arange(10) * 2, "flag": "keep"}
    y = torch.arange(10) + 100
    chunks = list(split_into_physical_batches(x, y, 4))
    assert [c[1].tolist() for c in chunks] == [[100, 101, 102, 103], [104, 105, 106, 107], [108, 109]]
    assert chunks[0][0]["flag"] == "keep" and chunks[2][0]["b"].tolist() == [16, 18]
    assert [len(c[1]) for c in split_into_physical_batches(x, y, 5, multiple_of=2)] == [4, 4, 2]
    assert len(list(split_into_physical_batches(x, y, None))) == 1
    (e,) = split_into_physical_batches(torch.zeros(0, 2), torch.zeros(0), 4)
    assert e[0].shape == (0, 2)
    with pytest.raises(ValueError, match="smaller than one microbatch"):
        list(split_into_physical_batches(x, y, 3, multiple_of=4))
    with pytest.raises(ValueError, match="mismatched"):
        list(split_into_physical_batches(x, y[:3], 4))


def _model():
    torch.manual_seed(4)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)


@pytest.mark.parametrize("micro", [None, 2])
def test_physical_chunks_give_the_same_update_and_draw_noise_once(micro):
    x, y = torch.randn(12, 4, dtype=DT), torch.randint(0, 3, (12,))
    kw = {"microbatch_size": micro} if micro else {}
    results = []
    for chunk in (None, 5, 1 if not micro else 2):
        model = _model()
        opt = DPGaussianOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.5), model, ce, 0.2, 0.0, expected_batch_size=12,
            max_physical_batch_size=chunk, **kw,
        )
        opt.fit_batch(x, y)
        results.append(naive.snapshot(model))
    for other in results[1:]:
        for n in results[0]:
            torch.testing.assert_close(other[n], results[0][n], rtol=1e-10, atol=1e-12)
    # with noise: same number of draws (generator states equal), same update
    states, params = [], []
    for chunk in (None, 4):
        model = _model()
        g = torch.Generator().manual_seed(7)
        opt = DPGaussianOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.5), model, ce, 0.2, 1.3, expected_batch_size=12,
            max_physical_batch_size=chunk, generator=g, **kw,
        )
        opt.fit_batch(x, y)
        states.append(g.get_state())
        params.append(naive.snapshot(model))
    assert torch.equal(states[0], states[1])
    for n in params[0]:
        torch.testing.assert_close(params[1][n], params[0][n], rtol=1e-10, atol=1e-12)


def test_make_ledger_matches_the_loader_settings():
    import torch

    from pytorch_privacy.optimizer import DPDataLoader

    loader = DPDataLoader(torch.utils.data.TensorDataset(torch.arange(500)), sample_rate=0.02)
    ledger = loader.make_ledger(run="x")
    assert (ledger.population_size, ledger.selection_probability, ledger.sampling) == (500, 0.02, "poisson")
    assert ledger.expected_batch_size == 10.0 and ledger.metadata == {"run": "x"}
