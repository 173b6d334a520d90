"""TreeRangeSumQuery: TF Privacy's expected trees (tree_range_query_test.py), range sums,
noise level, event, errors."""

from __future__ import annotations

import itertools

import pytest
import torch

from pytorch_privacy.dp_query.events import GaussianEvent
from pytorch_privacy.dp_query.gaussian_query import GaussianSumQuery
from pytorch_privacy.dp_query.tree_range_query import (
    TreeRangeSumQuery,
    build_tree_from_leaf,
    range_sum,
    tree_depth,
    tree_size,
)


@pytest.mark.parametrize("n, arity, dtype", list(itertools.product([1, 2, 3, 4, 5], [2, 3], [torch.int32, torch.float32])))
def test_build_tree_from_leaf(n, arity, dtype):
    leaves = torch.arange(n).to(dtype)
    depth = {(1, 2): 1, (2, 2): 2, (3, 2): 3, (4, 2): 3, (5, 2): 4, (1, 3): 1, (2, 3): 2, (3, 3): 2, (4, 3): 3, (5, 3): 3}
    tree = build_tree_from_leaf(leaves, arity)
    assert len(tree) == depth[(n, arity)] == tree_depth(n, arity)
    for layer in range(len(tree)):
        span = arity ** (len(tree) - layer - 1)
        assert tree[layer].shape == (arity**layer,)
        for i in range(arity**layer):
            assert tree[layer][i].item() == sum(range(n)[i * span : (i + 1) * span])


def test_tree_example_and_sizes():
    assert [t.tolist() for t in build_tree_from_leaf(torch.tensor([1, 2, 3, 4]))] == [[10], [3, 7], [1, 2, 3, 4]]
    assert tree_size(4, 2) == 7 and tree_size(4, 3) == 13 and tree_size(1, 2) == 1


@pytest.mark.parametrize("arity, expected", [(2, [1, 1, 0, 1, 0, 0, 0]), (3, [1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0])])
def test_preprocess_record(arity, expected):
    q = TreeRangeSumQuery.build_central_gaussian_query(10.0, 0.0, arity)
    params = q.derive_sample_params(q.initial_global_state())
    assert params[0] == arity and params[1] == 10.0
    got = q.preprocess_record(params, torch.tensor([1.0, 0.0, 0.0, 0.0]))
    assert got.tolist() == expected


@pytest.mark.parametrize("arity, expected", [(2, [[1], [1, 0], [1, 0, 0, 0]]), (3, [[1], [1, 0, 0], [1] + [0] * 8])])
def test_get_noised_result(arity, expected):
    q = TreeRangeSumQuery.build_central_gaussian_query(10.0, 0.0, arity)
    gs = q.initial_global_state()
    params = q.derive_sample_params(gs)
    pre = q.preprocess_record(params, torch.tensor([1.0, 0.0, 0.0, 0.0]))
    tree, _, event = q.get_noised_result(pre, gs)
    assert [t.tolist() for t in tree] == expected
    assert event == GaussianEvent(0.0)


def test_initial_sample_state_gives_zero_tree():
    q = TreeRangeSumQuery.build_central_gaussian_query(10.0, 0.0, 2)
    gs = q.initial_global_state()
    tree, _, _ = q.get_noised_result(q.initial_sample_state(torch.tensor([1.0, 2, 3, 4])), gs)
    assert [t.tolist() for t in tree] == [[0], [0, 0], [0, 0, 0, 0]]


def test_sum_of_histograms_clip_batched_and_ranges():
    """Three histograms (L2 clip on the flat tree: the one of norm > C is scaled down); batched
    equals looped; every range sum of the noiseless tree equals the sum of the clipped leaves."""
    hist = torch.tensor([[1.0, 0, 0, 0, 0], [0, 2, 0, 1, 0], [0, 0, 0, 0, 3]])
    clip = 4.0
    q = TreeRangeSumQuery.build_central_gaussian_query(clip, 0.0)
    gs = q.initial_global_state()
    params = q.derive_sample_params(gs)
    s_loop = q.initial_sample_state(hist[0])
    for h in hist:
        s_loop = q.accumulate_record(params, s_loop, h)
    s_batch = q.accumulate_records(params, q.initial_sample_state(hist[0]), hist)
    torch.testing.assert_close(s_loop, s_batch)
    tree, _, _ = q.get_noised_result(s_batch, gs)
    # flat-tree norms by hand (depth 4, 8 leaves): [1,0..]: sqrt(4) = 2; [0,2,0,1,0]: levels
    # (3), (3, 0), (2, 1, 0, 0), (0,2,0,1,...) -> sqrt(9+9+5+5) = sqrt(28); [0,0,0,0,3]: sqrt(36) = 6
    scales = [1.0, clip / 28**0.5, clip / 6.0]
    leaves = sum(s * torch.cat([h, torch.zeros(3)]) for s, h in zip(scales, hist))
    for a in range(9):
        for b in range(a, 9):
            torch.testing.assert_close(range_sum(tree, a, b), leaves[a:b].sum(), rtol=1e-5, atol=1e-6)


def test_noise_level_and_event():
    """Every node gets N(0, stddev^2): over 2^13 - 1 nodes of a zero tree the sample sd is within
    5% of 2.0 (relative sd of the estimate 0.8%); the event is GaussianEvent(stddev / C)."""
    q = TreeRangeSumQuery.build_central_gaussian_query(4.0, 2.0, generator=torch.Generator().manual_seed(3))
    gs = q.initial_global_state()
    tree, _, event = q.get_noised_result(q.initial_sample_state(torch.zeros(4096)), gs)
    flat = torch.cat(tree).double()
    assert flat.numel() == 8191
    assert abs(flat.std().item() / 2.0 - 1) < 0.05
    assert event == GaussianEvent(0.5)


def test_errors():
    for clip, stddev, arity in [(0.0, 1.0, 2), (1.0, -1.0, 2), (1.0, 1.0, 1)]:
        with pytest.raises(ValueError):
            TreeRangeSumQuery.build_central_gaussian_query(clip, stddev, arity)
    with pytest.raises(TypeError, match="SumAggregationDPQuery"):
        TreeRangeSumQuery(object())
    q = TreeRangeSumQuery(GaussianSumQuery(1.0, 0.0))
    with pytest.raises(ValueError, match="1-D histogram"):
        q.preprocess_record(q.derive_sample_params(q.initial_global_state()), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="shape"):
        params = q.derive_sample_params(q.initial_global_state())
        q.accumulate_record(params, q.initial_sample_state(torch.zeros(4)), torch.zeros(8))
    with pytest.raises(ValueError, match="start"):
        range_sum(build_tree_from_leaf(torch.zeros(4)), 2, 5)
    with pytest.raises(ValueError, match="at least one dimension"):
        build_tree_from_leaf(torch.tensor(1.0))
