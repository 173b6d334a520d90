"""Tree cumulative / residual sum queries: TF Privacy's expected values
(tree_aggregation_query_test.py), events, noise level, state round trips, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pytorch_privacy.dp_query.events import NoOpEvent, UnsupportedEvent
from pytorch_privacy.dp_query.tree_aggregation import EfficientTreeAggregator, GaussianNoiseGenerator, TreeAggregator
from pytorch_privacy.dp_query.tree_aggregation_query import TreeCumulativeSumQuery, TreeResidualSumQuery
from pytorch_privacy.dp_query.tree_events import TreeAggregationStepEvent
from pytorch_privacy.optimizer.checkpoint import from_plain, to_plain

STRUCT_RECORD = [torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([-1.0, 0.0])]
SINGLE_VALUE_RECORDS = [torch.tensor(1.0), torch.tensor(3.0), torch.tensor(5.0)]
STREAMING_SCALARS = np.arange(7, dtype=np.float32)


def _zero():
    return 0.0


def _run_query(query, records, global_state=None):
    """One step: accumulate ``records`` one by one, release."""
    if global_state is None:
        global_state = query.initial_global_state()
    params = query.derive_sample_params(global_state)
    state = query.initial_sample_state(records[0])
    for r in records:
        state = query.accumulate_record(params, state, r)
    result, global_state, event = query.get_noised_result(state, global_state)
    return result, global_state, event


def _linf_clip(flat, c):
    return [torch.clamp(t, -c, c) for t in flat]


# -- clipping and noiseless sums -------------------------------------------------------------
@pytest.mark.parametrize("cls", [TreeCumulativeSumQuery, TreeResidualSumQuery])
@pytest.mark.parametrize("record, clip", [(STRUCT_RECORD, 10.0), (STRUCT_RECORD, 1.0), (torch.tensor(3.0), 1.0)])
def test_l2_clip(cls, record, clip):
    q = cls(clip, _zero)
    leaves = record if isinstance(record, list) else [record]
    norm = math.sqrt(sum(float((t.double() ** 2).sum()) for t in leaves))  # sqrt(6) for STRUCT_RECORD
    factor = min(1.0, clip / norm)
    got = q.preprocess_record(q.derive_sample_params(q.initial_global_state()), record)
    got = got if isinstance(got, list) else [got]
    for g, t in zip(got, leaves):
        torch.testing.assert_close(g, t * factor)


@pytest.mark.parametrize("record, clip", [(STRUCT_RECORD, 10.0), (STRUCT_RECORD, 1.0)])
def test_linf_clip_fn(record, clip):
    q = TreeCumulativeSumQuery(clip, _zero, clip_fn=_linf_clip)
    got = q.preprocess_record(clip, record)
    for g, t in zip(got, record):
        torch.testing.assert_close(g, torch.clamp(t, -clip, clip))
    assert isinstance(q.event(q.initial_global_state()), UnsupportedEvent)


def test_noiseless_single_values_and_structure():
    q = TreeCumulativeSumQuery(10.0, _zero)
    result, _, _ = _run_query(q, SINGLE_VALUE_RECORDS)
    assert float(result) == 9.0
    result, _, _ = _run_query(q, [STRUCT_RECORD, STRUCT_RECORD])
    for r, t in zip(result, STRUCT_RECORD):
        torch.testing.assert_close(r, 2 * t)


@pytest.mark.parametrize(
    "clip, partial",
    [
        (10.0, np.cumsum(STREAMING_SCALARS)),
        (0.5, STREAMING_SCALARS * 0.5),  # min(x, 0.5) = 0, .5, .5, ...: cumulative sums 0, .5, 1, ..., 3
        (5.0, np.append(np.cumsum(STREAMING_SCALARS[:-1]), 20.0)),
    ],
)
def test_partial_sum_scalar_no_noise(clip, partial):
    q = TreeCumulativeSumQuery(clip, _zero)
    gs = q.initial_global_state()
    for x, want in zip(STREAMING_SCALARS, partial):
        r, gs, _ = _run_query(q, [torch.tensor(x)], gs)
        assert float(r) == pytest.approx(float(want), abs=1e-6)


@pytest.mark.parametrize("scalar, node", [(0.0, 1.0), (1.0, 1.0), (1.0, 2.0)])
def test_partial_sum_scalar_tree_aggregation(scalar, node):
    q = TreeCumulativeSumQuery(scalar + 1.0, lambda: node, use_efficient=False)
    gs = q.initial_global_state()
    for i in range(8):
        r, gs, _ = _run_query(q, [torch.tensor(scalar)], gs)
        assert float(r) == scalar * (i + 1) + node * bin(i + 1).count("1")


RESET_CASES = [(0.0, 1.0, 1), (0.0, 1.0, 2), (0.0, 1.0, 5), (1.0, 1.0, 5), (1.0, 2.0, 2), (1.0, 5.0, 6)]


@pytest.mark.parametrize("scalar, node, freq", RESET_CASES)
def test_cumulative_reset(scalar, node, freq):
    q = TreeCumulativeSumQuery(scalar + 1.0, lambda: node, use_efficient=False)
    gs = q.initial_global_state()
    for i in range(20):
        r, gs, _ = _run_query(q, [torch.tensor(scalar)], gs)
        if i % freq == freq - 1:
            gs = q.reset_state(r, gs)
        want = scalar * (i + 1) + i // freq * node * bin(freq).count("1") + node * bin(i % freq + 1).count("1")
        assert float(r) == want


@pytest.mark.parametrize("scalar, node, freq", RESET_CASES)
def test_residual_reset(scalar, node, freq):
    q = TreeResidualSumQuery(scalar + 1.0, lambda: node, use_efficient=False)
    gs = q.initial_global_state()
    for i in range(20):
        r, gs, _ = _run_query(q, [torch.tensor(scalar)], gs)
        if i % freq == freq - 1:
            gs = q.reset_state(r, gs)
        want = scalar + node * (bin(i % freq + 1).count("1") - bin(i % freq).count("1"))
        assert float(r) == want


# -- Gaussian queries -------------------------------------------------------------------------
@pytest.mark.parametrize("use_efficient, agg_cls", [(True, EfficientTreeAggregator), (False, TreeAggregator)])
def test_aggregator_choice(use_efficient, agg_cls):
    for cls in (TreeCumulativeSumQuery, TreeResidualSumQuery):
        assert isinstance(cls(1.0, _zero, use_efficient=use_efficient).tree_aggregator, agg_cls)


@pytest.mark.parametrize(
    "n, dim, z, seed, steps, clip, eff",
    [(5, 10, 0.0, 1, 16, 0.1, True), (3, 5, 1.0, 1, 32, 1.0, True), (10, 3, 1.0, 2, 16, 10.0, True),
     (10, 3, 1.0, 2, 16, 10.0, False)],
)  # fmt: skip
def test_build_and_residuals_add_up_to_cumulative(n, dim, z, seed, steps, clip, eff):
    """TF: the builder equals the explicit constructor; the running sum of residual releases
    equals the cumulative query's release with the same noise (rtol 1e-6)."""
    built = TreeCumulativeSumQuery.build_l2_gaussian_query(
        clip, z, generator=torch.Generator().manual_seed(seed), use_efficient=eff
    )
    ref = TreeCumulativeSumQuery(
        clip, GaussianNoiseGenerator(clip * z, generator=torch.Generator().manual_seed(seed)), use_efficient=eff
    )
    res = TreeResidualSumQuery.build_l2_gaussian_query(
        clip, z, generator=torch.Generator().manual_seed(seed), use_efficient=eff
    )
    data = torch.Generator().manual_seed(100 + seed)
    gb, gr, gres = built.initial_global_state(), ref.initial_global_state(), res.initial_global_state()
    total = torch.zeros(dim, dtype=torch.float64)
    for _ in range(steps):
        records = [torch.rand(dim, generator=data) * n for _ in range(n)]
        rb, gb, _ = _run_query(built, records, gb)
        rr, gr, _ = _run_query(ref, records, gr)
        rres, gres, _ = _run_query(res, records, gres)
        total += rres.double()
        torch.testing.assert_close(rb, rr, rtol=1e-6, atol=0)
        torch.testing.assert_close(total, rb.double(), rtol=1e-5, atol=1e-5 * clip * n)


