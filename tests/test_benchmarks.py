"""The benchmark helpers (ATen op counter, peak step memory) and a smoke run of
``benchmarks/bench_architectures.py``."""

import importlib.util
import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench_common():
    spec = importlib.util.spec_from_file_location("bench_common", os.path.join(ROOT, "benchmarks", "common.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_op_counter_counts_each_dispatched_aten_op():
    common = _bench_common()
    a = torch.randn(3)

    def fn():
        b = a + a
        b.mul(2).sum()

    c = common.count_ops(fn)
    assert c.count == 3
    assert dict(c.by_op) == {"aten.add": 1, "aten.mul": 1, "aten.sum": 1}


def test_op_counter_sees_backward_ops():
    common = _bench_common()
    w = torch.randn(4, requires_grad=True)
    x = torch.randn(4)
    fwd = common.count_ops(lambda: (w * x).sum()).count
    both = common.count_ops(lambda: (w * x).sum().backward()).count
    assert both > fwd  # the autograd engine's ops (mul backward, grad accumulation) are counted


def test_op_counter_keeps_non_aten_ops_apart():
    common = _bench_common()
    w = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.SGD([w], lr=0.1)
    w.grad = torch.ones(3)
    c = common.count_ops(opt.step)  # Optimizer.step runs under a profiler record_function scope
    assert c.other > 0
    assert c.count == sum(n for op, n in c.by_op.items() if op.startswith("aten."))
    assert c.count >= 1  # the update itself


def test_peak_step_memory_sees_transient_allocations():
    common = _bench_common()
    mib = 2**20

    def one():
        t = torch.empty(mib // 4)  # 1 MiB of float32, freed at return
        t.fill_(1.0)

    def two_at_once():
        t = torch.empty(mib // 4)
        u = torch.empty(mib // 4)
        t.fill_(1.0)
        u.fill_(2.0)

    p1 = common.peak_step_memory(one, torch.device("cpu"))
    p2 = common.peak_step_memory(two_at_once, torch.device("cpu"))
    assert mib <= p1 < mib + 64 * 1024
    assert 2 * mib <= p2 < 2 * mib + 64 * 1024
    counter = common.OpCounter()
    p3 = common.peak_step_memory(two_at_once, torch.device("cpu"), counter=counter)
    assert 2 * mib <= p3 < 2 * mib + 64 * 1024
    assert dict(counter.by_op) == {"aten.empty": 2, "aten.fill_": 2}  # one call counted, not two


@pytest.mark.slow
def test_bench_architectures_quick_mnist_runs_and_prints_op_counts():
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run(
        [sys.executable, "benchmarks/bench_architectures.py", "--quick", "--cases", "mnist"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = proc.stdout
    assert "ATen ops/step" in out
    rows = {}
    for line in out.splitlines():
        m = re.match(r"\s+(non-private|dp auto|dp functorch)\s+\S+\s+([\d.]+)\s.*\s(\d+)\s+[\d.]+\s*$", line)
        if m:
            rows[m.group(1)] = (float(m.group(2)), int(m.group(3)))
    assert set(rows) == {"non-private", "dp auto", "dp functorch"}, out
    # a DP step does strictly more work than the plain one: per-example norms, clipping, noise
    assert 0 < rows["non-private"][1] < rows["dp auto"][1]
    assert 0 < rows["non-private"][1] < rows["dp functorch"][1]
    assert "MNIST CNN ATen ops <= 2.5x non-private" in out
