"""Process bodies for the distributed tests (module level: ``torch.multiprocessing.spawn``
pickles them by name).  Each rank joins a gloo group on 127.0.0.1, runs, saves what the parent
test checks with ``torch.save`` and leaves the group."""

from __future__ import annotations

import os
import socket
import sys

import torch
import torch.distributed as dist
from torch import nn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, world_size: int, *args) -> None:
    """Run ``fn(rank, world_size, port, *args)`` in ``world_size`` fresh processes."""
    port = free_port()
    torch.multiprocessing.spawn(_entry, args=(fn, world_size, port, args), nprocs=world_size, join=True)


def _entry(rank, fn, world_size, port, args):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, port, *args)
        # both ranks leave their last collective before either tears gloo down (tearing down while
        # the peer still talks to it aborted a rank now and then: "terminate called without an
        # active exception")
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # leave without the interpreter's teardown: gloo's threads destroyed during it aborted a rank
    # now and then ("terminate called without an active exception", SIGABRT) after its work was
    # done and saved (seen once in a loaded CI run of the FSDP2 noise test)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def make_batches(steps: int = 3, batch: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 6, generator=g), torch.randint(0, 3, (batch,), generator=g)) for _ in range(steps)]


def loss_fn():
    return nn.CrossEntropyLoss(reduction="none")


def train(model, engine, batches, *, rank=0, world=1, **opt_kwargs):
    """3 noise-free DP steps; rank ``r`` of ``world`` takes the ``r``-th consecutive share of
    each global batch.  Returns the (inner) parameters."""
    from pytorch_privacy.optimizer import DPGaussianOptimizer

    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    passes = opt_kwargs.pop("passes", False)
    opt = DPGaussianOptimizer(
        torch.optim.SGD(inner.parameters(), lr=0.5), model, loss_fn(), l2_norm_clip=0.3, noise_multiplier=0.0,
        expected_batch_size=8, engine=engine, generator=torch.Generator().manual_seed(0), **opt_kwargs,
    )
    for x, y in batches:
        share = x.shape[0] // world
        xs, ys = x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]
        if not passes:
            opt.fit_batch(xs, ys)
            continue
        # the multi-pass API: a sensitive pass per half of the share (flushed in between), and a
        # public pass on a share of a public batch; communication only at step()
        opt.zero_grad()
        half = xs.shape[0] // 2
        opt.backward_pass(xs[:half], ys[:half])
        opt.clip_and_accumulate()
        opt.backward_pass(xs[half:], ys[half:])
        pub_x = x.flip(0) * 0.5  # "public" data, split the same way
        opt.backward_pass(pub_x[rank * share:(rank + 1) * share], ys, sensitive=False)
        opt.step()
    return {n: p.detach().clone() for n, p in inner.named_parameters()}


def equivalence(rank, world, port, variants, out_dir):
    """Every ``(engine, optimizer kwargs)`` variant in one spawn (process start-up dominates)."""
    results, hook_calls = [], []
    for engine, opt_kwargs in variants:
        model = nn.parallel.DistributedDataParallel(make_model())
        calls = _count_ddp_reductions(model)
        results.append(train(model, engine, make_batches(), rank=rank, world=world, **dict(opt_kwargs)))
        hook_calls.append(len(calls))
    # control: the same hook does fire for an ordinary DDP backward
    control = nn.parallel.DistributedDataParallel(make_model())
    calls = _count_ddp_reductions(control)
    x, y = make_batches(1)[0]
    loss_fn()(control(x), y).mean().backward()
    torch.save({"params": results, "hook_calls": hook_calls, "control_calls": len(calls)},
               os.path.join(out_dir, f"params{rank}.pt"))


def _count_ddp_reductions(model) -> list:
    """A DDP communication hook that counts DDP's own gradient all-reduces (buckets)."""
    calls = []

    def hook(state, bucket):
        calls.append(1)
        fut = torch.futures.Future()
        fut.set_result(bucket.buffer())
        return fut

    model.register_comm_hook(None, hook)
    return calls


