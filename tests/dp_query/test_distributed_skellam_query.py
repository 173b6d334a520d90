"""DistributedSkellamSumQuery: exact sums without noise (TF Privacy's cases), L1/L2 bounds,
Skellam/Poisson samplers (pmf, variance), modular wrap-around and clipping, scaling and
decoding, event and accounting."""

import math
import re

import numpy as np
import pytest
import torch
from scipy import stats

from pytorch_privacy.analysis.distributed import compute_rdp_skellam
from pytorch_privacy.analysis.rdp_accountant import compute_rdp_from_event
from pytorch_privacy.dp_query.discrete_gaussian_query import rounded_l2_norm_bound
from pytorch_privacy.dp_query.distributed_events import DistributedSkellamEvent
from pytorch_privacy.dp_query.distributed_skellam_query import (
    DistributedSkellamSumQuery,
    sample_poisson,
    sample_skellam,
)
from pytorch_privacy.dp_query.events import NoOpEvent
from pytorch_privacy.dp_query.randomness import RandomSource

from ._records import int_record as _i
from ._records import run_query

ALPHA = 1e-4


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _run(query, records):
    result, _, event = run_query(query, records)
    return result, event


def test_sum_no_noise_tf_cases():
    q = DistributedSkellamSumQuery(l1_norm_bound=10, l2_norm_bound=10, local_stddev=0.0)
    result, event = _run(q, [_i(2, 0), _i(-1, 1)])
    assert result.dtype == torch.int64 and result.tolist() == [1, 1]
    assert event == DistributedSkellamEvent(10.0, 10.0, 0.0, 2)
    out, _ = _run(q, [[_i(2, 0), _i(-1, 1, 3)]] * 2)
    assert [o.tolist() for o in out] == [[4, 0], [-2, 2, 6]]
    with pytest.raises(TypeError, match="integer"):
        _run(q, [torch.tensor([2.0, 0.0])])


def test_l1_and_l2_bounds_clip():
    # TF Privacy raises on these records; here they are clipped within both bounds
    out, _ = _run(DistributedSkellamSumQuery(1, 100, 0.0), [_i(1, 2)])
    assert out.abs().sum() <= 1
    out, _ = _run(DistributedSkellamSumQuery(10, 4, 0.0), [_i(3, 4)])
    assert float(out.double().norm()) <= 4


@pytest.mark.parametrize("variance,seed", [(3.0, 1), (60.0, 2)])
def test_skellam_pmf_chi_square(variance, seed):
    n = 40_000
    x = sample_skellam(variance, (n,), _gen(seed)).numpy()
    mu = variance / 2
    k = int(math.sqrt(variance) * 4) + 2
    support = np.arange(-k, k + 1)
    expected = stats.skellam.pmf(support, mu, mu) * n
    observed = np.array([(x == v).sum() for v in support], dtype=float)
    keep = expected >= 5
    obs = np.append(observed[keep], n - observed[keep].sum())
    exp = np.append(expected[keep], n - expected[keep].sum())
    assert stats.chisquare(obs, exp).pvalue > ALPHA


@pytest.mark.parametrize("lam,seed", [(0.7, 3), (9.9, 4), (10.0, 5), (1e6, 6)])
def test_poisson_mean_and_variance(lam, seed):
    n = 40_000
    x = sample_poisson(lam, (n,), _gen(seed)).numpy().astype(float)
    z = stats.norm.isf(ALPHA / 2)
    assert abs(x.mean() - lam) < z * math.sqrt(lam / n)
    chi = (n - 1) * x.var(ddof=1) / lam
    assert stats.chi2.sf(chi, n - 1) > ALPHA / 2 and stats.chi2.cdf(chi, n - 1) > ALPHA / 2


