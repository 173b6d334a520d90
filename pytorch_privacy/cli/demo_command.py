"""``pytorch-privacy demo``: argument checks before training, then :func:`pytorch_privacy.demo.run_demo`."""

from __future__ import annotations

import os

from .plot import _require_matplotlib

#: trainable coordinates of the demo's DigitsCNN (checked against the model by tests/test_cli.py;
#: spelled out so that checking ``--audit`` does not import torch)
DIGITS_CNN_PARAMETERS = 9258


def _check_output_path(path: str, option: str, *, overwrite: bool) -> None:
    """Refuse, before any work, an output path that cannot be written as asked."""
    if os.path.isdir(path):
        raise ValueError(f"{option} {path} is a directory; give a file name")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ValueError(f"{option} {path}: the directory {os.path.dirname(path) or parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise ValueError(f"{option} {path}: the directory {os.path.dirname(path) or parent} is not writable")
    if not overwrite and os.path.exists(path):
        raise ValueError(f"{option} {path} already exists; pass --overwrite to replace it, or choose another path")


def _check_device(device: str) -> None:
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"--device {device!r} is not a torch device ({exc})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"--device {device}: CUDA is not available here (torch {torch.__version__}, "
            f"{'built without CUDA' if torch.version.cuda is None else 'no usable GPU'}); use --device cpu"
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"--device {device}: MPS is not available here; use --device cpu")


def _cmd_demo(args) -> int:
    # every check that can fail on the user's input runs before the data loads
    _check_output_path(args.ledger, "--ledger", overwrite=args.overwrite)
    if args.plot is not None:
        _check_output_path(args.plot, "--plot", overwrite=True)
        _require_matplotlib()
    if args.audit is not None and args.audit > DIGITS_CNN_PARAMETERS:
        raise ValueError(
            f"--audit {args.audit}: the demo model has {DIGITS_CNN_PARAMETERS} coordinates, one per Dirac "
            "canary; use at most that many"
        )
    _check_device(args.device)
    from ..demo import run_demo

    run_demo(
        epochs=args.epochs,
        batch_size=args.batch_size,
        noise_multiplier=args.noise_multiplier,
        l2_norm_clip=args.l2_norm_clip,
        lr=args.lr,
        delta=args.delta,
        seed=args.seed,
        device=args.device,
        engine=args.engine,
        ledger_path=args.ledger,
        ledger_mode=args.ledger_mode,
        plot_path=args.plot,
        progress=not args.no_progress,
        audit=args.audit,
    )
    return 0
