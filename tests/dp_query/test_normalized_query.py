"""NormalizedQuery / GaussianAverageQuery: a sum divided by a public constant."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pytorch_privacy.dp_query import (
    GaussianAverageQuery,
    GaussianEvent,
    GaussianSumQuery,
    NormalizedQuery,
    QuantileAdaptiveClipSumQuery,
)

from pytorch_privacy.dp_query.normalized_query import divide

from ._records import STRUCTURES, clipped_sum64, flat64, leaves, random_record, rows64, weighted_sum_fn


@given(
    st.sampled_from(sorted(STRUCTURES)),
    st.integers(0, 2**32 - 1),
    st.floats(0.01, 100),
    st.floats(0.0, 10),
    st.floats(0.5, 1e4),
    st.integers(0, 8),
)
def test_average_is_sum_over_denominator(structure, seed, clip, noise_multiplier, denominator, b):
    batch = random_record(structure, seed, scale=clip, dtype=torch.float64, batch=b)
    template = random_record(structure, seed, dtype=torch.float64)
    stddev = noise_multiplier * clip
    avg_q = GaussianAverageQuery(clip, stddev, denominator, generator=torch.Generator().manual_seed(seed))
    sum_q = GaussianSumQuery(clip, stddev, generator=torch.Generator().manual_seed(seed))

    def run(q):
        gs = q.initial_global_state()
        p = q.derive_sample_params(gs)
        s = q.accumulate_records(p, q.initial_sample_state(template), batch)
        return q.get_noised_result(s, gs)

    avg, avg_gs, avg_ev = run(avg_q)
    tot, _, sum_ev = run(sum_q)
    for a, t in zip(leaves(avg), leaves(tot)):
        torch.testing.assert_close(a, t / denominator, rtol=1e-12, atol=1e-12)
    assert avg_ev == sum_ev
    assert avg_gs.denominator == denominator
    if noise_multiplier == 0:
        expected = (clipped_sum64(rows64(batch), clip) if b else np.zeros_like(flat64(template))) / denominator
        np.testing.assert_allclose(flat64(avg), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("d", [0, 0.0, -1, -1e-9, float("inf"), float("nan")])
def test_bad_denominator_value(d):
    with pytest.raises(ValueError):
        GaussianAverageQuery(1.0, 1.0, d)


@pytest.mark.parametrize("d", [torch.tensor(10.0), torch.tensor([10.0]), "10", None, True])
def test_bad_denominator_type(d):
    with pytest.raises(TypeError):
        GaussianAverageQuery(1.0, 1.0, d)


def test_wraps_only_queries():
    with pytest.raises(TypeError):
        NormalizedQuery("sum", 10)


def test_metrics_and_by_norm_are_forwarded():
    q = GaussianAverageQuery(2.0, 1.0, 4.0)
    gs = q.initial_global_state()
    assert q.derive_metrics(gs) == {"l2_norm_clip": 2.0, "stddev": 1.0}
    assert q.numerator_query.derive_metrics(gs.numerator_state) == q.derive_metrics(gs)
    batch = torch.tensor([[3.0, 4.0], [0.3, 0.4]], dtype=torch.float64)
    p = q.derive_sample_params(gs)
    s = q.accumulate_records_by_norm(p, q.initial_sample_state(batch[0]), torch.tensor([5.0, 0.5], dtype=torch.float64), weighted_sum_fn(batch))
    torch.testing.assert_close(s, torch.tensor([1.2 + 0.3, 1.6 + 0.4], dtype=torch.float64))


def test_adaptive_numerator_state_evolves():
    q = NormalizedQuery(QuantileAdaptiveClipSumQuery(1.0, 0.0, 0.5, 0.5, 0.0, 4), 4.0)
    gs = q.initial_global_state()
    batch = torch.full((4, 1), 10.0)  # every norm above the clip: the clip must grow
    p = q.derive_sample_params(gs)
    s = q.accumulate_records(p, q.initial_sample_state(batch[0]), batch)
    result, new_gs, event = q.get_noised_result(s, gs)
    torch.testing.assert_close(result, torch.tensor([1.0]))  # 4 records clipped to 1, / 4
    assert float(new_gs.numerator_state.sum_state.l2_norm_clip) > 1.0
    assert new_gs.denominator == 4.0
    assert event.events[0] == GaussianEvent(0.0)


# -- the in-place release (the optimizer's step on sums it owns) -----------------------------
def _state(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(7, 5, generator=g).to(dtype), "b": torch.randn(5, generator=g).to(dtype)}


@pytest.mark.parametrize("stddev", [0.0, 1.3])
def test_normalized_in_place_release_equals_get_noised_result(stddev):
    q1 = GaussianAverageQuery(1.0, stddev, 8.0, generator=torch.Generator().manual_seed(4))
    q2 = GaussianAverageQuery(1.0, stddev, 8.0, generator=torch.Generator().manual_seed(4))
    s = _state()
    ref, st1, ev1 = q1.get_noised_result({k: v.clone() for k, v in s.items()}, q1.initial_global_state())
    mine = {k: v.clone() for k, v in s.items()}
    out, st2, ev2 = q2.get_noised_result_in_place(mine, q2.initial_global_state())
    assert ev1 == ev2 and st1 == st2
    for k in s:
        assert torch.equal(out[k], ref[k]) and out[k] is mine[k]


def test_divide_in_place_matches_division_and_keeps_the_tensors():
    s = _state()
    ref = divide(s, 3.0)
    mine = {k: v.clone() for k, v in s.items()}
    out = divide(mine, 3.0, in_place=True)
    assert all(torch.equal(out[k], ref[k]) and out[k] is mine[k] for k in s)
    assert all(torch.equal(s[k] / 3.0, ref[k]) for k in s)
