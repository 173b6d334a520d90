"""Private steps on FSDP2 models (``fully_shard``) on gloo, 2 spawned CPU processes: equivalence
with one process, per-example norms equal to the unsharded model's, noise once per element with
independent streams per shard, one ledger entry on rank 0."""

from __future__ import annotations

import math

import pytest
import torch

from . import _fsdp_workers as fw
from . import _release_workers as rw
from . import _workers as w

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(), reason="needs gloo"
)

VARIANTS = [
    ("ghost", {}),
    ("functorch", {}),
    ("ghost", {"max_physical_batch_size": 1}),  # physical chunks: one reduction at step()
    ("ghost", {"uneven": True}),  # rank 1's local batches are empty (no forward there)
    ("functorch", {"num_microbatches": 4}),  # global count: 2 microbatches per rank
]


def _load(path):
    return torch.load(path, weights_only=False)


@pytest.mark.slow
def test_two_fsdp_ranks_equal_one_process_without_noise(tmp_path):
    refs = []
    for engine, kw in VARIANTS:
        model = w.make_model()
        fw.train(model, engine, w.make_batches(), **kw)
        refs.append({n: p.detach().clone() for n, p in model.named_parameters()})
    start = dict(w.make_model().named_parameters())
    for ref in refs:
        assert any((ref[n] - start[n]).abs().max() > 1e-3 for n in ref), "the reference did not train"
    w.spawn(fw.equivalence, 2, VARIANTS, str(tmp_path))
    for rank in range(2):
        out = _load(tmp_path / f"fsdp{rank}.pt")
        for (engine, kw), ref, res in zip(VARIANTS, refs, out):
            for n in ref:
                torch.testing.assert_close(res["params"][n], ref[n], atol=1e-5, rtol=0, msg=lambda m: f"{engine} {kw}: {m}")
            # one reduce-scatter of a rank-major buffer per physical slot: 2 rows (each rank's shard of
            # every parameter, padded to the longer one) of sums, fp32; then an all-reduce of 3 noise-,
            # 3 settings- and 3 sampling-fingerprint values per rank and 5 counters
            seg = [sum(torch.chunk(t, 2, 0)[s].numel() for t in ref.values()) for s in range(2)]
            assert seg == [33, 20]
            slots = 4 if kw.get("max_physical_batch_size") == 1 else 1  # 4 examples per rank, one per chunk
            assert res["volume"] == 4 * (2 * max(seg) * slots + 9 * 2 + 5)


@pytest.mark.slow
def test_fsdp_per_example_norms_are_the_unsharded_models(tmp_path):
    engines = ["ghost", "functorch"]
    w.spawn(fw.norms, 2, engines, str(tmp_path))
    for rank in range(2):
        out = _load(tmp_path / f"norms{rank}.pt")
        # the same examples through the plain model, per-example gradients materialised one by one
        expected, own_shard = fw.naive_norms(w.make_model(), out["x"], out["y"], rank)
        for engine in engines:
            torch.testing.assert_close(out[engine], expected, atol=1e-5, rtol=1e-5)
        # the norm over all shards, not over this rank's shard alone
        assert (own_shard < expected - 1e-3).all()


@pytest.mark.slow
@pytest.mark.parametrize("general,buckets", [(False, None), (True, None), (False, 1)], ids=["gaussian", "general", "bucketed"])
def test_fsdp_noise_once_per_element_independent_across_shards(tmp_path, general, buckets):
    sigma, clip, denominator = 2.0, 1.0, 10.0
    args = (str(tmp_path), sigma, clip, denominator, False, general)
    if buckets is None:
        w.spawn(fw.noise, 2, *args)
    else:  # one reduce-scatter per parameter (distributed/sharded_release.py)
        w.spawn(rw.with_buckets, 2, buckets, "noise", *args)
    u0, u1 = (_load(tmp_path / f"noise{r}.pt") for r in range(2))
    # both ranks see the same (all-gathered) update
    torch.testing.assert_close(u0["update"], u1["update"], atol=0, rtol=0)
    update = u0["update"]
    assert update.numel() == 5050
    assert bool((update != 0).all())  # every element noised (an empty batch: the update is the noise)
    expected = sigma * clip / denominator
    std = float(update.std())
    assert abs(std / expected - 1) < 0.05, (std, expected)
    assert abs(std / (expected * math.sqrt(2)) - 1) > 0.25  # not noised on every rank and summed
    assert abs(float(update.mean())) < 5 * expected / math.sqrt(update.numel())
    # the two shards of the weight are noised by independent streams (rows 0-24 on rank 0, 25-49 on
    # rank 1): identical streams would make the halves equal (correlation 1)
    w0, w1 = update[:2500], update[2500:5000]
    corr = float(torch.corrcoef(torch.stack([w0, w1]))[0, 1])
    assert abs(corr) < 0.1, corr
    # recorded once, on rank 0, with the ledger's q; the global denominator D = q N = 10
    assert u0["steps"] == 1 and u1["steps"] == 0
    from pytorch_privacy.dp_query import PrivacyLedger

    led = PrivacyLedger.from_dict(u0["ledger"])
    assert led.selection_probability == denominator / 100 and led.runs[0].count == 1