def noise_std(rank, world, port, out_dir, sigma, clip, denominator, mode="block"):
    """One step with empty local batches on every rank: the update is -noise / D exactly.

    ``mode``: ``"block"`` (DPGaussianOptimizer: each rank noises its block), ``"broadcast"`` (a
    query with its own ``get_noised_result``: rank 0 noises the global sum and broadcasts),
    ``"same_seed"`` (block noise with one seed on every rank: refused)."""
    from pytorch_privacy.dp_query import GaussianAverageQuery
    from pytorch_privacy.optimizer import DPGaussianOptimizer, DPOptimizer

    class OwnRelease(GaussianAverageQuery):
        def get_noised_result(self, sample_state, global_state):
            return super().get_noised_result(sample_state, global_state)

    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(nn.Linear(100, 50))
    before = {n: p.detach().clone() for n, p in model.module.named_parameters()}
    sgd = torch.optim.SGD(model.module.parameters(), lr=1.0)
    if mode == "broadcast":
        opt = DPOptimizer(sgd, model, loss_fn(), OwnRelease(clip, sigma * clip, denominator))
    else:
        gen = torch.Generator().manual_seed(11) if mode == "same_seed" else None
        opt = DPGaussianOptimizer(
            sgd, model, loss_fn(), l2_norm_clip=clip, noise_multiplier=sigma, expected_batch_size=denominator,
            generator=gen,
        )
    try:
        opt.fit_batch(torch.zeros(0, 100), torch.zeros(0, dtype=torch.long))
    except ValueError as exc:
        torch.save({"error": str(exc)}, os.path.join(out_dir, f"update{rank}.pt"))
        return
    update = torch.cat([(p.detach() - before[n]).reshape(-1) for n, p in model.module.named_parameters()])
    torch.save({"update": update, "volume": opt.distributed_step.last_volume_bytes}, os.path.join(out_dir, f"update{rank}.pt"))


def ledger_run(rank, world, port, out_dir, n, q, steps, target_epsilon, fsdp=False):
    """A 2-rank run on a DistributedDPDataLoader with budget enforcement: saves the ledger, the
    number of steps taken and whether (and at which step) the budget refused (``fsdp``: the model
    sharded with ``fully_shard`` instead of wrapped in DDP)."""
    from torch.utils.data import TensorDataset

    from pytorch_privacy.optimizer import DPGaussianOptimizer, PrivacyBudgetExceeded
    from pytorch_privacy.optimizer.distributed import DistributedDPDataLoader

    g = torch.Generator().manual_seed(3)
    data = TensorDataset(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g))
    loader = DistributedDPDataLoader(data, q, steps=steps)
    if fsdp:
        from ._fsdp_workers import shard

        model = inner = shard(make_model())
    else:
        model = nn.parallel.DistributedDataParallel(make_model())
        inner = model.module
    opt = DPGaussianOptimizer(
        torch.optim.SGD(inner.parameters(), lr=0.1), model, loss_fn(), l2_norm_clip=1.0,
        noise_multiplier=1.0, data_loader=loader, target_epsilon=target_epsilon, target_delta=1e-5,
    )
    taken, refused_at, local, noise_spent = 0, None, [], None
    source = opt._random_sources[0]

    def position():  # where the noise stream stands (a held prefetch counts as not yet drawn)
        st = source.state_dict()["states"].get("cpu")  # None before the generator's first draw
        return torch.zeros(0, dtype=torch.uint8) if st is None else st.clone()

    for x, y in loader:
        local.append(x.shape[0])
        before = position()
        try:
            opt.fit_batch(x, y)
            taken += 1
        except PrivacyBudgetExceeded:
            refused_at = taken
            # the refused step's noised sums were already reduced across the ranks: its normals
            # must stay spent (a rewound generator would put the same noise on the next attempt)
            noise_spent = not torch.equal(position(), before)
            break
    sharded = all(type(p).__name__ == "DTensor" for p in inner.parameters())  # resharded after a refusal too
    torch.save(
        {"ledger": opt.ledger.to_dict(), "taken": taken, "refused_at": refused_at, "local": local,
         "denominator": opt.denominator, "sharded": sharded, "noise_spent": noise_spent},
        os.path.join(out_dir, f"ledger{rank}.pt"),
    )


