"""Noise trees: TF Privacy's expected sequences (tree_aggregation_test.py), the variance of each
prefix's noise (statistical, seeded), state size, reset and state round trips, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pytorch_privacy.dp_query.randomness import RandomSource
from pytorch_privacy.dp_query.tree_aggregation import (
    EfficientTreeAggregator,
    GaussianNoiseGenerator,
    StatelessValueGenerator,
    TreeAggregator,
    TreeState,
    ValueGenerator,
    get_step_idx,
    tree_noise_variance,
)

SCALAR = torch.zeros((), dtype=torch.float64)


class ConstantValueGenerator(ValueGenerator):
    def __init__(self, value):
        self.value = value

    def initialize(self):
        return ()

    def next(self, state, like):
        return [torch.full(l.shape, float(self.value), dtype=torch.float64) for l in like], state


def _run(agg, steps, like=SCALAR):
    state = agg.init_state()
    out = []
    for t in range(steps):
        assert get_step_idx(state) == t
        val, state = agg.get_cumsum_and_update(state, like)
        out.append(val)
    return out, state


# -- TF Privacy's expected sequences -------------------------------------------------------
@pytest.mark.parametrize(
    "total, expected, node",
    [
        (4, [1, 1, 2, 1], 1),
        (5, [1, 1, 2, 1, 2], 1),
        (6, [1, 1, 2, 1, 2, 2], 1),
        (7, [1, 1, 2, 1, 2, 2, 3], 1),
        (8, [1, 1, 2, 1, 2, 2, 3, 1], 1),
        (8, [2, 2, 4, 2, 4, 4, 6, 2], 2),
        (8, [0.5, 0.5, 1, 0.5, 1, 1, 1.5, 0.5], 0.5),
    ],
)
def test_tree_sum_steps_expected(total, expected, node):
    out, _ = _run(TreeAggregator(ConstantValueGenerator(node)), total)
    assert [float(v) for v in out] == expected


LAST_STEP = [
    (16, 1, 1), (17, 2, 1), (18, 2, 1), (19, 3, 1), (20, 1, 0.5), (21, 6, 2),
    (1024, 1, 1), (1025, 2, 1), (1026, 2, 1), (1027, 3, 1), (1028, 1, 0.5), (1029, 6, 2),
]  # fmt: skip


@pytest.mark.parametrize("total, expected, node", LAST_STEP)
@pytest.mark.parametrize("as_fn", [False, True])
def test_tree_sum_last_step_expected(total, expected, node, as_fn):
    gen = (lambda: node) if as_fn else ConstantValueGenerator(node)
    out, state = _run(TreeAggregator(gen), total)
    assert float(out[-1]) == expected
    assert get_step_idx(state) == total


@pytest.mark.parametrize("total, node", [(8, 1), (8, 2), (8, 0.5), (32, 0.5), (1024, 0.5), (2020, 0.5)])
def test_tree_sum_steps_max(total, node):
    out, _ = _run(TreeAggregator(ConstantValueGenerator(node)), total)
    assert max(float(v) for v in out) <= node * math.ceil(math.log2(total))


@pytest.mark.parametrize(
    "total, expected, node",
    [
        (1, 1.0, 1.0),
        (2, 4 / 3, 1.0),
        (3, 4 / 3 + 1, 1.0),
        (4, 12 / 7, 1.0),
        (5, 12 / 7 + 1, 1.0),
        (6, 12 / 7 + 4 / 3, 1.0),
        (7, 12 / 7 + 4 / 3 + 1, 1.0),
        (8, 32 / 15, 1.0),
        (1024, 11 / (2 - 0.5**10), 1.0),
        (1025, 11 / (2 - 0.5**10) + 1, 1.0),
        (1026, 11 / (2 - 0.5**10) + 4 / 3, 1.0),
        (1027, 11 / (2 - 0.5**10) + 4 / 3 + 1, 1.0),
        (1028, (11 / (2 - 0.5**10) + 12 / 7) * 0.5, 0.5),
        (1029, (11 / (2 - 0.5**10) + 12 / 7 + 1) * 2, 2.0),
    ],
)
def test_efficient_tree_last_step_expected(total, expected, node):
    out, _ = _run(EfficientTreeAggregator(ConstantValueGenerator(node)), total)
    assert float(out[-1]) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("cls", [TreeAggregator, EfficientTreeAggregator])
def test_cumsum_structured_record(cls):
    like = [torch.zeros(2, 2), {"b": torch.zeros(1)}]
    agg = cls(StatelessValueGenerator(lambda: [torch.ones(2, 2), {"b": torch.tensor([2.0])}]))
    truth = cls(ConstantValueGenerator(1.0))
    s, ts = agg.init_state(), truth.init_state()
    for _ in range(15):
        val, s = agg.get_cumsum_and_update(s, like)
        ref, ts = truth.get_cumsum_and_update(ts, SCALAR)
        assert isinstance(val, list) and isinstance(val[1], dict)
        torch.testing.assert_close(val[0], torch.full((2, 2), float(ref)), rtol=1e-6, atol=0)
        torch.testing.assert_close(val[1]["b"], torch.full((1,), 2 * float(ref)), rtol=1e-6, atol=0)
        assert get_step_idx(s) == get_step_idx(ts)


# -- variance of each released prefix (statistical) ----------------------------------------
def _bits(n):
    return [d for d in range(n.bit_length()) if n >> d & 1]


@pytest.mark.parametrize("efficient", [False, True])
@pytest.mark.parametrize("stddev", [1.0, 2.5])
def test_prefix_noise_variance(efficient, stddev):
    """Each prefix ``[0, t]``'s noise: per-coordinate variance ``popcount(t+1) s^2`` (plain) or
    ``sum_{set bits d of t+1} s^2 / (2 - 2^-d)`` (efficient; TF's 4/7, 8/15, ... values), mean 0.
    d = 40000 coordinates: the sample variance's relative sd is sqrt(2/d) = 0.7%; the 4%
    tolerance is 5.6 sd (two-sided p ~ 2e-8 per check, 16 checks)."""
    d = 40_000
    gen = GaussianNoiseGenerator(stddev, generator=torch.Generator().manual_seed(1234))
    agg = EfficientTreeAggregator(gen) if efficient else TreeAggregator(gen)
    out, _ = _run(agg, 16, like=torch.zeros(d))
    for t, v in enumerate(out):
        n = t + 1
        if efficient:
            want = sum(stddev**2 / (2 - 0.5**b) for b in _bits(n))
        else:
            want = len(_bits(n)) * stddev**2
        x = v.double().numpy()
        assert abs(x.var() / want - 1) < 0.04, (t, x.var(), want)
        assert abs(x.mean()) < 5 * math.sqrt(want / d)
        assert tree_noise_variance(n, stddev, efficient) == pytest.approx(want, rel=1e-12)
    # TF's stated values (tree_aggregation_test.py): 4 leaves 4/7, 7 leaves 4/7+2/3+1, 8 leaves 8/15
    if efficient:
        assert tree_noise_variance(4, 1.0, True) == pytest.approx(4 / 7)
        assert tree_noise_variance(7, 1.0, True) == pytest.approx(4 / 7 + 2 / 3 + 1)
        assert tree_noise_variance(8, 2.0, True) == pytest.approx(8 / 15 * 4)


def test_consecutive_prefixes_share_nodes():
    """The plain tree's prefixes [0,0] and [0,1] use disjoint nodes (correlation 0); [0,1] and
    [0,2] share the level-1 node (correlation 1/sqrt(2)); seeded, d = 40000 (sd of r ~ 0.005)."""
    gen = GaussianNoiseGenerator(1.0, generator=torch.Generator().manual_seed(7))
    out, _ = _run(TreeAggregator(gen), 3, like=torch.zeros(40_000))
    x = [v.double().numpy() for v in out]
    assert abs(np.corrcoef(x[0], x[1])[0, 1]) < 0.03
    assert abs(np.corrcoef(x[1], x[2])[0, 1] - 1 / math.sqrt(2)) < 0.03


def test_efficient_has_lower_variance_than_plain():
    for total in (4, 30, 60):
        assert tree_noise_variance(total, 1.0, True) < tree_noise_variance(total, 1.0, False)


# -- state: size, reset, round trip ---------------------------------------------------------
@pytest.mark.parametrize("cls", [TreeAggregator, EfficientTreeAggregator])
def test_state_is_small(cls):
    _, state = _run(cls(ConstantValueGenerator(1.0)), 1000, like=torch.zeros(3))
    # 1000 = 0b1111101000: nodes at levels 3, 5, 6, 7, 8, 9
    assert state.level_buffer_idx.tolist() == [3, 5, 6, 7, 8, 9]
    assert state.level_buffer[0].shape == (6, 3)


@pytest.mark.parametrize("cls", [TreeAggregator, EfficientTreeAggregator])
def test_reset_starts_a_new_tree(cls):
    agg = cls(ConstantValueGenerator(1.0))
    _, state = _run(agg, 7)
    state = agg.reset_state(state)
    assert state.level_buffer is None and state.level_buffer_idx.numel() == 0 and get_step_idx(state) == 0
    out = []
    for _ in range(4):
        v, state = agg.get_cumsum_and_update(state, SCALAR)
        out.append(float(v))
    fresh, _ = _run(cls(ConstantValueGenerator(1.0)), 4)
    assert out == [float(v) for v in fresh]


@pytest.mark.parametrize("cls", [TreeAggregator, EfficientTreeAggregator])
def test_state_dict_round_trip_reproduces_sequence(cls, tmp_path):
    gen = GaussianNoiseGenerator(1.5, generator=torch.Generator().manual_seed(3))
    agg = cls(gen)
    like = {"w": torch.zeros(2, 3), "b": torch.zeros(3)}
    state = agg.init_state()
    for _ in range(5):
        _, state = agg.get_cumsum_and_update(state, like)
    path = tmp_path / "tree.pt"
    torch.save({"tree": state.state_dict(), "rng": gen.generator.state_dict()}, path)
    first = []
    for _ in range(6):
        v, state = agg.get_cumsum_and_update(state, like)
        first.append(v)
    saved = torch.load(path, weights_only=True)
    gen2 = GaussianNoiseGenerator(1.5, generator=torch.Generator().manual_seed(999))
    gen2.generator.load_state_dict(saved["rng"])
    agg2 = cls(gen2)
    state2 = TreeState.from_state_dict(saved["tree"])
    for want in first:
        v, state2 = agg2.get_cumsum_and_update(state2, like)
        for k in like:
            assert torch.equal(v[k], want[k])


# -- generator: owned randomness, dtypes, secure mode --------------------------------------
def test_gaussian_generator_never_touches_global_rng():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    agg = EfficientTreeAggregator(GaussianNoiseGenerator(1.0))
    _run(agg, 5, like=torch.zeros(10))
    assert torch.equal(before, torch.get_rng_state())


def test_noise_dtype_is_float32_or_wider():
    agg = TreeAggregator(GaussianNoiseGenerator(1.0, generator=torch.Generator().manual_seed(0)))
    v, _ = agg.get_cumsum_and_update(agg.init_state(), torch.zeros(4, dtype=torch.bfloat16))
    assert v.dtype == torch.float32
    v, _ = agg.get_cumsum_and_update(agg.init_state(), torch.zeros(4, dtype=torch.float64))
    assert v.dtype == torch.float64


def test_secure_mode_draws_from_os():
    gen = GaussianNoiseGenerator(2.0, secure_mode=True)
    assert gen.random_sources()[0].secure_mode
    out, _ = _run(TreeAggregator(gen), 3, like=torch.zeros(20_000))
    assert out[0].dtype == torch.float32  # built in float64 from OS bytes, then the leaf's noise dtype
    assert abs(out[2].var().item() / 8.0 - 1) < 0.06  # 2 nodes of variance 4; sd of ratio 1%
    with pytest.raises(ValueError, match="secure"):
        GaussianNoiseGenerator(1.0, generator=torch.Generator(), secure_mode=True)


def test_shared_random_source_is_used():
    src = RandomSource(torch.Generator().manual_seed(5))
    gen = GaussianNoiseGenerator(1.0, generator=src)
    assert gen.random_sources() == [src]
    a, _ = _run(TreeAggregator(gen), 1, like=torch.zeros(5))
    b = torch.randn(5, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a[0], b)


def test_zero_stddev_gives_exact_zeros():
    out, _ = _run(EfficientTreeAggregator(GaussianNoiseGenerator(0.0)), 5, like=torch.ones(3))
    assert all(torch.equal(v, torch.zeros(3)) for v in out)


# -- errors ---------------------------------------------------------------------------------
def test_errors():
    with pytest.raises(ValueError, match="noise_std"):
        GaussianNoiseGenerator(-1.0)
    with pytest.raises(ValueError, match="noise_std"):
        GaussianNoiseGenerator(float("nan"))
    with pytest.raises(TypeError, match="value_generator"):
        TreeAggregator(3.0)
    agg = TreeAggregator(ConstantValueGenerator(1.0))
    _, state = _run(agg, 3, like=[torch.zeros(2), torch.zeros(3)])
    with pytest.raises(ValueError, match="record"):
        agg.get_cumsum_and_update(state, [torch.zeros(2)])
    with pytest.raises(ValueError, match="shape"):
        agg.get_cumsum_and_update(state, [torch.zeros(2), torch.zeros(4)])
    with pytest.raises(TypeError):
        agg.get_cumsum_and_update(state, [torch.zeros(2), 3.0])
    bad = state.state_dict()
    bad["level_buffer_idx"] = torch.tensor([1, 0])
    with pytest.raises(ValueError, match="increasing"):
        TreeState.from_state_dict(bad)
    with pytest.raises(ValueError, match="not a TreeState"):
        TreeState.from_state_dict({"x": 1})
    with pytest.raises(ValueError, match="num_steps"):
        tree_noise_variance(0, 1.0)


# -- node structure (property tests against an independent reference) ---------------------
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


class CounterGenerator(ValueGenerator):
    """Draw k (k = 0, 1, ...) returns 2^k: a sum of draws identifies which draws it contains."""

    def initialize(self):
        return 0

    def next(self, state, like):
        return [torch.full(l.shape, 2.0**state, dtype=torch.float64) for l in like], state + 1


def _blocks(n):
    """Dyadic decomposition of [0, n): (level, index) of each block, left to right."""
    out, start = [], 0
    for d in reversed(range(n.bit_length())):
        if n >> d & 1:
            out.append((d, start >> d))
            start += 1 << d
    return out


@settings(max_examples=25, deadline=None, derandomize=True)
@given(st.integers(1, 45))
def test_plain_tree_prefix_is_its_dyadic_nodes(n):
    """Plain tree: one draw per step; the node of block [a, a + 2^d) is the draw of its last step
    a + 2^d - 1.  The prefix [0, n-1] is exactly the blocks of n's decomposition."""
    out, _ = _run(TreeAggregator(CounterGenerator()), n)
    want = sum(2.0 ** (((i + 1) << d) - 1) for d, i in _blocks(n))
    assert float(out[-1]) == want


@settings(max_examples=25, deadline=None, derandomize=True)
@given(st.integers(1, 40))
def test_efficient_tree_matches_bottom_up_reference(n):
    """Efficient tree against a reference built here: draws in TF's order (leaf t, then each node
    step t completes, bottom up), stored(d, i) = fresh(d, i) + (stored(d-1, 2i) + stored(d-1, 2i+1))/2,
    prefix = sum over the decomposition of stored / (2 - 2^-d)."""
    fresh, k = {}, 0
    for t in range(n):
        fresh[(0, t)] = 2.0**k
        k += 1
        d = 1
        while (t + 1) % (1 << d) == 0:
            fresh[(d, (t + 1 >> d) - 1)] = 2.0**k
            k += 1
            d += 1

    def stored(d, i):
        if d == 0:
            return fresh[(0, i)]
        return fresh[(d, i)] + (stored(d - 1, 2 * i) + stored(d - 1, 2 * i + 1)) / 2

    want = sum(stored(d, i) / (2 - 0.5**d) for d, i in _blocks(n))
    out, state = _run(EfficientTreeAggregator(CounterGenerator()), n)
    assert float(out[-1]) == pytest.approx(want, rel=1e-12)
    assert state.value_generator_state == k  # the same number of draws
