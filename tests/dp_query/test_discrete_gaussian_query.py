"""DiscreteGaussianSumQuery: exact sums without noise (TF Privacy's cases), clipping of integer
records, conditional randomized rounding within the L2 bound, noise variance, event."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from pytorch_privacy.dp_query.discrete_gaussian_query import (
    DiscreteGaussianSumQuery,
    clip_integer_records,
    prepare_integer_records,
    randomized_round,
    rounded_l1_norm_bound,
    rounded_l2_norm_bound,
)
from pytorch_privacy.dp_query.distributed_events import DiscreteGaussianEvent
from pytorch_privacy.dp_query.events import NoOpEvent
from pytorch_privacy.dp_query.randomness import RandomSource

ALPHA = 1e-4


def _run(query, records):
    result, _, event = run_query(query, records)
    return result, event


def test_sum_no_noise_tf_cases():
    q = DiscreteGaussianSumQuery(l2_norm_bound=10, stddev=0.0)
    result, event = _run(q, [_i(2, 0), _i(-1, 1)])
    assert result.dtype == torch.int64 and result.tolist() == [1, 1]
    assert event == DiscreteGaussianEvent(10.0, 0.0)
    for n in (1, 3):
        rec = [_i(1, 0), {"a": _i(1, 1, 1), "b": [_i(1), (torch.ones(2, 2, dtype=torch.int32), _i(1, 0))]}]
        out, _ = _run(q, [rec] * n)
        assert out[0].tolist() == [n, 0]
        assert out[1]["a"].tolist() == [n] * 3
        assert out[1]["b"][1][0].tolist() == [[n, n], [n, n]]


def test_float_records_need_rounding():
    q = DiscreteGaussianSumQuery(l2_norm_bound=10, stddev=0.0)
    with pytest.raises(TypeError, match="integer"):
        _run(q, [torch.tensor([2.0, 0.0]), torch.tensor([-1.0, 1.0])])


def test_float_bound_not_rounded_and_excess_is_clipped():
    q = DiscreteGaussianSumQuery(l2_norm_bound=14.2, stddev=0.0)  # [10, 10] has norm 14.14
    assert _run(q, [_i(10, 10)])[0].tolist() == [10, 10]
    for bound in (0, 3, 10, 14.1):
        out, event = _run(DiscreteGaussianSumQuery(bound, 0.0), [_i(10, 10)])
        assert float(out.double().norm()) <= bound
        assert out.tolist() == [math.floor(bound / math.sqrt(200) * 10)] * 2
        assert (event == NoOpEvent()) == (bound == 0)


def test_clip_integer_records_exact_boundary_and_l1():
    # [3, 4] has norm exactly 5: within a bound of 5, clipped under 4.999999
    rows = [torch.tensor([[3, 4], [3, 4]])]
    assert clip_integer_records(rows, 5.0)[0].tolist() == [[3, 4], [3, 4]]
    out = clip_integer_records(rows, 4.999999)[0]
    assert (out.double().norm(dim=1) <= 4.999999).all()
    l1 = clip_integer_records([torch.tensor([[5, -5, 2]])], 100.0, l1_norm_bound=6)[0]
    assert l1.abs().sum() <= 6 and (l1.abs() <= torch.tensor([5, 5, 2])).all()


def test_randomized_round_unbiased_and_within_bound():
    x = torch.tensor([0.3, -1.7, 2.5, 0.0, 4.9])
    bound = rounded_l2_norm_bound(float(x.norm()), 5, beta=math.exp(-0.5))
    src = RandomSource(torch.Generator().manual_seed(3))
    one = randomized_round(x, bound, src)
    assert one.shape == x.shape and float(one.double().norm()) <= bound
    # the batched path (what the queries run) on 3000 copies
    draws = prepare_integer_records([x.repeat(3000, 1)], l2_norm_bound=bound, l2_norm_clip=10.0, source=src)[0]
    assert draws.dtype == torch.int64
    assert (draws.double().norm(dim=1) <= bound).all()
    assert set(draws[:, 0].tolist()) <= {0, 1} and set(draws[:, 1].tolist()) <= {-2, -1}
    # each coordinate is floor or ceil; the conditioning on the norm barely biases it here
    np.testing.assert_allclose(draws.double().mean(0).numpy(), x.double().numpy(), atol=0.05)


def test_randomized_round_falls_back_within_bound():
    # a bound equal to the record's own norm can rarely be met by rounding up: after the tries
    # the record is rounded toward zero, never above the bound
    x = {"a": torch.tensor([0.5, 0.5]), "b": torch.tensor([0.5])}
    out = randomized_round(x, math.sqrt(0.75), torch.Generator().manual_seed(0), max_tries=2)
    norm = math.sqrt(sum(float(v.double().square().sum()) for v in out.values()))
    assert norm <= math.sqrt(0.75)


def test_query_rounds_float_records_within_bound():
    bound = rounded_l2_norm_bound(2.0, 6)
    q = DiscreteGaussianSumQuery(bound, 0.0, l2_norm_clip=2.0, generator=torch.Generator().manual_seed(1))
    batch = torch.randn(200, 6, generator=torch.Generator().manual_seed(2)) * 3
    params = q.derive_sample_params(q.initial_global_state())
    pre = q.preprocess_records(params, batch)
    assert pre.dtype == torch.int64 and (pre.double().norm(dim=1) <= bound).all()
    with pytest.raises(ValueError, match="exceeds l2_norm_bound"):
        DiscreteGaussianSumQuery(1.0, 0.0, l2_norm_clip=2.0)
    with pytest.raises(ValueError, match="NaN"):
        q.preprocess_records(params, torch.tensor([[float("nan")] * 6]))


def test_batched_equals_looped_without_noise():
    q = DiscreteGaussianSumQuery(7.5, 0.0)
    batch = torch.randint(-6, 7, (30, 4), generator=torch.Generator().manual_seed(5))
    params = q.derive_sample_params(q.initial_global_state())
    s1 = q.accumulate_records(params, q.initial_sample_state(batch[0]), batch)
    s2 = q.initial_sample_state(batch[0])
    for r in batch:
        s2 = q.accumulate_record(params, s2, r)
    assert torch.equal(s1, s2)
    assert torch.equal(q.merge_sample_states(s1, s2), 2 * s1)


@pytest.mark.parametrize("stddev", [10.0, 100.0, 3.5])
def test_noise_variance(stddev):
    n = 4000
    q = DiscreteGaussianSumQuery(n, stddev, generator=torch.Generator().manual_seed(int(stddev)))
    result, event = _run(q, [torch.zeros(n, dtype=torch.int32), torch.ones(n, dtype=torch.int32)])
    noise = (result - 1).double().numpy()
    # the variance of N_Z(0, s^2) equals s^2 to ~1e-8 relative from s = 1 on
    chi = (n - 1) * noise.var(ddof=1) / stddev**2
    assert stats.chi2.sf(chi, n - 1) > ALPHA / 2 and stats.chi2.cdf(chi, n - 1) > ALPHA / 2
    assert event == DiscreteGaussianEvent(n, stddev)


def test_owned_randomness_and_metrics():
    q = DiscreteGaussianSumQuery(3.0, 2.0)
    assert q.random_sources()[0].kind == "owned"
    assert q.derive_metrics(q.initial_global_state()) == {"l2_norm_bound": 3.0, "stddev": 2.0}
    assert DiscreteGaussianSumQuery(3.0, 2.0, secure_mode=True).generator.secure_mode
    with pytest.raises(ValueError):
        DiscreteGaussianSumQuery(3.0, 1e-5)
    with pytest.raises(ValueError):
        DiscreteGaussianSumQuery(-1.0, 1.0)


def test_resumed_source_repeats_the_noise_and_results_are_fresh_tensors():
    q = DiscreteGaussianSumQuery(5.0, 3.0, generator=torch.Generator().manual_seed(9))
    gs = q.initial_global_state()
    state = q.initial_sample_state(torch.zeros(50, dtype=torch.int64))
    saved = q.generator.state_dict()
    a = q.get_noised_result(state, gs)[0]
    q.generator.load_state_dict(saved)
    b = q.get_noised_result(state, gs)[0]
    assert torch.equal(a, b) and a.abs().sum() > 0
    assert not state.any()  # the sample state was not modified in place


def test_rounding_bounds():
    # c = 3, d = 16, beta = e^-0.5: sqrt(9 + 4 + 1 * (3 + 2)) = sqrt(18) < 3 + 4
    assert rounded_l2_norm_bound(3.0, 16) == pytest.approx(math.sqrt(18.0), rel=1e-15)
    assert rounded_l2_norm_bound(3.0, 16, beta=0) == 7.0
    assert rounded_l1_norm_bound(3.0, 100) == 9.0 and rounded_l1_norm_bound(30.0, 4) == 60.0


def test_full_batch_ledger_accounts_the_discrete_gaussian():
    from pytorch_privacy.analysis.rdp_accountant import compute_rdp_from_ledger
    from pytorch_privacy.dp_query.privacy_ledger import PrivacyLedger
    from pytorch_privacy.dp_query.query_with_ledger import QueryWithLedger

    ledger = PrivacyLedger(50, sampling="full")
    q = QueryWithLedger(DiscreteGaussianSumQuery(2.0, 8.0, generator=torch.Generator().manual_seed(0)), ledger)
    batch = torch.randint(-1, 2, (50, 3), generator=torch.Generator().manual_seed(1))
    for _ in range(7):
        p = q.derive_sample_params(q.initial_global_state())
        q.get_noised_result(q.accumulate_records(p, q.initial_sample_state(batch[0]), batch), q.initial_global_state())
    loaded = PrivacyLedger.from_json(ledger.to_json())
    orders = np.array([2.0, 10.0])
    # add/remove-one, 7 releases: 7 * alpha * 2^2 / (2 * 8^2)
    np.testing.assert_allclose(compute_rdp_from_ledger(loaded, orders), 7 * orders * 4 / 128, rtol=1e-12)


# -- properties ------------------------------------------------------------------------------
from fractions import Fraction  # noqa: E402

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from ._records import int_record as _i
from ._records import run_query


def _exact_sq(row) -> int:
    return sum(int(v) ** 2 for v in row)


@settings(max_examples=40)
@given(
    rows=st.lists(st.lists(st.integers(-10**6, 10**6), min_size=3, max_size=3), min_size=1, max_size=6),
    l2=st.floats(0.0, 2e6),
    l1=st.one_of(st.none(), st.floats(0.0, 3e6)),
)
def test_clip_integer_records_always_within_bounds(rows, l2, l1):
    x = torch.tensor(rows, dtype=torch.int64)
    out = clip_integer_records([x], l2, l1)[0]
    assert out.dtype == torch.int64
    for r_in, r_out in zip(x.tolist(), out.tolist()):
        assert Fraction(_exact_sq(r_out)) <= Fraction(l2) ** 2
        if l1 is not None:
            assert sum(abs(v) for v in r_out) <= l1
        assert all(abs(b) <= abs(a) and a * b >= 0 for a, b in zip(r_in, r_out))
        within = Fraction(_exact_sq(r_in)) <= Fraction(l2) ** 2 and (l1 is None or sum(map(abs, r_in)) <= l1)
        if within:
            assert r_out == r_in


@settings(max_examples=25)
@given(
    rows=st.lists(st.lists(st.floats(-50, 50), min_size=4, max_size=4), min_size=1, max_size=5),
    clip=st.floats(0.0, 30.0),
    scale=st.floats(0.5, 20.0),
    seed=st.integers(0, 2**31),
)
def test_prepared_float_records_always_within_bound(rows, clip, scale, seed):
    bound = rounded_l2_norm_bound(clip * scale, 4)
    src = RandomSource(torch.Generator().manual_seed(seed))
    x = torch.tensor(rows, dtype=torch.float64)
    out = prepare_integer_records([x], l2_norm_bound=bound, l2_norm_clip=clip, scale=scale, source=src, max_round_tries=3)[0]
    for r in out.tolist():
        assert Fraction(_exact_sq(r)) <= Fraction(bound) ** 2


@pytest.mark.parametrize("scale", [1.0, 64.0])
def test_scaled_float_records_are_decoded(scale):
    from pytorch_privacy.dp_query.distributed_discrete_gaussian_query import DistributedDiscreteGaussianSumQuery

    dim, clip, n = 16, 1.0, 300
    bound = rounded_l2_norm_bound(clip * scale, dim)
    batch = torch.randn(n, dim, generator=torch.Generator().manual_seed(6)) * 0.1  # within the clip
    for q in (
        DiscreteGaussianSumQuery(bound, 0.0, l2_norm_clip=clip, scale=scale, generator=torch.Generator().manual_seed(7)),
        DistributedDiscreteGaussianSumQuery(bound, 0.0, l2_norm_clip=clip, scale=scale, generator=torch.Generator().manual_seed(8)),
    ):
        gs = q.initial_global_state()
        st = q.accumulate_records(q.derive_sample_params(gs), q.initial_sample_state(batch[0]), batch)
        result = q.get_noised_result(st, gs)[0]
        assert result.dtype == torch.float64
        # unbiased rounding to the grid 1/scale: error of the sum ~ sqrt(n / 4) / scale
        err = float((result - batch.double().sum(0)).abs().max())
        assert err < 5 * math.sqrt(n / 4) / scale
    with pytest.raises(ValueError, match="l2_norm_clip"):
        DiscreteGaussianSumQuery(10.0, 1.0, scale=2.0)


def test_trains_with_dp_optimizer_and_accounts_the_ledger():
    from torch import nn

    from pytorch_privacy.analysis.rdp_accountant import compute_rdp_from_ledger
    from pytorch_privacy.dp_query.normalized_query import NormalizedQuery
    from pytorch_privacy.dp_query.privacy_ledger import PrivacyLedger
    from pytorch_privacy.optimizer.dp_optimizer import DPOptimizer

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(100, 5, generator=g), torch.randint(0, 2, (100,), generator=g)
    model = nn.Linear(5, 2)
    before = [p.detach().clone() for p in model.parameters()]
    scale = 100.0
    bound = rounded_l2_norm_bound(scale, 12)
    inner = DiscreteGaussianSumQuery(bound, scale, l2_norm_clip=1.0, scale=scale, generator=torch.Generator().manual_seed(1))
    ledger = PrivacyLedger(100, sampling="shuffle", batch_size=50)
    opt = DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.5), model, nn.CrossEntropyLoss(reduction="none"),
        NormalizedQuery(inner, denominator=50), ledger=ledger,
    )
    for _ in range(2):
        for i in range(0, 100, 50):
            assert math.isfinite(opt.fit_batch(x[i : i + 50], y[i : i + 50]))
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # shuffled batches: one release per epoch under replace-one (sensitivity 2 * bound)
    orders = np.array([2.0, 8.0])
    np.testing.assert_allclose(compute_rdp_from_ledger(ledger, orders), 2 * orders * (2 * bound) ** 2 / (2 * scale**2))


def test_bounds_are_capped_and_rounding_refuses_non_finite():
    from pytorch_privacy.dp_query.distributed_skellam_query import DistributedSkellamSumQuery

    with pytest.raises(ValueError, match="at most"):
        DiscreteGaussianSumQuery(2.0**27, 1.0)
    with pytest.raises(ValueError, match="at most"):
        DistributedSkellamSumQuery(2.0**53, 10, 1.0)
    with pytest.raises(ValueError, match="NaN or infinite"):
        randomized_round(torch.tensor([1.0, float("inf")]), 5.0)
