"""MNIST CNN step time: non-private SGD vs DP-SGD (this project's engines) vs Opacus.

The model is :class:`tests.reference_models.MnistCNN` (the TF Privacy / Opacus tutorial
CNN benchmarked by Subramani et al. 2021, arXiv 2010.09063) on synthetic MNIST-shaped data.
Every method does a full training step on the same batch, timed in one run, interleaved:

* ``non-private``: forward, ``loss.mean().backward()``, ``SGD.step()``.
* ``dp ghost`` / ``dp functorch``: ``DPGaussianOptimizer.fit_batch`` with that engine:
  per-example gradients (or ghost norms), clip, sum, Gaussian noise, ``SGD.step()``.
* ``dp compiled``: the same with :class:`~pytorch_privacy.optimizer.engines.CompiledEngine`
  (inductor; ``mode="reduce-overhead"``, i.e. CUDA graphs, on CUDA); it compiles during warm-up.
* ``engine ghost (raw)``: the ghost engine + ``GaussianSumQuery.accumulate_records_by_norm`` +
  noise + step without the optimizer wrapper (shows the wrapper's overhead).
* ``opacus hooks`` / ``opacus ghost``: ``PrivacyEngine.make_private`` with the same clip and
  noise (``grad_sample_mode="hooks"`` and ``"ghost"``, fast gradient clipping), Opacus installed.

Usage::

    python benchmarks/bench_mnist_cnn.py [--device cpu|cuda] [--batch-size 256] [--steps 10]
        [--threads N] [--clock wall|process] [--activation tanh|relu] [--no-opacus]
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests.reference_models
from common import compiled_engine, format_table, time_interleaved  # noqa: E402
from common import raw_engine_step as common_raw_engine_step  # noqa: E402

from tests.reference_models import MnistCNN  # noqa: E402

CLIP, SIGMA, LR = 1.0, 1.0, 0.1


def per_example_ce(out, y):
    """Per-example cross-entropy."""
    return F.cross_entropy(out, y, reduction="none")


def make_model(device, seed=0, activation="tanh"):
    """A fresh MnistCNN on ``device``."""
    torch.manual_seed(seed)
    return MnistCNN(activation).to(device)


def nonprivate_step(device, x, y, activation):
    """A closure doing one plain SGD step (the baseline)."""
    model = make_model(device, activation=activation)
    opt = torch.optim.SGD(model.parameters(), lr=LR)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def dp_optimizer_step(device, x, y, engine, activation):
    """A closure doing one ``DPGaussianOptimizer.fit_batch`` step with ``engine``."""
    from pytorch_privacy.optimizer import DPGaussianOptimizer

    model = make_model(device, activation=activation)
    opt = DPGaussianOptimizer(
        torch.optim.SGD(model.parameters(), lr=LR),
        model,
        per_example_ce,
        l2_norm_clip=CLIP,
        noise_multiplier=SIGMA,
        expected_batch_size=x.shape[0],
        engine=engine,
    )
    return lambda: opt.fit_batch(x, y)


def raw_engine_step(device, x, y, engine, activation):
    """A closure doing one DP step from the engine and the query directly (no optimizer wrapper)."""
    return common_raw_engine_step(make_model(device, activation=activation), x, y, engine, per_example_ce, CLIP, SIGMA, LR)


def opacus_step(device, x, y, mode, activation):
    """A closure doing one Opacus DP step (``grad_sample_mode`` ``mode``)."""
    from opacus import PrivacyEngine

    model = make_model(device, activation=activation)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    ds = torch.utils.data.TensorDataset(x.cpu(), y.cpu())
    loader = torch.utils.data.DataLoader(ds, batch_size=x.shape[0])
    pe = PrivacyEngine(accountant="rdp")
    out = pe.make_private(
        module=model,
        optimizer=opt,
        data_loader=loader,
        noise_multiplier=SIGMA,
        max_grad_norm=CLIP,
        poisson_sampling=False,
        grad_sample_mode=mode,
        criterion=nn.CrossEntropyLoss(),
    )
    if mode == "ghost":
        pmodel, popt, criterion, _ = out
    else:
        (pmodel, popt, _), criterion = out, nn.CrossEntropyLoss()

    def step():
        popt.zero_grad(set_to_none=True)
        criterion(pmodel(x), y).backward()
        popt.step()

    return step


def main(argv=None):
    """Parse arguments, time every method, print the table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per repeat")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--activation", default="tanh", choices=["tanh", "relu"])
    ap.add_argument("--clock", default="wall", choices=["wall", "process"],
                    help="wall time, or this process's CPU time (use with --threads 1 on a shared machine)")
    ap.add_argument("--no-opacus", action="store_true")
    ap.add_argument("--methods", default=None, help="comma-separated subset of the method names")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    warnings.filterwarnings("ignore")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 1, 28, 28, generator=g).to(device)
    y = torch.randint(0, 10, (args.batch_size,), generator=g).to(device)
    act = args.activation
    makers = {
        "non-private": lambda: nonprivate_step(device, x, y, act),
        "dp ghost": lambda: dp_optimizer_step(device, x, y, "ghost", act),
        "dp functorch": lambda: dp_optimizer_step(device, x, y, "functorch", act),
        "dp compiled": lambda: dp_optimizer_step(device, x, y, compiled_engine(device), act),
        "engine ghost (raw)": lambda: raw_engine_step(device, x, y, "ghost", act),
    }
    if not args.no_opacus:
        try:
            import opacus  # noqa: F401

            makers["opacus hooks"] = lambda: opacus_step(device, x, y, "hooks", act)
            makers["opacus ghost"] = lambda: opacus_step(device, x, y, "ghost", act)
        except ImportError:
            print("opacus not installed: skipping the Opacus rows")
    if args.methods:
        wanted = [m.strip() for m in args.methods.split(",")]
        makers = {k: v for k, v in makers.items() if k in wanted or k == "non-private"}
    steps = {}
    for name, make in makers.items():
        try:
            steps[name] = make()
        except Exception as err:  # a peer that cannot run this configuration
            print(f"{name}: not run ({type(err).__name__}: {err})")
    faults: dict[str, float] = {}
    times = time_interleaved(
        steps, device, warmup=args.warmup, repeats=args.repeats, steps_per_repeat=args.steps, clock=args.clock,
        faults=faults,
    )
    print(
        f"MnistCNN({act}), batch {args.batch_size}, device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else f", {torch.get_num_threads()} threads")
        + f", torch {torch.__version__}; {args.repeats} repeats x {args.steps} steps after {args.warmup} warm-up"
        + f", {args.clock} clock"
    )
    print(format_table(times, "non-private", faults if device.type == "cpu" else None))
    return times


if __name__ == "__main__":
    main()
