"""StepAccumulator's fast paths give what the general DPQuery path gives.

* a plain Gaussian sum (also under an average or ledger wrapper) takes the clipped sum as the
  fresh sample state instead of adding it to zeros: same values, same dtypes, and any override of
  the accumulation (a subclass, a wrapper) turns the shortcut off;
* a batch without non-finite records skips the masking, one with a NaN record still drops it.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pytorch_privacy.dp_query.delegating_query import DelegatingQuery
from pytorch_privacy.dp_query.gaussian_query import GaussianSumQuery
from pytorch_privacy.dp_query.normalized_query import GaussianAverageQuery, NormalizedQuery
from pytorch_privacy.dp_query.quantile_adaptive_clip_sum_query import QuantileAdaptiveClipSumQuery
from pytorch_privacy.optimizer.engines.base import MaterializedGradients, PerExampleGradients
from pytorch_privacy.optimizer.dp_optimizer import DPOptimizer
from pytorch_privacy.optimizer.step_accumulator import StepAccumulator, in_place_release, plain_gaussian_sum


def _records(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    grads = {"w": torch.randn(5, 3, 2, generator=g, dtype=dtype), "b": torch.randn(5, 3, generator=g, dtype=dtype)}
    return MaterializedGradients(grads, torch.zeros(5))


def _template(dtype=torch.float32):
    return {"w": torch.zeros(3, 2, dtype=dtype), "b": torch.zeros(3, dtype=dtype)}


class _Doubled(GaussianSumQuery):
    def accumulate_preprocessed_record(self, sample_state, preprocessed_record):
        return super().accumulate_preprocessed_record(sample_state, {k: 2 * v for k, v in preprocessed_record.items()})


class _ShiftedStart(GaussianSumQuery):
    def initial_sample_state(self, template):
        return {k: torch.ones_like(v) for k, v in template.items()}


class _Rescaling(DelegatingQuery):
    def accumulate_records_by_norm(self, params, sample_state, norms, weighted_sum):
        return self._inner.accumulate_records_by_norm(params, sample_state, norms, lambda c: weighted_sum(c / 2))


def test_plain_gaussian_sum_sees_through_forwarding_wrappers_only():
    inner = GaussianSumQuery(1.0, 0.0)
    assert plain_gaussian_sum(inner) is inner
    assert plain_gaussian_sum(GaussianAverageQuery(1.0, 0.0, 4.0)).__class__ is GaussianSumQuery
    assert plain_gaussian_sum(DelegatingQuery(DelegatingQuery(inner))) is inner
    assert plain_gaussian_sum(_Doubled(1.0, 0.0)) is None
    assert plain_gaussian_sum(_ShiftedStart(1.0, 0.0)) is None
    assert plain_gaussian_sum(_Rescaling(inner)) is None
    assert plain_gaussian_sum(QuantileAdaptiveClipSumQuery(1.0, 0.0, 0.5, 0.0, 1.0, 5.0)) is None


def _general_path(query, records, template):
    """What the DPQuery contract gives: initial state, then accumulate_records_by_norm."""
    state = query.initial_sample_state(template)
    params = query.derive_sample_params(query.initial_global_state())
    return query.accumulate_records_by_norm(params, state, records.norms(), records.weighted_sum)


@pytest.mark.parametrize("query", [GaussianSumQuery(0.7, 0.0), GaussianAverageQuery(0.7, 0.0, 4.0),
                                   _Doubled(0.7, 0.0), _ShiftedStart(0.7, 0.0), _Rescaling(GaussianSumQuery(0.7, 0.0))])
def test_flush_equals_the_general_path(query):
    acc = StepAccumulator(query)
    acc.begin(query.initial_global_state(), _template())
    acc.add_sensitive(_records())
    acc.flush()
    expected = _general_path(query, _records(), _template())
    assert acc.sample_state.keys() == expected.keys()
    for k in expected:
        assert acc.sample_state[k].dtype == expected[k].dtype
        torch.testing.assert_close(acc.sample_state[k], expected[k], rtol=0, atol=0)
    # the shifted start really shifts (so the comparison above could fail)
    if isinstance(query, _ShiftedStart):
        assert torch.all(acc.sample_state["b"] != _general_path(GaussianSumQuery(0.7, 0.0), _records(), _template())["b"])


def test_two_chunks_merge_to_the_sum_of_both():
    q = GaussianSumQuery(0.7, 0.0)
    acc = StepAccumulator(q)
    acc.begin(q.initial_global_state(), _template())
    for seed in (0, 1):
        acc.add_sensitive(_records(seed=seed))
        acc.flush()
    a, b = (_general_path(q, _records(seed=s), _template()) for s in (0, 1))
    for k in a:
        torch.testing.assert_close(acc.sample_state[k], a[k] + b[k], rtol=0, atol=0)


def test_dtype_that_would_promote_takes_the_addition():
    """float32 sums into a float64 template: 0 (float64) + S (float32) is float64, as before."""
    q = GaussianSumQuery(0.7, 0.0)
    acc = StepAccumulator(q)
    acc.begin(q.initial_global_state(), _template(torch.float64))
    acc.add_sensitive(_records(torch.float32))
    acc.flush()
    assert all(t.dtype == torch.float64 for t in acc.sample_state.values())
    expected = _general_path(q, _records(torch.float32), _template(torch.float64))
    for k in expected:
        torch.testing.assert_close(acc.sample_state[k], expected[k], rtol=0, atol=0)


class _SharedDict(PerExampleGradients):
    """Returns the same dict object from every weighted_sum call."""

    def __init__(self):
        self.names = ("w", "b")
        self.out = {"w": torch.ones(3, 2), "b": torch.ones(3)}

    losses = torch.zeros(2)
    num_records = 2

    def norms(self):
        return torch.tensor([0.1, 0.1])

    def weighted_sum(self, coefficients):
        return self.out


def test_fresh_state_is_a_dict_of_its_own():
    q = GaussianSumQuery(1.0, 0.0)
    acc = StepAccumulator(q)
    acc.begin(q.initial_global_state(), _template())
    pe = _SharedDict()
    acc.add_sensitive(pe)
    acc.flush()
    assert acc.sample_state is not pe.out
    pe.out["w"] = torch.zeros(3, 2)  # the engine rebinding its dict does not reach the state
    assert torch.all(acc.sample_state["w"] == 1)


def test_nan_record_is_still_dropped():
    q = GaussianSumQuery(1e6, 0.0)  # no clipping: the sum is the plain sum of the good records
    acc = StepAccumulator(q)
    acc.begin(q.initial_global_state(), _template())
    rec = _records()
    rec.materialize()["w"][2, 0, 0] = float("nan")
    acc.add_sensitive(rec)
    acc.flush()
    keep = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0])
    for k, g in _records().materialize().items():
        torch.testing.assert_close(acc.sample_state[k], torch.tensordot(keep, g, dims=([0], [0])))
    assert int(acc.dropped) == 1


# -- the in-place release (the optimizer's step on sums it owns) -----------------------------
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


# -- deferred sums (FSDP2's bucketed release reads them one parameter at a time) -------------
def _flushed(defer, chunks, template_dtype=torch.float32, nan=False, query=None):
    q = query or GaussianSumQuery(0.7, 0.0)
    acc = StepAccumulator(q)
    acc.begin(q.initial_global_state(), _template(template_dtype), defer_sums=defer)
    for seed in range(chunks):
        rec = _records(seed=seed)
        if nan and seed == chunks - 1:
            rec.materialize()["b"][1, 0] = float("nan")
        acc.add_sensitive(rec)
        acc.flush()
    return acc


@pytest.mark.parametrize("chunks", [1, 2, 3])
@pytest.mark.parametrize("nan", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_deferred_sums_read_one_at_a_time_equal_the_formed_state(chunks, nan, dtype):
    from pytorch_privacy.optimizer.step_accumulator import DeferredSums

    plain = _flushed(False, chunks, dtype, nan).sample_state
    deferred = _flushed(True, chunks, dtype, nan)
    state = deferred.sample_state
    assert isinstance(state, DeferredSums) and set(state) == set(plain) and len(state) == 2
    for name in ("b", "w"):  # in any order, each formed when read
        s = state.take(name)
        assert s.dtype == plain[name].dtype
        torch.testing.assert_close(s, plain[name], rtol=1e-6, atol=1e-6)
    if chunks > 1:  # the earlier chunks' sums were given up as they were read
        assert state._base == {}
    settled = _flushed(True, chunks, dtype, nan).settle()
    assert isinstance(settled, dict)
    for name in plain:
        torch.testing.assert_close(settled[name], plain[name], rtol=1e-6, atol=1e-6)


def test_deferred_sums_only_for_the_builtin_gaussian_release():
    assert isinstance(_flushed(True, 1, query=_KeepsItsResult()).sample_state, dict)  # its own release
    state = _flushed(True, 1, query=GaussianAverageQuery(0.7, 0.0, 4.0)).sample_state
    assert type(state).__name__ == "DeferredSums"
    assert isinstance(_flushed(True, 1, query=_Doubled(0.7, 0.0)).sample_state, dict)  # its own accumulation


def test_finish_forms_deferred_sums():
    q = GaussianSumQuery(0.7, 0.0)
    plain = _flushed(False, 2, query=q).finish(q.initial_global_state())[0]
    got = _flushed(True, 2, query=q).finish(q.initial_global_state())[0]
    for name in plain:
        torch.testing.assert_close(got[name], plain[name], rtol=1e-6, atol=1e-6)