def ftrl_train(model, batches, *, rank=0, world=1, seed=0):
    """DP-FTRL with momentum and a restart every 2 steps, noise on; rank ``r`` of ``world`` takes the
    ``r``-th consecutive share of each global batch.  Returns the (inner) parameters."""
    from pytorch_privacy.dp_query.privacy_ledger import PrivacyLedger
    from pytorch_privacy.optimizer.ftrl_optimizer import DPFTRLOptimizer

    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    n, b = 8 * len(batches), batches[0][0].shape[0]
    opt = DPFTRLOptimizer(
        model, loss_fn(), 0.5, 1.0, learning_rate=0.3, momentum=0.5, restart=2, batch_size=b,
        ledger=PrivacyLedger(n, sampling="fixed_order", batch_size=b), generator=torch.Generator().manual_seed(seed),
    )
    for x, y in batches:
        share = x.shape[0] // world
        opt.fit_batch(x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share])
    return {n: p.detach().clone() for n, p in inner.named_parameters()}, len(opt.ledger) if rank == 0 else None


def ftrl_equivalence(rank, world, port, out_dir):
    model = nn.parallel.DistributedDataParallel(make_model())
    params, steps = ftrl_train(model, make_batches(steps=5), rank=rank, world=world, seed=rank)
    torch.save({"params": params, "steps": steps}, os.path.join(out_dir, f"ftrl{rank}.pt"))


def mf_train(model, batches, *, rank=0, world=1, seed=0):
    """Banded matrix-factorisation noise (3 bands), noise on, fixed-order ledger; rank ``r`` of
    ``world`` takes the ``r``-th consecutive share of each global batch."""
    from pytorch_privacy.dp_query.matrix_factorization import BandedToeplitzStrategy
    from pytorch_privacy.dp_query.privacy_ledger import PrivacyLedger
    from pytorch_privacy.optimizer.mf_optimizer import DPMatrixFactorizationOptimizer

    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    n, b = 8 * len(batches), batches[0][0].shape[0]
    opt = DPMatrixFactorizationOptimizer(
        torch.optim.SGD(inner.parameters(), lr=0.3), model, loss_fn(), 0.5, 1.0, BandedToeplitzStrategy([1.0, -0.4, 0.1]),
        ledger=PrivacyLedger(n, sampling="fixed_order", batch_size=b), expected_batch_size=float(b),
        generator=torch.Generator().manual_seed(seed),
    )
    for x, y in batches:
        share = x.shape[0] // world
        opt.fit_batch(x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share])
    return {n: p.detach().clone() for n, p in inner.named_parameters()}


def mf_equivalence(rank, world, port, out_dir):
    model = nn.parallel.DistributedDataParallel(make_model())
    params = mf_train(model, make_batches(steps=5), rank=rank, world=world, seed=rank)
    torch.save(params, os.path.join(out_dir, f"mf{rank}.pt"))


def dynamic_scale(rank, world, port, out_dir, steps, overflow, fsdp=False):
    """fp16 DDP (``fsdp``: FSDP2) steps with a DynamicDPLossScaler; ``overflow``: every record of
    rank 1 overflows at the first scale.  Saves the scales, the released counts and the ledger."""
    from pytorch_privacy.dp_query import PrivacyLedger
    from pytorch_privacy.optimizer import DPGaussianOptimizer
    from pytorch_privacy.optimizer.distributed.precision import DynamicDPLossScaler

    def weighted_ce(out, y):
        return nn.functional.cross_entropy(out, y[:, 0].long(), reduction="none") * y[:, 1]

    if fsdp:
        from ._fsdp_workers import shard

        model = inner = shard(make_model())
    else:
        model = nn.parallel.DistributedDataParallel(make_model())
        inner = model.module
    ledger = PrivacyLedger(1600, 0.01)
    opt = DPGaussianOptimizer(
        torch.optim.SGD(inner.parameters(), lr=0.1), model, weighted_ce, l2_norm_clip=0.3,
        noise_multiplier=1.0, expected_batch_size=16, ledger=ledger,
        generator=torch.Generator().manual_seed(100 + rank),
    )
    scaler = DynamicDPLossScaler(init_scale=2.0**15 if overflow else 2.0**4, growth_interval=10**6)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(8, 6, generator=g)
    y = torch.stack([torch.randint(0, 3, (8,), generator=g).float(), torch.ones(8)], 1)
    if overflow and rank == 1:
        y[:, 1] = 30.0
    scales, released, dropped = [], [], []
    import warnings

    with torch.autocast("cpu", dtype=torch.float16), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(steps):
            before = opt.dropped_records
            scales.append(scaler.scale)
            scaler.fit_batch(opt, x, y)
            released.append(scaler.last_noised_count)
            dropped.append(opt.dropped_records - before)
    torch.save({"scales": scales + [scaler.scale], "released": released, "dropped": dropped,
                "ledger": opt.ledger.to_json()}, os.path.join(out_dir, f"dyn{rank}.pt"))


