"""Training with matrix-factorisation noise: DPOptimizer with a MatrixFactorizationQuery, the
DPMatrixFactorizationOptimizer convenience class, fixed-order and banded Poisson loaders."""

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from pytorch_privacy.analysis.rdp import compute_rdp
from pytorch_privacy.analysis.rdp_accountant import RdpAccountant
from pytorch_privacy.dp_query.matrix_factorization import BandedToeplitzStrategy, identity_strategy
from pytorch_privacy.dp_query.matrix_factorization_events import (
    AmplifiedBandedMatrixFactorizationEvent,
    MatrixFactorizationReplaceOneEvent,
)
from pytorch_privacy.dp_query.matrix_factorization_query import MatrixFactorizationQuery
from pytorch_privacy.dp_query.normalized_query import NormalizedQuery
from pytorch_privacy.optimizer.dp_optimizer import DPOptimizer
from pytorch_privacy.optimizer.fixed_order import FixedOrderLoader
from pytorch_privacy.optimizer.gaussian_optimizer import DPGaussianOptimizer
from pytorch_privacy.optimizer.mf_optimizer import BandedPoissonLoader, BandedPoissonSampler, DPMatrixFactorizationOptimizer


def _data(n=64, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(d, 1, generator=g)
    return TensorDataset(x, (x @ w).squeeze(1))


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Linear(5, 1)


def _loss(out, y):
    return (out.squeeze(1) - y) ** 2


def test_identity_strategy_trains_exactly_like_dp_sgd():
    ds = _data()
    m1, m2 = _model(), _model()
    o1 = DPMatrixFactorizationOptimizer(torch.optim.SGD(m1.parameters(), lr=0.1), m1, _loss, 1.0, 0.8, identity_strategy(),
                                        expected_batch_size=16.0, generator=torch.Generator().manual_seed(4))
    o2 = DPGaussianOptimizer(torch.optim.SGD(m2.parameters(), lr=0.1), m2, _loss, 1.0, 0.8, expected_batch_size=16.0,
                             generator=torch.Generator().manual_seed(4))
    for i in range(4):
        x, y = ds.tensors[0][16 * i : 16 * (i + 1)], ds.tensors[1][16 * i : 16 * (i + 1)]
        o1.fit_batch(x, y)
        o2.fit_batch(x, y)
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)


def test_dp_optimizer_with_a_custom_mf_query_trains_on_fixed_order_data():
    ds = _data(n=80)
    loader = FixedOrderLoader(ds, 10, generator=1)  # 8 steps per epoch
    model = _model()
    strategy = BandedToeplitzStrategy([0.8, 0.6])  # column norm 1, 2 bands <= 8
    query = NormalizedQuery(MatrixFactorizationQuery(1.0, 0.5, strategy, generator=torch.Generator().manual_seed(0)), 10.0)
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, _loss, query, data_loader=loader)
    with torch.no_grad():
        first = float(_loss(model(ds.tensors[0]), ds.tensors[1]).mean())
    for _ in range(5):
        for x, y in loader:
            opt.fit_batch(x, y)
    with torch.no_grad():
        last = float(_loss(model(ds.tensors[0]), ds.tensors[1]).mean())
    assert last < 0.5 * first
    ev = opt.ledger.to_event()
    # 40 steps, 5 epochs, 8 apart: sens^2 = 5 column norms^2 = 5
    assert ev == MatrixFactorizationReplaceOneEvent(0.5, math.sqrt(5.0), 40, 5, 8)
    eps = RdpAccountant(neighboring_relation="replace_one").compose(ev).get_epsilon(1e-5)
    assert math.isfinite(eps) and eps > 0


