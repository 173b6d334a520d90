"""Data-parallel DP-SGD on CPU (gloo): W=1 vs W=2 processes, private vs non-private.

Each configuration spawns ``W`` processes (gloo on 127.0.0.1, one thread each); a global batch of
``--batch-size`` examples is split evenly across the ranks, and two steps are timed interleaved
(median over ``--steps`` steps after ``--warmup``):

* ``non-private``: forward through the ``DistributedDataParallel`` model, ``loss.mean().backward()``
  (DDP all-reduces the gradients in buckets during the backward), ``SGD.step()``.
* ``dp``: ``DPGaussianOptimizer(ddp_model, ...).fit_batch`` with the chosen engine: per-example
  gradients of the local share, clip and sum locally, each rank noises its own block of the flat
  sums, one all-reduce, ``SGD.step()`` (the one-collective step, see ``distributed/ddp.py``);
  the next step's block noise is drawn while the all-reduce is in flight.
* ``dp no-prefetch``: the same with ``distributed_step.prefetch_noise = False`` (each step draws
  its block noise before its all-reduce).
* ``dp-bcast``: the same through a query with its own ``get_noised_result`` (the generic path, and
  the DDP step before the block noise): all-reduce of the un-noised sums, rank 0 noises the whole
  global sum, a control broadcast and a broadcast of the release.
* with ``--loop``: ``loop`` is the step of ``make_private``'s unchanged loop on the DDP model (the
  user's forward and ``backward()``, whose gradients are discarded, then the DP step), with the
  gradient all-reduce of that backward switched off as ``make_private`` does
  (``require_backward_grad_sync = False``); ``loop grad-sync`` the same with DDP's all-reduce on.
* with ``--fsdp``: ``fsdp non-private`` (``fully_shard`` on each Linear and the root, plain
  backward), ``fsdp dp`` (``DPGaussianOptimizer`` on the FSDP2 model, per-unit steps: FSDP2
  gathers one unit at a time, a planning all-reduce, one reduce-scatter of the noised sums) and
  ``fsdp dp whole`` (the same with ``per_unit=False``: every unit unsharded once per step).  For
  these the peak number of parameter elements gathered at once on a rank (FSDP2 parameter groups
  unsharded at the same time, counted by wrapping FSDP2's ``_to_unsharded`` / ``_to_sharded``)
  and the path of the last step are printed too.

Two ratios are printed: ``x non-private`` divides the modes' median step times, ``paired`` is the
median over steps of each step's time over the non-private step timed just before it (the modes
run interleaved, so load from other processes on a shared machine mostly cancels in the pair).

Reduction volume per step is what each rank hands to the collectives: for the DP modes
``DistributedStep.last_volume_bytes``; for ``non-private`` the gradient bytes DDP all-reduces.

Usage::

    python benchmarks/bench_distributed.py [--worlds 1 2] [--batch-size 256] [--steps 20]
        [--warmup 3] [--engine ghost] [--hidden 256] [--fsdp] [--loop] [--repeats 1]
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

from pytorch_privacy.dp_query import GaussianAverageQuery


def per_example_ce(out, y):
    """Per-example cross-entropy."""
    return F.cross_entropy(out, y, reduction="none")


def make_model(hidden: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10))


class OwnReleaseQuery(GaussianAverageQuery):
    """A Gaussian average with its own ``get_noised_result`` (same numbers): takes the generic
    distributed path (rank 0 noises the global sum and broadcasts the release)."""

    def get_noised_result(self, sample_state, global_state):
        return super().get_noised_result(sample_state, global_state)


class _count_gathered:
    """Peak parameter elements gathered at once on this rank in a mode's latest step (FSDP2 groups between
    their ``_to_unsharded`` and ``_to_sharded``; wraps those two methods in this process)."""

    def __init__(self):
        from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

        self.live, self.peak, self.mode = {}, {}, None
        to_un, to_sh = FSDPParamGroup._to_unsharded, FSDPParamGroup._to_sharded

        def unsharded(group):
            if not group.is_unsharded and self.mode is not None:
                self.live[id(group)] = sum(fp.sharded_param.numel() for fp in group.fsdp_params)
                self.peak[self.mode] = max(self.peak.get(self.mode, 0), sum(self.live.values()))
            to_un(group)

        def sharded(group):
            self.live.pop(id(group), None)
            to_sh(group)

        FSDPParamGroup._to_unsharded, FSDPParamGroup._to_sharded = unsharded, sharded

    def measure(self, mode, fn):
        def run():  # the peak of the latest call (the first step of a signature is whole-model)
            self.mode, self.peak[mode] = mode, sum(self.live.values())
            try:
                fn()
            finally:
                self.mode = None

        return run


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
        from pytorch_privacy.optimizer import DPGaussianOptimizer, DPOptimizer

        local = args["batch_size"] // world
        g = torch.Generator().manual_seed(100 + rank)
        x, y = torch.randn(local, 784, generator=g), torch.randint(0, 10, (local,), generator=g)

        plain = nn.parallel.DistributedDataParallel(make_model(args["hidden"]))
        plain_opt = torch.optim.SGD(plain.parameters(), lr=0.01)

        def plain_step():
            plain_opt.zero_grad(set_to_none=True)
            per_example_ce(plain(x), y).mean().backward()
            plain_opt.step()

        def dp_optimizer(model, own_release=False):
            inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
            gen = torch.Generator().manual_seed(1000 + rank)
            if own_release:
                query = OwnReleaseQuery(1.0, 1.0, args["batch_size"], generator=gen)
                return DPOptimizer(torch.optim.SGD(inner.parameters(), lr=0.01), model, per_example_ce, query,
                                   engine=args["engine"])
            return DPGaussianOptimizer(
                torch.optim.SGD(inner.parameters(), lr=0.01), model, per_example_ce, l2_norm_clip=1.0,
                noise_multiplier=1.0, expected_batch_size=args["batch_size"], engine=args["engine"], generator=gen,
            )

        dp_opt = dp_optimizer(nn.parallel.DistributedDataParallel(make_model(args["hidden"])))
        bcast_opt = dp_optimizer(nn.parallel.DistributedDataParallel(make_model(args["hidden"])), own_release=True)
        eager_opt = dp_optimizer(nn.parallel.DistributedDataParallel(make_model(args["hidden"])))
        if world > 1:
            eager_opt.distributed_step.prefetch_noise = False
        modes = {
            "non-private": plain_step,
            "dp": lambda: dp_opt.fit_batch(x, y),
            "dp no-prefetch": lambda: eager_opt.fit_batch(x, y),
            "dp-bcast": lambda: bcast_opt.fit_batch(x, y),
        }
        if args["loop"]:  # make_private's unchanged loop: the user's forward and backward, then the private step
            loop_model = nn.parallel.DistributedDataParallel(make_model(args["hidden"]))
            sync_model = nn.parallel.DistributedDataParallel(make_model(args["hidden"]))
            loop_opt, sync_opt = dp_optimizer(loop_model), dp_optimizer(sync_model)
            if world > 1:
                loop_model.require_backward_grad_sync = False  # as make_private sets it

            def loop_step(model, opt):
                opt.zero_grad()
                per_example_ce(model(x), y).mean().backward()
                opt.fit_batch(x, y)

            modes["loop"] = lambda: loop_step(loop_model, loop_opt)
            modes["loop grad-sync"] = lambda: loop_step(sync_model, sync_opt)
        volumes = {}
        if args["fsdp"]:
            from torch.distributed.fsdp import fully_shard

            def sharded():
                m = make_model(args["hidden"])
                for sub in m:
                    if isinstance(sub, nn.Linear):
                        fully_shard(sub)
                return fully_shard(m)

            fsdp_plain = sharded()
            fsdp_plain_opt = torch.optim.SGD(fsdp_plain.parameters(), lr=0.01)

            def fsdp_plain_step():
                fsdp_plain_opt.zero_grad(set_to_none=True)
                per_example_ce(fsdp_plain(x), y).mean().backward()
                fsdp_plain_opt.step()

            fsdp_opt = dp_optimizer(sharded())
            fsdp_whole = dp_optimizer(sharded())
            fsdp_whole.distributed_step.per_unit = False
            gathered = _count_gathered()
            modes["fsdp non-private"] = fsdp_plain_step
            modes["fsdp dp"] = gathered.measure("fsdp dp", lambda: fsdp_opt.fit_batch(x, y))
            modes["fsdp dp whole"] = gathered.measure("fsdp dp whole", lambda: fsdp_whole.fit_batch(x, y))

        times = {name: [] for name in modes}
        for i in range(args["warmup"] + args["steps"]):
            for name, fn in modes.items():
                dist.barrier()
                t0 = time.perf_counter()
                fn()
                dist.barrier()
                if i >= args["warmup"]:
                    times[name].append(time.perf_counter() - t0)
        volumes["dp"] = dp_opt.distributed_step.last_volume_bytes
        volumes["dp no-prefetch"] = eager_opt.distributed_step.last_volume_bytes if world > 1 else 0
        volumes["dp-bcast"] = bcast_opt.distributed_step.last_volume_bytes
        extra = {}
        if args["fsdp"]:
            for name, o in (("fsdp dp", fsdp_opt), ("fsdp dp whole", fsdp_whole)):
                volumes[name] = o.distributed_step.last_volume_bytes + o.distributed_step.last_plan_bytes
                extra[name] = (o.distributed_step.last_path, gathered.peak[name])
        n_params = sum(p.numel() for p in plain.parameters())
        volumes["non-private"] = n_params * 4 if world > 1 else 0
        if args["loop"]:  # with grad sync, the user's backward also all-reduces the gradient
            volumes["loop"] = loop_opt.distributed_step.last_volume_bytes
            volumes["loop grad-sync"] = sync_opt.distributed_step.last_volume_bytes + volumes["non-private"]
        if rank == 0:
            with open(out, "w") as f:
                json.dump({"times": times, "volumes": volumes, "params": n_params, "fsdp": extra}, f)
        # both ranks leave their last collective before either tears gloo down (tearing down while
        # the peer still talks to it aborts a rank now and then with SIGABRT)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # leave without the interpreter's teardown: gloo's threads destroyed during it abort a rank now
    # and then ("terminate called without an active exception") after rank 0 saved its results
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


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
    p.add_argument("--fsdp", action="store_true", help="also time FSDP2 (fully_shard) steps")
    p.add_argument("--loop", action="store_true",
                   help="also time make_private's loop step (the user's forward and backward, then the DP step)")
    p.add_argument("--repeats", type=int, default=1, help="spawn each world this many times (medians of medians)")
    ns = p.parse_args(argv)
    args = {k: getattr(ns, k) for k in ("batch_size", "steps", "warmup", "engine", "hidden", "fsdp", "loop")}
    print(f"MLP 784-{ns.hidden}-{ns.hidden}-10, global batch {ns.batch_size}, engine {ns.engine}, gloo on CPU, "
          f"1 thread per rank, {os.cpu_count()} CPUs visible; median step ms over {ns.steps} interleaved steps "
          f"(median over {ns.repeats} spawn(s))")
    print(f"{'W':>2} {'mode':>17} {'ms/step':>9} {'x non-private':>14} {'paired':>7} {'bytes/step/rank':>16}")
    for world in ns.worlds:
        runs = [run(world, args) for _ in range(ns.repeats)]
        med = {m: statistics.median(statistics.median(r["times"][m]) for r in runs) * 1e3 for m in runs[0]["times"]}
        for mode, ms in med.items():
            ref = "fsdp non-private" if mode.startswith("fsdp") else "non-private"
            paired = statistics.median(
                statistics.median(t / b for t, b in zip(r["times"][mode], r["times"][ref])) for r in runs
            )
            vol = runs[0]["volumes"].get(mode, runs[0]["volumes"]["non-private"] if mode.startswith("fsdp") else 0)
            print(f"{world:>2} {mode:>17} {ms:>9.2f} {ms / med[ref]:>14.2f} {paired:>7.2f} {vol:>16,d}")
        for mode, (path, peak) in runs[0].get("fsdp", {}).items():
            print(f"{world:>2} {mode:>17}: last step {path}, peak {peak:,d} of {runs[0]['params']:,d} parameter "
                  "elements gathered at once on a rank")
    print("x non-private: DDP modes against the DDP non-private step, FSDP modes against the FSDP non-private "
          "step. bytes/step/rank: the flat buffers each rank hands to the collectives (DP: all-reduce + broadcasts; "
          "non-private DDP: the gradient; FSDP non-private: shown as the gradient size, FSDP's own all-gathers and "
          "reduce-scatters are not counted)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
