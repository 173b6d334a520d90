"""Data-parallel DP-SGD on gloo (2 spawned CPU processes): equivalence with one process, noise
added once, one ledger entry per step with the global q, the budget refused on all ranks together,
and bf16 autocast numerics (norms, clip coefficients, sums and noise in fp32)."""

from __future__ import annotations

import math

import pytest
import torch

from . import _workers as w

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(), reason="needs gloo"
)


def _load(path):
    return torch.load(path, weights_only=False)


VARIANTS = [
    ("ghost", {}),
    ("functorch", {}),
    ("ghost", {"max_physical_batch_size": 1}),  # physical chunks: no all-reduce until step()
    ("functorch", {"microbatch_size": 2}),
    ("functorch", {"num_microbatches": 4}),  # global count: 2 microbatches per rank
    ("ghost", {"passes": True}),  # backward_pass x2 (one public) + clip_and_accumulate + step
    ("graphed", {"max_physical_batch_size": 3}),  # padded chunks (eager on the CPU)
]


@pytest.mark.slow
def test_two_ranks_equal_one_process_without_noise(tmp_path):
    """ghost and functorch engines, physical chunks, microbatches: 3 steps, to 1e-5."""
    refs = [w.train(w.make_model(), engine, w.make_batches(), **kw) for engine, kw in VARIANTS]
    start = dict(w.make_model().named_parameters())
    for ref in refs:
        assert any((ref[n] - start[n]).abs().max() > 1e-3 for n in ref), "the reference did not train"
    w.spawn(w.equivalence, 2, VARIANTS, str(tmp_path))
    for rank in range(2):
        out = _load(tmp_path / f"params{rank}.pt")
        # the engines never trigger DDP's own gradient all-reduce (its hook fires on a plain backward)
        assert out["control_calls"] > 0 and out["hook_calls"] == [0] * len(VARIANTS)
        for (engine, kw), ref, params in zip(VARIANTS, refs, out["params"]):
            for n in ref:
                torch.testing.assert_close(params[n], ref[n], atol=1e-5, rtol=0, msg=lambda m: f"{engine} {kw}: {m}")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["block", "broadcast"])
def test_noise_added_once_across_ranks(tmp_path, mode):
    sigma, clip, denominator = 2.0, 1.0, 10.0
    w.spawn(w.noise_std, 2, str(tmp_path), sigma, clip, denominator, mode)
    u0, u1 = (_load(tmp_path / f"update{r}.pt") for r in range(2))
    # every replica applies the same noised release
    torch.testing.assert_close(u0["update"], u1["update"], atol=0, rtol=0)
    update = u0["update"]
    assert update.numel() == 5050  # sample std to ~1% (1/sqrt(2n))
    expected = sigma * clip / denominator
    std = float(update.std())
    assert abs(std / expected - 1) < 0.05, (std, expected)
    # not sqrt(W) times more (noise drawn on every rank), not noise-free, and centred
    assert abs(std / (expected * math.sqrt(2)) - 1) > 0.25
    assert abs(float(update.mean())) < 5 * expected / math.sqrt(update.numel())
    if mode == "block":
        # one flat all-reduce of the block-noised sums, 3 noise-, 3 settings- and 3 sampling-fingerprint
        # values per rank and 5 counters, fp32; no broadcast
        assert u0["volume"] == 4 * (5050 + 9 * 2 + 5)
        # rank 0 noised elements [0, 2525), rank 1 [2525, 5050), from independent streams
        corr = float(torch.corrcoef(torch.stack([update[:2525], update[2525:]]))[0, 1])
        assert abs(corr) < 0.1, corr
    else:
        # one flat all-reduce of the sums (+3 settings- and 3 sampling-fingerprint values per rank and 3
        # counters) and one broadcast of rank 0's release, fp32
        assert u0["volume"] == 4 * (5050 + 6 * 2 + 3) + 4 * 5050


@pytest.mark.slow
def test_block_noise_refuses_one_seed_on_every_rank(tmp_path):
    w.spawn(w.noise_std, 2, str(tmp_path), 1.0, 1.0, 10.0, "same_seed")
    for r in range(2):
        assert "same state" in _load(tmp_path / f"update{r}.pt").get("error", "")