def test_checkpoint_resume_continues_the_correlated_noise():
    ds = _data(n=40)
    strategy = BandedToeplitzStrategy([1.0, 0.5, 0.25])

    def build(seed):
        model = _model()
        loader = FixedOrderLoader(ds, 8, generator=3)
        opt = DPMatrixFactorizationOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), model, _loss, 1.0, 1.0, strategy,
                                             data_loader=loader, generator=torch.Generator().manual_seed(seed))
        return model, loader, opt

    model, loader, opt = build(0)
    batches = [b for b in loader]
    for x, y in batches[:3]:
        opt.fit_batch(x, y)
    state = copy.deepcopy(opt.state_dict())
    model_state = copy.deepcopy(model.state_dict())
    for x, y in batches[3:]:
        opt.fit_batch(x, y)
    model2, _, opt2 = build(123)
    model2.load_state_dict(model_state)
    opt2.load_state_dict(state)
    for x, y in batches[3:]:
        opt2.fit_batch(x, y)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    # a checkpoint of another strategy is refused: its noise memory would be misread
    other = _model()
    opt3 = DPMatrixFactorizationOptimizer(torch.optim.SGD(other.parameters(), lr=0.05), other, _loss, 1.0, 1.0,
                                          BandedToeplitzStrategy([1.0, 0.5, 0.2]), data_loader=FixedOrderLoader(ds, 8, generator=3))
    with pytest.raises(ValueError, match="strategy"):
        opt3.load_state_dict(state)


def test_banded_poisson_sampler_groups_and_state():
    s = BandedPoissonSampler(10, 1.0, 3, generator=torch.Generator().manual_seed(0))
    batches = [s.sample().tolist() for _ in range(4)]
    assert batches == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8], [0, 3, 6, 9]]
    assert s.group_size == 4 and s.expected_batch_size == 4.0 and len(s) == 3
    t = BandedPoissonSampler(10, 0.5, 3, generator=torch.Generator().manual_seed(1))
    saved = t.state_dict()
    a = [t.sample().tolist() for _ in range(5)]
    u = BandedPoissonSampler(10, 0.5, 3, generator=torch.Generator().manual_seed(9))
    u.load_state_dict(saved)
    assert [u.sample().tolist() for _ in range(5)] == a
    assert all(i % 3 == k % 3 for k, b in enumerate(a) for i in b)
    with pytest.raises(ValueError, match="partitions"):
        BandedPoissonSampler(10, 0.5, 2).load_state_dict(saved)
    with pytest.raises(ValueError):
        BandedPoissonSampler(10, 0.5, 11)


def test_banded_poisson_training_is_accounted_with_amplification():
    ds = _data(n=60)
    loader = BandedPoissonLoader(ds, 0.25, 2, generator=torch.Generator().manual_seed(2))
    model = _model()
    strategy = BandedToeplitzStrategy([0.8, 0.6])
    opt = DPMatrixFactorizationOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, _loss, 1.0, 1.2, strategy,
                                         data_loader=loader, generator=torch.Generator().manual_seed(0))
    assert opt.denominator == pytest.approx(0.25 * 30)
    for x, y in loader:  # 2 * 4 = 8 steps
        opt.fit_batch(x, y)
    ev = opt.ledger.to_event()
    assert ev == AmplifiedBandedMatrixFactorizationEvent(1.2, 1.0, 0.25, 4)
    orders = [2.0, 4.0, 16.0]
    np.testing.assert_allclose(RdpAccountant(orders=orders).compose(ev).rdp, compute_rdp(0.25, 1.2, 4, orders))


@pytest.mark.parametrize("loader_kind", ["none", "dp_loader", "other_partitions"])
def test_a_partitions_claim_without_a_banded_loader_is_refused(loader_kind):
    """partitions > 1 amplifies the accounting; only a loader that really cycles the groups may back it."""
    from pytorch_privacy.optimizer.samplers import DPDataLoader

    ds = _data()
    loader = {
        "none": None,
        "dp_loader": DPDataLoader(ds, sample_rate=0.25),
        "other_partitions": BandedPoissonLoader(ds, 0.25, partitions=2),
    }[loader_kind]
    m = _model()
    strategy = BandedToeplitzStrategy([1.0, -0.5, 0.1])
    query = NormalizedQuery(MatrixFactorizationQuery(1.0, 1.0, strategy, partitions=4), 4.0)
    with pytest.raises(ValueError, match="claims banded sampling"):
        DPOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), m, _loss, query, data_loader=loader)
    # backed by the loader that implements it: accepted
    DPOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), m, _loss, query, data_loader=BandedPoissonLoader(ds, 0.25, partitions=4))
