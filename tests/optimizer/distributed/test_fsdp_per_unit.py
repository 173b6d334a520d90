"""FSDP2 per-unit private steps (FSDP2's own hooks all-gather each unit for its forward and
backward, then free it): equal to one process, lockstep across ranks with different local batch
sizes, empty local batches and different physical chunk counts, the probe step unsharding the
whole model, and fewer parameters gathered at once than the whole-model path."""

from __future__ import annotations

import pytest
import torch

from . import _fsdp_workers as fw
from . import _workers as w

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(), reason="needs gloo"
)

# (engine, rank 0's share of each global batch of 8 (rank 1 takes the rest), optimizer options)
CASES = [
    ("ghost", [4, 4, 4], {}),
    ("ghost", [5, 3, 6], {}),  # different local batch sizes
    ("ghost", [4, 8, 0], {}),  # an empty local batch on rank 1, then on rank 0
    ("ghost", [4, 6, 1], {"max_physical_batch_size": 2}),  # 3 vs 1 physical chunks, then 1 vs 4
    ("ghost", [4, 4, 4], {"num_microbatches": 4}),  # global count: 2 microbatches of 2 per rank
    ("ghost", [4, 2, 4], {"root_owns_last": True}),  # the root's unit holds the last Linear
    ("functorch", [4, 4, 4], {}),  # no lockstep passes: whole-model every step
    ("ghost", [4, 4, 4], {"per_unit": False}),  # optimizer.distributed_step.per_unit = False: whole-model
    # the user's zero_grad() (which gathers the whole model for a multi-pass step) and an evaluation
    # forward before each fit_batch: the per-unit step gives the gathered model back first
    ("ghost", [4, 4, 4], {"zero_grad_first": True}),
]


@pytest.mark.slow
def test_per_unit_steps_equal_one_process_and_gather_one_unit_at_a_time(tmp_path):
    refs = []
    for engine, splits, kw in CASES:
        model = fw.deep_model()
        kw = {k: v for k, v in kw.items() if k not in ("root_owns_last", "per_unit", "zero_grad_first")}
        fw.split_train(model, engine, w.make_batches(len(splits)), splits, **kw)
        refs.append({n: p.detach().clone() for n, p in model.named_parameters()})
    start = dict(fw.deep_model().named_parameters())
    for ref in refs:
        assert any((ref[n] - start[n]).abs().max() > 1e-3 for n in ref), "the reference did not train"
    w.spawn(fw.per_unit, 2, CASES, str(tmp_path))
    outs = [torch.load(tmp_path / f"unit{r}.pt", weights_only=False) for r in range(2)]
    for i, ((engine, splits, kw), ref) in enumerate(zip(CASES, refs)):
        for rank in range(2):
            res = outs[rank][i]
            for n in ref:
                torch.testing.assert_close(res["params"][n], ref[n], atol=1e-5, rtol=0, msg=lambda m: f"{engine} {splits} {kw}: {m}")
            paths = [t[0] for t in res["trace"]]
            if engine == "functorch" or kw.get("per_unit") is False:
                assert paths == ["whole-model"] * 3
                continue
            # the first step verifies and traces the batch signature (probe forwards): whole model
            assert paths == ["whole-model", "per-unit", "per-unit"], paths
            whole, per_unit = res["trace"][0], res["trace"][1:]
            assert whole[1] == 4 and whole[2] == res["elems"] and not whole[4]
            # the root's unit stays gathered through its own forward: its 27 elements beside one other unit
            root = "root_owns_last" in kw
            for path, peak, peak_elems, gathers, sharded_in_forward in per_unit:
                # one unit's parameters at a time (never the 4 of the whole model) ...
                assert (peak, peak_elems <= 72 + 27 * root) == (1 + root, True), (peak, peak_elems)
                # ... the first unit is sharded again while the last one runs its forward ...
                assert sharded_in_forward
                # ... and each physical slot gathers every unit in its forward, some in backward
                assert gathers >= 4


@pytest.mark.slow
def test_per_unit_norms_are_the_unsharded_models(tmp_path):
    w.spawn(fw.per_unit_norms, 2, str(tmp_path))
    for rank in range(2):
        out = torch.load(tmp_path / f"unorms{rank}.pt", weights_only=False)
        assert out["path"] == "per-unit" and len(out["norms"]) == 1
        model = fw.deep_model()
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(out["before"][n])
        expected, own_shard = fw.naive_norms(model, out["x"], out["y"], rank)
        torch.testing.assert_close(out["norms"][0], expected, atol=1e-5, rtol=1e-5)
        assert (own_shard < expected - 1e-3).all()  # all shards, not this rank's


@pytest.mark.slow
def test_a_signature_new_to_one_rank_unshards_the_whole_model_on_every_rank(tmp_path):
    w.spawn(fw.new_signature, 2, str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"sig{r}.pt", weights_only=False) for r in range(2))
    # T=5 is new to rank 1 in step 3 (T=3 is known to rank 0): both ranks take the whole-model path;
    # T=4 is new to both in step 5
    expected = ["whole-model", "per-unit", "whole-model", "per-unit", "whole-model"]
    assert r0["paths"] == r1["paths"] == expected
    for n in r0["params"]:  # noise on: the ranks still hold the same (released) parameters
        torch.testing.assert_close(r0["params"][n], r1["params"][n], atol=0, rtol=0)


