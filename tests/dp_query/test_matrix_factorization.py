"""Matrix-factorisation strategies, workloads, sensitivity (checked against brute-force enumeration of
every participation pattern) and the banded Toeplitz optimiser."""

import itertools
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytorch_privacy.dp_query.matrix_factorization import (
    BandedToeplitzStrategy,
    BLTStrategy,
    DenseStrategy,
    banded_sensitivity,
    count_participation_patterns,
    identity_strategy,
    max_separated_sum,
    momentum_workload,
    prefix_sum_workload,
    sensitivity_squared,
    strategy_from_spec,
    toeplitz_matrix,
    strategy_sensitivity_squared,
)
from pytorch_privacy.dp_query.matrix_factorization_optimizer import (
    banded_toeplitz_loss,
    optimize_banded_toeplitz,
    sqrt_prefix_sum_coefficients,
)


def patterns(n, k, s):
    for m in range(1, k + 1):
        for idx in itertools.combinations(range(n), m):
            if all(b - a >= s for a, b in zip(idx, idx[1:])):
                yield idx


def brute_sens2(C, k, s):
    best = 0.0
    for idx in patterns(C.shape[1], k, s):
        best = max(best, float(np.sum(C[:, list(idx)].sum(axis=1) ** 2)))
    return best


# -- workloads and strategies --------------------------------------------------------------------
def test_workloads_are_what_sgd_and_momentum_compute():
    rng = np.random.default_rng(0)
    n, beta = 7, 0.8
    g = rng.normal(size=n)
    np.testing.assert_allclose(prefix_sum_workload(n) @ g, np.cumsum(g))
    m, theta, traj = 0.0, 0.0, []
    for t in range(n):  # heavy ball: m_t = beta m_{t-1} + g_t, theta_t = theta_{t-1} - m_t
        m = beta * m + g[t]
        theta -= m
        traj.append(-theta)
    np.testing.assert_allclose(momentum_workload(n, beta) @ g, traj)


def test_strategy_matrices():
    c = [2.0, -1.0, 0.5]
    m = BandedToeplitzStrategy(c).matrix(5)
    assert m[4, 2] == 0.5 and m[4, 1] == 0.0 and m[3, 3] == 2.0 and m[0, 1] == 0.0
    assert BandedToeplitzStrategy(c).bands == 3
    np.testing.assert_array_equal(identity_strategy().matrix(4), np.eye(4))
    blt = BLTStrategy([0.5, 0.25], [1.0, 2.0])
    # c_0 = 1, c_t = 1 * 0.5^(t-1) + 2 * 0.25^(t-1)
    np.testing.assert_allclose(blt.coefficients(4), [1.0, 3.0, 1.0, 0.375])
    np.testing.assert_allclose(blt.matrix(3), toeplitz_matrix([1.0, 3.0, 1.0], 3))
    np.testing.assert_allclose(BandedToeplitzStrategy(c).column_norms(4), np.linalg.norm(toeplitz_matrix(c, 4), axis=0))
    dense = DenseStrategy(np.array([[1.0, 0.0], [0.5, 2.0]]))
    assert dense.bands == 2 and dense.num_steps == 2


@pytest.mark.parametrize(
    "bad",
    [
        lambda: BandedToeplitzStrategy([0.0, 1.0]),
        lambda: BandedToeplitzStrategy([]),
        lambda: BandedToeplitzStrategy([1.0, float("nan")]),
        lambda: BLTStrategy([1.0], [0.5]),
        lambda: BLTStrategy([0.5], [0.5, 0.1]),
        lambda: DenseStrategy(np.ones((2, 2))),
        lambda: DenseStrategy(np.zeros((2, 2))),
        lambda: DenseStrategy(np.eye(3)[:2]),
        lambda: strategy_from_spec('{"type": "banded_toeplitz", "coefficients": [1], "x": 1}'),
        lambda: strategy_from_spec('{"type": "nope"}'),
        lambda: strategy_from_spec('{"type": "banded_toeplitz", "coefficients": ["1"]}'),
        lambda: strategy_from_spec('{"type": "dense", "rows": [[1, 0], [1, 1]]}'),
        lambda: strategy_from_spec("[1"),
        lambda: identity_strategy().check_steps(0),
        lambda: DenseStrategy(np.eye(2)).matrix(3),
    ],
)
def test_invalid_strategies_are_refused(bad):
    with pytest.raises((ValueError, TypeError)):
        bad()


@pytest.mark.parametrize(
    "strategy",
    [BandedToeplitzStrategy([1.0, 0.25]), BLTStrategy([0.9], [-0.3]), DenseStrategy(np.tril(np.ones((3, 3))))],
)
def test_spec_round_trip(strategy):
    back = strategy_from_spec(strategy.to_json())
    assert back == strategy and hash(back) == hash(strategy)
    assert strategy_from_spec(json.loads(strategy.to_json())) == strategy
    np.testing.assert_array_equal(back.matrix(3), strategy.matrix(3))


