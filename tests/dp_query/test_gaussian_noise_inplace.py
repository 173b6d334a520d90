"""``add_gaussian_noise_`` and ``GaussianSumQuery.noise_in_place``: the in-place twins of
``add_gaussian_noise`` / ``get_noised_result`` that data-parallel steps use on their block of the
flat all-reduce buffer."""

from __future__ import annotations

import pytest
import torch

from pytorch_privacy.dp_query.gaussian_query import GaussianSumQuery, add_gaussian_noise, add_gaussian_noise_
from pytorch_privacy.dp_query.normalized_query import GaussianAverageQuery


@pytest.mark.parametrize("stddev", [0.7, torch.tensor(0.7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_same_draws_as_the_out_of_place_noise(stddev, dtype):
    x = torch.linspace(-3, 3, 1001, dtype=dtype)
    ref = add_gaussian_noise(x, stddev, torch.Generator().manual_seed(5))
    y = x.clone()
    out = add_gaussian_noise_(y, stddev, torch.Generator().manual_seed(5))
    assert out is y and y.dtype == dtype
    tol = {torch.bfloat16: 1e-2}.get(dtype, 1e-6)
    torch.testing.assert_close(y, ref, rtol=tol, atol=tol)
    assert (y != x).float().mean() > 0.9  # noise was added


def test_stddev_of_the_added_noise():
    n, s = 200_000, 2.5
    for stddev in (s, torch.tensor(s)):
        x = torch.full((n,), 4.0)
        add_gaussian_noise_(x, stddev, torch.Generator().manual_seed(11))
        z = x - 4.0
        assert abs(float(z.std()) / s - 1) < 0.01
        assert abs(float(z.mean())) < 5 * s / n**0.5


def test_zero_stddev_draws_nothing_and_bad_input_is_refused():
    g = torch.Generator().manual_seed(3)
    before = g.get_state().clone()
    x = torch.ones(10)
    add_gaussian_noise_(x, 0.0, g)
    assert torch.equal(x, torch.ones(10)) and torch.equal(g.get_state(), before)
    with pytest.raises(TypeError, match="floating-point tensor"):
        add_gaussian_noise_(torch.ones(3, dtype=torch.long), 1.0, g)


def test_noise_in_place_matches_get_noised_result():
    q1 = GaussianSumQuery(1.5, 3.0, generator=torch.Generator().manual_seed(9))
    q2 = GaussianSumQuery(1.5, 3.0, generator=torch.Generator().manual_seed(9))
    s = torch.arange(50.0)
    ref, ref_state, ref_event = q1.get_noised_result(s, q1.initial_global_state())
    flat = s.clone()
    state, event = q2.noise_in_place(flat, q2.initial_global_state())
    torch.testing.assert_close(flat, ref, rtol=1e-6, atol=1e-5)
    assert state == ref_state and event == ref_event


def test_block_release_needs_the_query_own_in_place_noise():
    """DDP's one-collective release relies on noise_in_place being get_noised_result's twin: a
    subclass that changes either takes the generic path."""
    from pytorch_privacy.optimizer.distributed.ddp import linear_release_divisor

    class Louder(GaussianSumQuery):
        def noise_in_place(self, flat, global_state):
            add_gaussian_noise_(flat, 2 * global_state.stddev, self.generator)
            return global_state, self.event(global_state)

    plain = GaussianSumQuery(1.0, 1.0)
    assert linear_release_divisor(plain, plain.initial_global_state()) == 1.0
    avg = GaussianAverageQuery(1.0, 1.0, 8.0)
    assert linear_release_divisor(avg, avg.initial_global_state()) == 8.0
    louder = Louder(1.0, 1.0)
    assert linear_release_divisor(louder, louder.initial_global_state()) is None