@pytest.mark.parametrize("cls", [TreeCumulativeSumQuery, TreeResidualSumQuery])
def test_first_release_noise_level(cls):
    """The first release of either query is x_0 + one leaf: stddev sigma (d = 40000, seeded;
    relative sd of the sample stddev 0.35%, tolerance 2%)."""
    q = cls.build_l2_gaussian_query(10.0, 0.5, generator=torch.Generator().manual_seed(11))
    recs = [torch.full((40_000,), 0.001), torch.full((40_000,), 0.002)]
    r, _, _ = _run_query(q, recs)
    x = (r.double() - 0.003).numpy()
    assert abs(x.std() / 5.0 - 1) < 0.02


def test_residual_noise_levels_follow_the_tree():
    """Residual k (plain tree) has noise n_k - n_{k-1}; with d = 40000 the variances at steps
    0..3 are 1, 2 (n_1 and n_0 share no node), 1 (n_2 = n_1 + leaf), 3 (n_3 = new level-2 node vs
    two nodes) times sigma^2: tolerance 4% (5.6 sd)."""
    q = TreeResidualSumQuery.build_l2_gaussian_query(1.0, 1.0, generator=torch.Generator().manual_seed(5), use_efficient=False)
    gs = q.initial_global_state()
    for want in (1, 2, 1, 3):
        r, gs, _ = _run_query(q, [torch.zeros(40_000)], gs)
        assert abs(r.double().var().item() / want - 1) < 0.04


