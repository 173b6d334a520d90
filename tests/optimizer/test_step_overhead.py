"""The per-step cuts of the ghost DP step keep what is computed: the in-place release (noise and
division where the sums lie) gives get_noised_result's values bit for bit, is taken only for the
built-in Gaussian queries on sums the step owns, never mutates a tensor a query keeps, and the
one-group book-keeping contraction equals the per-record formula."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pytorch_privacy.dp_query.gaussian_query import GaussianSumQuery, add_gaussian_noise
from pytorch_privacy.dp_query.normalized_query import GaussianAverageQuery, NormalizedQuery, divide
from pytorch_privacy.optimizer.dp_optimizer import DPOptimizer
from pytorch_privacy.optimizer.engines.base import MaterializedGradients
from pytorch_privacy.optimizer.engines.ghost_rules import OuterContribution
from pytorch_privacy.optimizer.step_accumulator import StepAccumulator, in_place_release


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


class _KeepsItsResult(GaussianSumQuery):
    """A query whose release is a tensor it keeps (as a tree-aggregation query keeps its sums)."""

    def __init__(self):
        super().__init__(1.0, 0.0)
        self.kept: dict[str, torch.Tensor] | None = None

    def get_noised_result(self, sample_state, global_state):
        self.kept = {k: torch.full_like(v, float("nan")) for k, v in sample_state.items()}
        return self.kept, global_state, self.event(global_state)


def test_in_place_release_only_for_the_builtin_queries():
    assert in_place_release(GaussianSumQuery(1.0, 1.0))
    assert in_place_release(GaussianAverageQuery(1.0, 1.0, 4.0))
    assert not in_place_release(_KeepsItsResult())
    assert not in_place_release(NormalizedQuery(_KeepsItsResult(), 4.0))

    class Div(NormalizedQuery):
        def get_noised_result(self, sample_state, global_state):
            return super().get_noised_result(sample_state, global_state)

    assert not in_place_release(Div(GaussianSumQuery(1.0, 1.0), 4.0))


def _accumulate(query, in_place):
    acc = StepAccumulator(query)
    tmpl = {"w": torch.zeros(3, 2), "b": torch.zeros(2)}
    acc.begin(query.initial_global_state(), tmpl)
    g = torch.Generator().manual_seed(1)
    grads = {"w": torch.randn(6, 3, 2, generator=g), "b": torch.randn(6, 2, generator=g)}
    acc.add_sensitive(MaterializedGradients(grads, torch.zeros(6)))
    return acc, acc.finish(query.initial_global_state(), in_place=in_place)


def test_accumulator_in_place_finish_equals_the_plain_finish():
    q = lambda: GaussianAverageQuery(0.5, 0.7, 6.0, generator=torch.Generator().manual_seed(9))  # noqa: E731
    acc1, (r1, _, e1) = _accumulate(q(), False)
    acc2, (r2, _, e2) = _accumulate(q(), True)
    assert not acc1.result_owned and acc2.result_owned and e1 == e2
    assert all(torch.equal(r1[k], r2[k]) for k in r1)
    acc3, (r3, _, _) = _accumulate(_KeepsItsResult(), True)
    assert not acc3.result_owned and r3 is acc3.query.kept


def test_step_never_mutates_a_tensor_the_query_keeps():
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    q = _KeepsItsResult()
    loss = lambda out, y: ((out - y) ** 2).sum(1)  # noqa: E731
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, loss, q)
    opt.fit_batch(torch.randn(5, 4), torch.randn(5, 2))  # a NaN release: zeroed as a last resort
    assert all(bool(t.isnan().all()) for t in q.kept.values())  # the query's own tensors are untouched
    assert all(p.grad is not None and bool((p.grad == 0).all()) for p in model.parameters())


@pytest.mark.parametrize("positions", [1, 3])
def test_one_group_contraction_equals_the_per_record_sum(positions):
    g0 = torch.Generator().manual_seed(2)
    R, N, p, d = 5, positions, 4, 3
    g, a = torch.randn(R, 1, N, p, generator=g0), torch.randn(R, 1, N, d, generator=g0)
    c = torch.rand(R, generator=g0)
    contrib = OuterContribution(g, a, torch.Size([p, d]))
    ref = sum(c[r] * g[r, 0].t().double() @ a[r, 0].double() for r in range(R))
    for mask in (False, True):
        torch.testing.assert_close(contrib.weighted_sum(c, mask).double(), ref, rtol=1e-5, atol=1e-6)


def test_linear_bias_norms_reuse_the_weights_row_norms_only_for_the_same_data():
    from pytorch_privacy.optimizer.engines.ghost_rules import DirectContribution, NormPolicy

    g0 = torch.Generator().manual_seed(6)
    R, p, d = 9, 5, 4
    g, a = torch.randn(R, 1, 1, p, generator=g0), torch.randn(R, 1, 1, d, generator=g0)
    w = OuterContribution(g, a, torch.Size([p, d]))
    linked = DirectContribution(g.reshape(R, p), torch.Size([p]), rows_of=w)
    other = DirectContribution(g.reshape(R, p).clone() * 2, torch.Size([p]), rows_of=w)  # not g: not linked
    ref = (g.reshape(R, p).double() ** 2).sum(1)
    torch.testing.assert_close(linked.sq_norms(NormPolicy())[0].double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(other.sq_norms(NormPolicy())[0].double(), 4 * ref, rtol=1e-5, atol=1e-6)
    assert linked.sq_norms(NormPolicy())[0].shape == (R,)
    wsq = w.sq_norms(NormPolicy())[0].double()
    torch.testing.assert_close(wsq, ref * (a.reshape(R, d).double() ** 2).sum(1), rtol=1e-5, atol=1e-6)
