"""Argument parsing of the ``pytorch-privacy`` console script: option types and the parser."""

from __future__ import annotations

import argparse
import math


#: ``--engine`` values: ``auto`` and every built-in engine (a test checks this against the registry;
#: the list is spelled out so that building the parser does not import torch).
ENGINE_CHOICES = ("auto", "ghost", "functorch", "compiled", "graphed", "loop")


def _parsed(s: str, cast, ok, unparsable: str, out_of_range: str):
    """``cast(s)`` if it parses and ``ok`` holds, else ``argparse.ArgumentTypeError`` with the message."""
    try:
        v = cast(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{unparsable}, got {s!r}") from None
    if not ok(v):
        raise argparse.ArgumentTypeError(f"{out_of_range}, got {s}")
    return v


def _positive_int(s: str) -> int:
    return _parsed(s, int, lambda v: v > 0, "must be a positive integer", "must be a positive integer")


def _positive_float(s: str) -> float:
    return _parsed(
        s, float, lambda v: math.isfinite(v) and v > 0, "must be a positive number", "must be a positive number"
    )


def _nonnegative_float(s: str) -> float:
    return _parsed(s, float, lambda v: v >= 0 and math.isfinite(v), "must be a number >= 0", "must be a number >= 0")


def _delta(s: str) -> float:
    return _parsed(s, float, lambda v: 0 < v < 1, "delta must be a number in (0, 1)", "delta must be in (0, 1)")


def _file_mode(s: str) -> int:
    return _parsed(
        s, lambda t: int(t, 8), lambda v: 0 <= v <= 0o777, "must be an octal file mode such as 644",
        "must be an octal file mode between 000 and 777",
    )


def _version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("pytorch_privacy")
    except PackageNotFoundError:  # running from a source tree
        from .. import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the console script (exposed for the docs and tests)."""
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = argparse.ArgumentParser(prog="pytorch-privacy", description=__doc__.split("\n\n")[0], formatter_class=fmt)
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="{demo,audit,privacy,noise}")

    _add_demo(sub, fmt)
    _add_audit(sub, fmt)
    _add_planning(sub, fmt)
    return p


def _add_demo(sub, fmt) -> None:
    """``demo``: private training on the bundled digits."""
    d = sub.add_parser(
        "demo", help="train a small CNN privately on the bundled digits dataset", formatter_class=fmt,
        description="Train a small CNN with DP-SGD on scikit-learn's digits images (no download), save "
        "the privacy ledger and print the (epsilon, delta) bound.",
    )
    d.add_argument("--epochs", type=_positive_int, default=15, help="passes over the training set")
    d.add_argument("--batch-size", type=_positive_int, default=64, help="expected (Poisson) batch size")
    d.add_argument("--noise-multiplier", type=_positive_float, default=1.0, help="noise stddev / clip norm")
    d.add_argument("--l2-norm-clip", type=_positive_float, default=1.0, help="per-example gradient clip norm C")
    d.add_argument("--lr", type=_positive_float, default=0.1, help="SGD learning rate (momentum 0.9)")
    d.add_argument("--delta", type=_delta, default=1e-5, help="delta of the reported (epsilon, delta)")
    d.add_argument("--seed", type=int, default=0, help="seed of the data split, model and sampling")
    d.add_argument("--device", default="cpu", help="torch device to train on (cpu, cuda, cuda:1, ...)")
    d.add_argument(
        "--engine", default="auto", choices=ENGINE_CHOICES,
        help="per-example gradient engine (auto picks the fastest that supports the model)",
    )
    d.add_argument("--ledger", default="demo_ledger.json", help="where to save the privacy ledger")
    d.add_argument("--overwrite", action="store_true", help="replace an existing ledger file at --ledger")
    d.add_argument(
        "--ledger-mode", type=_file_mode, default="644",
        help="permissions (octal) of the saved ledger file; readable by others unless told otherwise",
    )
    d.add_argument(
        "--plot", default=None,
        help="also draw epsilon against steps (RDP and PLD) into this PNG file (with --audit, also the "
        "audit's ROC curve and score histogram into <name>_audit.png)",
    )
    d.add_argument(
        "--audit", type=_positive_int, nargs="?", const=1000, default=None, metavar="M",
        help="run the one-run audit (Steinke et al. 2023) in the same training run with M gradient "
        "canaries (1000 when M is left out) and print the empirical epsilon lower bound (95%% confidence) "
        "beside the ledger's upper bounds",
    )
    d.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")


def _add_audit(sub, fmt) -> None:
    """``audit``: integrity, suspicious content and the bound of a ledger file."""
    a = sub.add_parser(
        "audit",
        help="check a saved ledger's integrity and recompute (epsilon, delta)",
        formatter_class=fmt,
        description="Exit status: 0 signature OK (or unsigned without suspicious content), 1 tampered, "
        "2 refused or invalid file, 3 unsigned and suspicious, or unsigned although --key was given.",
    )
    a.add_argument("ledger", help="the ledger file (JSON written by PrivacyLedger.save)")
    a.add_argument("--delta", type=_delta, default=1e-5, help="delta at which epsilon is reported")
    a.add_argument("--no-pld", action="store_true", help="skip the (slower, tighter) PLD accountant")
    a.add_argument(
        "--time-limit", type=_nonnegative_float, default=9.0,
        help="seconds the audit (reading and analysis) may take before the analysis is stopped and "
        "the ledger refused (the default keeps the whole command under 10 s; 0: none)",
    )
    a.add_argument(
        "--memory-limit-mb", type=_nonnegative_float, default=700.0,
        help="address space (MiB) the analysis may add to what is loaded (~310 MiB) before it is stopped "
        "(the default keeps the command under 1 GiB; 0: none)",
    )
    k = a.add_mutually_exclusive_group()
    k.add_argument(
        "--key", help="HMAC-SHA256 key (UTF-8 text) the ledger was signed with (visible to other users "
        "in the process list: prefer --key-file)"
    )
    k.add_argument(
        "--key-file", help="file holding the HMAC-SHA256 key (its bytes; one trailing newline is ignored)"
    )
    k.add_argument(
        "--public-key-file",
        help="PEM file with the Ed25519 public key the ledger was signed with (needs the optional "
        "'cryptography' package)",
    )
    a.add_argument(
        "--plot", default=None,
        help="draw epsilon against steps (RDP and PLD at --delta) into this PNG file (needs matplotlib)",
    )
    a.add_argument(
        "--target-epsilon", type=_positive_float, default=None,
        help="budget line drawn on the plot (default: the ledger metadata's target_epsilon, if any)",
    )


def _add_planning(sub, fmt) -> None:
    """``privacy`` and ``noise``: planning questions about a DP-SGD training plan."""
    accountant_help = "rdp: exact RDP of the subsampled Gaussian; pld: privacy loss distribution (tighter)"
    pr = sub.add_parser(
        "privacy", help="epsilon of a DP-SGD training plan (Poisson sampling)", formatter_class=fmt,
        description="Epsilon of DP-SGD with Poisson sampling (q = batch size / N) and add-or-remove-one "
        "neighbours, for steps = ceil(epochs * N / batch size).",
    )
    pr.add_argument("--N", type=_positive_int, required=True, help="dataset size")
    pr.add_argument("--batch-size", "--batch_size", type=_positive_int, required=True, help="expected batch size")
    pr.add_argument(
        "--noise-multiplier", "--noise_multiplier", type=_positive_float, required=True, help="noise stddev / clip norm"
    )
    pr.add_argument("--epochs", type=_positive_float, required=True, help="number of epochs (may be fractional)")
    pr.add_argument("--delta", type=_delta, default=1e-5, help="target delta")
    pr.add_argument("--accountant", choices=("rdp", "pld"), default="rdp", help=accountant_help)

    n = sub.add_parser(
        "noise", help="smallest noise multiplier for a target epsilon", formatter_class=fmt,
        description="The smallest noise multiplier that keeps a DP-SGD plan (Poisson sampling) within "
        "a target epsilon at the given delta.",
    )
    n.add_argument("--N", type=_positive_int, required=True, help="dataset size")
    n.add_argument("--batch-size", "--batch_size", type=_positive_int, required=True, help="expected batch size")
    n.add_argument("--epsilon", type=_positive_float, required=True, help="target epsilon")
    n.add_argument("--epochs", type=_positive_float, required=True, help="number of epochs (may be fractional)")
    n.add_argument("--delta", type=_delta, default=1e-5, help="target delta")
    n.add_argument("--accountant", choices=("rdp", "pld"), default="rdp", help=accountant_help)
