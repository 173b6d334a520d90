"""``nn.LSTM`` classifier step time: non-private SGD vs DP-SGD on the ghost engine after
:func:`~pytorch_privacy.optimizer.engines.swap_to_dp_layers` vs Opacus.

The model: ``Embedding(V, E) -> nn.LSTM(E, H, batch_first=True) -> Linear(H, 2)`` on the last
hidden state, sequences of length ``T`` (default T=50, B=64, E=64, H=128, V=1000).

Timed side by side in one run (interleaved, see :func:`common.time_interleaved`):

* ``non-private``: forward, ``loss.mean().backward()``, ``SGD.step()`` on the native ``nn.LSTM``.
* ``dp ghost (swapped)``: ``swap_to_dp_layers`` then ``DPGaussianOptimizer.fit_batch`` with
  ``engine="ghost"`` (the LSTM becomes ``DPLSTM`` over ``nn.Linear`` cells).
* ``dp functorch (native)``: ``DPGaussianOptimizer`` with ``engine="functorch"`` on the unswapped
  ``nn.LSTM`` (what ``engine="auto"`` fell back to before the swap existed; slow, off unless
  ``--native``).
* ``opacus hooks``: ``ModuleValidator.fix`` (Opacus swaps in its own ``DPLSTM``) then
  ``PrivacyEngine.make_private(grad_sample_mode="hooks")``, same clip and noise.

Usage::

    python benchmarks/bench_lstm.py [--threads 2] [--batch-size 64] [--seq-len 50]
        [--steps 3] [--repeats 3] [--native] [--no-opacus] [--clock wall|process]
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
from common import format_table, time_interleaved  # noqa: E402

CLIP, SIGMA, LR = 1.0, 1.0, 0.1


class LSTMClassifier(nn.Module):
    """Embedding, one ``nn.LSTM`` layer, a linear head on the last hidden state."""

    def __init__(self, vocab: int = 1000, embed: int = 64, hidden: int = 128, classes: int = 2):
        super().__init__()
        self.emb = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        out, _ = self.lstm(self.emb(x))
        return self.head(out[:, -1])


def per_example_ce(out, y):
    """Per-example cross-entropy."""
    return F.cross_entropy(out, y, reduction="none")


def make_model(seed: int = 0) -> LSTMClassifier:
    torch.manual_seed(seed)
    return LSTMClassifier()


def non_private_step(x, y):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)

    def step():
        opt.zero_grad(set_to_none=True)
        per_example_ce(model(x), y).mean().backward()
        opt.step()

    return step


def dp_step(x, y, engine: str, swap: bool):
    from pytorch_privacy.optimizer import DPGaussianOptimizer
    from pytorch_privacy.optimizer.engines import swap_to_dp_layers

    model = make_model()
    if swap:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            swap_to_dp_layers(model)
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


def opacus_step(x, y):
    from opacus import PrivacyEngine
    from opacus.validators import ModuleValidator

    model = ModuleValidator.fix(make_model())
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=x.shape[0])
    pmodel, popt, _ = PrivacyEngine(accountant="rdp").make_private(
        module=model, optimizer=opt, data_loader=loader, noise_multiplier=SIGMA, max_grad_norm=CLIP,
        poisson_sampling=False, grad_sample_mode="hooks",
    )
    criterion = nn.CrossEntropyLoss()

    def step():
        popt.zero_grad(set_to_none=True)
        criterion(pmodel(x), y).backward()
        popt.step()

    return step


def main(argv=None):
    """Parse arguments, time every method, print the table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=50)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--native", action="store_true", help="also time engine='functorch' on the unswapped nn.LSTM")
    ap.add_argument("--no-opacus", action="store_true")
    ap.add_argument("--clock", default="wall", choices=["wall", "process"],
                    help="'process' times this process's CPU seconds (robust to other load on a shared machine)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 1000, (args.batch_size, args.seq_len), generator=g)
    y = torch.randint(0, 2, (args.batch_size,), generator=g)
    steps = {"non-private": non_private_step(x, y), "dp ghost (swapped)": dp_step(x, y, "ghost", True)}
    if args.native:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            steps["dp functorch (native)"] = dp_step(x, y, "functorch", False)
    if not args.no_opacus:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                steps["opacus hooks"] = opacus_step(x, y)
        except ImportError:
            print("opacus not installed: skipping the Opacus row")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        times = time_interleaved(
            steps, torch.device("cpu"), warmup=1, repeats=args.repeats, steps_per_repeat=args.steps, clock=args.clock
        )
    print(
        f"nn.LSTM classifier, B={args.batch_size}, T={args.seq_len}, {args.threads} threads, {args.clock} clock, "
        f"torch {torch.__version__}"
    )
    print(format_table(times, "non-private"))
    if "opacus hooks" in times:
        import statistics

        ratio = statistics.median(times["dp ghost (swapped)"]) / statistics.median(times["opacus hooks"])
        print(f"dp ghost (swapped) / opacus hooks: {ratio:.2f}")


if __name__ == "__main__":
    main()