@pytest.mark.parametrize("lam,seed", [(4.0, 7), (10.0, 8), (40.0, 9)])
def test_poisson_pmf_chi_square(lam, seed):
    # 400k draws: enough to see a shifted PTRS proposal (0.43 -> 0.93 gives p ~ 1e-9 at lam 10)
    n = 400_000
    x = sample_poisson(lam, (n,), _gen(seed)).numpy()
    support = np.arange(0, int(lam + 8 * math.sqrt(lam)) + 1)
    expected = stats.poisson.pmf(support, lam) * n
    keep = expected >= 5
    observed = np.array([(x == v).sum() for v in support[keep]], dtype=float)
    obs = np.append(observed, n - observed.sum())
    exp = np.append(expected[keep], n - expected[keep].sum())
    assert stats.chisquare(obs, exp).pvalue > ALPHA


def test_sampler_randomness_is_owned():
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    a = sample_skellam(20.0, (100,), _gen(9))
    assert torch.equal(a, sample_skellam(20.0, (100,), _gen(9)))
    assert torch.equal(before, torch.random.get_rng_state())
    s = sample_skellam(20.0, (2000,), secure_mode=True).double()
    assert abs(float(s.var()) - 20.0) < 4.0
    with pytest.raises(ValueError):
        sample_poisson(-1.0, (3,))


@pytest.mark.parametrize("local_stddev,users", [(1.0, 1), (1.0, 100), (30.0, 7)])
def test_local_noise_sum_variance(local_stddev, users):
    trials = 4000
    q = DistributedSkellamSumQuery(10, 10, local_stddev, generator=_gen(users))
    params = q.derive_sample_params(q.initial_global_state())
    batch = torch.zeros(users, trials, dtype=torch.int32)
    state = q.accumulate_records(params, q.initial_sample_state(batch[0]), batch)
    agg, _, event = q.get_noised_result(state, q.initial_global_state())
    var = users * local_stddev**2  # a sum of Skellams is Skellam: variances add exactly
    chi = (trials - 1) * agg.double().numpy().var(ddof=1) / var
    assert stats.chi2.sf(chi, trials - 1) > ALPHA / 2 and stats.chi2.cdf(chi, trials - 1) > ALPHA / 2
    assert event == DistributedSkellamEvent(10.0, 10.0, local_stddev**2, users)


def test_modular_wrap_around_and_centring():
    # bits = 4: sums live in [-8, 8); 5 + 6 = 11 wraps to -5, -5 + -6 = -11 wraps to 5
    q = DistributedSkellamSumQuery(20, 20, 0.0, bits=4)
    assert q.modulus == 16
    out, _ = _run(q, [_i(5, -5, 3, 7), _i(6, -6, 4, 0)])
    assert out.tolist() == [-5, 5, 7, 7]
    # client messages and partial sums stay in [0, modulus)
    params = q.derive_sample_params(q.initial_global_state())
    pre = q.preprocess_records(params, torch.tensor([[5, -5, 3, 7], [6, -6, 4, 0]]))
    assert pre.min() >= 0 and pre.max() < 16
    state = q.accumulate_preprocessed_records(q.initial_sample_state(pre[0]), pre)
    assert state.total.tolist() == [11, 5, 7, 7]


def test_modular_sum_equals_centred_plain_sum_with_noise():
    # the same seed gives the same noise: the modular result is the plain one wrapped
    batch = torch.randint(-3, 4, (50, 64), generator=_gen(1))
    plain = DistributedSkellamSumQuery(100, 100, 3.0, generator=_gen(2))
    modq = DistributedSkellamSumQuery(100, 100, 3.0, modulus=37, generator=_gen(2))
    res = []
    for q in (plain, modq):
        p = q.derive_sample_params(q.initial_global_state())
        st = q.accumulate_records(p, q.initial_sample_state(batch[0]), batch)
        res.append(q.get_noised_result(st, q.initial_global_state())[0])
    wrapped = torch.remainder(res[0], 37)
    wrapped = torch.where(wrapped >= 19, wrapped - 37, wrapped)
    assert torch.equal(res[1], wrapped)
    assert not torch.equal(res[0], res[1])  # some coordinates did wrap