# -- sensitivity ----------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.integers(1, 12), st.integers(1, 4), st.integers(1, 5), st.integers(0, 2**31))
def test_max_separated_sum_and_pattern_count_match_enumeration(n, k, s, seed):
    x = np.random.default_rng(seed).normal(size=n)
    best = max([0.0] + [float(sum(x[list(p)])) for p in patterns(n, k, s)])
    assert max_separated_sum(x, s, k) == pytest.approx(best, abs=1e-12)
    assert count_participation_patterns(n, k, s) == sum(1 for _ in patterns(n, k, s))


@settings(max_examples=30, deadline=None, derandomize=True)
@given(st.integers(1, 12), st.integers(1, 4), st.integers(1, 6), st.integers(0, 2**31))
def test_banded_sensitivity_is_exact_against_brute_force(n, k, s, seed):
    rng = np.random.default_rng(seed)
    bands = int(rng.integers(1, s + 1))  # bands <= min_separation
    strategy = BandedToeplitzStrategy(rng.normal(size=bands) + np.eye(bands)[0] * 2)
    expected = brute_sens2(strategy.matrix(n), k, s)
    assert banded_sensitivity(strategy, n, k, s) ** 2 == pytest.approx(expected, rel=1e-12)
    # any banded lower-triangular C (not Toeplitz) through the matrix path
    C = np.tril(rng.normal(size=(n, n))) * (np.abs(np.subtract.outer(range(n), range(n))) < bands)
    assert sensitivity_squared(C, k, s, method="banded") == pytest.approx(brute_sens2(C, k, s), rel=1e-12, abs=1e-12)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(st.integers(1, 10), st.integers(1, 4), st.integers(1, 4), st.integers(0, 2**31))
def test_general_sensitivity_exact_and_bound(n, k, s, seed):
    rng = np.random.default_rng(seed)
    C = np.tril(rng.normal(size=(n, n)))
    expected = brute_sens2(C, k, s)
    assert sensitivity_squared(C, k, s, method="exact") == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert sensitivity_squared(C, k, s) == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert sensitivity_squared(C, k, s, method="bound") >= expected * (1 - 1e-12)


def test_sensitivity_facts():
    # DP-SGD (C = I) with k participations: sqrt(k)
    assert banded_sensitivity(identity_strategy(), 100, 4, 10) == pytest.approx(2.0)
    # single participation: the largest column norm
    C = np.tril(np.arange(1.0, 26.0).reshape(5, 5))
    assert sensitivity_squared(C, 1, 1) == pytest.approx(max(np.sum(C**2, axis=0)))
    # prefix-sum strategy, every step: ||C 1||^2 = sum_t (t+1)^2
    assert sensitivity_squared(prefix_sum_workload(6), 6, 1) == pytest.approx(sum((t + 1) ** 2 for t in range(6)))
    with pytest.raises(ValueError, match="orthogonal"):
        sensitivity_squared(prefix_sum_workload(6), 2, 2, method="banded")
    with pytest.raises(ValueError, match="bands <= min_separation"):
        banded_sensitivity(BandedToeplitzStrategy([1.0, 0.5, 0.2]), 10, 2, 2)
    with pytest.raises(ValueError, match="MAX_ENUMERATED"):
        sensitivity_squared(np.eye(40), 20, 1, method="exact")


def test_toeplitz_sensitivity_large_bound_is_not_below_exact():
    blt = BLTStrategy([0.95, 0.5], [0.3, -0.2])
    n = 1030  # above the dense-matrix path: the Toeplitz bound
    C = blt.matrix(n)
    X = C.T @ C
    d = np.diag(X)
    # exact for at most 2 participations at least 1000 apart, by vectorised enumeration
    i, j = np.nonzero(np.subtract.outer(np.arange(n), np.arange(n)) <= -1000)
    exact = max(float(d.max()), float(np.max(d[i] + d[j] + 2 * X[i, j])))
    bound, how = strategy_sensitivity_squared(blt, n, 2, 1000)
    assert how == "bound" and exact <= bound <= 4 * exact
    # a dense strategy above DENSE_ACCOUNTING_STEPS: the triangle bound
    dense = DenseStrategy(np.tril(np.random.default_rng(1).normal(size=(300, 300))) + 5 * np.eye(300))
    X = dense.matrix(300).T @ dense.matrix(300)
    d = np.diag(X)
    i, j = np.nonzero(np.subtract.outer(np.arange(300), np.arange(300)) <= -200)
    exact = max(float(d.max()), float(np.max(d[i] + d[j] + 2 * X[i, j])))
    bound, how = strategy_sensitivity_squared(dense, 300, 2, 200)
    assert how == "bound" and exact <= bound <= 4 * exact
    value, how = strategy_sensitivity_squared(blt, 40, 2, 5)
    assert how == "exact"
    assert value == pytest.approx(brute_sens2(blt.matrix(40), 2, 5), rel=1e-12)


