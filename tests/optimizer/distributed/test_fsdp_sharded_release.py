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
    ("ghost", [4, 4, 4], {"max_physical_batch_size": 2}),  # two chunks per rank: the first one's sums are a base
    ("ghost", [8, 0, 8], {}),  # rank 1 has no examples in the last step (its sums: of an empty batch)
    ("functorch", [4, 4, 4], {}),  # whole-model steps, materialised per-example gradients
    ("ghost", [4, 4, 4], {"per_unit": False}),
]


def test_plan_buckets_closes_a_bucket_before_it_would_overflow():
    t = {"a": torch.zeros(10), "b": torch.zeros(20), "c": torch.zeros(5), "d": torch.zeros(100), "e": torch.zeros(1)}
    assert plan_buckets(t, 4, False, 4 * 30) == [["a", "b"], ["c"], ["d"], ["e"]]
    assert plan_buckets(t, 4, True, 4 * 30) == [["a"], ["b"], ["c"], ["d"], ["e"]]  # sums and public gradients
    assert plan_buckets(t, 4, False, 10**9) == [["a", "b", "c", "d", "e"]]
    assert plan_buckets(t, 4, False, 1) == [[n] for n in t]  # one parameter at least
    assert plan_buckets({}, 4, False, 1) == []


@pytest.mark.slow
def test_one_parameter_per_bucket_equals_one_process_and_forms_each_sum_at_its_bucket(tmp_path):
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
            ev = res["events"]
            # one reduce-scatter per parameter, each of 2 rows of the larger shard (+ 5 counters in the last)
            rows = [max(c.numel() for c in torch.chunk(torch.zeros(shapes[n]), 2, 0)) for n in names]
            assert [e[1] for e in ev if e[0] == "rs"] == [2 * r for r in rows[:-1]] + [2 * (rows[-1] + 5)], what
            assert res["volume"] == 4 * 2 * (sum(rows) + 5), what
            if kw.get("max_physical_batch_size"):  # the first chunk's sums are formed when the second is flushed
                assert ev[0] == ("sums", tuple(names)), what
                ev = ev[1:]
            # each parameter's sum is formed alone, just before the reduce-scatter of its bucket
            assert ev == [e for n, r in zip(names, rows) for e in (("sums", (n,)), ("rs", ev[2 * names.index(n) + 1][1]))], what
