"""GaussianSumQuery: clipping, accumulation, merging, noise statistics, validation."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pytorch_privacy.dp_query import GaussianEvent, GaussianSumQuery
from pytorch_privacy.dp_query.gaussian_query import add_gaussian_noise, clip_record

from ._records import STRUCTURES, clipped_sum64, flat64, leaves, random_record, row, rows64, weighted_sum_fn

structures = st.sampled_from(sorted(STRUCTURES))
seeds = st.integers(0, 2**32 - 1)
clips = st.floats(1e-3, 1e3)
log_scales = st.floats(-4, 4)


def run_looped(q, params, template, batch, n):
    state = q.initial_sample_state(template)
    for i in range(n):
        state = q.accumulate_record(params, state, row(batch, i))
    return state


# -- clipping ----------------------------------------------------------------------------


@given(structures, seeds, clips, log_scales, st.sampled_from([torch.float32, torch.float64]))
def test_clip_record_bound_and_untouched(structure, seed, clip, log_scale, dtype):
    rec = random_record(structure, seed, scale=clip * 10**log_scale, dtype=dtype)
    norm = np.linalg.norm(flat64(rec))
    q = GaussianSumQuery(clip, 0.0)
    out = q.preprocess_record(q.derive_sample_params(q.initial_global_state()), rec)
    out_norm = np.linalg.norm(flat64(out))
    assert out_norm <= clip * (1 + 1e-6)
    assert [l.dtype for l in leaves(out)] == [dtype] * len(leaves(out))
    if norm <= clip:
        assert all(torch.equal(a, b) for a, b in zip(leaves(out), leaves(rec)))
    else:
        # scaled onto the sphere of radius clip, direction kept
        np.testing.assert_allclose(out_norm, clip, rtol=1e-5)
        np.testing.assert_allclose(flat64(out), flat64(rec) * (clip / norm), rtol=1e-5, atol=clip * 1e-6)


@given(structures, seeds, clips, st.lists(log_scales, min_size=1, max_size=12), st.sampled_from([torch.float32, torch.float64]))
def test_batched_clip_bound_and_untouched(structure, seed, clip, row_log_scales, dtype):
    b = len(row_log_scales)
    scales = [clip * 10**s for s in row_log_scales]
    batch = random_record(structure, seed, dtype=dtype, batch=b, row_scales=scales)
    rows = rows64(batch)
    norms = np.linalg.norm(rows, axis=1)
    q = GaussianSumQuery(clip, 0.0)
    out = q.preprocess_records(clip, batch)
    out_rows = rows64(out)
    out_norms = np.linalg.norm(out_rows, axis=1)
    assert np.all(out_norms <= clip * (1 + 1e-6))
    for i in range(b):
        if norms[i] <= clip * (1 - 1e-5):
            assert np.array_equal(out_rows[i], rows[i])  # bit for bit
        elif norms[i] > clip * (1 + 1e-5):
            np.testing.assert_allclose(out_norms[i], clip, rtol=1e-5)


def test_zero_record_is_kept():
    q = GaussianSumQuery(1.0, 0.0)
    z = [torch.zeros(3), torch.zeros(2, 2)]
    out = q.preprocess_record(1.0, z)
    assert all(torch.equal(a, b) for a, b in zip(out, z))
    out_b = q.preprocess_records(1.0, [torch.zeros(4, 3), torch.zeros(4, 2, 2)])
    assert all(bool((l == 0).all()) and not bool(l.isnan().any()) for l in out_b)


def test_clip_record_known_values():
    out = clip_record(torch.tensor([3.0, 4.0]), 1.0)
    assert torch.allclose(out, torch.tensor([0.6, 0.8]))
    out = clip_record({"a": torch.tensor([3.0]), "b": torch.tensor([[4.0]])}, 10.0)
    assert out["a"].item() == 3.0 and out["b"].item() == 4.0


# -- accumulation ------------------------------------------------------------------------


@given(structures, seeds, clips, st.integers(0, 9), st.sampled_from([torch.float32, torch.float64]))
def test_batched_equals_looped_and_exact_sum(structure, seed, clip, b, dtype):
    scales = [clip * 10 ** ((i % 5) - 2) for i in range(b)]
    batch = random_record(structure, seed, dtype=dtype, batch=b, row_scales=scales)
    template = random_record(structure, seed + 1, dtype=dtype)
    q = GaussianSumQuery(clip, 0.0)
    gs = q.initial_global_state()
    params = q.derive_sample_params(gs)
    batched = q.accumulate_records(params, q.initial_sample_state(template), batch)
    looped = run_looped(q, params, template, batch, b)
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    atol = clip * rtol * max(b, 1)
    for x, y in zip(leaves(batched), leaves(looped)):
        assert x.dtype == dtype and y.dtype == dtype
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)
    # zero noise: the released result is the exact clipped sum, computed by hand in float64
    result, new_gs, event = q.get_noised_result(batched, gs)
    expected = clipped_sum64(rows64(batch), clip) if b else np.zeros(flat64(template).shape)
    np.testing.assert_allclose(flat64(result), expected, rtol=rtol * 10, atol=atol * 10)
    assert new_gs == gs
    assert event == GaussianEvent(0.0)


@given(structures, seeds, clips, st.integers(1, 6))
def test_by_norm_equals_records(structure, seed, clip, b):
    scales = [clip * 10 ** ((i % 3) - 1) for i in range(b)]
    batch = random_record(structure, seed, dtype=torch.float64, batch=b, row_scales=scales)
    template = random_record(structure, seed, dtype=torch.float64)
    q = GaussianSumQuery(clip, 0.0)
    norms = torch.tensor(np.linalg.norm(rows64(batch), axis=1))
    by_norm = q.accumulate_records_by_norm(clip, q.initial_sample_state(template), norms, weighted_sum_fn(batch))
    by_records = q.accumulate_records(clip, q.initial_sample_state(template), batch)
    for x, y in zip(leaves(by_norm), leaves(by_records)):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10 * clip)


@given(structures, seeds, st.integers(1, 4), st.integers(1, 4), st.integers(1, 4))
def test_merge_associative_and_commutative(structure, seed, na, nb, nc):
    q = GaussianSumQuery(1.0, 0.0)
    template = random_record(structure, seed)

    def part(k, n):
        return q.accumulate_records(1.0, q.initial_sample_state(template), random_record(structure, seed + k, scale=3.0, batch=n))

    a, b, c = part(1, na), part(2, nb), part(3, nc)
    left = q.merge_sample_states(q.merge_sample_states(a, b), c)
    right = q.merge_sample_states(a, q.merge_sample_states(b, c))
    for x, y in zip(leaves(left), leaves(right)):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)
    for x, y in zip(leaves(q.merge_sample_states(a, b)), leaves(q.merge_sample_states(b, a))):
        assert torch.equal(x, y)
    # merging two halves equals accumulating the whole batch
    whole = random_record(structure, seed + 9, scale=3.0, batch=na + nb)
    h1 = q.accumulate_records(1.0, q.initial_sample_state(template), _slice(whole, 0, na))
    h2 = q.accumulate_records(1.0, q.initial_sample_state(template), _slice(whole, na, na + nb))
    full = q.accumulate_records(1.0, q.initial_sample_state(template), whole)
    for x, y in zip(leaves(q.merge_sample_states(h1, h2)), leaves(full)):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def _slice(batch, lo, hi):
    if isinstance(batch, torch.Tensor):
        return batch[lo:hi]
    if isinstance(batch, dict):
        return {k: _slice(v, lo, hi) for k, v in batch.items()}
    return type(batch)(_slice(v, lo, hi) for v in batch)


def test_empty_batch_leaves_state_unchanged():
    q = GaussianSumQuery(1.0, 0.0)
    template = [torch.ones(3), torch.ones(2, 2)]
    state = q.accumulate_record(1.0, q.initial_sample_state(template), [torch.ones(3), torch.ones(2, 2)])
    after = q.accumulate_records(1.0, state, [torch.zeros(0, 3), torch.zeros(0, 2, 2)])
    assert all(torch.equal(a, b) for a, b in zip(after, state))


# -- noise -------------------------------------------------------------------------------


def test_noise_statistics_large_tensor():
    stddev = 2.5
    q = GaussianSumQuery(1.0, stddev, generator=torch.Generator().manual_seed(1234))
    template = [torch.zeros(1000, 500), torch.zeros(500_000, dtype=torch.float64)]
    state = q.initial_sample_state(template)
    result, _, event = q.get_noised_result(state, q.initial_global_state())
    a = result[0].double().reshape(-1).numpy()
    b = result[1].numpy()
    x = np.concatenate([a, b])
    n = x.size
    assert n == 10**6
    assert abs(x.std() / stddev - 1) < 0.01
    assert abs(x.mean()) < 5 * stddev / math.sqrt(n)
    # Gaussian shape: mass within one stddev, and no structure between the two leaves
    assert abs(np.mean(np.abs(x) < stddev) - 0.682689) < 0.005
    assert abs(np.corrcoef(a, b)[0, 1]) < 5 / math.sqrt(a.size)
    assert result[0].dtype == torch.float32 and result[1].dtype == torch.float64
    assert event.noise_multiplier == pytest.approx(stddev)


def test_noise_is_added_to_the_sum():
    q = GaussianSumQuery(10.0, 0.5, generator=torch.Generator().manual_seed(0))
    template = torch.zeros(200_000)
    state = q.accumulate_record(10.0, q.initial_sample_state(template), torch.full((200_000,), 0.01))
    result, _, _ = q.get_noised_result(state, q.initial_global_state())
    noise = result.double().numpy() - 0.01
    assert abs(noise.std() / 0.5 - 1) < 0.01
    assert abs(noise.mean()) < 5 * 0.5 / math.sqrt(noise.size)


def test_seeded_generator_reproducible():
    def run(seed):
        q = GaussianSumQuery(1.0, 1.0, generator=torch.Generator().manual_seed(seed))
        gs = q.initial_global_state()
        s = q.initial_sample_state({"a": torch.zeros(10), "b": torch.zeros(3, 3)})
        r1, gs, _ = q.get_noised_result(s, gs)
        r2, gs, _ = q.get_noised_result(s, gs)
        return r1, r2

    (a1, a2), (b1, b2), (c1, _) = run(5), run(5), run(6)
    for k in ("a", "b"):
        assert torch.equal(a1[k], b1[k]) and torch.equal(a2[k], b2[k])
        assert not torch.equal(a1[k], a2[k])  # the generator advances
        assert not torch.equal(a1[k], c1[k])


def test_add_gaussian_noise_zero_stddev_exact():
    t = {"x": torch.randn(5)}
    out = add_gaussian_noise(t, 0.0)
    assert torch.equal(out["x"], t["x"])
    out = add_gaussian_noise(t, torch.tensor(0.0))
    assert torch.equal(out["x"], t["x"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_and_device_preserved(dtype):
    q = GaussianSumQuery(1.0, 0.3)
    template = [torch.zeros(4, dtype=dtype), torch.zeros(2, 3, dtype=dtype)]
    gs = q.initial_global_state()
    state = q.accumulate_records(1.0, q.initial_sample_state(template), [torch.randn(5, 4, dtype=dtype), torch.randn(5, 2, 3, dtype=dtype)])
    result, _, _ = q.get_noised_result(state, gs)
    for r, t in zip(result, template):
        assert r.dtype == dtype and r.device == t.device and r.shape == t.shape


# -- validation --------------------------------------------------------------------------


@pytest.mark.parametrize("clip", [-1.0, float("nan"), float("inf"), -float("inf")])  # 0 is allowed (TF parity)
def test_bad_clip_value(clip):
    with pytest.raises(ValueError):
        GaussianSumQuery(clip, 1.0)


@pytest.mark.parametrize("clip", ["1.0", None, True])
def test_bad_clip_type(clip):
    with pytest.raises(TypeError):
        GaussianSumQuery(clip, 1.0)


def test_non_scalar_clip():
    with pytest.raises(ValueError):
        GaussianSumQuery(torch.tensor([1.0, 2.0]), 1.0)


@pytest.mark.parametrize("stddev", [-0.1, float("nan"), float("inf")])
def test_bad_stddev(stddev):
    with pytest.raises(ValueError):
        GaussianSumQuery(1.0, stddev)


def test_structure_and_shape_mismatch():
    q = GaussianSumQuery(1.0, 0.0)
    state = q.initial_sample_state([torch.zeros(3), torch.zeros(2)])
    with pytest.raises(ValueError):
        q.accumulate_record(1.0, state, [torch.zeros(3)])
    with pytest.raises(ValueError):
        q.accumulate_record(1.0, state, [torch.zeros(4), torch.zeros(2)])
    with pytest.raises(ValueError):
        q.accumulate_record(1.0, state, {"a": torch.zeros(3), "b": torch.zeros(2)})
    with pytest.raises(ValueError):
        q.accumulate_records(1.0, state, [torch.zeros(5, 3), torch.zeros(6, 2)])  # batch sizes differ
    with pytest.raises(ValueError):
        q.accumulate_records(1.0, state, [torch.zeros(5, 4), torch.zeros(5, 2)])
    with pytest.raises(ValueError):
        q.merge_sample_states(state, [torch.zeros(3)])
    with pytest.raises(TypeError):
        q.initial_sample_state([torch.zeros(3), 1.0])


def test_event_and_metrics():
    q = GaussianSumQuery(2.0, 3.0)
    gs = q.initial_global_state()
    _, _, event = q.get_noised_result(q.initial_sample_state(torch.zeros(2)), gs)
    assert isinstance(event, GaussianEvent) and event.noise_multiplier == pytest.approx(1.5)
    assert q.derive_metrics(gs) == {"l2_norm_clip": 2.0, "stddev": 3.0}


# -- the in-place release (the optimizer's step on sums it owns) -----------------------------
def _state(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(7, 5, generator=g).to(dtype), "b": torch.randn(5, generator=g).to(dtype)}


@pytest.mark.parametrize("stddev", [0.0, 0.9, torch.tensor(0.9)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_in_place_noise_is_the_out_of_place_noise_bit_for_bit(stddev, dtype):
    s = _state(dtype)
    ref = add_gaussian_noise(s, stddev, torch.Generator().manual_seed(3))
    mine = {k: v.clone() for k, v in s.items()}
    out = add_gaussian_noise(mine, stddev, torch.Generator().manual_seed(3), in_place=True)
    for k in s:
        assert torch.equal(out[k], ref[k]) and out[k].dtype == dtype
        if dtype != torch.bfloat16:  # drawn in float32: a bfloat16 leaf is cast into a new tensor
            assert out[k] is mine[k]
    if not (isinstance(stddev, float) and stddev == 0):
        assert not torch.equal(ref["w"], s["w"])  # noise was added
