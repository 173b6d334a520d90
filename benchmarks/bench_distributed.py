"""Data-parallel DP-SGD on CPU (gloo): W=1 vs W=2 processes, private vs non-private.

Each configuration spawns ``W`` processes (gloo on 127.0.0.1, one thread each); a global batch of
``--batch-size`` examples is split evenly across the ranks, and two steps are timed interleaved
(median over ``--steps`` steps after ``--warmup``):

* ``non-private``: forward through the ``DistributedDataParallel`` model, ``loss.mean().backward()``
  (DDP all-reduces the gradients in buckets during the backward), ``SGD.step()``.
* ``dp``: ``DPGaussianOptimizer(ddp_model, ...).fit_batch`` with the chosen engine: per-example
  gradients of the local share, clip and sum locally, one all-reduce of the flat clipped sums,
  noise on rank 0, one broadcast of the release, ``SGD.step()``.

Reduction volume per step is what each rank hands to the collectives: for ``dp`` the flat buffer
of the all-reduce (sums + 3 counters) plus the broadcast release
(``DistributedStep.last_volume_bytes``); for ``non-private`` the gradient bytes DDP all-reduces.

Usage::

    python benchmarks/bench_distributed.py [--worlds 1 2] [--batch-size 256] [--steps 20]
        [--warmup 3] [--engine ghost] [--hidden 256]
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


def per_example_ce(out, y):
    """Per-example cross-entropy."""
    return F.cross_entropy(out, y, reduction="none")


def make_model(hidden: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, args: dict, out: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from pytorch_privacy.optimizer import DPGaussianOptimizer

        local = args["batch_size"] // world
        g = torch.Generator().manual_seed(100 + rank)
        x, y = torch.randn(local, 784, generator=g), torch.randint(0, 10, (local,), generator=g)

        plain = nn.parallel.DistributedDataParallel(make_model(args["hidden"]))
        plain_opt = torch.optim.SGD(plain.parameters(), lr=0.01)

        def plain_step():
            plain_opt.zero_grad(set_to_none=True)
            per_example_ce(plain(x), y).mean().backward()
            plain_opt.step()

        private = nn.parallel.DistributedDataParallel(make_model(args["hidden"]))
        dp_opt = DPGaussianOptimizer(
            torch.optim.SGD(private.module.parameters(), lr=0.01), private, per_example_ce, l2_norm_clip=1.0,
            noise_multiplier=1.0, expected_batch_size=args["batch_size"], engine=args["engine"],
        )

        def dp_step():
            dp_opt.fit_batch(x, y)

        times = {"non-private": [], "dp": []}
        for i in range(args["warmup"] + args["steps"]):
            for name, fn in (("non-private", plain_step), ("dp", dp_step)):
                dist.barrier()
                t0 = time.perf_counter()
                fn()
                dist.barrier()
                if i >= args["warmup"]:
                    times[name].append(time.perf_counter() - t0)
        n_params = sum(p.numel() for p in plain.parameters())
        if rank == 0:
            with open(out, "w") as f:
                json.dump({
                    "times": times,
                    "dp_volume": dp_opt._dist.last_volume_bytes,
                    "ddp_volume": n_params * 4,
                    "params": n_params,
                }, f)
    finally:
        dist.destroy_process_group()


def run(world: int, args: dict) -> dict:
    """Spawn ``world`` processes and return rank 0's measurements."""
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "result.json")
        torch.multiprocessing.spawn(_rank_main, args=(world, _free_port(), args, out), nprocs=world, join=True)
        with open(out) as f:
            return json.load(f)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2], help="numbers of processes to compare")
    p.add_argument("--batch-size", type=int, default=256, help="global batch size (split across ranks)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per mode")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--engine", default="ghost", help="per-example gradient engine of the DP step")
    p.add_argument("--hidden", type=int, default=256, help="width of the MLP's hidden layers")
    ns = p.parse_args(argv)
    args = {k: getattr(ns, k) for k in ("batch_size", "steps", "warmup", "engine", "hidden")}
    print(f"MLP 784-{ns.hidden}-{ns.hidden}-10, global batch {ns.batch_size}, engine {ns.engine}, gloo on CPU, "
          f"1 thread per rank, {os.cpu_count()} CPUs visible")
    print(f"{'W':>2} {'non-private ms':>15} {'dp ms':>9} {'dp/non-private':>15} {'DDP bytes/step':>15} {'dp bytes/step':>14}")
    for world in ns.worlds:
        r = run(world, args)
        npv = statistics.median(r["times"]["non-private"]) * 1e3
        dpv = statistics.median(r["times"]["dp"]) * 1e3
        ddp_bytes = r["ddp_volume"] if world > 1 else 0
        print(f"{world:>2} {npv:>15.2f} {dpv:>9.2f} {dpv / npv:>15.2f} {ddp_bytes:>15,d} {r['dp_volume']:>14,d}")
    print("bytes/step: what each rank hands to the collectives (both skip them at W=1; at W>1 the DP step "
          "all-reduces the clipped sums once and broadcasts rank 0's noised release once)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
