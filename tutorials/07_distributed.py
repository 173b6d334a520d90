# %% [markdown]
# # Data-parallel DP-SGD on `torch.distributed` (DDP, FSDP2), bf16 autocast and fp16 loss scaling
#
# Several processes (ranks) train one model together.  Each rank
#
# 1. loads **its share of a global Poisson sample** (`DistributedDPDataLoader`: rank `r` of `W`
#    owns the examples `i` with `i % W == r` and draws each with probability `q`),
# 2. computes and **clips the per-example gradients of its own examples** and sums them,
#
# then, once per logical step, each rank adds the Gaussian noise `N(0, (sigma C)^2)` to **its own
# block** of the flat sums (the blocks partition the coordinates, so every coordinate is noised
# **once**, by one rank), the sums are **all-reduced once**, every replica applies the same
# update, and **rank 0 records the step once** in the ledger with the global `q`.  The world
# releases exactly what one process holding the global batch would release, so the epsilon of a
# run does not depend on `W` (see `docs/distributed.md`).
#
# On a cluster you launch the script below with `torchrun`, one process per GPU or per CPU slot:
#
# ```bash
# torchrun --standalone --nproc_per_node=2 tutorials/07_distributed.py
# ```
#
# Run as a plain script (as the test suite does), it spawns two CPU processes itself with the
# `gloo` backend.

# %%
import os
import sys
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from pytorch_privacy.optimizer import DPGaussianOptimizer, PrivacyBudgetExceeded
from pytorch_privacy.optimizer.distributed import DistributedDPDataLoader

FAST = os.environ.get("TUTORIAL_FAST") == "1"  # CI runs the tutorials with fewer steps
N, Q, EPOCHS = 2000, 0.05, (2 if FAST else 5)
CLIP, SIGMA, TARGET_EPS, DELTA = 1.0, 1.0, 2.5, 1e-5  # the budget ends training early