def overflowing_release(rank, world, port, out_dir, fsdp=False):
    """A float16 model: two records per rank whose gradients (norm 4e4, within the clip and the
    float16 range) sum to 1.6e5 in the float32 release, past float16's 65504 once cast back to
    the parameter's dtype: that coordinate must reach ``.grad`` as 0, not inf (``fsdp``: the
    weight's columns sharded by ``fully_shard`` along dim 1 instead of a DDP replica)."""
    from pytorch_privacy.optimizer import DPGaussianOptimizer

    model = nn.Linear(2, 1, bias=False).half()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 1.0]]))
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        wrapped = fully_shard(model, shard_placement_fn=lambda p: torch.distributed.tensor.Shard(1))
    else:
        wrapped = nn.parallel.DistributedDataParallel(model)
    opt = DPGaussianOptimizer(
        torch.optim.SGD(model.parameters(), lr=1.0), wrapped, lambda out, y: out.reshape(-1).float(),
        l2_norm_clip=1e5, noise_multiplier=0.0, expected_batch_size=1,
    )
    x = torch.tensor([[4e4, 1.0], [4e4, 1.0]], dtype=torch.float16)  # d loss / d w = x
    opt.fit_batch(x, torch.zeros(2))
    weight = model.weight.full_tensor() if fsdp else model.weight
    torch.save({"weight": weight.detach().clone()}, os.path.join(out_dir, f"rank{rank}.pt"))


def public_only_step(rank, world, port, out_dir, fsdp=False):
    """A step with a public pass only (no rank takes a sensitive pass): every rank still noises its
    block before the collective (DDP: the reduced buffer carried that noise to every rank) or its
    shard after it (FSDP2).  Saves whether each rank's generator moved on (the draws stay spent)."""
    from pytorch_privacy.optimizer import DPGaussianOptimizer

    if fsdp:
        from ._fsdp_workers import shard

        model = inner = shard(make_model())
    else:
        model = nn.parallel.DistributedDataParallel(make_model())
        inner = model.module
    gen = torch.Generator().manual_seed(10 + rank)
    opt = DPGaussianOptimizer(
        torch.optim.SGD(inner.parameters(), lr=0.1), model, loss_fn(), l2_norm_clip=1.0, noise_multiplier=1.0,
        expected_batch_size=8, generator=gen,
    )
    x, y = make_batches(1)[0]
    before = gen.get_state().clone()
    opt.zero_grad()
    opt.backward_pass(x[rank * 4:(rank + 1) * 4], y[rank * 4:(rank + 1) * 4], sensitive=False)
    opt.step()
    torch.save({"noise_spent": not torch.equal(gen.get_state(), before)},
               os.path.join(out_dir, f"public{rank}.pt"))


def prefetch_twins(rank, world, port, out_dir):
    """Three noisy DDP steps twice from the same seeds: the block noise drawn the usual way, and
    prefetched while each step's all-reduce is in flight.  Saves both runs' parameters and the
    generator states."""
    from pytorch_privacy.optimizer import DPGaussianOptimizer

    out = {}
    for prefetch in (False, True):
        model = nn.parallel.DistributedDataParallel(make_model())
        gen = torch.Generator().manual_seed(20 + rank)
        opt = DPGaussianOptimizer(
            torch.optim.SGD(model.module.parameters(), lr=0.5), model, loss_fn(), l2_norm_clip=0.3,
            noise_multiplier=1.0, expected_batch_size=8, generator=gen,
        )
        opt.distributed_step.prefetch_noise = prefetch
        for x, y in make_batches():
            opt.fit_batch(x[rank * 4:(rank + 1) * 4], y[rank * 4:(rank + 1) * 4])
        out[prefetch] = {
            "params": {n: p.detach().clone() for n, p in model.module.named_parameters()},
            "saved": opt.state_dict(),
            "held": opt._random_sources[0]._prefetched is not None,  # the prefetch path ran
        }
    torch.save(out, os.path.join(out_dir, f"prefetch{rank}.pt"))