def _single_process_ledger(n, q, steps, target_epsilon):
    from torch.utils.data import TensorDataset

    from pytorch_privacy.optimizer import DPDataLoader, DPGaussianOptimizer, PrivacyBudgetExceeded

    g = torch.Generator().manual_seed(3)
    data = TensorDataset(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g))
    loader = DPDataLoader(data, q, steps=steps)
    model = w.make_model()
    opt = DPGaussianOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), model, w.loss_fn(), l2_norm_clip=1.0, noise_multiplier=1.0,
        data_loader=loader, target_epsilon=target_epsilon, target_delta=1e-5,
    )
    taken, refused_at = 0, None
    for x, y in loader:
        try:
            opt.fit_batch(x, y)
            taken += 1
        except PrivacyBudgetExceeded:
            refused_at = taken
            break
    return opt.ledger, taken, refused_at


def _runs(ledger_dict):
    from pytorch_privacy.dp_query import PrivacyLedger

    led = PrivacyLedger.from_dict(ledger_dict)
    return led, [(r.count, r.event, r.population_size, r.selection_probability) for r in led.runs]


@pytest.mark.slow
def test_ledger_of_two_ranks_equals_one_process_and_budget_refuses_together(tmp_path):
    n, q, steps = 40, 0.25, 4
    # a budget that allows some of the planned steps but not all of them
    ref, ref_taken, ref_refused = _single_process_ledger(n, q, steps, target_epsilon=None)
    assert ref_taken == steps and ref_refused is None
    budget = _budget_refusing_step_3(ref)
    ref_b, taken_b, refused_b = _single_process_ledger(n, q, steps, target_epsilon=budget)
    assert (taken_b, refused_b) == (2, 2)

    w.spawn(w.ledger_run, 2, str(tmp_path), n, q, steps, budget)
    r0, r1 = (_load(tmp_path / f"ledger{r}.pt") for r in range(2))
    led0, runs0 = _runs(r0["ledger"])
    _, runs_ref = _runs(ref_b.to_dict())
    assert runs0 == runs_ref and led0.steps == 2
    assert led0.population_size == n and led0.selection_probability == q  # global N and q
    assert r0["denominator"] == r1["denominator"] == q * n  # global q*N
    led1, _ = _runs(r1["ledger"])
    assert led1.steps == 0  # recorded once, on rank 0
    assert r0["taken"] == r1["taken"] == 2 and r0["refused_at"] == r1["refused_at"] == 2
    assert r0["noise_spent"] and r1["noise_spent"]  # no noise reused after a refusal


def _prefix(ledger, k):
    from pytorch_privacy.dp_query import PrivacyLedger

    led = PrivacyLedger(ledger.population_size, ledger.selection_probability)
    for _ in range(k):
        led.record_sample(ledger.runs[0].event)
    return led


def _budget_refusing_step_3(ledger):
    """A target epsilon between the epsilons after 2 and after 3 steps of ``ledger``."""
    from pytorch_privacy.analysis import RdpAccountant

    eps = [RdpAccountant().compose_ledger(_prefix(ledger, k)).get_epsilon(1e-5) for k in (2, 3)]
    return (eps[0] + eps[1]) / 2