def make_data():
    """Two Gaussian blobs in 10 dimensions (the same global dataset on every rank)."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (N,), generator=g)
    x = torch.randn(N, 10, generator=g) + 1.5 * (2 * y[:, None] - 1) * torch.linspace(1, 0.1, 10)
    return TensorDataset(x, y)


def per_example_ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


# %% [markdown]
# ## One rank's training loop
#
# Everything a rank does; `torchrun` runs this in every process.  Note what is *global*: the
# dataset given to the loader (each rank only loads its share), `q`, the ledger's `N`, and the
# denominator `q N` of the average, which the optimizer takes from the loader.


# %%
def build(rank: int, world: int, device: torch.device):
    """The loader, model and optimizer of one rank (the same on every rank but for the seed)."""
    loader = DistributedDPDataLoader(make_data(), Q, steps=EPOCHS * round(1 / Q))  # rank/world from the group
    torch.manual_seed(0)  # DDP broadcasts rank 0's initial weights anyway
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 2)).to(device)
    model = nn.parallel.DistributedDataParallel(model)
    opt = DPGaussianOptimizer(
        torch.optim.SGD(model.module.parameters(), lr=0.5), model, per_example_ce,
        l2_norm_clip=CLIP, noise_multiplier=SIGMA, data_loader=loader,
        target_epsilon=TARGET_EPS, target_delta=DELTA, engine="ghost",
        # reproducible tutorial; each rank noises its own block, so the seeds must differ across ranks
        generator=torch.Generator().manual_seed(19 * world + rank),
    )
    return loader, model, opt


def train(rank: int, world: int, ckpt_dir: str, device: torch.device = torch.device("cpu")) -> dict:
    data = make_data()
    loader, model, opt = build(rank, world, device)
    local_sizes, stopped = [], False
    for x, y in loader:
        local_sizes.append(x.shape[0])  # may be 0: the rank still joins the step
        try:
            opt.fit_batch(x.to(device), y.to(device))
        except PrivacyBudgetExceeded:  # decided on rank 0, raised on every rank together
            stopped = True
            break
    # every replica holds the same weights
    flat = torch.cat([p.detach().reshape(-1) for p in model.module.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    assert all(torch.equal(gathered[0], t) for t in gathered)
    x, y = data.tensors
    acc = (model.module(x.to(device)).argmax(1).cpu() == y).float().mean().item()
    return {
        "steps": opt.steps, "ledger_steps": opt.ledger.steps, "stopped": stopped, "accuracy": acc,
        "mean_local_batch": sum(local_sizes) / max(len(local_sizes), 1),
        "epsilon": opt.epsilon if rank == 0 else None, "denominator": opt.denominator,
        **checkpoint_and_resume(rank, world, model, opt, ckpt_dir, device),
    }


# %% [markdown]
# ## Checkpoints: one per rank
#
# Every rank saves its own checkpoint, named by its *global* rank: rank 0's holds the ledger, and
# each rank's holds its own noise stream and sampler state.  A restarted run builds the same objects
# and loads its own file.  Loading another rank's file is refused (rank 0 would get rank 1's empty
# ledger; two ranks restoring one noise stream would noise their blocks alike), and so is a step
# whose ranks' generators stand in the same state, whatever the cause.


# %%
def checkpoint_and_resume(rank: int, world: int, model, opt, ckpt_dir: str, device: torch.device) -> dict:
    path = os.path.join(ckpt_dir, f"ckpt_rank{rank}.pt")
    torch.save({"model": model.module.state_dict(), "opt": opt.state_dict()}, path)
    dist.barrier()  # every file written
    _, model2, opt2 = build(rank, world, device)  # as after a restart
    state = torch.load(path, weights_only=True)
    model2.module.load_state_dict(state["model"])
    opt2.load_state_dict(state["opt"])  # the ledger, the budget's account and the noise stream go on
    refusal = None
    if rank == 1:  # rank 0's file on rank 1: refused, nothing changed
        try:
            opt2.load_state_dict(torch.load(os.path.join(ckpt_dir, "ckpt_rank0.pt"), weights_only=True)["opt"])
        except ValueError as exc:
            refusal = str(exc)
    return {"resumed_ledger_steps": opt2.ledger.steps, "refusal": refusal}


# %% [markdown]
# ## Launching: `torchrun`, or two local CPU processes
#
# Under `torchrun` the environment carries `RANK`, `WORLD_SIZE`, `MASTER_ADDR` and `MASTER_PORT`.
# Without it we spawn the processes ourselves on 127.0.0.1 with `gloo` (CPU).  Each process calls
# `destroy_process_group` when it is done.


# %%
def _worker(rank: int, world: int, port: int, results, ckpt_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results[rank] = train(rank, world, ckpt_dir)
        dist.barrier()  # both ranks done with their collectives before gloo is torn down
    finally:
        dist.destroy_process_group()


def launch_local(world: int = 2) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manager = torch.multiprocessing.get_context("spawn").Manager()
    results = manager.dict()
    with tempfile.TemporaryDirectory() as ckpt_dir:
        torch.multiprocessing.spawn(_worker, args=(world, port, results, ckpt_dir), nprocs=world, join=True)
    return [results[r] for r in range(world)]


# %% [markdown]
# ## Run it and check the accounting
#
# Rank 0's ledger holds one entry per step with the global `q`; rank 1 records nothing.  The
# budget stopped both ranks at the same step.

# %%
if __name__ == "__main__":
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # launched by torchrun
        cuda = torch.cuda.is_available()
        dist.init_process_group("nccl" if cuda else "gloo")
        # one GPU per process: LOCAL_RANK (the rank on this machine) picks it, not the global rank
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        try:
            os.makedirs("checkpoints", exist_ok=True)  # on a file system every node sees
            out = train(dist.get_rank(), dist.get_world_size(), "checkpoints", device)
            # one write per line: the ranks share stdout, and two writes (text, then newline) can interleave
            sys.stdout.write(f"rank {dist.get_rank()}: {out}\n")
            sys.stdout.flush()
        finally:
            dist.destroy_process_group()
    else:
        r0, r1 = launch_local(2)
        print(f"rank 0: {r0}\nrank 1: {r1}")
        assert r0["steps"] == r1["steps"] == r0["ledger_steps"] > 0
        assert r1["ledger_steps"] == 0  # the step is recorded once, on rank 0
        assert r0["stopped"] and r1["stopped"]  # the budget refused the same step on both ranks
        assert r0["epsilon"] <= TARGET_EPS
        assert r0["denominator"] == r1["denominator"] == Q * N  # the global q N
        # each rank loads about half of the expected global batch q N = 100
        assert 35 < r0["mean_local_batch"] < 65 and 35 < r1["mean_local_batch"] < 65
        assert r0["accuracy"] == r1["accuracy"] > 0.8
        assert r0["resumed_ledger_steps"] == r0["ledger_steps"] and r1["resumed_ledger_steps"] == 0
        assert "saved by rank 0 of 2" in r1["refusal"]
        print(f"epsilon {r0['epsilon']:.3f} after {r0['steps']} steps, accuracy {r0['accuracy']:.3f}")

# %% [markdown]
# ## Mixed precision: bf16 autocast
#
# Wrap the step in `torch.autocast`: the forward and the per-example backward run in bf16, while
# norms, clip coefficients, the clipped sums and the noise stay in float32 (the optimizer disables
# autocast around them).  The step is the fp32 step up to bf16 rounding of the gradients.

# %%
if __name__ == "__main__":
    data = make_data()
    x, y = data.tensors[0][:64], data.tensors[1][:64]
    params = {}
    for use_bf16 in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 2))
        opt = DPGaussianOptimizer(torch.optim.SGD(model.parameters(), lr=0.5), model, per_example_ce,
                                  l2_norm_clip=CLIP, noise_multiplier=0.0, expected_batch_size=64, engine="ghost")
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
            norms = opt.per_example_gradients(x, y).norms()
            opt.fit_batch(x, y)
        assert norms.dtype == torch.float32
        params[use_bf16] = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    diff = (params[True] - params[False]).abs().max().item()
    print(f"bf16 vs fp32 step: max parameter difference {diff:.2e}")
    assert diff < 1e-2

# %% [markdown]
# ## fp16: a static loss scale
#
# In fp16 small output gradients underflow, so the loss is scaled.  `DPLossScaler` runs
# `fit_batch` with the per-example losses times `s` and unscales norms and sums **before
# clipping**.  The scale stays a public constant (it never backs off on an overflow: that would
# make it depend on single records); a record that overflows is dropped and the step is still
# released and recorded.  (CPU autocast supports fp16 too, which is what runs here.)

# %%
if __name__ == "__main__":
    from pytorch_privacy.optimizer.distributed.precision import DPLossScaler

    fp = {}
    for use_fp16 in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 2))
        opt = DPGaussianOptimizer(torch.optim.SGD(model.parameters(), lr=0.5), model, per_example_ce,
                                  l2_norm_clip=CLIP, noise_multiplier=0.0, expected_batch_size=64, engine="ghost")
        if use_fp16:
            with torch.autocast("cpu", dtype=torch.float16):
                DPLossScaler(torch.amp.GradScaler("cpu", init_scale=2.0**10)).fit_batch(opt, x, y)
        else:
            opt.fit_batch(x, y)
        fp[use_fp16] = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    diff = (fp[True] - fp[False]).abs().max().item()
    print(f"fp16 (scale 1024) vs fp32 step: max parameter difference {diff:.2e}")
    assert diff < 1e-2

# %% [markdown]
# ## FSDP2: `fully_shard`
#
# The same loop on a model sharded with `torch.distributed.fsdp.fully_shard`.  The optimizer is
# built over the sharded (`DTensor`) parameters.  Each rank computes the per-example gradients of
# its own examples on the full-width layers (so each norm is already the norm over all shards);
# after the first step of an input shape, FSDP2 gathers one unit at a time, as in non-private
# training (`distributed_step.last_path == "per-unit"`).  The clipped sums are formed and
# reduce-scattered one bucket of parameters at a time (`distributed_step.bucket_bytes`, 32 MiB by
# default), so the whole model's clipped sum never lies in memory, and each rank noises **its own
# shard** before writing it into `.grad` (see `docs/distributed.md`).


# %%
def train_fsdp(rank: int, world: int) -> dict:
    from torch.distributed.fsdp import fully_shard

    data = make_data()
    loader = DistributedDPDataLoader(data, Q, steps=round(1 / Q))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 2))
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)
    opt = DPGaussianOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.5), model, per_example_ce, l2_norm_clip=CLIP,
        noise_multiplier=SIGMA, data_loader=loader, engine="ghost",
        generator=torch.Generator().manual_seed(23 * world + rank),  # one noise stream per shard
    )
    for x, y in loader:
        opt.fit_batch(x, y)
    full = {n: p.full_tensor() for n, p in model.named_parameters()}  # all-gather the shards
    x, y = data.tensors
    with torch.no_grad():
        h = torch.tanh(x @ full["0.weight"].T + full["0.bias"])
        acc = ((h @ full["2.weight"].T + full["2.bias"]).argmax(1) == y).float().mean().item()
    return {"steps": opt.steps, "ledger_steps": opt.ledger.steps, "accuracy": acc,
            "local_rows": model[0].weight.to_local().shape[0], "path": opt.distributed_step.last_path}


def _fsdp_worker(rank: int, world: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results[rank] = train_fsdp(rank, world)
        dist.barrier()
    finally:
        dist.destroy_process_group()


# %%
if __name__ == "__main__" and not ("RANK" in os.environ and "WORLD_SIZE" in os.environ):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = torch.multiprocessing.get_context("spawn").Manager().dict()
    torch.multiprocessing.spawn(_fsdp_worker, args=(2, port, results), nprocs=2, join=True)
    f0, f1 = results[0], results[1]
    print(f"FSDP2 rank 0: {f0}\nFSDP2 rank 1: {f1}")
    assert f0["local_rows"] == f1["local_rows"] == 16  # each rank holds half of the 32 rows
    assert f0["steps"] == f1["steps"] == f0["ledger_steps"] == round(1 / Q) and f1["ledger_steps"] == 0
    assert f0["accuracy"] == f1["accuracy"] > 0.8
    assert f0["path"] == f1["path"] == "per-unit"  # the last step gathered one unit at a time
