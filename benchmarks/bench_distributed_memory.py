"""Memory of an FSDP2 (or DDP) DP step on CPU (gloo, 2 processes): the release's clipped sums
formed and reduced one bucket (DDP: one parameter) at a time, against forming the whole model's
clipped sum first.

Every rank shards an MLP of ``--layers`` square Linear layers of width ``--width`` (each Linear a
``fully_shard`` unit, then the root) and trains ``--steps`` steps of ``--batch-size`` examples per
rank, the modes interleaved in the same processes:

* ``non-private``: FSDP2's own backward (``loss.mean().backward()``: per-unit reduce-scatters).
* ``dp``: ``DPGaussianOptimizer`` (ghost engine, per-unit steps) with the default release: each
  parameter's clipped sum is formed when its bucket (``FSDPStep.bucket_bytes``, ``--bucket-mib``)
  is reduce-scattered (``distributed/sharded_release.py``).
* ``dp full sums``: the same with ``defers_sums = False`` and one bucket for the whole model: the
  whole clipped sum is formed at each flush, accumulated over the physical chunks and
  reduce-scattered at once at the release (the release before the bucketed one).

``--physical k`` splits each rank's batch into physical chunks of ``k`` (``max_physical_batch_size``):
the ``dp`` mode then reduce-scatters after every chunk.

``--wrap ddp``: the model is a ``DistributedDataParallel`` replica instead (non-private: DDP's own
backward and all-reduce); ``dp`` forms each parameter's clipped sum into the step's flat
all-reduce buffer at the release, ``dp full sums`` (``defers_sums = False`` on the step) forms the
whole clipped sum at the flush and copies it into the buffer.

Reported per mode, on rank 0: the step time (median over the steps after the first two), and the
peak bytes torch's CPU allocator held during one step above what it held when the step began
(:func:`common.peak_step_memory`: the allocator's events recorded by ``torch.profiler``).  For
scale: the model's parameters in fp32 (full, unsharded) are printed too.

Usage::

    python benchmarks/bench_distributed_memory.py [--width 1536] [--layers 4] [--batch-size 16]
        [--steps 6] [--bucket-mib 8] [--physical K] [--wrap fsdp|ddp]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import peak_step_memory  # noqa: E402


def _make_model(width: int, layers: int) -> nn.Module:
    torch.manual_seed(0)
    mods: list[nn.Module] = []
    for i in range(layers):
        mods += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*mods[:-1])


def _shard(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for m in model:
        if isinstance(m, nn.Linear):
            fully_shard(m)
    fully_shard(model)
    return model


def _rank_main(rank: int, world: int, port: int, args: dict, out: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from pytorch_privacy.optimizer import DPGaussianOptimizer

        width, layers, b = args["width"], args["layers"], args["batch_size"]
        g = torch.Generator().manual_seed(100 + rank)
        x, y = torch.randn(b, width, generator=g), torch.randint(0, width, (b,), generator=g)

        def loss_fn(out, target):
            return F.cross_entropy(out, target, reduction="none")

        ddp = args["wrap"] == "ddp"

        def wrap(m):
            return nn.parallel.DistributedDataParallel(m) if ddp else _shard(m)

        plain = wrap(_make_model(width, layers))
        plain_opt = torch.optim.SGD(plain.parameters(), lr=0.01)

        def plain_step():
            plain_opt.zero_grad(set_to_none=True)
            loss_fn(plain(x), y).mean().backward()
            plain_opt.step()

        def dp(sharded: bool):
            model = wrap(_make_model(width, layers))
            params = (model.module if ddp else model).parameters()
            opt = DPGaussianOptimizer(
                torch.optim.SGD(params, lr=0.01), model, loss_fn, l2_norm_clip=1.0,
                noise_multiplier=1.0, expected_batch_size=b * world, engine="ghost",
                generator=torch.Generator().manual_seed(1000 + rank), max_physical_batch_size=args["physical"],
            )
            step = opt.distributed_step
            step.defers_sums = sharded  # (DDP: an instance setting over the class default)
            if not ddp:
                step.bucket_bytes = int(args["bucket_mib"] * 2**20) if sharded else 2**62
            return lambda: opt.fit_batch(x, y), step

        dp_step, dp_state = dp(True)
        full_step, full_state = dp(False)
        modes = {"non-private": plain_step, "dp": dp_step, "dp full sums": full_step}
        times: dict[str, list[float]] = {m: [] for m in modes}
        for i in range(args["steps"]):
            for mode, fn in modes.items():
                dist.barrier()
                t0 = time.perf_counter()
                fn()
                if i >= 2:
                    times[mode].append(time.perf_counter() - t0)
        peaks = {}
        for mode, fn in modes.items():  # two steps each (the profiler's warm-up and the measured one)
            dist.barrier()
            peaks[mode] = peak_step_memory(fn, torch.device("cpu")) / 2**20
        if rank == 0:
            params = sum(p.numel() for p in _make_model(width, layers).parameters())
            with open(out, "w") as f:
                json.dump({"times": times, "peaks": peaks, "params": params,
                           "paths": [getattr(dp_state, "last_path", None), getattr(full_state, "last_path", None)]}, f)
    finally:
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=1536, help="width of the square Linear layers")
    p.add_argument("--layers", type=int, default=4, help="number of Linear layers (FSDP2 units)")
    p.add_argument("--batch-size", type=int, default=16, help="examples per rank and step")
    p.add_argument("--steps", type=int, default=6, help="steps per mode (the first two are not counted)")
    p.add_argument("--bucket-mib", type=float, default=8.0, help="FSDPStep.bucket_bytes of the dp mode, in MiB")
    p.add_argument("--physical", type=int, default=None, help="max_physical_batch_size of the DP modes (chunks per step)")
    p.add_argument("--wrap", choices=["fsdp", "ddp"], default="fsdp", help="FSDP2 shards or DDP replicas")
    args = vars(p.parse_args(argv))
    if args["steps"] < 3:
        p.error("--steps must be at least 3 (the first two are warm-up)")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        torch.multiprocessing.spawn(_rank_main, args=(2, _free_port(), args, out), nprocs=2, join=True)
        with open(out) as f:
            res = json.load(f)
    full_mib = res["params"] * 4 / 2**20
    fsdp = args["wrap"] == "fsdp"
    print(f"{'FSDP2' if fsdp else 'DDP'} on 2 CPU ranks (gloo): {args['layers']} x Linear({args['width']}, {args['width']}), "
          f"{res['params']:,} parameters ({full_mib:.1f} MiB in fp32"
          + (f", {full_mib / 2:.1f} MiB per shard" if fsdp else "") + f"); {args['batch_size']} examples per rank "
          f"(physical chunks of {args['physical'] or args['batch_size']})"
          + (f"; bucket {args['bucket_mib']:g} MiB; paths of the last dp steps: {res['paths']}" if fsdp else ""))
    print(f"{'mode':>14}  {'ms/step':>8}  {'peak MiB above start':>21}")
    for mode in res["times"]:
        ms = statistics.median(res["times"][mode]) * 1e3
        print(f"{mode:>14}  {ms:8.1f}  {res['peaks'][mode]:21.1f}")
    d, f = res["peaks"]["dp"], res["peaks"]["dp full sums"]
    print(f"dp / dp full sums peak: {d / f:.2f}  (rank 0; times: median over {len(res['times']['dp'])} steps)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