def private_setup(inner, *, fsdp, general, clip, sigma, denominator, ledger, lr, data_loader=None):
    """``(model, optimizer)``: ``inner`` wrapped in DDP (or ``fully_shard`` with ``fsdp``), under
    ``DPGaussianOptimizer``, or (``general``) a ``DPOptimizer`` over a Gaussian average query with
    its own ``get_noised_result`` (the general release path); ``data_loader`` as for the optimizer."""
    from pytorch_privacy.dp_query import GaussianAverageQuery
    from pytorch_privacy.optimizer import DPGaussianOptimizer, DPOptimizer

    class OwnRelease(GaussianAverageQuery):
        def get_noised_result(self, sample_state, global_state):
            return super().get_noised_result(sample_state, global_state)

    if fsdp:
        from torch.distributed.fsdp import fully_shard

        model = fully_shard(inner)
    else:
        model = nn.parallel.DistributedDataParallel(inner)
    sgd = torch.optim.SGD(model.parameters() if fsdp else inner.parameters(), lr=lr)
    if general:
        return model, DPOptimizer(sgd, model, loss_fn(), OwnRelease(clip, sigma * clip, denominator), ledger=ledger,
                                  data_loader=data_loader)
    return model, DPGaussianOptimizer(sgd, model, loss_fn(), l2_norm_clip=clip, noise_multiplier=sigma, ledger=ledger,
                                      expected_batch_size=denominator, data_loader=data_loader)