def test_float_records_scaled_rounded_and_decoded():
    dim, clip, scale = 32, 1.0, 50.0
    bound = rounded_l2_norm_bound(clip * scale, dim)
    q = DistributedSkellamSumQuery(
        bound * math.sqrt(dim), bound, 0.0, l2_norm_clip=clip, scale=scale, bits=20, generator=_gen(3)
    )
    batch = torch.randn(400, dim, generator=_gen(4)) * 0.1  # norms ~0.57, below the clip
    params = q.derive_sample_params(q.initial_global_state())
    pre = q.preprocess_records(params, batch)
    centred = torch.where(pre >= 2**19, pre - 2**20, pre)
    assert (centred.double().norm(dim=1) <= bound).all()
    state = q.accumulate_preprocessed_records(q.initial_sample_state(batch[0]), pre)
    result, _, event = q.get_noised_result(state, q.initial_global_state())
    assert result.dtype == torch.float64
    # unbiased rounding: the decoded sum is within a few rounding stddevs of the true sum
    err = (result - batch.double().sum(0)).abs().max()
    assert float(err) < 6 * math.sqrt(400 * 0.25) / scale
    assert event.num_clients == 400 and event.l2_sensitivity == pytest.approx(bound)


def test_event_accounting_and_degenerate():
    q = DistributedSkellamSumQuery(9, 3, 2.0)
    _, ev = _run(q, [torch.zeros(100, dtype=torch.int64)] * 5)
    assert ev == DistributedSkellamEvent(9.0, 3.0, 4.0, 5)
    orders = [2.0, 3.0, 10.0]
    np.testing.assert_allclose(
        compute_rdp_from_event(ev, orders, neighboring_relation="replace_one"),
        compute_rdp_skellam(18.0, 6.0, 20.0, orders),
    )
    empty = q.initial_sample_state(torch.zeros(3))
    assert q.get_noised_result(empty, q.initial_global_state())[2] == NoOpEvent()


def test_bad_arguments():
    with pytest.raises(ValueError, match="not both"):
        DistributedSkellamSumQuery(1, 1, 1.0, bits=4, modulus=16)
    with pytest.raises(ValueError):
        DistributedSkellamSumQuery(1, 1, 1.0, bits=64)
    with pytest.raises(ValueError, match="l2_norm_clip"):
        DistributedSkellamSumQuery(1, 1, 1.0, scale=10.0)
    with pytest.raises(ValueError, match="exceeds"):
        DistributedSkellamSumQuery(100, 10, 1.0, l2_norm_clip=1.0, scale=20.0)
    with pytest.raises(ValueError, match="2\\^26"):
        DistributedSkellamSumQuery(1, 1, 1e9)
    assert DistributedSkellamSumQuery(1, 1, 1.0, secure_mode=True).random_sources()[0].secure_mode
    assert isinstance(DistributedSkellamSumQuery(1, 1, 1.0).generator, RandomSource)


