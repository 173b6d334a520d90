"""TF Privacy parity at the edges (clip 0, weighted averages, estimates starting at 0) and
records at the edges of floating point (overflowing norms, NaN/inf entries)."""

import math

import attrs
import pytest
import torch

from pytorch_privacy.dp_query import (
    GaussianSumQuery,
    NoOpEvent,
    NoPrivacyAverageQuery,
    NoPrivacySumQuery,
    QuantileAdaptiveClipSumQuery,
    QuantileEstimatorQuery,
)
from pytorch_privacy.dp_query.gaussian_query import clip_record

from ._records import run_query as _run


# -- TF Privacy parity ------------------------------------------------------------------------


@pytest.mark.parametrize("batched", [False, True])
def test_gaussian_sum_with_clip_changed_to_zero_is_zero(batched):
    # TF Privacy gaussian_query_test: a clip variable assigned 0.0 gives a zero sum
    records = [torch.tensor([-6.0, 8.0]), torch.tensor([4.0, -3.0])]
    q = GaussianSumQuery(5.0, 0.0)
    result, _, event = _run(q, records, batched=batched)
    assert torch.equal(result, torch.tensor([1.0, 1.0]))  # [-3, 4] + [4, -3]
    zero_clip = attrs.evolve(q.initial_global_state(), l2_norm_clip=0.0)
    result, _, event = _run(q, records, zero_clip, batched=batched)  # used to raise ZeroDivisionError
    assert torch.equal(result, torch.zeros(2))
    assert event == NoOpEvent()  # the sum no longer depends on the data


def test_gaussian_sum_with_zero_clip_from_the_start():
    q = GaussianSumQuery(0.0, 0.0)
    result, _, event = _run(q, [torch.tensor([3.0, 4.0])])
    assert torch.equal(result, torch.zeros(2)) and event == NoOpEvent()


def test_no_privacy_weighted_average_tf_signature():
    # TF Privacy no_privacy_query_test: records [4, 0], [-1, 1] with weights 1 and 3
    q = NoPrivacyAverageQuery()
    gs = q.initial_global_state()
    params = q.derive_sample_params(gs)
    state = q.initial_sample_state(torch.zeros(2))
    for record, weight in [(torch.tensor([4.0, 0.0]), 1), (torch.tensor([-1.0, 1.0]), 3)]:
        state = q.accumulate_record(params, state, record, weight)
    result, _, _ = q.get_noised_result(state, gs)
    torch.testing.assert_close(result, torch.tensor([0.25, 0.75]))  # (4 - 3) / 4, 3 / 4
    with pytest.raises(ValueError, match="finite"):
        q.accumulate_record(params, state, torch.ones(2), float("nan"))


def test_quantile_estimator_from_zero_with_arithmetic_update():
    # initial_estimate=0 with geometric_update=False is accepted (TF Privacy allows it)
    q = QuantileEstimatorQuery(0.0, 0.5, 1.0, 0.0, expected_num_records=4, geometric_update=False)
    gs = q.initial_global_state()
    values = torch.tensor([1.0, 2.0, 3.0, 4.0])
    estimates = []
    for _ in range(20):
        state = q.accumulate_records(q.derive_sample_params(gs), q.initial_sample_state(), values)
        est, gs, _ = q.get_noised_result(state, gs)
        estimates.append(float(est))
    # nothing is at or below 0: fraction below 0, so the estimate moves up by lr * 0.5
    assert estimates[0] == 0.5
    assert 2.0 <= estimates[-1] <= 3.0  # settles at the median
    with pytest.raises(ValueError, match="geometric"):
        QuantileEstimatorQuery(0.0, 0.5, 1.0, 0.0, expected_num_records=4, geometric_update=True)


def test_adaptive_clipping_from_zero_with_arithmetic_update():
    q = QuantileAdaptiveClipSumQuery(0.0, 0.0, 0.5, 1.0, 0.0, expected_num_records=2, geometric_update=False)
    records = [torch.tensor([3.0, 4.0]), torch.tensor([0.0, 1.0])]
    gs = q.initial_global_state()
    result, gs, event = _run(q, records, gs)
    assert torch.equal(result, torch.zeros(2))  # every record clipped to 0
    assert float(gs.sum_state.l2_norm_clip) == 0.5  # 0 - 1.0 * (0 - 0.5)
    result, gs, _ = _run(q, records, gs, batched=True)
    torch.testing.assert_close(result, torch.tensor([0.3, 0.4 + 0.5]))  # [3, 4] and [0, 1] clipped to 0.5
    with pytest.raises(ValueError, match="geometric"):
        QuantileAdaptiveClipSumQuery(0.0, 1.0, 0.5, 1.0, 1.0, expected_num_records=2)


# -- records at the edges of floating point ----------------------------------------------------


