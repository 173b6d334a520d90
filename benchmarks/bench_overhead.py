"""Per-step overhead of the private step: a tiny deep MLP with a small batch, where kernel work
is negligible and the Python / launch overhead of the optimizer, query and engine dominates.

Timed side by side in one run (interleaved, see :func:`common.time_interleaved`):

* ``non-private``: forward, ``loss.mean().backward()``, ``SGD.step()``.
* ``engine ghost (raw)``: ghost engine + ``GaussianSumQuery.accumulate_records_by_norm`` + noise +
  ``.grad`` + step, without the optimizer wrapper.
* ``dp ghost`` / ``dp functorch``: ``DPGaussianOptimizer.fit_batch`` with that engine.
* ``dp graphed``: the same with :class:`~pytorch_privacy.optimizer.engines.GraphedEngine` (the
  per-record gradients and the clipped sum replayed as CUDA graphs on CUDA; eager on CPU).
* ``dp compiled``: the same with :class:`~pytorch_privacy.optimizer.engines.CompiledEngine`
  (inductor; ``mode="reduce-overhead"``, i.e. CUDA graphs, on CUDA); it compiles during warm-up.

Usage::

    python benchmarks/bench_overhead.py [--device cpu|cuda] [--layers 12] [--width 16]
        [--batch-size 8] [--steps 50] [--repeats 5] [--profile cprofile|torch] [--profile-sort cumulative]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import warnings

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import compiled_engine, format_table, time_interleaved  # noqa: E402
from common import raw_engine_step as common_raw_engine_step  # noqa: E402


CLIP, SIGMA, LR = 1.0, 1.0, 0.1


def per_example_ce(out, y):
    """Per-example cross-entropy."""
    return F.cross_entropy(out, y, reduction="none")


def make_model(device, layers, width, classes=10, seed=0):
    torch.manual_seed(seed)
    mods = []
    for _ in range(layers):
        mods += [nn.Linear(width, width), nn.Tanh()]
    mods.append(nn.Linear(width, classes))
    return nn.Sequential(*mods).to(device)


def nonprivate_step(device, x, y, a):
    model = make_model(device, a.layers, a.width)
    opt = torch.optim.SGD(model.parameters(), lr=LR)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def dp_step(device, x, y, a, engine):
    from pytorch_privacy.optimizer import DPGaussianOptimizer

    model = make_model(device, a.layers, a.width)
    opt = DPGaussianOptimizer(
        torch.optim.SGD(model.parameters(), lr=LR), model, per_example_ce,
        l2_norm_clip=CLIP, noise_multiplier=SIGMA, expected_batch_size=x.shape[0], engine=engine,
    )
    return lambda: opt.fit_batch(x, y)


def raw_engine_step(device, x, y, a):
    return common_raw_engine_step(make_model(device, a.layers, a.width), x, y, "ghost", per_example_ce, CLIP, SIGMA, LR)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", default="wall", choices=["wall", "process"])
    ap.add_argument("--methods", default=None, help="comma-separated subset of the method names")
    ap.add_argument("--profile", default=None, choices=["cprofile", "torch"],
                    help="profile 200 steps of 'dp ghost' instead of timing")
    ap.add_argument("--profile-sort", default="tottime", choices=["tottime", "cumulative"],
                    help="order of the cProfile table")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    warnings.filterwarnings("ignore")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(a.batch_size, a.width, generator=g).to(device)
    y = torch.randint(0, 10, (a.batch_size,), generator=g).to(device)
    makers = {
        "non-private": lambda: nonprivate_step(device, x, y, a),
        "engine ghost (raw)": lambda: raw_engine_step(device, x, y, a),
        "dp ghost": lambda: dp_step(device, x, y, a, "ghost"),
        "dp functorch": lambda: dp_step(device, x, y, a, "functorch"),
        "dp compiled": lambda: dp_step(device, x, y, a, compiled_engine(device)),
        "dp graphed": lambda: dp_step(device, x, y, a, "graphed"),
    }
    if a.methods:
        wanted = [m.strip() for m in a.methods.split(",")]
        makers = {k: v for k, v in makers.items() if k in wanted or k == "non-private"}
    if a.profile:
        fn = makers["dp ghost"]()
        for _ in range(20):
            fn()
        if a.profile == "cprofile":
            import cProfile
            import pstats

            pr = cProfile.Profile()
            pr.enable()
            for _ in range(200):
                fn()
            pr.disable()
            pstats.Stats(pr).sort_stats(a.profile_sort).print_stats(40)
        else:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            with profile(activities=acts) as prof:
                for _ in range(50):
                    fn()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))
        return None
    steps = {name: make() for name, make in makers.items()}
    times = time_interleaved(steps, device, warmup=a.warmup, repeats=a.repeats, steps_per_repeat=a.steps, clock=a.clock)
    print(
        f"MLP {a.layers}x{a.width} ({2 * a.layers + 2} parameter tensors), batch {a.batch_size}, device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else f", {torch.get_num_threads()} threads")
        + f", torch {torch.__version__}; {a.repeats} repeats x {a.steps} steps after {a.warmup} warm-up, {a.clock} clock"
    )
    print(format_table(times, "non-private"))
    base = statistics.median(times["non-private"])
    if "dp ghost" in times and "engine ghost (raw)" in times:
        d = statistics.median(times["dp ghost"]) - statistics.median(times["engine ghost (raw)"])
        print(f"optimizer wrapper overhead (dp ghost - raw): {d * 1e3:.3f} ms/step")
    if "dp ghost" in times:
        print(f"private overhead (dp ghost - non-private): {(statistics.median(times['dp ghost']) - base) * 1e3:.3f} ms/step")
    return times


if __name__ == "__main__":
    main()
