"""FixedOrderLoader: fixed-size batches in one fixed order, the same every epoch."""

import pytest
import torch
from torch.utils.data import TensorDataset

from pytorch_privacy.optimizer.fixed_order import FixedOrderLoader, FixedOrderSampler


def _ds(n):
    return TensorDataset(torch.arange(n, dtype=torch.float32).unsqueeze(1), torch.arange(n))


def test_same_batches_every_epoch_and_fixed_size():
    loader = FixedOrderLoader(_ds(23), 5, generator=7)
    e1 = [y.tolist() for _, y in loader]
    e2 = [y.tolist() for _, y in loader]
    assert e1 == e2
    assert len(e1) == 23 // 5 == len(loader) == loader.steps_per_epoch
    assert all(len(b) == 5 for b in e1)
    flat = [i for b in e1 for i in b]
    assert len(set(flat)) == 20  # every record at most once an epoch
    assert loader.min_separation == 3


def test_seeded_order_is_reproducible_and_shuffled():
    a = FixedOrderSampler(50, 10, generator=3).order
    b = FixedOrderSampler(50, 10, generator=torch.Generator().manual_seed(3)).order
    c = FixedOrderSampler(50, 10, generator=4).order
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert sorted(a.tolist()) == list(range(50))
    assert FixedOrderSampler(50, 10, shuffle=False).order.tolist() == list(range(50))


def test_unseeded_order_does_not_use_global_rng():
    torch.manual_seed(0)
    a = FixedOrderSampler(1000, 10).order
    torch.manual_seed(0)
    b = FixedOrderSampler(1000, 10).order
    assert not torch.equal(a, b)


def test_ledger_settings_and_ledger():
    loader = FixedOrderLoader(_ds(40), 8, generator=0)
    s = loader.ledger_settings()
    assert s == {"population_size": 40, "sampling": "fixed_order", "selection_probability": 0.2, "batch_size": 8}


def test_state_dict_round_trip_and_refusals():
    a = FixedOrderLoader(_ds(30), 6, generator=1)
    b = FixedOrderLoader(_ds(30), 6, generator=2)
    b.load_state_dict(a.state_dict())
    assert [y.tolist() for _, y in a] == [y.tolist() for _, y in b]
    with pytest.raises(ValueError, match="batch_size"):
        FixedOrderLoader(_ds(30), 5).load_state_dict(a.state_dict())
    bad = a.state_dict()
    bad["order"] = torch.zeros(30, dtype=torch.int64)
    with pytest.raises(ValueError, match="permutation"):
        b.load_state_dict(bad)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"batch_size": 11}, ValueError, "exceeds"),
        ({"batch_size": 2, "drop_last": True}, ValueError, "drop_last"),
        ({"batch_size": 2, "generator": "x"}, TypeError, "generator"),
    ],
)
def test_bad_input(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        FixedOrderLoader(_ds(10), **kwargs)


def test_make_ledger_matches_the_loader():
    loader = FixedOrderLoader(_ds(40), 8, generator=0)
    ledger = loader.make_ledger(run="t")
    assert (ledger.population_size, ledger.sampling, ledger.batch_size) == (40, "fixed_order", 8)
    from pytorch_privacy.optimizer.consistency import SamplingMonitor, ledger_for_loader

    built = ledger_for_loader(loader)
    assert (built.population_size, built.sampling, built.batch_size) == (40, "fixed_order", 8)
    SamplingMonitor(built, loader)  # agrees with its loader
    with pytest.raises(ValueError, match="ledger"):
        SamplingMonitor(built, FixedOrderLoader(_ds(40), 4))


def test_position_continues_the_cycle_and_is_checkpointed():
    loader = FixedOrderLoader(_ds(12), 3, generator=5)  # 4 batches an epoch
    whole = [y.tolist() for _, y in loader] * 2
    loader = FixedOrderLoader(_ds(12), 3, generator=5)
    got = []
    for _, y in loader:
        got.append(y.tolist())
        if len(got) == 3:
            break
    assert loader.position == 3
    got += [y.tolist() for _, y in loader]  # continues at batch 3, then wraps around
    assert got == whole[:7] and loader.position == 7
    other = FixedOrderLoader(_ds(12), 3, generator=6)
    other.load_state_dict(loader.state_dict())
    assert other.position == 7 and [y.tolist() for _, y in other][0] == whole[7]
    bad = loader.state_dict()
    bad["position"] = -1
    with pytest.raises(ValueError, match="position"):
        other.load_state_dict(bad)