@pytest.mark.slow
def test_a_second_forward_in_a_per_unit_slot_fails_loudly(tmp_path):
    w.spawn(fw.double_forward, 2, str(tmp_path))
    for rank in range(2):
        out = torch.load(tmp_path / f"twice{rank}.pt", weights_only=False)
        assert out["error"] and "second forward" in out["error"], out


@pytest.mark.slow
def test_per_unit_step_noises_every_element_once(tmp_path):
    import math

    sigma, clip, denominator = 2.0, 1.0, 10
    w.spawn(fw.per_unit_noise, 2, str(tmp_path), sigma, clip, denominator)
    u0, u1 = (torch.load(tmp_path / f"unoise{r}.pt", weights_only=False) for r in range(2))
    assert u0["paths"] == u1["paths"] == ["per-unit", "per-unit"]
    torch.testing.assert_close(u0["noise"], u1["noise"], atol=0, rtol=0)  # the same release on both ranks
    assert float(u0["clean"].abs().max()) > 1e-4  # the examples moved the noise-free twin
    noise = u0["noise"]
    assert bool((noise != 0).all())  # every element noised
    expected = sigma * clip / denominator
    assert abs(float(noise.std()) / expected - 1) < 0.05, (float(noise.std()), expected)
    assert abs(float(noise.std()) / (expected * math.sqrt(2)) - 1) > 0.25  # not noised on both ranks
    corr = float(torch.corrcoef(torch.stack([noise[:2500], noise[2500:5000]]))[0, 1])
    assert abs(corr) < 0.1, corr  # the two shards' noise streams are independent


@pytest.mark.slow
def test_a_model_failing_on_zero_examples_keeps_whole_model_steps(tmp_path):
    w.spawn(fw.zero_examples_fail, 2, str(tmp_path))
    for rank in range(2):
        out = torch.load(tmp_path / f"zero{rank}.pt", weights_only=False)
        assert out["paths"] == ["whole-model"] * 3  # step 2 leaves rank 1 without examples: no deadlock
        assert len(out["warnings"]) == 1 and "view" in out["warnings"][0]


@pytest.mark.slow
def test_per_unit_steps_on_a_distributed_poisson_loader_equal_one_process(tmp_path):
    n, q, steps = 40, 0.1, 12
    w.spawn(fw.poisson_per_unit, 2, str(tmp_path), n, q, steps)
    r0, r1 = (torch.load(tmp_path / f"pois{r}.pt", weights_only=False) for r in range(2))
    assert r0["paths"] == r1["paths"]
    sizes = [(a[0].shape[0], b[0].shape[0]) for a, b in zip(r0["batches"], r1["batches"])]
    per_unit = [s for s, p in zip(sizes, r0["paths"]) if p == "per-unit"]
    assert per_unit and any(0 in s for s in per_unit), (sizes, r0["paths"])  # an empty rank took part per unit
    # one process on the union of the ranks' batches, step by step (noise 0: order within a step is immaterial)
    model = fw.deep_model()
    union = [(torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])) for a, b in zip(r0["batches"], r1["batches"])]
    from pytorch_privacy.optimizer import DPGaussianOptimizer

    opt = DPGaussianOptimizer(torch.optim.SGD(model.parameters(), lr=0.5), model, w.loss_fn(), l2_norm_clip=0.3,
                              noise_multiplier=0.0, expected_batch_size=q * n, engine="ghost")
    for x, y in union:
        opt.fit_batch(x, y)
    for name, p in model.named_parameters():
        torch.testing.assert_close(r0["params"][name], p.detach(), atol=1e-5, rtol=0)
        torch.testing.assert_close(r1["params"][name], p.detach(), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_a_parameter_used_outside_its_unit_in_a_per_unit_step_fails_loudly():
    # the unit's parameter is its sharded DTensor there, as in plain FSDP2 (not an object whose storage
    # is freed until the unit's all-gather: reading it would crash the process or return garbage)
    with pytest.raises(Exception, match="DTensor"):
        w.spawn(fw.early_use, 2)


@pytest.mark.slow
def test_per_unit_steps_under_bf16_autocast_equal_whole_model_steps(tmp_path):
    w.spawn(fw.autocast_paths, 2, str(tmp_path))
    for rank in range(2):
        out = torch.load(tmp_path / f"autocast{rank}.pt", weights_only=False)
        assert out["sum_dtypes"] == ["torch.float32"]  # clipped sums in fp32, also those formed after a slot
        assert out[True]["paths"] == ["whole-model", "per-unit", "per-unit"]
        assert out[False]["paths"] == ["whole-model"] * 3
        start = dict(fw.deep_model().named_parameters())
        assert any((p - start[n]).abs().max() > 1e-3 for n, p in out[True]["params"].items())  # it trained
        for n, p in out[False]["params"].items():
            torch.testing.assert_close(out[True]["params"][n], p, atol=1e-6, rtol=0)
