"""Calibration: smallest noise for a budget, longest training within a budget."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytorch_privacy.analysis.calibration import compute_epochs, compute_noise
from pytorch_privacy.analysis.compute_dp_sgd_privacy import compute_dp_sgd_privacy


def eps_of(n, b, s, epochs, delta):
    return compute_dp_sgd_privacy(n, b, s, epochs, delta)[0]


@pytest.mark.parametrize(
    "n,b,target,epochs,delta",
    [(60000, 256, 2.0, 60, 1e-5), (60000, 256, 8.0, 15, 1e-5), (50000, 1024, 1.0, 100, 1e-6), (1000, 1000, 3.0, 5, 1e-4)],
)
def test_compute_noise_is_smallest(n, b, target, epochs, delta):
    s = compute_noise(n, b, target, epochs, delta)
    assert eps_of(n, b, s, epochs, delta) <= target
    assert eps_of(n, b, 0.99 * s, epochs, delta) > target


@given(target=st.floats(0.3, 20.0), epochs=st.integers(1, 50))
@settings(max_examples=5)
def test_compute_noise_property(target, epochs):
    s = compute_noise(10000, 100, target, epochs, 1e-5)
    assert eps_of(10000, 100, s, epochs, 1e-5) <= target
    assert eps_of(10000, 100, 0.99 * s, epochs, 1e-5) > target


def test_compute_noise_by_steps():
    s = compute_noise(60000, 256, 2.0, steps=math.ceil(60 * 60000 / 256), delta=1e-5)
    assert s == pytest.approx(compute_noise(60000, 256, 2.0, 60, 1e-5), rel=1e-12)


def test_compute_noise_errors():
    with pytest.raises(ValueError, match="target_epsilon"):
        compute_noise(1000, 10, 0.0, 1, 1e-5)
    with pytest.raises(ValueError, match="exactly one"):
        compute_noise(1000, 10, 1.0, None, 1e-5)
    with pytest.raises(ValueError, match="delta"):
        compute_noise(1000, 10, 1.0, 1, 0.0)
    with pytest.raises(ValueError, match="batch_size"):
        compute_noise(1000, 2000, 1.0, 1, 1e-5)
    with pytest.raises(ValueError, match="not reached"):
        compute_noise(1000, 10, 1e-6, 10**6, 1e-5, max_noise=10.0)


@pytest.mark.parametrize("target", [1.0, 3.0])
def test_compute_epochs_is_largest(target):
    e = compute_epochs(60000, 256, 1.1, target, 1e-5)
    assert isinstance(e, int) and e >= 1
    assert eps_of(60000, 256, 1.1, e, 1e-5) <= target
    assert eps_of(60000, 256, 1.1, e + 1, 1e-5) > target


def test_compute_epochs_in_steps():
    t = compute_epochs(60000, 256, 1.1, 3.0, 1e-5, unit="steps")
    e = compute_epochs(60000, 256, 1.1, 3.0, 1e-5)
    assert math.ceil(e * 60000 / 256) <= t < math.ceil((e + 1) * 60000 / 256)
    # steps: compare on the step count directly
    from pytorch_privacy.analysis.compute_dp_sgd_privacy_lib import epsilon_for as _epsilon_for

    assert _epsilon_for(256 / 60000, 1.1, t, 1e-5)[0] <= 3.0 < _epsilon_for(256 / 60000, 1.1, t + 1, 1e-5)[0]


def test_compute_epochs_errors():
    with pytest.raises(ValueError, match="exceeded by one epoch"):
        compute_epochs(1000, 1000, 0.5, 0.1, 1e-5)
    with pytest.raises(ValueError, match="exceeded by one step"):
        compute_epochs(1000, 1000, 0.5, 0.1, 1e-5, unit="steps")
    with pytest.raises(ValueError, match="noise_multiplier"):
        compute_epochs(1000, 10, 0.0, 1.0, 1e-5)
    with pytest.raises(ValueError, match="unit"):
        compute_epochs(1000, 10, 1.0, 1.0, 1e-5, unit="hours")
    with pytest.raises(ValueError, match="not exhausted"):
        compute_epochs(1000, 1, 1e4, 50.0, 1e-5, unit="steps", max_steps=1000)
