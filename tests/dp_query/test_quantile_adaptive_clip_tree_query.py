"""QAdaClipTreeResSumQuery: TF Privacy's expected sums and clips
(quantile_adaptive_clip_tree_query_test.py), the noise level, events, restarts, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pytorch_privacy.dp_query.quantile_adaptive_clip_tree_query import QAdaClipTreeResSumQuery
from pytorch_privacy.dp_query.restart_query import PeriodicRoundRestartIndicator, RestartQuery
from pytorch_privacy.dp_query.tree_events import TreeAggregationStepEvent
from pytorch_privacy.optimizer.checkpoint import from_plain, to_plain

from ._records import run_query as _run


def _q(clip, z=0.0, target=1.0, lr=0.0, sigma_b=0.0, m=2.0, geometric=True, seed=None):
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    return QAdaClipTreeResSumQuery(clip, z, target, lr, sigma_b, m, geometric, generator=gen)


def test_sum_no_clip_no_noise():
    r, _, _ = _run(_q(10.0), [torch.tensor([2.0, 0.0]), torch.tensor([-1.0, 1.0])])
    torch.testing.assert_close(r, torch.tensor([1.0, 1.0]))


@pytest.mark.parametrize("batched", [False, True])
def test_sum_with_clip_no_noise(batched):
    r, _, _ = _run(_q(5.0), [torch.tensor([-6.0, 8.0]), torch.tensor([4.0, -3.0])], batched=batched)
    torch.testing.assert_close(r, torch.tensor([1.0, 1.0]))


def test_sum_with_noise():
    """First release: sum + one leaf of stddev z C = 1 (d = 40000; tolerance 2%, 5.7 sd)."""
    r, _, _ = _run(_q(5.0, z=1.0 / 5.0, seed=1), [torch.full((40_000,), 2.71828), torch.full((40_000,), 3.14159)])
    assert abs((r.double() - (2.71828 + 3.14159)).std().item() - 1.0) < 0.02


ADAPT = {
    "target_zero": dict(recs=[8.5, -7.25], clip=10.0, target=0.0, lr=1.0, geometric=False,
                        sums=[1.25, 1.25, 0.75, 0.25, 0.0], clips=[9.0, 8.0, 7.5, 7.0, 7.0]),
    "target_zero_geometric": dict(recs=[5.0, -2.5], clip=16.0, target=0.0, lr=math.log(2.0), geometric=True,
                                  sums=[2.5, 2.5, 1.5, 4 / math.sqrt(2) - 2.5, 0.0],
                                  clips=[8.0, 4.0, 4 / math.sqrt(2), 2.0, 2.0]),
    "target_one": dict(recs=[-1.5, 2.75], clip=0.0, target=1.0, lr=1.0, geometric=False,
                       sums=[0.0, 0.0, 0.5, 1.0, 1.25], clips=[1.0, 2.0, 2.5, 3.0, 3.0]),
    "target_one_geometric": dict(recs=[-1.5, 3.0], clip=0.5, target=1.0, lr=math.log(2.0), geometric=True,
                                 sums=[0.0, 0.0, 0.5, 2 * math.sqrt(2) - 1.5, 1.5],
                                 clips=[1.0, 2.0, 2 * math.sqrt(2), 4.0, 4.0]),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(ADAPT))
@pytest.mark.parametrize("reset", [True, False])
def test_adaptation(case, reset):
    """TF's sequences: with a restart after every step the clip follows the estimate (sums use
    the new clip); without restarts the clip stays and only the estimate moves."""
    c = ADAPT[case]
    q = _q(c["clip"], target=c["target"], lr=c["lr"], geometric=c["geometric"])
    gs = q.initial_global_state()
    assert gs.sum_state.clip_value == c["clip"]
    recs = [torch.tensor([v]) for v in c["recs"]]
    for want_sum, want_clip in zip(c["sums"], c["clips"]):
        r, gs, _ = _run(q, recs, gs)
        if reset:
            gs = q.reset_state(r, gs)
            assert gs.sum_state.clip_value == pytest.approx(want_clip, abs=1e-6)
            assert float(r) == pytest.approx(want_sum, abs=1e-6)
        else:
            assert gs.sum_state.clip_value == c["clip"]
            assert float(gs.quantile_estimator_state.current_estimate) == pytest.approx(want_clip, abs=1e-6)
            assert float(r) == pytest.approx(c["sums"][0], abs=1e-6)


@pytest.mark.parametrize("start_low", [True, False])
@pytest.mark.parametrize("geometric", [True, False])
def test_adaptation_linspace_converges_to_median(start_low, geometric):
    recs = [torch.tensor(x) for x in np.linspace(0.0, 10.0, num=21, dtype=np.float32)]
    q = _q(1.0 if start_low else 10.0, target=0.5, lr=1.0, m=21.0, geometric=geometric)
    gs = q.initial_global_state()
    for t in range(50):
        r, gs, _ = _run(q, recs, gs)
        if t > 40:
            gs = q.reset_state(r, gs)
            assert abs(gs.sum_state.clip_value - 5.0) < 0.25


@pytest.mark.parametrize("start_low", [True, False])
def test_noise_stddev_follows_clip_after_restart(start_low):
    """After each restart the node stddev is z * clip, and the first release of the new tree has
    that stddev (d = 20000; tolerance 5%, ~7 sd)."""
    z, d = 0.1, 20_000
    recs = [torch.full((d,), d**-0.5 * x) for x in np.linspace(0.0, 10.0, num=11)]
    q = _q(1.0 if start_low else 10.0, z=z, target=0.5, lr=1.0, m=11.0, geometric=True, seed=1)
    gs = q.initial_global_state()
    for _ in range(6):
        clip = gs.sum_state.clip_value
        assert gs.sum_state.tree_state.value_generator_state == pytest.approx(clip * z)
        r, gs, _ = _run(q, recs, gs)
        signal = sum(rc * min(1.0, clip / float(rc.double().norm())) if float(rc.norm()) > 0 else rc for rc in recs)
        assert abs((r.double() - signal.double()).std().item() / (clip * z) - 1) < 0.05
        gs = q.reset_state(r, gs)


def test_events_and_restart_query():
    """One tree event per step with the combined multiplier (z^-2 + (2 sigma_b)^-2)^-1/2; a
    RestartQuery around it restarts both trees and moves the clip."""
    z, sigma_b = 1.0, 1.0
    q = RestartQuery(_q(1.0, z=z, target=0.5, lr=0.2, sigma_b=sigma_b, m=4.0, seed=0), PeriodicRoundRestartIndicator(3))
    gs = q.initial_global_state()
    recs = [torch.ones(3) * v for v in (0.1, 0.5, 2.0, 4.0)]
    events = []
    for _ in range(7):
        _, gs, ev = _run(q, recs, gs)
        events.append(ev)
    combined = (z**-2 + (2 * sigma_b) ** -2) ** -0.5  # 0.894427...
    assert combined == pytest.approx(2 / math.sqrt(5))
    assert events == [TreeAggregationStepEvent(combined, s) for s in (1, 0, 0, 1, 0, 0, 1)]
    inner = gs.inner_query_state
    assert inner.sum_state.tree_state.num_steps == 1 and inner.count_state.tree_state.num_steps == 1
    # the clip was last set at the restart after step 6 (from the estimate then), not 1.0
    assert inner.sum_state.clip_value != 1.0
    assert set(q.derive_metrics(gs)) == {"current_clip", "estimate_clip"}


def test_state_round_trip():
    q = _q(1.0, z=0.5, target=0.5, lr=0.2, sigma_b=0.5, m=2.0, seed=3)
    recs = [torch.tensor([0.3, 0.4]), torch.tensor([3.0, 4.0])]
    gs = q.initial_global_state()
    for _ in range(3):
        _, gs, _ = _run(q, recs, gs)
    plain, rng = to_plain(gs), q.generator.state_dict()
    a = [_run(q, recs, gs)]
    a.append(_run(q, recs, a[-1][1]))
    q.generator.load_state_dict(rng)
    gs2 = from_plain(q.initial_global_state(), plain)
    b = [_run(q, recs, gs2)]
    b.append(_run(q, recs, b[-1][1]))
    for (ra, ga, ea), (rb, gb, eb) in zip(a, b):
        assert torch.equal(ra, rb) and ea == eb
        assert torch.equal(ga.quantile_estimator_state.current_estimate, gb.quantile_estimator_state.current_estimate)


def test_errors():
    with pytest.raises(ValueError, match="noise_multiplier"):
        _q(1.0, z=-1.0)
    with pytest.raises(ValueError, match="clipped_count_stddev"):
        _q(1.0, sigma_b=-1.0)
    with pytest.raises(ValueError, match="initial_l2_norm_clip"):
        _q(-1.0)
    with pytest.raises(ValueError, match="initial_estimate"):
        _q(0.0, geometric=True)
    with pytest.raises(ValueError):
        _q(1.0, m=0.0)
    q = _q(1.0)
    _, gs, _ = _run(q, [torch.zeros(2)])
    with pytest.raises(ValueError, match="shape"):
        _run(q, [torch.zeros(3)], gs)