# -- mixed precision (one process) --------------------------------------------------------------
@pytest.mark.parametrize("engine", ["ghost", "functorch"])
def test_bf16_autocast_step_matches_fp32_and_norms_are_fp32(engine):
    from pytorch_privacy.optimizer import DPGaussianOptimizer
    from pytorch_privacy.optimizer.distributed.precision import full_precision

    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)

    def run(autocast: bool):
        model = w.make_model()
        opt = DPGaussianOptimizer(
            torch.optim.SGD(model.parameters(), lr=1.0), model, w.loss_fn(), l2_norm_clip=0.3,
            noise_multiplier=0.0, expected_batch_size=16, engine=engine,
        )
        ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)
        with ctx:
            pe = opt.per_example_gradients(x, y)
            norms = pe.norms()
            with full_precision():  # what the optimizer wraps around clipping and summing
                summed = pe.weighted_sum(torch.ones(16))
            opt.zero_grad()
            opt.accumulate_pass(pe)
            opt.step()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        return norms, summed, grads, {n: p.detach().clone() for n, p in model.named_parameters()}

    n32, s32, g32, p32 = run(False)
    n16, s16, g16, p16 = run(True)
    assert n16.dtype == torch.float32 and all(t.dtype == torch.float32 for t in s16.values())
    assert all(t.dtype == torch.float32 for t in g16.values())
    assert not torch.equal(n16, n32)  # autocast really ran the forward in bf16
    torch.testing.assert_close(n16, n32, rtol=3e-2, atol=1e-3)  # bf16: 8 mantissa bits
    for n in g32:
        torch.testing.assert_close(g16[n], g32[n], rtol=3e-2, atol=3e-3)
        torch.testing.assert_close(p16[n], p32[n], rtol=3e-2, atol=3e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("engine", ["ghost", "functorch"])
def test_fp16_autocast_on_gpu_norms_fp32(engine):
    from pytorch_privacy.optimizer import DPGaussianOptimizer

    model = w.make_model().cuda()
    x, y = torch.randn(16, 6, device="cuda"), torch.randint(0, 3, (16,), device="cuda")
    opt = DPGaussianOptimizer(
        torch.optim.SGD(model.parameters(), lr=1.0), model, w.loss_fn(), l2_norm_clip=0.3, noise_multiplier=1.0,
        expected_batch_size=16, engine=engine,
    )
    with torch.autocast("cuda", dtype=torch.float16):
        pe = opt.per_example_gradients(x, y)
        assert pe.norms().dtype == torch.float32
        opt.fit_batch(x, y)
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in model.parameters())


def test_plain_model_with_a_distributed_loader_is_refused():
    from torch.utils.data import TensorDataset

    from pytorch_privacy.optimizer import DPGaussianOptimizer
    from pytorch_privacy.optimizer.distributed import DistributedDPDataLoader

    data = TensorDataset(torch.randn(10, 6), torch.randint(0, 3, (10,)))
    loader = DistributedDPDataLoader(data, 0.5, rank=0, world_size=2)
    model = w.make_model()
    with pytest.raises(ValueError, match="DistributedDataParallel"):
        DPGaussianOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1), model, w.loss_fn(), l2_norm_clip=1.0,
            noise_multiplier=1.0, data_loader=loader,
        )


@pytest.mark.parametrize("where", ["root", "inner"])
def test_data_parallel_is_refused_with_the_fix(where):
    """nn.DataParallel runs replicas in threads on slices of the batch (a pass-through on a CPU-only
    machine, so a run tested here would change on several GPUs): refused, by the optimizer and by
    make_private, naming DistributedDataParallel and model.module."""
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from pytorch_privacy import make_private
    from pytorch_privacy.optimizer import DPGaussianOptimizer

    inner = w.make_model()
    model = nn.DataParallel(inner) if where == "root" else nn.Sequential(nn.DataParallel(inner[0]), inner[1], inner[2])
    with pytest.raises(ValueError, match=r"DataParallel.*DistributedDataParallel.*model\.module"):
        DPGaussianOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1), model, w.loss_fn(), l2_norm_clip=1.0, noise_multiplier=1.0,
            expected_batch_size=4,
        )
    data = DataLoader(TensorDataset(torch.randn(8, 6), torch.randint(0, 3, (8,))), batch_size=4)
    with pytest.raises(ValueError, match="DistributedDataParallel"):
        make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), data, criterion=nn.CrossEntropyLoss(),
                     max_grad_norm=1.0, noise_multiplier=1.0)


def test_ddp_model_without_process_group_is_refused():
    from pytorch_privacy.optimizer.distributed.ddp import DistributedStep

    if torch.distributed.is_initialized():
        pytest.skip("a process group is initialised in this process")
    with pytest.raises(ValueError, match="init_process_group"):
        DistributedStep()