def resume_from_rank0(rank, world, port, out_dir, fresh_optimizer, fsdp=False, fresh_randomness=False, general=False):
    """Every rank resumes from *rank 0's* checkpoint (one file saved by rank 0, loaded everywhere),
    then takes one noise-only step.  Owned (OS-seeded) generators restored from one state would give
    every block (shard) the same noise: the step must be refused on every rank, with nothing applied
    or recorded.  ``fresh_optimizer``: load into a newly built optimizer (as after a restart) rather
    than the one that saved; ``general``: a query with its own ``get_noised_result``."""
    from pytorch_privacy.dp_query import PrivacyLedger

    def build():
        torch.manual_seed(0)
        return private_setup(nn.Linear(100, 50), fsdp=fsdp, general=general, clip=1.0, sigma=2.0, denominator=10.0,
                             ledger=PrivacyLedger(100, 0.1), lr=1.0)

    empty = (torch.zeros(0, 100), torch.zeros(0, dtype=torch.long))
    model, opt = build()
    opt.fit_batch(*empty)
    box = [opt.state_dict() if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    if fresh_optimizer:
        model, opt = build()
    out = os.path.join(out_dir, f"update{rank}.pt")
    if rank:  # as a checkpoint that names no rank (one process's, or an older one): the load itself
        box[0] = dict(box[0], distributed=None)  # refuses another rank's (see swapped_checkpoints)
    opt.load_state_dict(box[0], fresh_randomness=fresh_randomness)
    before, steps = _full_params(model), opt.ledger.steps
    try:
        opt.fit_batch(*empty)
    except ValueError as exc:
        torch.save({"error": str(exc), "changed": bool((_full_params(model) != before).any()),
                    "recorded": opt.ledger.steps - steps}, out)
        return
    torch.save({"update": _full_params(model) - before}, out)


def swapped_checkpoints(rank, world, port, out_dir):
    """Rank r loads rank 1 - r's checkpoint (e.g. files named by LOCAL_RANK on two nodes): refused
    on both ranks (rank 0 would get rank 1's empty ledger)."""
    from pytorch_privacy.dp_query import PrivacyLedger
    from pytorch_privacy.optimizer import DPGaussianOptimizer

    model = nn.parallel.DistributedDataParallel(make_model())
    opt = DPGaussianOptimizer(torch.optim.SGD(model.module.parameters(), lr=0.1), model, loss_fn(), l2_norm_clip=1.0,
                              noise_multiplier=1.0, ledger=PrivacyLedger(80, 0.1))
    x, y = make_batches(1)[0]
    opt.fit_batch(x[rank * 4:(rank + 1) * 4], y[rank * 4:(rank + 1) * 4])
    states: list = [None] * world
    dist.all_gather_object(states, opt.state_dict())
    result = {}
    try:
        opt.load_state_dict(states[1 - rank])
    except ValueError as exc:
        result["error"] = str(exc)
    opt.load_state_dict(states[rank])  # its own: fine
    result["steps"] = opt.ledger.steps
    torch.save(result, os.path.join(out_dir, f"swap{rank}.pt"))


def unlike_settings(rank, world, port, out_dir, what, fsdp=False):
    """Rank 1 builds its optimizer with another noise multiplier, clip or denominator (``what``)
    than rank 0, whose ledger accounts for its own; one step on real examples.  ``what``:
    ``"noise"``, ``"clip"``, ``"denominator"``, ``"clip-general"`` (a query with its own
    ``get_noised_result``: the general path), or ``"none"`` (alike: the step goes through)."""
    from pytorch_privacy.dp_query import PrivacyLedger

    odd = rank == 1
    torch.manual_seed(0)
    model, opt = private_setup(
        make_model(), fsdp=fsdp, general=what == "clip-general", clip=2.0 if odd and what.startswith("clip") else 1.0,
        sigma=0.5 if odd and what == "noise" else 1.0, denominator=16.0 if odd and what == "denominator" else 8.0,
        ledger=PrivacyLedger(80, 0.1), lr=0.1,
    )
    before = _full_params(model)
    x, y = make_batches(1)[0]
    result = {}
    try:
        opt.fit_batch(x[rank * 4:(rank + 1) * 4], y[rank * 4:(rank + 1) * 4])
    except ValueError as exc:
        result["error"] = str(exc)
    result.update(changed=bool((_full_params(model) != before).any()), recorded=opt.ledger.steps)
    torch.save(result, os.path.join(out_dir, f"unlike{rank}.pt"))


def loader_kinds(rank, world, port, out_dir, fsdp):
    """Build a DP optimizer on a DDP (or FSDP2) model with each kind of data loader; saves the
    error (or ``None``) per kind."""
    from torch.utils.data import DataLoader, TensorDataset

    from pytorch_privacy.optimizer import DPDataLoader
    from pytorch_privacy.optimizer.distributed import DistributedDPDataLoader

    data = TensorDataset(torch.randn(40, 6), torch.randint(0, 3, (40,)))
    kinds = {
        "dp-loader": lambda: DPDataLoader(data, 0.25),
        "shuffle": lambda: DataLoader(data, batch_size=4, shuffle=True),
        "distributed-as-one": lambda: DistributedDPDataLoader(data, 0.25, rank=0, world_size=1),
        "distributed": lambda: DistributedDPDataLoader(data, 0.25),
    }
    from pytorch_privacy.optimizer import DPGaussianOptimizer

    errors = {}
    for kind, make in kinds.items():
        torch.manual_seed(0)
        inner = make_model()
        if fsdp:
            from torch.distributed.fsdp import fully_shard

            model = fully_shard(inner)
        else:
            model = nn.parallel.DistributedDataParallel(inner)
        try:
            DPGaussianOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, loss_fn(), l2_norm_clip=1.0,
                                noise_multiplier=1.0, data_loader=make())
            errors[kind] = None
        except ValueError as exc:
            errors[kind] = str(exc)
    torch.save(errors, os.path.join(out_dir, f"loaders{rank}.pt"))


def make_private_loop(rank, world, port, out_dir, fsdp=False):
    """``make_private`` on a DDP model (``fsdp``: a ``fully_shard`` one) over 2 ranks, in an
    unchanged loop (forward, criterion, backward, step): a loader of 8 per rank over 64 examples is
    a global Poisson sample at q = 2 * 8 / 64; saves each step's global indices, the ledger and the
    parameters."""
    from torch.utils.data import DataLoader, TensorDataset

    from pytorch_privacy import make_private

    n = 64
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 6, generator=g)
    x[:, 0] = torch.arange(n, dtype=x.dtype)  # the example's index rides along in feature 0
    data = TensorDataset(x, torch.randint(0, 3, (n,), generator=g))
    torch.manual_seed(0)
    if fsdp:
        from ._fsdp_workers import shard

        model = shard(make_model())
    else:
        model = nn.parallel.DistributedDataParallel(make_model())
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt, loader = make_private(model, sgd, DataLoader(data, batch_size=8), criterion=nn.CrossEntropyLoss(),
                                      max_grad_norm=1.0, noise_multiplier=1.0)
    steps = []
    for xb, yb in loader:
        opt.zero_grad()
        nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()
        parts: list = [None] * world
        dist.all_gather_object(parts, xb[:, 0].long().tolist())
        steps.append(parts)
    torch.save({"kind": type(loader).__name__, "q": loader.sample_rate, "len": len(loader), "steps": steps,
                "grad_sync": getattr(model, "require_backward_grad_sync", None),
                "ledger_steps": opt.ledger.steps, "ledger_q": opt.ledger.selection_probability,
                "ledger_n": opt.ledger.population_size,
                "params": _full_params(model)},
               os.path.join(out_dir, f"mp{rank}.pt"))