@pytest.mark.parametrize(
    "strategy,k,s",
    [(BandedToeplitzStrategy([1.0, 0.5, 0.25]), 10**6, 1000), (BandedToeplitzStrategy([1.0, 0.5, 0.25]), 10**9, 1),
     (BLTStrategy([0.99, 0.5], [0.1, -0.2]), 10**4, 10**5)],
)
def test_sensitivity_of_a_billion_steps_is_bounded_in_time(strategy, k, s):
    import time

    t0 = time.perf_counter()
    value, how = strategy_sensitivity_squared(strategy, 10**9, k, s)
    assert time.perf_counter() - t0 < 2.0
    assert math.isfinite(value) and value > 0
    if strategy.bands is not None and strategy.bands <= s:
        assert how == "exact" and value == pytest.approx(min(k, 10**9 // s) * 1.3125)
    assert count_participation_patterns(10**9, 2, 5, limit=100) > 100


# -- optimiser ------------------------------------------------------------------------------------
@pytest.mark.parametrize("workload,momentum", [("prefix", 0.0), ("momentum", 0.9)])
@pytest.mark.parametrize("objective", ["total", "max"])
def test_loss_equals_dense_error_and_gradient_matches_finite_differences(workload, momentum, objective):
    n, c = 20, np.array([1.0, 0.4, -0.2, 0.1])
    loss, grad = banded_toeplitz_loss(c, n, workload=workload, momentum=momentum, objective=objective)
    A = prefix_sum_workload(n) if workload == "prefix" else momentum_workload(n, momentum)
    C = toeplitz_matrix(c, n)
    B = A @ np.linalg.inv(C)
    err = np.sum(B**2) if objective == "total" else np.max(np.sum(B**2, axis=1))
    assert loss == pytest.approx(np.max(np.sum(C**2, axis=0)) * err, rel=1e-10)
    h = 1e-6
    fd = [
        (banded_toeplitz_loss(c + h * e, n, workload=workload, momentum=momentum, objective=objective)[0]
         - banded_toeplitz_loss(c - h * e, n, workload=workload, momentum=momentum, objective=objective)[0]) / (2 * h)
        for e in np.eye(4)
    ]
    np.testing.assert_allclose(grad, fd, rtol=1e-5)


def test_square_root_factorisation_facts():
    n = 12
    C = toeplitz_matrix(sqrt_prefix_sum_coefficients(n), n)
    np.testing.assert_allclose(C @ C, prefix_sum_workload(n), atol=1e-12)
    # C^{-1} = (1 - x)^{1/2}: 1, -1/2, -1/8, -1/16, -5/128, ...
    np.testing.assert_allclose(np.linalg.inv(C)[:5, 0], [1, -1 / 2, -1 / 8, -1 / 16, -5 / 128], atol=1e-12)


def _tree_total_error(n):
    """Total squared error of the binary-tree mechanism for prefix sums (sensitivity^2 = levels,
    prefix t+1 sums popcount(t+1) node noises)."""
    levels = math.ceil(math.log2(n)) + 1
    return levels * sum(bin(t + 1).count("1") for t in range(n))


@pytest.mark.parametrize("n,bands", [(64, 8), (256, 16)])
def test_optimised_banded_beats_identity_and_tree(n, bands):
    strategy = optimize_banded_toeplitz(n, bands, cache=False, progress=False)
    assert strategy.bands == bands
    assert np.linalg.norm(strategy.coefficients_) == pytest.approx(1.0)
    loss = banded_toeplitz_loss(strategy.coefficients_, n)[0]
    identity = n * (n + 1) / 2  # ||A||_F^2 with C = I
    assert loss < identity / 4
    assert loss < _tree_total_error(n) / 2.5
    # more bands never hurt (the families are nested)
    more = optimize_banded_toeplitz(n, 4 * bands, cache=False, progress=False)
    assert banded_toeplitz_loss(more.coefficients_, n)[0] <= loss * (1 + 1e-9)
    # full-band optimum at least as good as the square-root factorisation (Fichtenberger et al. 2023)
    full = optimize_banded_toeplitz(64, 64, cache=False, progress=False)
    assert banded_toeplitz_loss(full.coefficients_, 64)[0] <= banded_toeplitz_loss(sqrt_prefix_sum_coefficients(64), 64)[0]


def test_optimiser_cache_and_progress(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PYTORCH_PRIVACY_CACHE_DIR", str(tmp_path))
    first = optimize_banded_toeplitz(32, 4, objective="max")
    assert "optimising a 4-banded" in capsys.readouterr().err
    (path,) = (tmp_path / "matrix_factorization").iterdir()
    data = json.loads(path.read_text())
    assert data["key"] == {"n": 32, "bands": 4, "workload": "prefix", "momentum": 0.0, "objective": "max"}
    second = optimize_banded_toeplitz(32, 4, objective="max")
    assert capsys.readouterr().err == "" and second == first
    path.write_text("{corrupt")
    assert optimize_banded_toeplitz(32, 4, objective="max") == first
    assert "optimising" in capsys.readouterr().err
    with pytest.raises(ValueError):
        optimize_banded_toeplitz(4, 5)
    with pytest.raises(ValueError):
        optimize_banded_toeplitz(8, 2, workload="lr_decay")
    with pytest.raises(ValueError):
        optimize_banded_toeplitz(8, 2, objective="mean")