def test_ledger_round_trip_and_audit_of_distributed_events(tmp_path, capsys):
    from pytorch_privacy.analysis.conversion import get_privacy_spent
    from pytorch_privacy.analysis.rdp_accountant import compute_rdp_from_ledger
    from pytorch_privacy.cli import main
    from pytorch_privacy.dp_query.distributed_discrete_gaussian_query import DistributedDiscreteGaussianSumQuery
    from pytorch_privacy.dp_query.privacy_ledger import PrivacyLedger
    from pytorch_privacy.dp_query.query_with_ledger import QueryWithLedger

    # 1000 clients, cohorts of 10 from a shuffled order (replace-one): 25 rounds = 3 epochs
    ledger = PrivacyLedger(1000, sampling="shuffle", batch_size=10)
    sk = QueryWithLedger(DistributedSkellamSumQuery(9, 3, 2.0, bits=16, generator=_gen(0)), ledger)
    ddg = QueryWithLedger(DistributedDiscreteGaussianSumQuery(3.0, 2.0, generator=_gen(1)), ledger)
    batch = torch.randint(-1, 2, (10, 4), generator=_gen(2))
    for _ in range(25):
        for q in (sk, ddg):
            p = q.derive_sample_params(q.initial_global_state())
            st = q.accumulate_records(p, q.initial_sample_state(batch[0]), batch)
            q.get_noised_result(st, q.initial_global_state())
    path = tmp_path / "ledger.json"
    ledger.save(path)
    loaded = PrivacyLedger.load(path)
    assert loaded == ledger
    orders = np.array([2.0, 4.0, 8.0, 32.0])
    from pytorch_privacy.analysis.distributed import compute_rdp_distributed_discrete_gaussian

    # shuffle accounting: at most one un-amplified release per epoch and query (25 rounds are
    # 1/4 epoch; a ledger that keeps alternating runs apart counts each run as an epoch: <= 25)
    sk_one = compute_rdp_skellam(18.0, 6.0, 40.0, orders)
    ddg_one = compute_rdp_distributed_discrete_gaussian(6.0, 12.0, 2.0, 10, 4, orders)
    rdp = compute_rdp_from_ledger(loaded, orders)
    assert np.all(rdp > 0) and np.all(np.isfinite(rdp))
    assert np.all(rdp <= 25 * (sk_one + ddg_one) * (1 + 1e-12))
    assert np.all(rdp >= sk_one + ddg_one)
    from pytorch_privacy.analysis.orders import DEFAULT_ORDERS

    eps = get_privacy_spent(DEFAULT_ORDERS, compute_rdp_from_ledger(loaded, DEFAULT_ORDERS), target_delta=1e-5)[0]
    assert main(["audit", str(path), "--delta", "1e-5", "--no-pld"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"RDP \(tight conversion\)\s+epsilon = " + re.escape(f"{eps:.6g}"), out), out


def test_docs_page_code_runs(capsys):
    import pathlib

    page = pathlib.Path(__file__).resolve().parents[2] / "docs" / "discrete_queries.md"
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)
    assert blocks
    exec(compile("\n".join(blocks), str(page), "exec"), {})
    out = capsys.readouterr().out
    eps = float(re.search(r"epsilon = ([0-9.]+) after 10 rounds", out).group(1))
    assert 1 < eps < 10


def test_average_through_normalized_query_tf_case():
    # TF Privacy's DistributedSkellamAverageQuery is the sum query inside a NormalizedQuery
    from pytorch_privacy.dp_query.normalized_query import NormalizedQuery

    q = NormalizedQuery(DistributedSkellamSumQuery(3.0, 3.0, 0.0), denominator=2.0)
    result, event = _run(q, [_i(1, 1), _i(1, 1)])
    assert result.tolist() == [1.0, 1.0]
    assert event == DistributedSkellamEvent(3.0, 3.0, 0.0, 2)


@pytest.mark.gpu
def test_discrete_queries_on_cuda():
    from pytorch_privacy.dp_query.discrete_gaussian_query import DiscreteGaussianSumQuery
    from pytorch_privacy.dp_query.distributed_discrete_gaussian_query import DistributedDiscreteGaussianSumQuery

    dev = torch.device("cuda")
    ints = torch.randint(-2, 3, (20, 8), generator=_gen(0)).to(dev)
    floats = (torch.randn(20, 8, generator=_gen(1)) * 0.1).to(dev)
    bound = rounded_l2_norm_bound(16.0, 8)
    for q, batch in (
        (DiscreteGaussianSumQuery(10.0, 0.0), ints),
        (DistributedDiscreteGaussianSumQuery(10.0, 0.0), ints),
        (DistributedSkellamSumQuery(30, 10, 0.0, bits=12), ints),
        (DistributedSkellamSumQuery(100, bound, 0.0, l2_norm_clip=1.0, scale=16.0, bits=16), floats),
    ):
        gs = q.initial_global_state()
        st = q.accumulate_records(q.derive_sample_params(gs), q.initial_sample_state(batch[0]), batch)
        res = q.get_noised_result(st, gs)[0]
        assert res.device.type == "cuda"
        if batch.dtype == torch.int64:
            assert torch.equal(res.cpu(), batch.sum(0).cpu())
        else:
            assert float((res.double() - batch.double().sum(0)).abs().max()) < 5 * math.sqrt(5) / 16
    noisy = DiscreteGaussianSumQuery(10.0, 3.0)
    gs = noisy.initial_global_state()
    res = noisy.get_noised_result(noisy.initial_sample_state(ints[0]), gs)[0]
    assert res.device.type == "cuda" and res.dtype == torch.int64