# -- events -------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [TreeCumulativeSumQuery, TreeResidualSumQuery])
def test_events(cls):
    q = cls.build_l2_gaussian_query(2.0, 1.5, generator=torch.Generator().manual_seed(0))
    gs = q.initial_global_state()
    events = []
    for i in range(5):
        r, gs, ev = _run_query(q, [torch.ones(3)], gs)
        events.append(ev)
        if i == 2:
            gs = q.reset_state(r, gs)
    assert events == [
        TreeAggregationStepEvent(noise_multiplier=1.5, starts_tree=s) for s in (1, 0, 0, 1, 0)
    ]
    assert isinstance(cls(0.0, GaussianNoiseGenerator(1.0)).event(cls(0.0, GaussianNoiseGenerator(1.0)).initial_global_state()), NoOpEvent)
    assert isinstance(cls(1.0, _zero).event(cls(1.0, _zero).initial_global_state()), UnsupportedEvent)
    assert q.derive_metrics(gs) == {"tree_agg_dpftrl_clip": 2.0, "stddev": 3.0}


# -- batched path, state round trip -----------------------------------------------------------
@pytest.mark.parametrize("cls", [TreeCumulativeSumQuery, TreeResidualSumQuery])
def test_batched_equals_looped(cls):
    q = cls(1.0, _zero)
    batch = {"w": torch.randn(6, 2, 3, generator=torch.Generator().manual_seed(1)), "b": torch.ones(6, 3)}
    params = q.derive_sample_params(q.initial_global_state())
    template = {"w": torch.zeros(2, 3), "b": torch.zeros(3)}
    s1 = q.accumulate_records(params, q.initial_sample_state(template), batch)
    s2 = q.initial_sample_state(template)
    for i in range(6):
        s2 = q.accumulate_record(params, s2, {k: v[i] for k, v in batch.items()})
    for k in template:
        torch.testing.assert_close(s1[k], s2[k])


@pytest.mark.parametrize("cls", [TreeCumulativeSumQuery, TreeResidualSumQuery])
@pytest.mark.parametrize("eff", [True, False])
def test_state_round_trip_reproduces_sequence(cls, eff, tmp_path):
    """Global state (via the optimizer's checkpoint helpers and torch.save(weights_only)) and the
    generator state restore the exact release sequence."""
    q = cls.build_l2_gaussian_query(1.0, 2.0, generator=torch.Generator().manual_seed(4), use_efficient=eff)
    rec = [{"w": torch.ones(2, 2) * 0.1, "b": torch.ones(3) * 0.2}]
    gs = q.initial_global_state()
    for _ in range(5):
        _, gs, _ = _run_query(q, rec, gs)
    torch.save({"g": to_plain(gs), "rng": [s.state_dict() for s in q.random_sources()]}, tmp_path / "s.pt")
    first = [_run_query(q, rec, gs)]
    for _ in range(5):
        first.append(_run_query(q, rec, first[-1][1]))
    saved = torch.load(tmp_path / "s.pt", weights_only=True)
    q2 = cls.build_l2_gaussian_query(1.0, 2.0, generator=torch.Generator().manual_seed(77), use_efficient=eff)
    for s, st in zip(q2.random_sources(), saved["rng"]):
        s.load_state_dict(st)
    gs2 = from_plain(q2.initial_global_state(), saved["g"])
    for want, _, want_ev in first:
        r, gs2, ev = _run_query(q2, rec, gs2)
        assert ev == want_ev
        for k in ("w", "b"):
            assert torch.equal(r[k], want[k])


# -- errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [TreeCumulativeSumQuery, TreeResidualSumQuery])
def test_errors(cls):
    with pytest.raises(ValueError, match="clip"):
        cls(-1.0, _zero)
    with pytest.raises(ValueError, match="noise_multiplier"):
        cls.build_l2_gaussian_query(1.0, -0.5)
    with pytest.raises(ValueError, match="clip_norm"):
        cls.build_l2_gaussian_query(float("inf"), 1.0)
    with pytest.raises(TypeError, match="clip_fn"):
        cls(1.0, _zero, clip_fn=3)
    with pytest.raises(TypeError, match="value_generator"):
        cls(1.0, "noise")
    q = cls.build_l2_gaussian_query(1.0, 1.0, generator=torch.Generator().manual_seed(0))
    _, gs, _ = _run_query(q, [[torch.zeros(2), torch.zeros(3)]])
    with pytest.raises(ValueError, match="record"):
        _run_query(q, [[torch.zeros(2)]], gs)
    with pytest.raises(ValueError, match="shape"):
        _run_query(q, [[torch.zeros(2), torch.zeros(4)]], gs)
    with pytest.raises(ValueError, match="NaN"):
        q.preprocess_record(1.0, torch.tensor([float("nan")]))