@pytest.mark.slow
def test_dp_ftrl_on_two_ranks_equals_one_process_with_rank_zeros_noise(tmp_path):
    """DP-FTRL (tree noise, momentum, restarts every 2 steps) under DDP: the tree's noise is drawn
    once, on rank 0, so two ranks (rank 0 seeded like the single process, rank 1 otherwise) end
    with the single process's parameters, and every replica with the same ones."""
    ref, steps = w.ftrl_train(w.make_model(), w.make_batches(steps=5), seed=0)
    assert steps == 5
    w.spawn(w.ftrl_equivalence, 2, str(tmp_path))
    outs = [_load(tmp_path / f"ftrl{r}.pt") for r in range(2)]
    assert outs[0]["steps"] == 5
    for out in outs:
        for n in ref:
            torch.testing.assert_close(out["params"][n], ref[n], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_matrix_factorisation_on_two_ranks_equals_one_process_with_rank_zeros_noise(tmp_path):
    """Banded MF noise (correlated across steps) under DDP: drawn once per step on rank 0, so both
    replicas end with the single process's parameters (rank 0 seeded like it)."""
    ref = w.mf_train(w.make_model(), w.make_batches(steps=5), seed=0)
    w.spawn(w.mf_equivalence, 2, str(tmp_path))
    for r in range(2):
        params = _load(tmp_path / f"mf{r}.pt")
        for n in ref:
            torch.testing.assert_close(params[n], ref[n], atol=1e-5, rtol=0)


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_an_overflowing_release_reaches_grad_as_zero_on_every_rank(tmp_path, fsdp):
    # the optimizer's NaN/inf guard runs in place on the release (DDP: the reduced flat buffer;
    # FSDP2: each rank's reduced shard, one column of the weight per rank)
    w.spawn(w.overflowing_release, 2, str(tmp_path), fsdp)
    for rank in range(2):
        weight = _load(tmp_path / f"rank{rank}.pt")["weight"]
        assert torch.isfinite(weight).all()
        # coordinate 0 overflowed (gradient 0: unchanged); coordinate 1 moved by lr * (4 records * 1) / 1
        assert torch.equal(weight, torch.tensor([[1.0, -3.0]], dtype=torch.float16))


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_a_public_only_step_keeps_its_noise_spent(tmp_path, fsdp):
    # every rank noised its block (shard) before the collective, so the reduced buffer showed that
    # noise to every rank; a rewound generator would put the same normals on the next step's sums,
    # whose noise-free value on the other blocks the ranks could then read off by subtraction
    w.spawn(w.public_only_step, 2, str(tmp_path), fsdp)
    for rank in range(2):
        assert _load(tmp_path / f"public{rank}.pt")["noise_spent"]


def test_prefetched_block_noise_is_the_noise_drawn_the_usual_way(tmp_path):
    # the next step's normals are drawn while the all-reduce is in flight: the same values in the
    # same stream order, so the runs agree bit for bit, and a checkpoint (taken while a prefetch
    # is held) holds the generator where the usual run's is
    w.spawn(w.prefetch_twins, 2, str(tmp_path))
    for rank in range(2):
        out = _load(tmp_path / f"prefetch{rank}.pt")
        plain, early = out[False], out[True]
        assert early["held"] and not plain["held"]
        for n, p in plain["params"].items():
            assert torch.equal(p, early["params"][n]), n
        start = dict(w.make_model().named_parameters())
        assert any(not torch.equal(p, start[n].detach()) for n, p in plain["params"].items())
        s_plain, s_early = plain["saved"]["random_sources"], early["saved"]["random_sources"]
        assert len(s_plain) == len(s_early) == 1
        assert torch.equal(s_plain[0]["states"]["cpu"], s_early[0]["states"]["cpu"])


@pytest.mark.slow
def test_the_release_forms_each_sum_into_the_flat_buffer_one_at_a_time(tmp_path):
    """The clipped sums are deferred to the release, which writes them into its flat all-reduce
    buffer one parameter at a time: never a dict of every sum next to the buffer."""
    from . import _release_workers as rw

    w.spawn(rw.ddp_sums, 2, str(tmp_path))
    for rank in range(2):
        out = torch.load(tmp_path / f"ddpsums{rank}.pt", weights_only=False)
        for engine, res in out.items():
            assert res["events"] == [("sums", (n,)) for n in res["names"]], (rank, engine, res["events"])


def check_resume_from_rank0(tmp_path, *args):
    """Shared by the DDP and FSDP2 tests: resuming every rank from rank 0's checkpoint is refused
    at the first noisy step on every rank (nothing applied, nothing recorded); with
    ``fresh_randomness=True`` it trains, with independent noise in the two ranks' halves."""
    fresh_randomness = args[2] if len(args) > 2 else False
    w.spawn(w.resume_from_rank0, 2, str(tmp_path), *args)
    outs = [_load(tmp_path / f"update{r}.pt") for r in range(2)]
    if not fresh_randomness:
        for out in outs:
            assert "same state" in out.get("error", ""), out.keys()
            assert "fresh_randomness=True" in out["error"]
            assert not out["changed"] and out["recorded"] == 0
        return
    update = outs[0]["update"]
    torch.testing.assert_close(outs[1]["update"], update, atol=0, rtol=0)
    assert update.abs().min() > 0  # every element noised
    # rows 0-24 of the weight and rows 25-49 (rank 0's and rank 1's block or shard): identical
    # streams would make them equal (correlation 1)
    corr = float(torch.corrcoef(torch.stack([update[:2500], update[2500:5000]]))[0, 1])
    assert abs(corr) < 0.1, corr


@pytest.mark.slow
@pytest.mark.parametrize("fresh_optimizer", [False, True], ids=["same-optimizer", "new-optimizer"])
@pytest.mark.parametrize("general", [False, True], ids=["block-noise", "broadcast"])
def test_every_rank_resuming_from_rank0s_checkpoint_is_refused(tmp_path, fresh_optimizer, general):
    """Rank 0's OS-seeded generator state, restored on every rank, would noise both blocks alike
    (the release would carry the noise-free difference of the two blocks).  Rank 0 alone draws the
    noise on the broadcast path: there the same resume is fine."""
    if general:
        w.spawn(w.resume_from_rank0, 2, str(tmp_path), fresh_optimizer, False, False, True)
        for r in range(2):
            assert "update" in _load(tmp_path / f"update{r}.pt")
        return
    check_resume_from_rank0(tmp_path, fresh_optimizer, False)


@pytest.mark.slow
def test_resuming_from_rank0s_checkpoint_with_fresh_randomness_trains(tmp_path):
    check_resume_from_rank0(tmp_path, True, False, True)


@pytest.mark.slow
def test_a_checkpoint_of_another_rank_is_refused(tmp_path):
    w.spawn(w.swapped_checkpoints, 2, str(tmp_path))
    for r in range(2):
        out = _load(tmp_path / f"swap{r}.pt")
        assert f"saved by rank {1 - r} of 2, and is loaded by rank {r} of 2" in out.get("error", ""), out
        assert out["steps"] == (1 if r == 0 else 0)  # rank 0's ledger holds the step, rank 1's is empty


def check_unlike_settings(tmp_path, what, fsdp):
    w.spawn(w.unlike_settings, 2, str(tmp_path), what, fsdp)
    for r in range(2):
        out = _load(tmp_path / f"unlike{r}.pt")
        if what == "none":
            assert "error" not in out and out["changed"] and out["recorded"] == (1 if r == 0 else 0), out
            continue
        assert "rank(s) [1] differ from rank 0's" in out.get("error", ""), out
        assert not out["changed"] and out["recorded"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("what", ["noise", "clip", "denominator", "clip-general", "none"])
def test_ranks_with_unlike_privacy_settings_are_refused(tmp_path, what):
    """Rank 1 with half the noise, twice the clip or another denominator than rank 0 (whose ledger
    accounts for rank 0's settings): refused on both ranks, nothing applied or recorded."""
    check_unlike_settings(tmp_path, what, False)


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_only_a_distributed_loader_over_the_same_ranks_is_accepted(tmp_path, fsdp):
    """A DPDataLoader, a shuffling DataLoader or a DistributedDPDataLoader built as one rank of one,
    on every rank of 2, samples the whole dataset per rank: an example could join a step twice
    (sensitivity 2C at a rate near 2q) while the loader's ledger says one draw at q.  Refused."""
    w.spawn(w.loader_kinds, 2, str(tmp_path), fsdp)
    for r in range(2):
        errors = _load(tmp_path / f"loaders{r}.pt")
        assert "samples the whole dataset" in errors["dp-loader"] and "DPDataLoader" in errors["dp-loader"]
        assert "samples the whole dataset" in errors["shuffle"]
        assert "built for rank 0 of 1" in errors["distributed-as-one"]
        assert errors["distributed"] is None


@pytest.mark.slow
@pytest.mark.parametrize("general", [False, True], ids=["gaussian", "general"])
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_sampling_generators_reseeded_alike_are_refused_at_the_step(tmp_path, fsdp, general):
    """The loaders' sampling generators seeded with one seed on every rank after construction (which
    the construction check cannot see): the step drawn from them is refused on every rank, nothing
    applied or recorded, also when the optimizer was not given the loader (the sampler that drew
    last in the process is checked); a seed per rank trains."""
    w.spawn(w.shared_sampling, 2, str(tmp_path), fsdp, general)
    for rank in range(2):
        out = _load(tmp_path / f"sampling{rank}.pt")
        for case in ("same", "unseen"):
            assert "sampling generators in the same state" in (out[case]["error"] or ""), (case, out[case])
            assert not out[case]["changed"] and out[case]["recorded"] == 0
        assert out["own"]["error"] is None and out["own"]["changed"]
        assert out["own"]["recorded"] == (1 if rank == 0 else 0)


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_frozen_parameters_on_two_ranks(tmp_path, fsdp):
    """A frozen layer and a frozen bias in a trained layer (LoRA-like), the optimizer over the
    trainable parameters only: two ranks equal one process without noise (ghost and functorch
    engines), and a noisy step leaves every frozen element exactly as it was."""
    start = torch.cat([p.detach().reshape(-1) for p in w.frozen_model().parameters()])
    frozen = torch.cat([torch.full((p.numel(),), not p.requires_grad) for p in w.frozen_model().parameters()])
    w.spawn(w.frozen_params, 2, str(tmp_path), fsdp)
    outs = [_load(tmp_path / f"frozen{r}.pt") for r in range(2)]
    for engine in ("ghost", "functorch"):
        model = w.frozen_model()
        w.train_frozen(model, engine)
        ref = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        assert (ref - start)[~frozen].abs().max() > 1e-3  # the reference trained
        for out in outs:
            trained, noisy = out[engine]["trained"], out[engine]["noisy"]
            torch.testing.assert_close(trained, ref, atol=1e-5, rtol=0)
            assert torch.equal(trained[frozen], start[frozen]) and torch.equal(noisy[frozen], start[frozen])
            assert (noisy - trained)[~frozen].abs().min() > 0  # every trainable element noised


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_make_private_on_two_ranks_samples_once_globally(tmp_path, fsdp):
    """make_private with a DDP (or FSDP2) model: the loader becomes a DistributedPrivateLoader at
    the global q = W b / N; in every step no example is loaded by both ranks and only rank 0
    records, with the global q; the replicas (the gathered shards) stay equal."""
    w.spawn(w.make_private_loop, 2, str(tmp_path), fsdp)
    r0, r1 = (_load(tmp_path / f"mp{r}.pt") for r in range(2))
    for out in (r0, r1):
        assert out["kind"] == "DistributedPrivateLoader" and out["q"] == 0.25 and out["len"] == 4
        # DDP: the user's backward does not all-reduce the gradients that step() discards
        assert out["grad_sync"] is (None if fsdp else False)
    assert r0["steps"] == r1["steps"] and len(r0["steps"]) == 4
    seen = 0
    for rank0, rank1 in r0["steps"]:
        assert not set(rank0) & set(rank1)  # each example drawn by one rank at most
        assert all(i % 2 == 0 for i in rank0) and all(i % 2 == 1 for i in rank1)  # its own part
        seen += len(rank0) + len(rank1)
    assert 30 < seen < 100  # Binomial(4 * 64, 0.25): mean 64, sd 6.9
    assert r0["ledger_steps"] == 4 and r1["ledger_steps"] == 0
    assert r0["ledger_q"] == 0.25 and r0["ledger_n"] == 64
    torch.testing.assert_close(r0["params"], r1["params"], atol=0, rtol=0)
