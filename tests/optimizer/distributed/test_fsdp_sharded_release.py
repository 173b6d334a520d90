"""FSDP2's bucketed release (``distributed/sharded_release.py``): with small buckets, 2 gloo ranks
still equal one process, and each parameter's clipped sum is formed only when its bucket is
reduce-scattered (never the whole model's clipped sum at once); the bucket plan itself."""

from __future__ import annotations

import pytest
import torch

from pytorch_privacy.optimizer.distributed.sharded_release import plan_buckets

from . import _fsdp_workers as fw
from . import _release_workers as rw
from . import _workers as w

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(), reason="needs gloo"
)

CASES = [
    ("ghost", [4, 4, 4], {}),  # per-unit steps after the first
    ("ghost", [4, 4, 4], {"max_physical_batch_size": 2}),  # two chunks per rank: reduced after each
    ("ghost", [8, 0, 8], {}),  # rank 1 has no examples in the last step (its sums: of an empty batch)
    ("functorch", [4, 4, 4], {}),  # whole-model steps, materialised per-example gradients
    ("ghost", [4, 4, 4], {"per_unit": False}),
    # whole-model steps, 3 chunks on rank 0 and 1 on rank 1: rank 1 sends zeros in the last 2 slots
    ("functorch", [6, 6, 6], {"max_physical_batch_size": 2}),
]


def test_plan_buckets_closes_a_bucket_before_it_would_overflow():
    t = {"a": torch.zeros(10), "b": torch.zeros(20), "c": torch.zeros(5), "d": torch.zeros(100), "e": torch.zeros(1)}
    assert plan_buckets(t, 4, 4 * 30) == [["a", "b"], ["c"], ["d"], ["e"]]
    assert plan_buckets(t, 2 * 4, 4 * 30) == [["a"], ["b"], ["c"], ["d"], ["e"]]  # sums and public gradients
    assert plan_buckets(t, 4, 10**9) == [["a", "b", "c", "d", "e"]]
    assert plan_buckets(t, 4, 1) == [[n] for n in t]  # one parameter at least
    assert plan_buckets({}, 4, 1) == []


@pytest.mark.slow
def test_one_parameter_per_bucket_equals_one_process_and_forms_each_sum_at_its_bucket(tmp_path):
    """Every case reduces its sums slot by slot, one parameter per bucket: the parameters equal one
    process's, and the whole model's clipped sum is never formed at once (even with two chunks)."""
    refs = []
    batches = w.make_batches(3)
    extra = w.make_batches(1, seed=9)[0]
    for engine, splits, kw in CASES:
        model = fw.deep_model()
        kw = {k: v for k, v in kw.items() if k != "per_unit"}
        opt, _ = fw.split_train(model, engine, batches, splits, world=1, **kw)
        opt.fit_batch(*extra)
        refs.append({n: p.detach().clone() for n, p in model.named_parameters()})
    shapes = {n: p.shape for n, p in fw.deep_model().named_parameters()}
    names = list(shapes)
    w.spawn(rw.bucketed, 2, str(tmp_path), 1, CASES)
    for rank in range(2):
        out = torch.load(tmp_path / f"bucketed{rank}.pt", weights_only=False)
        for (engine, splits, kw), ref, res in zip(CASES, refs, out):
            what = f"rank {rank}, {engine} {splits} {kw}"
            for n in ref:
                torch.testing.assert_close(res["params"][n], ref[n], atol=1e-5, rtol=0, msg=lambda m: f"{what}: {m}")
            assert res["path"] == ("whole-model" if engine == "functorch" or kw.get("per_unit") is False else "per-unit")
            assert res["refused"] == [0, -1, 1.5, True, "8MiB"] and res["bucket_bytes"] == 1, what  # bad sizes refused
            ev = res["events"]
            # per physical slot, one reduce-scatter per parameter of 2 rows of the larger shard; the
            # release then noises the shards and all-reduces 5 counters and 9 fingerprint values per
            # rank (noise, settings, sampling; no reduce-scatter of its own)
            rows = [max(c.numel() for c in torch.chunk(torch.zeros(shapes[n]), 2, 0)) for n in names]
            mpb = kw.get("max_physical_batch_size")
            chunks = [max(1, -(-m // mpb)) if mpb else 1 for m in (splits[-1], 8 - splits[-1])]
            slots = max(chunks)  # the ranks agree on the most chunks
            assert [e[1] for e in ev if e[0] == "rs"] == [2 * r for r in rows] * slots, what
            assert res["volume"] == 4 * (2 * sum(rows) * slots + 9 * 2 + 5), what
            # each parameter's sum is formed alone, just before the reduce-scatter of its bucket;
            # in a slot without a chunk of this rank, nothing is formed (zeros are sent)
            expected = []
            for slot in range(slots):
                for n, r in zip(names, rows):
                    expected += ([("sums", (n,))] if slot < chunks[rank] else []) + [("rs", 2 * r)]
            assert ev == expected, what


@pytest.mark.slow
def test_multi_pass_steps_with_public_passes_reduce_at_the_release_and_equal_one_process(tmp_path):
    ref = w.train(w.make_model(), "ghost", w.make_batches(), passes=True)
    start = dict(w.make_model().named_parameters())
    assert any((ref[n] - start[n]).abs().max() > 1e-3 for n in ref), "the reference did not train"
    w.spawn(rw.multipass, 2, str(tmp_path), 1)
    for rank in range(2):
        got = torch.load(tmp_path / f"multipass{rank}.pt", weights_only=False)
        for n in ref:
            torch.testing.assert_close(got[n], ref[n], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_settings_that_differ_across_ranks_are_refused_on_every_rank(tmp_path):
    # different buckets (or one rank reducing after each slot, the other not) would pair unlike
    # collectives: the planning all-reduce checks the settings first
    w.spawn(rw.mismatched_settings, 2, str(tmp_path))
    for rank in range(2):
        out = torch.load(tmp_path / f"mismatch{rank}.pt", weights_only=False)
        for name in ("bucket_bytes", "defers_sums"):
            assert out["errors"][name] is not None and name in out["errors"][name], (rank, out["errors"])
        assert out["path"] == "per-unit"
