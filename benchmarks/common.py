"""Shared helpers for the benchmarks: interleaved step timing, a plain-text table, and per-step
ATen op counts (:class:`OpCounter`) and peak memory (:func:`peak_step_memory`)."""

from __future__ import annotations

import statistics
import time
from collections import Counter
from typing import Callable

try:
    import resource
except ImportError:  # pragma: no cover - not on Windows
    resource = None

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["sync", "time_interleaved", "format_table", "minor_faults", "OpCounter", "count_ops", "peak_step_memory"]


def minor_faults() -> int:
    """Minor page faults of this process so far (0 where unavailable).  Fresh memory from the
    OS costs a fault per page: a step that allocates large buffers which the allocator hands
    back to the OS pays them on every step, as system time."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource is not None else 0


def sync(device: torch.device) -> None:
    """Wait for queued device work (CUDA); no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    steps: dict[str, Callable[[], None]],
    device: torch.device,
    *,
    warmup: int,
    repeats: int,
    steps_per_repeat: int,
    clock: str = "wall",
    faults: dict[str, float] | None = None,
) -> dict[str, list[float]]:
    """Mean seconds per step of each callable, per repeat.

    Each callable first runs ``warmup`` untimed steps.  Then, ``repeats`` times, every callable
    in turn runs ``steps_per_repeat`` timed steps (interleaving spreads drifts of a shared
    machine over all methods alike).  ``clock="process"`` measures this process's CPU time
    instead of wall time (robust to other load on a shared machine; meaningful for CPU runs
    with one thread).  Returns ``{name: [mean step time of each repeat]}``; ``faults``, if
    given, receives the mean number of minor page faults per timed step of each callable.
    """
    now = {"wall": time.perf_counter, "process": time.process_time}[clock]
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    sync(device)
    out: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, fn in steps.items():
            sync(device)
            f0, t0 = minor_faults(), now()
            for _ in range(steps_per_repeat):
                fn()
            sync(device)
            out[name].append((now() - t0) / steps_per_repeat)
            if faults is not None:
                faults[name] = faults.get(name, 0.0) + (minor_faults() - f0) / (steps_per_repeat * repeats)
    return out


def format_table(times: dict[str, list[float]], baseline: str, faults: dict[str, float] | None = None) -> str:
    """Median step time (ms), spread across repeats, and the ratio to ``baseline`` (and minor
    page faults per step, if given)."""
    base = statistics.median(times[baseline])
    width = max(len(n) for n in times)
    head = f"{'method':<{width}}  {'median ms/step':>14}  {'min..max':>17}  {'x non-private':>13}"
    lines = [head + (f"  {'faults/step':>11}" if faults is not None else "")]
    for name, ts in times.items():
        med = statistics.median(ts)
        line = f"{name:<{width}}  {med * 1e3:14.2f}  {min(ts) * 1e3:7.2f}..{max(ts) * 1e3:8.2f}  {med / base:13.2f}"
        if faults is not None:
            line += f"  {faults.get(name, 0.0):11.0f}"
        lines.append(line)
    return "\n".join(lines)


def raw_engine_step(model: torch.nn.Module, x, y, engine: str, loss_fn, clip: float, sigma: float, lr: float):
    """A closure doing one DP-SGD step from an engine and ``GaussianSumQuery`` directly (no
    optimizer wrapper): per-example norms, clipped weighted sum, noise, ``/ B``, SGD step."""
    from pytorch_privacy.dp_query.gaussian_query import GaussianSumQuery, add_gaussian_noise
    from pytorch_privacy.optimizer.engines import get_engine

    eng = get_engine(engine)(model, loss_fn)
    query = GaussianSumQuery(clip, sigma * clip)
    gstate = query.initial_global_state()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD(params.values(), lr=lr)
    B = x.shape[0]

    def step():
        pe = eng.compute(x, y)
        state = query.initial_sample_state({n: torch.zeros_like(p) for n, p in params.items()})
        state = query.accumulate_records_by_norm(query.derive_sample_params(gstate), state, pe.norms(), pe.weighted_sum)
        noised = add_gaussian_noise(state, sigma * clip)
        for n, p in params.items():
            p.grad = noised[n] / B
        opt.step()

    return step


class OpCounter(TorchDispatchMode):
    """Counts the ops dispatched while active, one per call of ``__torch_dispatch__``: every op
    that reaches a backend kernel (composite ops are counted as what they decompose to; ops run
    by the autograd engine in ``backward()`` and under ``torch.func`` transforms are included).

    ``count``: ops of the ``aten`` namespace (what the benchmarks report as ATen ops);
    ``other``: ops of other namespaces (``profiler::_record_function_enter_new`` from
    ``Optimizer.step``'s profiling scope, ...), which launch no kernel; ``by_op``: the count per
    op overload packet name, both kinds.

    On a GPU most ATen ops are a kernel launch, so this is what a launch-bound step pays for."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.other = 0
        self.by_op: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "aten":
            self.count += 1
        else:
            self.other += 1
        self.by_op[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn: Callable[[], None]) -> OpCounter:
    """Run ``fn()`` once under an :class:`OpCounter` and return the counter."""
    with OpCounter() as counter:
        fn()
    return counter


def peak_step_memory(fn: Callable[[], None], device: torch.device, *, counter: OpCounter | None = None) -> int:
    """Peak bytes of memory allocated by one call of ``fn()`` (a step), over what was allocated
    when it started.

    * CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the
      allocated bytes at the start.
    * CPU: the allocation and free events of torch's CPU allocator, recorded by
      ``torch.profiler`` (``profile_memory=True``) over two consecutive calls; the running sum
      of the events of the second call, from its start, and its maximum.  Frees of blocks
      allocated before the first call are invisible to the profiler, so a step that frees such
      a block early is charged a little too much (all methods alike: parameters never move).
      Memory not allocated through torch's allocator (Python objects, oneDNN scratch) is not
      counted.

    With ``counter``, the first call (on CPU; on CUDA an extra call before the measured one)
    runs under that :class:`OpCounter`, so one call gives both figures.
    """
    if device.type == "cuda":
        if counter is not None:
            with counter:
                fn()
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with record_function("bench::first_step"):
            if counter is not None:
                with counter:
                    fn()
            else:
                fn()
        with record_function("bench::measured_step"):
            fn()
    events = list(prof.profiler.kineto_results.events())
    marks = [e for e in events if e.name() == "bench::measured_step"]
    if not marks:
        raise RuntimeError("peak_step_memory: the profiler recorded no step marker")
    t0, t1 = marks[0].start_ns(), marks[0].end_ns()
    mem = sorted((e for e in events if e.name() == "[memory]" and e.device_type() == torch._C._autograd.DeviceType.CPU),
                 key=lambda e: e.start_ns())
    live = peak = 0
    for e in mem:
        if t0 <= e.start_ns() <= t1:
            live += e.nbytes()
            peak = max(peak, live)
    return peak


def compiled_engine(device):
    """The compiled engine: inductor, and CUDA graphs (``mode="reduce-overhead"``) on CUDA."""
    import functools

    from pytorch_privacy.optimizer.engines import CompiledEngine

    return functools.partial(CompiledEngine, mode="reduce-overhead" if device.type == "cuda" else None)