def _full_params(model) -> torch.Tensor:
    """Every parameter element (FSDP2 shards gathered), flat."""
    parts = []
    for p in model.parameters():
        t = p.detach()
        if hasattr(t, "full_tensor"):
            t = t.full_tensor()
        parts.append(t.reshape(-1).clone())
    return torch.cat(parts)


def frozen_model() -> nn.Module:
    """:func:`make_model`'s kind with a frozen first layer and, in a trained layer, a frozen bias
    (a LoRA-like mix of trained and frozen parameters)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    model[0].requires_grad_(False)
    model[2].bias.requires_grad_(False)
    return model


def train_frozen(model, engine: str, rank: int = 0, world: int = 1, sigma: float = 0.0, steps: int = 3):
    """``steps`` DP steps on :func:`make_batches` with the optimizer over the trainable parameters
    only, after the user's ``zero_grad()`` each; rank ``r`` of ``world`` takes its share of each batch."""
    from pytorch_privacy.optimizer import DPGaussianOptimizer

    opt = DPGaussianOptimizer(
        torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5), model, loss_fn(),
        l2_norm_clip=0.3, noise_multiplier=sigma, expected_batch_size=8, engine=engine,
    )
    for x, y in make_batches(steps):
        k = len(x) // world
        opt.zero_grad()
        opt.fit_batch(x[rank * k : (rank + 1) * k], y[rank * k : (rank + 1) * k])
    return opt


def frozen_params(rank, world, port, out_dir, fsdp):
    """Frozen parameters (:func:`frozen_model`) under DDP (or FSDP2): per engine, the parameters
    after 3 noise-free steps, and before and after one noisy step."""
    out = {}
    for engine in ("ghost", "functorch"):
        model = frozen_model()
        if fsdp:
            from ._fsdp_workers import shard

            model = shard(model)
        else:
            model = nn.parallel.DistributedDataParallel(model)
        train_frozen(model, engine, rank, world)
        before = _full_params(model)
        train_frozen(model, engine, rank, world, sigma=1.0, steps=1)
        out[engine] = {"trained": before, "noisy": _full_params(model)}
    torch.save(out, os.path.join(out_dir, f"frozen{rank}.pt"))


def shared_sampling(rank, world, port, out_dir, fsdp, general):
    """The loader's sampling generator reseeded by hand after construction: with one seed on every
    rank (``same``; ``unseen``: the same, with the optimizer not given the loader) and with a seed
    per rank (``own``); each takes one step of the loader's first batch.  Saves per case the error
    (or ``None``), whether the parameters changed and the ledger's step count."""
    from torch.utils.data import TensorDataset

    from pytorch_privacy.dp_query import PrivacyLedger
    from pytorch_privacy.optimizer.distributed import DistributedDPDataLoader

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(40, 6, generator=g), torch.randint(0, 3, (40,), generator=g))
    out = {}
    for case in ("same", "own", "unseen"):
        loader = DistributedDPDataLoader(data, 0.25)  # OS-seeded: passes the construction check
        torch.manual_seed(0)
        unseen = case == "unseen"
        model, opt = private_setup(make_model(), fsdp=fsdp, general=general, clip=1.0, sigma=1.0, denominator=10.0,
                                   ledger=PrivacyLedger(40, 0.25) if unseen else None, lr=0.5,
                                   data_loader=None if unseen else loader)
        loader.poisson_sampler.random.torch_generator("cpu").manual_seed(7 if case != "own" else 7 + rank)
        before = _full_params(model)
        error = None
        try:
            x, y = next(iter(loader))
            opt.fit_batch(x, y)
        except ValueError as exc:
            error = str(exc)
        out[case] = {"error": error, "changed": not torch.equal(_full_params(model), before),
                     "recorded": opt.ledger.steps}
    torch.save(out, os.path.join(out_dir, f"sampling{rank}.pt"))