@pytest.mark.slow
@pytest.mark.parametrize("general", [False, True])
def test_fsdp_refuses_identical_noise_generators(tmp_path, general):
    w.spawn(fw.noise, 2, str(tmp_path), 1.0, 1.0, 10.0, True, general)
    for r in range(2):
        out = _load(tmp_path / f"noise{r}.pt")
        assert "same state" in out.get("error", ""), out.keys()


@pytest.mark.slow
@pytest.mark.parametrize("buckets", [None, 1], ids=["one-bucket", "bucketed"])
def test_fsdp_ledger_equals_one_process_and_budget_refuses_on_every_rank(tmp_path, buckets):
    from .test_ddp import _budget_refusing_step_3, _runs, _single_process_ledger

    n, q, steps = 40, 0.25, 4
    ref, _, _ = _single_process_ledger(n, q, steps, target_epsilon=None)
    budget = _budget_refusing_step_3(ref)
    ref_b, taken_b, refused_b = _single_process_ledger(n, q, steps, target_epsilon=budget)
    assert (taken_b, refused_b) == (2, 2)
    if buckets is None:
        w.spawn(w.ledger_run, 2, str(tmp_path), n, q, steps, budget, True)
    else:  # rank 0 refuses after the first bucket; the later ones carry zeros from it
        w.spawn(rw.with_buckets, 2, buckets, "ledger_run", str(tmp_path), n, q, steps, budget, True)
    r0, r1 = (_load(tmp_path / f"ledger{r}.pt") for r in range(2))
    led0, runs0 = _runs(r0["ledger"])
    _, runs_ref = _runs(ref_b.to_dict())
    assert runs0 == runs_ref and led0.steps == 2  # rank 0: the one-process ledger, global N and q
    assert _runs(r1["ledger"])[0].steps == 0
    assert r0["taken"] == r1["taken"] == 2 and r0["refused_at"] == r1["refused_at"] == 2
    assert r0["sharded"] and r1["sharded"]
    assert r0["noise_spent"] and r1["noise_spent"]  # no noise reused after a refusal


@pytest.mark.slow
def test_fsdp_checkpoint_resumes_every_ranks_noise_stream(tmp_path):
    w.spawn(fw.resume, 2, str(tmp_path))
    for r in range(2):
        out = _load(tmp_path / f"resume{r}.pt")
        a, b = out["updates"]
        assert out["steps"] == 3 and float(a.abs().max()) > 0  # 2 restored + 1
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("general", [False, True], ids=["sharded-release", "general"])
@pytest.mark.parametrize("fresh_randomness", [False, True])
def test_fsdp_every_rank_resuming_from_rank0s_checkpoint(tmp_path, general, fresh_randomness):
    """As for DDP (test_ddp.check_resume_from_rank0): every rank noises its own shard, on both paths."""
    from .test_ddp import check_resume_from_rank0

    check_resume_from_rank0(tmp_path, True, True, fresh_randomness, general)


@pytest.mark.slow
@pytest.mark.parametrize("what", ["noise", "clip-general", "none"])
def test_fsdp_ranks_with_unlike_privacy_settings_are_refused(tmp_path, what):
    from .test_ddp import check_unlike_settings

    check_unlike_settings(tmp_path, what, True)