@pytest.mark.parametrize("cls", [TreeCumulativeSumQuery, TreeResidualSumQuery])
def test_by_norm_equals_records(cls):
    """The ghost-clipping path (norms + weighted sum) equals clipping the records themselves."""
    q = cls(1.0, _zero)
    batch = torch.randn(5, 4, generator=torch.Generator().manual_seed(2)) * 2
    params = q.derive_sample_params(q.initial_global_state())
    a = q.accumulate_records(params, q.initial_sample_state(batch[0]), batch)
    norms = batch.double().norm(dim=1)
    b = q.accumulate_records_by_norm(params, q.initial_sample_state(batch[0]), norms, lambda c: (c[:, None].float() * batch).sum(0))
    torch.testing.assert_close(a, b)


def test_secure_mode_query():
    q = TreeResidualSumQuery.build_l2_gaussian_query(1.0, 1.0, secure_mode=True)
    assert q.random_sources()[0].secure_mode
    r, _, ev = _run_query(q, [torch.zeros(20_000)])
    assert abs(r.double().std().item() - 1.0) < 0.04 and ev.starts_tree == 1
    with pytest.raises(ValueError, match="secure"):
        TreeResidualSumQuery.build_l2_gaussian_query(1.0, 1.0, generator=torch.Generator(), secure_mode=True)


def test_docs_page_example_runs():
    """docs/tree_queries.md's code runs as written and records what the page says."""
    import pathlib
    import re

    page = pathlib.Path(__file__).resolve().parents[2] / "docs" / "tree_queries.md"
    (block,) = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)
    ns: dict = {}
    exec(compile(block, str(page), "exec"), ns)
    assert ns["event"] == TreeAggregationStepEvent(2.0, 0)
    assert ns["global_state"].inner_query_state.tree_state.num_steps == 3


@pytest.mark.parametrize("cls", [TreeCumulativeSumQuery, TreeResidualSumQuery])
def test_refused_step_draws_nothing(cls):
    """A record whose shape contradicts the state is refused before any noise is drawn; for the
    cumulative query the running sum keeps the shape across a restart (TF semantics)."""
    q = cls.build_l2_gaussian_query(1.0, 1.0, generator=torch.Generator().manual_seed(0))
    _, gs, _ = _run_query(q, [torch.zeros(3)])
    before = q.random_sources()[0].state_dict()["states"]
    with pytest.raises(ValueError, match="shape"):
        _run_query(q, [torch.zeros(4)], gs)
    after = q.random_sources()[0].state_dict()["states"]
    assert all(torch.equal(before[k], after[k]) for k in before)
    gs = q.reset_state(torch.zeros(3), gs)
    if cls is TreeCumulativeSumQuery:
        with pytest.raises(ValueError, match="running sum"):
            _run_query(q, [torch.zeros(4)], gs)
    else:
        r, _, ev = _run_query(q, [torch.zeros(4)], gs)  # a new tree may take a new shape
        assert r.shape == (4,) and ev.starts_tree == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cls", [TreeCumulativeSumQuery, TreeResidualSumQuery])
def test_cuda_records_and_cpu_restored_state(cls):
    """CUDA records give CUDA results; a state saved from CUDA and restored on the CPU (plain
    tensors) continues on CUDA (its tensors move to the records' device)."""
    q = cls.build_l2_gaussian_query(1.0, 1.0, generator=torch.Generator(device="cuda").manual_seed(0))
    rec = [torch.ones(5, device="cuda")]
    r, gs, _ = _run_query(q, rec)
    assert r.device.type == "cuda"
    import attrs

    field = "samples_cumulative_sum" if cls is TreeCumulativeSumQuery else "previous_tree_noise"
    tree = attrs.evolve(gs.tree_state, level_buffer=tuple(t.cpu() for t in gs.tree_state.level_buffer))
    cpu_state = attrs.evolve(gs, tree_state=tree, **{field: tuple(t.cpu() for t in getattr(gs, field))})
    r2, _, ev = _run_query(q, rec, cpu_state)
    assert r2.device.type == "cuda" and ev.starts_tree == 0