def _clip_both_ways(query, batch):
    gs = query.initial_global_state()
    params = query.derive_sample_params(gs)
    batched = query.preprocess_records(params, batch)
    single = torch.stack([query.preprocess_record(params, r) for r in batch])
    return batched, single


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_overflowing_norm_clipped_identically_by_both_paths(dtype):
    big = {torch.float32: 1e30, torch.float64: 1e200, torch.float16: 3e4, torch.bfloat16: 1e30}[dtype]
    batch = torch.stack([
        torch.full((1000,), big, dtype=dtype),
        torch.full((1000,), 1e-3, dtype=dtype),
        torch.tensor([3.0, 4.0] + [0.0] * 998, dtype=dtype),
    ])
    assert torch.isfinite(batch).all() and not torch.isfinite(batch[0].pow(2).sum())  # the squares overflow
    q = GaussianSumQuery(1.0, 0.0)
    batched, single = _clip_both_ways(q, batch)
    assert torch.equal(batched, single)
    norms = batched.double().norm(dim=1)
    # the big record is clipped to norm 1 (it used to become all zeros in the batched path)
    assert norms[0].item() == pytest.approx(1.0, rel=2 * torch.finfo(dtype).eps)
    assert torch.equal(batched[1], batch[1])  # within the bound: unchanged
    assert norms[2].item() == pytest.approx(1.0, rel=2 * torch.finfo(dtype).eps)


def test_overflowing_record_in_a_pytree_and_in_adaptive_clipping():
    batch = {"a": torch.full((2, 10), 1e30), "b": torch.full((2, 3, 3), 2e30)}
    q = GaussianSumQuery(2.0, 0.0)
    gs = q.initial_global_state()
    p = q.derive_sample_params(gs)
    batched = q.preprocess_records(p, batch)
    single = [q.preprocess_record(p, {"a": batch["a"][i], "b": batch["b"][i]}) for i in range(2)]
    for k in batch:
        assert torch.equal(batched[k], torch.stack([s[k] for s in single]))
    total = math.sqrt(sum(float(batched[k][0].double().pow(2).sum()) for k in batch))
    assert total == pytest.approx(2.0, rel=1e-5)
    aq = QuantileAdaptiveClipSumQuery(2.0, 0.0, 0.5, 0.2, 0.0, expected_num_records=2)
    ap = aq.derive_sample_params(aq.initial_global_state())
    ab = aq.preprocess_records(ap, batch)
    for i in range(2):
        s = aq.preprocess_record(ap, {"a": batch["a"][i], "b": batch["b"][i]})
        assert all(torch.equal(ab.sum_state[k][i], s.sum_state[k]) for k in batch)
        assert torch.equal(ab.count_state[i], s.count_state)


BAD = {"NaN": float("nan"), "infinite": float("inf")}


@pytest.mark.parametrize("kind", sorted(BAD))
@pytest.mark.parametrize(
    "make",
    [
        lambda: GaussianSumQuery(1.0, 0.5),
        lambda: QuantileAdaptiveClipSumQuery(1.0, 1.0, 0.5, 0.2, 1.0, expected_num_records=3),
        lambda: NoPrivacySumQuery(),
        lambda: NoPrivacyAverageQuery(),
    ],
)
@pytest.mark.parametrize("batched", [False, True])
def test_non_finite_record_is_refused_not_a_nan_result(kind, make, batched):
    records = [torch.tensor([1.0, 2.0]), torch.tensor([0.5, BAD[kind]]), torch.tensor([3.0, 0.0])]
    with pytest.raises(ValueError, match=f"record 1 has a {kind} entry" if batched else f"the record has a {kind} entry"):
        _run(make(), records, batched=batched)


def test_records_known_finite_is_scoped_to_its_block():
    """The optimizer's opt-out of the host-side check (its records are masked already) must not
    leak: the refusal is back after the block, also when the block raised."""
    from pytorch_privacy.dp_query.pytree import records_known_finite

    records = [torch.tensor([1.0, 2.0]), torch.tensor([0.5, float("nan")])]
    with pytest.raises(RuntimeError, match="inside"):
        with records_known_finite():
            _run(GaussianSumQuery(1.0, 0.0), [records[0]], batched=True)
            raise RuntimeError("inside")
    with pytest.raises(ValueError, match="record 1 has a NaN entry"):
        _run(GaussianSumQuery(1.0, 0.0), records, batched=True)


def test_clip_record_refuses_nan():
    with pytest.raises(ValueError, match="NaN"):
        clip_record({"w": torch.tensor([1.0, float("nan")])}, 1.0)


def test_norms_of_integer_and_ordinary_records():
    from pytorch_privacy.dp_query import pytree

    assert pytree.global_norms(torch.tensor([[3, 4], [0, 1]])).tolist() == [5.0, 1.0]
    # rows far from overflow are measured unscaled: the same value as a plain float64 norm
    x = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 1e6
    torch.testing.assert_close(pytree.global_norms(x), x.double().norm(dim=1), rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_accelerator_norm_route_matches_the_cpu_route(dtype):
    # accelerators always take the scaled route (no host sync); on CPU it only measures rows that
    # overflowed.  Both must agree: exactly for ordinary rows, to rounding for overflowing ones.
    from pytorch_privacy.dp_query import pytree

    big = {torch.float32: 1e30, torch.float64: 1e200, torch.float16: 3e4, torch.bfloat16: 1e30}[dtype]
    g = torch.Generator().manual_seed(1)
    batch = {"w": torch.randn(5, 7, 3, generator=g).to(dtype), "b": torch.randn(5, 4, generator=g).to(dtype)}
    batch["w"][2] = big
    cpu = pytree.global_norms(batch)
    acc = pytree.scaled_norms([batch["w"], batch["b"]])
    rows = [0, 1, 3, 4]
    assert torch.equal(cpu[rows], acc[rows])
    torch.testing.assert_close(cpu[2], acc[2], rtol=1e-6, atol=0)
    assert math.isfinite(cpu[2].item()) and cpu[2].item() > big
