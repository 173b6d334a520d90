"""state_dict round trips: a resumed run makes the same updates and continues the ledger."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from pytorch_privacy.dp_query import NormalizedQuery, PrivacyLedger, QuantileAdaptiveClipSumQuery
from pytorch_privacy.optimizer import DPGaussianOptimizer, DPOptimizer


def ce(out, y):
    return nn.functional.cross_entropy(out, y, reduction="none")


def batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, 3, generator=g), torch.randint(0, 2, (6,), generator=g)) for _ in range(n)]


def gaussian_run(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    ledger = PrivacyLedger(60, 0.1)
    opt = DPGaussianOptimizer(
        torch.optim.Adam(model.parameters(), lr=0.01), model, ce, 0.5, 1.2, ledger=ledger,
        generator=torch.Generator().manual_seed(123),
    )
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    return model, opt, ledger, sched


def adaptive_run(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    ledger = PrivacyLedger(60, 0.1)
    q = QuantileAdaptiveClipSumQuery(
        initial_l2_norm_clip=0.5, noise_multiplier=1.0, target_unclipped_quantile=0.5, learning_rate=0.2,
        clipped_count_stddev=0.5, expected_num_records=6.0, generator=torch.Generator().manual_seed(7),
    )
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model, ce, NormalizedQuery(q, 6.0),
                      ledger=ledger)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    return model, opt, ledger, sched


def _save(obj) -> dict:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("run", [gaussian_run, adaptive_run], ids=["gaussian_adam", "adaptive_clip_momentum"])
def test_resume_gives_identical_updates_and_continues_the_ledger(run):
    data = batches(5)
    # uninterrupted reference
    model, opt, ledger, sched = run()
    for x, y in data:
        opt.fit_batch(x, y)
        sched.step()
    ref = [p.detach().clone() for p in model.parameters()]
    ref_state = opt.global_state

    # interrupted after 3 steps, checkpoint through torch.save / torch.load(weights_only=True)
    model, opt, ledger, sched = run()
    for x, y in data[:3]:
        opt.fit_batch(x, y)
        sched.step()
    ckpt = _save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()})
    for x, y in data[3:]:  # the original keeps going; must not affect the checkpoint
        opt.fit_batch(x, y)

    model2, opt2, ledger2, sched2 = run(seed=1)  # different init, different generator draws so far
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    assert len(ledger2) == 3 and opt2.steps == 3
    for x, y in data[3:]:
        opt2.fit_batch(x, y)
        sched2.step()
    for p, r in zip(model2.parameters(), ref):
        assert torch.equal(p.detach(), r)
    assert len(ledger2) == 5
    assert ledger2.to_dict() == ledger.to_dict()
    assert str(opt2.global_state) == str(ref_state)


def test_adaptive_clip_state_is_restored():
    model, opt, ledger, _ = adaptive_run()
    for x, y in batches(3):
        opt.fit_batch(x, y)
    clip = opt.global_state.numerator_state.sum_state.l2_norm_clip
    assert float(clip) != 0.5
    sd = _save(opt.state_dict())
    _, opt2, _, _ = adaptive_run()
    opt2.load_state_dict(sd)
    s2 = opt2.global_state.numerator_state
    assert torch.equal(s2.sum_state.l2_norm_clip, clip)
    assert type(s2) is type(opt.global_state.numerator_state)


def test_ledger_object_is_updated_in_place():
    model, opt, ledger, _ = gaussian_run()
    for x, y in batches(2):
        opt.fit_batch(x, y)
    sd = opt.state_dict()
    _, opt2, ledger2, _ = gaussian_run()
    opt2.load_state_dict(sd)
    assert opt2.ledger is ledger2 and len(ledger2) == 2
    opt2.fit_batch(*batches(1)[0])
    assert len(ledger2) == 3 and len(ledger) == 2


def test_mismatched_checkpoints_are_refused():
    model, opt, ledger, _ = gaussian_run()
    opt.fit_batch(*batches(1)[0])
    sd = opt.state_dict()
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    no_ledger = DPGaussianOptimizer(torch.optim.Adam(m.parameters(), lr=0.01), m, ce, 0.5, 1.2, expected_batch_size=6)
    with pytest.raises(ValueError, match="ledger"):
        no_ledger.load_state_dict(sd)
    with pytest.raises(ValueError, match="not a DPOptimizer state dict"):
        opt.load_state_dict(opt.original_optimizer.state_dict())
    _, opt_a, _, _ = adaptive_run()
    with pytest.raises(ValueError, match="differently configured"):
        opt_a.load_state_dict(sd)


def test_a_checkpoint_of_another_rank_is_refused():
    """Only rank 0's checkpoint of a distributed run holds its ledger: a one-process optimizer
    refuses another rank's (the account would restart from nothing) and takes rank 0's."""
    _, opt, ledger, _ = gaussian_run()
    opt.fit_batch(*batches(1)[0])
    sd = opt.state_dict()
    assert sd["distributed"] is None
    _, fresh, fresh_ledger, _ = gaussian_run()
    before = fresh.original_optimizer.state_dict()
    with pytest.raises(ValueError, match="saved by rank 1 of 2.*LOCAL_RANK"):
        fresh.load_state_dict(dict(sd, distributed={"rank": 1, "world_size": 2}))
    assert fresh_ledger.steps == 0 and fresh.original_optimizer.state_dict() == before  # nothing changed
    with pytest.raises(ValueError, match="corrupt checkpoint"):
        fresh.load_state_dict(dict(sd, distributed="rank 0"))
    fresh.load_state_dict(dict(sd, distributed={"rank": 0, "world_size": 2}))
    assert fresh_ledger.steps == ledger.steps == 1
    assert _save(sd)["distributed"] is None  # weights_only loads it


def _params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("run", [gaussian_run, adaptive_run], ids=["gaussian_adam", "adaptive_clip_momentum"])
def test_rolling_back_in_a_run_is_refused_unless_asked_and_never_reuses_noise(run):
    """Loading an earlier checkpoint of this run into its own optimizer (a rollback after a loss
    spike, say) would erase the ledger's records of the steps since and rewind the noise, so the
    replayed steps would get the abandoned steps' noise.  Refused by default, nothing changed;
    ``rollback=True`` restores the optimizer but keeps the ledger and the generators going."""
    data = batches(5)
    model, opt, ledger, _ = run()
    for x, y in data[:2]:
        opt.fit_batch(x, y)
    ckpt = _save({"model": model.state_dict(), "opt": opt.state_dict()})
    abandoned = []
    for x, y in data[2:]:
        before = _params(model)
        opt.fit_batch(x, y)
        abandoned.append(_params(model) - before)

    # an exact restore (a new optimizer resuming the run) repeats those updates: what reuse looks like
    model2, opt2, _, _ = run(seed=1)
    copy2 = _save(ckpt)  # torch's optimizers adopt a loaded state's tensors and update them in place
    model2.load_state_dict(copy2["model"])
    opt2.load_state_dict(copy2["opt"])
    start = _params(model2)
    opt2.fit_batch(*data[2])
    torch.testing.assert_close(_params(model2) - start, abandoned[0])

    state = _save(opt.state_dict())
    with pytest.raises(ValueError, match=r"taken 5 steps and the checkpoint holds 2.*rollback=True"):
        opt.load_state_dict(ckpt["opt"])
    assert len(ledger) == 5 and opt.steps == 5
    assert str(_save(opt.state_dict())) == str(state)  # nothing changed

    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"], rollback=True)
    assert len(ledger) == 5 and opt.steps == 2  # every private step stays recorded
    for (x, y), old in zip(data[2:], abandoned):
        before = _params(model)
        opt.fit_batch(x, y)
        assert not torch.allclose(_params(model) - before, old, atol=1e-6), "a replayed step reused its noise"
    assert len(ledger) == 8


def test_rollback_takes_only_a_checkpoint_of_this_run():
    data = batches(4)
    _, other, _, _ = gaussian_run()
    other.fit_batch(*data[0])
    foreign = _save(other.state_dict())  # same settings, same ledger events: another run all the same
    model, opt, ledger, _ = gaussian_run()
    for x, y in data:
        opt.fit_batch(x, y)
    with pytest.raises(ValueError, match="is of another run"):
        opt.load_state_dict(foreign, rollback=True)
    # a branch (fresh randomness) is a new run too: an earlier checkpoint of its trunk is not its own
    early = _save(opt.state_dict())
    opt.fit_batch(*data[0])
    opt.load_state_dict(_save(opt.state_dict()), fresh_randomness=True)
    with pytest.raises(ValueError, match="is of another run"):
        opt.load_state_dict(early, rollback=True)
    model, opt, ledger, _ = gaussian_run()
    for x, y in data:
        opt.fit_batch(x, y)
    legacy = _save(opt.state_dict())
    legacy["steps"] = 1
    del legacy["run_id"]
    with pytest.raises(ValueError, match="holds no run id"):
        opt.load_state_dict(legacy, rollback=True)
    assert len(ledger) == 4 and opt.steps == 4
