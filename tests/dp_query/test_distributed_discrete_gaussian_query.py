"""DistributedDiscreteGaussianSumQuery: exact sums without noise (TF Privacy's cases), local
noise shares (variance of their sum), bounds, event and its accounting."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from pytorch_privacy.analysis.distributed import compute_rdp_distributed_discrete_gaussian
from pytorch_privacy.analysis.rdp_accountant import compute_rdp_from_event
from pytorch_privacy.dp_query.discrete_gaussian_query import rounded_l2_norm_bound
from pytorch_privacy.dp_query.distributed_discrete_gaussian_query import (
    DistributedDiscreteGaussianSumQuery,
    DistributedSumState,
)
from pytorch_privacy.dp_query.distributed_events import DistributedDiscreteGaussianEvent
from pytorch_privacy.dp_query.events import NoOpEvent

from ._records import int_record as _i
from ._records import run_query

ALPHA = 1e-4


def _run(query, records):
    result, _, event = run_query(query, records)
    return result, event


def test_sum_no_noise_tf_cases():
    q = DistributedDiscreteGaussianSumQuery(l2_norm_bound=10, local_stddev=0.0)
    result, event = _run(q, [_i(2, 0), _i(-1, 1)])
    assert result.tolist() == [1, 1]
    assert event == DistributedDiscreteGaussianEvent(10.0, math.sqrt(2) * 10, 0.0, 2, 2)
    for n in (1, 3):
        rec = [_i(2, 0), _i(-1, 1, 3), _i(-2)]
        out, ev = _run(q, [rec] * n)
        assert [o.tolist() for o in out] == [[2 * n, 0], [-n, n, 3 * n], [-2 * n]]
        assert ev.num_clients == n and ev.dimension == 6
    with pytest.raises(TypeError, match="integer"):
        _run(q, [torch.tensor([2.0, 0.0])])


def test_bound_not_rounded_and_excess_clipped():
    assert _run(DistributedDiscreteGaussianSumQuery(14.2, 0.0), [_i(10, 10)])[0].tolist() == [10, 10]
    for bound in (3, 10, 14.1):
        out, _ = _run(DistributedDiscreteGaussianSumQuery(bound, 0.0), [_i(10, 10)])
        assert float(out.double().norm()) <= bound


@pytest.mark.parametrize("local_stddev,num_records", [(2.0, 1), (10.0, 4), (1000.0, 1), (1000.0, 25), (0.8, 9)])
def test_local_noise_shares_variance(local_stddev, num_records):
    trials = 2000
    q = DistributedDiscreteGaussianSumQuery(10.0, local_stddev, generator=torch.Generator().manual_seed(num_records))
    params = q.derive_sample_params(q.initial_global_state())
    batch = torch.zeros(num_records, trials, dtype=torch.int32)
    state = q.accumulate_records(params, q.initial_sample_state(batch[0]), batch)
    agg, _, event = q.get_noised_result(state, q.initial_global_state())
    # exact variance of one share, by summation of the pmf
    half = int(60 * local_stddev + 60)
    x = np.arange(-half, half + 1, dtype=float)
    w = np.exp(-(x**2) / (2 * local_stddev**2))
    var = num_records * (w * x**2).sum() / w.sum()
    chi = (trials - 1) * agg.double().numpy().var(ddof=1) / var
    # sums of discrete Gaussians are not Gaussian, but the sample variance's spread is close to
    # the chi-square's: a two-sided test at ALPHA
    assert stats.chi2.sf(chi, trials - 1) > ALPHA / 2 and stats.chi2.cdf(chi, trials - 1) > ALPHA / 2
    assert abs(float(agg.double().mean())) < stats.norm.isf(ALPHA / 2) * math.sqrt(var / trials)
    assert event.num_clients == num_records and event.dimension == trials


def test_state_counts_merge_and_empty_sample():
    q = DistributedDiscreteGaussianSumQuery(5.0, 0.0)
    params = q.derive_sample_params(q.initial_global_state())
    batch = torch.randint(-2, 3, (7, 3), generator=torch.Generator().manual_seed(0))
    s1 = q.accumulate_records(params, q.initial_sample_state(batch[0]), batch)
    s2 = q.accumulate_record(params, q.initial_sample_state(batch[0]), batch[0])
    merged = q.merge_sample_states(s1, s2)
    assert isinstance(merged, DistributedSumState) and merged.num_records == 8
    assert torch.equal(merged.total, batch.sum(0) + batch[0])
    empty = q.initial_sample_state(batch[0])
    res, _, ev = q.get_noised_result(empty, q.initial_global_state())
    assert ev == NoOpEvent() and not res.any()


def test_float_records_rounded_with_l1_bound():
    bound = rounded_l2_norm_bound(3.0, 8)
    q = DistributedDiscreteGaussianSumQuery(
        bound, 0.0, l1_norm_bound=5, l2_norm_clip=3.0, generator=torch.Generator().manual_seed(4)
    )
    params = q.derive_sample_params(q.initial_global_state())
    batch = torch.randn(100, 8, generator=torch.Generator().manual_seed(5)) * 4
    pre = q.preprocess_records(params, batch)
    assert pre.dtype == torch.int64
    assert (pre.double().norm(dim=1) <= bound).all() and (pre.abs().sum(1) <= 5).all()
    state = q.accumulate_preprocessed_records(q.initial_sample_state(batch[0]), pre)
    _, _, ev = q.get_noised_result(state, q.initial_global_state())
    assert ev.l1_sensitivity == 5.0 and ev.num_clients == 100


def test_event_accounting_replace_one():
    q = DistributedDiscreteGaussianSumQuery(4.0, 3.0, generator=torch.Generator().manual_seed(0))
    _, ev = _run(q, [torch.zeros(16, dtype=torch.int64)] * 10)
    assert ev == DistributedDiscreteGaussianEvent(4.0, 16.0, 3.0, 10, 16)
    orders = [2.0, 4.0, 16.0]
    rdp = compute_rdp_from_event(ev, orders, neighboring_relation="replace_one")
    np.testing.assert_allclose(rdp, compute_rdp_distributed_discrete_gaussian(8.0, 32.0, 3.0, 10, 16, orders))
    # sigma 3 per share, 10 shares: tau ~ 1e-76, the central bound alpha (2*4)^2 / (2 * 90)
    np.testing.assert_allclose(rdp, np.array(orders) * 64 / 180, rtol=1e-9)
