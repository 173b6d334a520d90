"""``pytorch-privacy`` console script.

Subcommands:

* ``demo``     train a small CNN privately on scikit-learn's bundled ``digits`` images (no
  download), save the ledger, print the (epsilon, delta) bound.
* ``audit``    check a saved ledger file's integrity (``unsigned``, ``signature OK`` or
  ``tampered``), flag suspicious content, and recompute the bound: RDP, moments accountant and PLD
  side by side (torch is not imported).  Exit status: 0 verified or clean, 1 tampered, 2 refused
  or invalid, 3 unsigned and either suspicious or expected to be signed (``--key``).
* ``privacy``  epsilon of a DP-SGD training plan (like TF Privacy's compute_dp_sgd_privacy).
* ``noise``    the smallest noise multiplier meeting a target epsilon for a training plan.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Sequence

__all__ = ["main", "build_parser"]


def _positive_int(s: str) -> int:
    v = int(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


def _positive_float(s: str) -> float:
    v = float(s)
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {s}")
    return v


def _delta(s: str) -> float:
    v = float(s)
    if not 0 < v < 1:
        raise argparse.ArgumentTypeError(f"delta must be in (0, 1), got {s}")
    return v


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the console script (exposed for the docs and tests)."""
    p = argparse.ArgumentParser(prog="pytorch-privacy", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="train a small CNN privately on the bundled digits dataset")
    d.add_argument("--epochs", type=_positive_int, default=15)
    d.add_argument("--batch-size", type=_positive_int, default=64, help="expected (Poisson) batch size")
    d.add_argument("--noise-multiplier", type=_positive_float, default=1.0)
    d.add_argument("--l2-norm-clip", type=_positive_float, default=1.0)
    d.add_argument("--lr", type=_positive_float, default=0.1)
    d.add_argument("--delta", type=_delta, default=1e-5)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--device", default="cpu")
    d.add_argument("--engine", default="auto", help="per-example gradient engine (auto, ghost, functorch)")
    d.add_argument("--ledger", default="demo_ledger.json", help="where to save the privacy ledger")

    a = sub.add_parser(
        "audit",
        help="check a saved ledger's integrity and recompute (epsilon, delta)",
        description="Exit status: 0 signature OK (or unsigned without suspicious content), 1 tampered, "
        "2 refused or invalid file, 3 unsigned and suspicious, or unsigned although --key was given.",
    )
    a.add_argument("ledger")
    a.add_argument("--delta", type=_delta, default=1e-5)
    a.add_argument("--no-pld", action="store_true", help="skip the (slower, tighter) PLD accountant")
    k = a.add_mutually_exclusive_group()
    k.add_argument("--key", help="HMAC-SHA256 key (UTF-8 text) the ledger was signed with")
    k.add_argument(
        "--key-file", help="file holding the HMAC-SHA256 key (its bytes; one trailing newline is ignored)"
    )

    pr = sub.add_parser("privacy", help="epsilon of a DP-SGD training plan (Poisson sampling)")
    pr.add_argument("--N", type=_positive_int, required=True, help="dataset size")
    pr.add_argument("--batch-size", "--batch_size", type=_positive_int, required=True)
    pr.add_argument("--noise-multiplier", "--noise_multiplier", type=_positive_float, required=True)
    pr.add_argument("--epochs", type=_positive_float, required=True)
    pr.add_argument("--delta", type=_delta, default=1e-5)

    n = sub.add_parser("noise", help="smallest noise multiplier for a target epsilon")
    n.add_argument("--N", type=_positive_int, required=True)
    n.add_argument("--batch-size", "--batch_size", type=_positive_int, required=True)
    n.add_argument("--epsilon", type=_positive_float, required=True)
    n.add_argument("--epochs", type=_positive_float, required=True)
    n.add_argument("--delta", type=_delta, default=1e-5)
    return p


#: The audit refuses ledgers whose composed event has more distinct parts than this (each part
#: costs one RDP curve and one PLD; the bound keeps any ledger under 1 MB within seconds).
AUDIT_MAX_PARTS = 200
#: At most this many lines of the ledger summary are printed.
AUDIT_SUMMARY_LINES = 25

_EXIT_OK, _EXIT_TAMPERED, _EXIT_ERROR, _EXIT_UNVERIFIED = 0, 1, 2, 3


def _read_key(args) -> bytes | None:
    if args.key is not None:
        if not args.key:
            raise ValueError("--key is empty")
        return args.key.encode("utf-8")
    if args.key_file is not None:
        with open(args.key_file, "rb") as f:
            key = f.read(1 << 20)
        if key.endswith(b"\r\n"):
            key = key[:-2]
        elif key.endswith(b"\n"):
            key = key[:-1]
        if not key:
            raise ValueError(f"key file {args.key_file} is empty")
        return key
    return None


def _cmd_audit(args) -> int:
    from .dp_query.privacy_ledger import (
        SIGNATURE_OK,
        TAMPERED,
        UNSIGNED,
        LedgerIntegrityError,
        PrivacyLedger,
        suspicious_content,
    )

    key = _read_key(args)
    try:
        ledger = PrivacyLedger.load(args.ledger, key=key)
    except LedgerIntegrityError as exc:
        print(f"integrity: {TAMPERED}: {exc}")
        print("No epsilon is reported for a tampered ledger.")
        return _EXIT_TAMPERED
    status = ledger.integrity
    print(f"integrity: {status} ({ledger.integrity_detail})")
    warnings = suspicious_content(ledger)
    unverified = status == UNSIGNED and (key is not None or warnings)
    if status == UNSIGNED:
        print(
            "WARNING: UNSIGNED ledger: its content is not authenticated, anyone who can write the file "
            "can change it and recompute the digest. Sign ledgers with PrivacyLedger.save(path, key=...) "
            "and audit with --key or --key-file."
        )
    for w in warnings:
        print(f"WARNING: suspicious content: {w}")
    lines = ledger.summary().splitlines()
    print("\n".join(lines[:AUDIT_SUMMARY_LINES]))
    if len(lines) > AUDIT_SUMMARY_LINES:
        print(f"  ... {len(lines) - AUDIT_SUMMARY_LINES} more setting(s)")
    event = ledger.to_event()
    parts = len(event.events) if event.kind == "composed" else 1
    if parts > AUDIT_MAX_PARTS:
        raise ValueError(
            f"the ledger composes {parts} distinct settings, more than the audit's limit of {AUDIT_MAX_PARTS} "
            "(AUDIT_MAX_PARTS); analyse it with the library (pytorch_privacy.analysis) instead"
        )

    from .analysis import DEFAULT_ORDERS, compute_rdp_from_ledger, get_privacy_spent, get_privacy_spent_moments

    try:
        rdp = compute_rdp_from_ledger(ledger, DEFAULT_ORDERS)
        eps, _, order = get_privacy_spent(DEFAULT_ORDERS, rdp, target_delta=args.delta)
        # moments accountant: log moment alpha(lambda) = lambda * RDP(lambda + 1)
        lambdas = [o - 1.0 for o in DEFAULT_ORDERS]
        eps_m, _, lam_m = get_privacy_spent_moments(
            lambdas, [l * r for l, r in zip(lambdas, rdp)], target_delta=args.delta
        )
        print(f"delta = {args.delta:g}")
        print(f"  RDP (tight conversion)      epsilon = {eps:.4f}   (order {order:g})")
        print(f"  moments accountant (classic) epsilon = {eps_m:.4f}   (lambda {lam_m:g})")
        if not args.no_pld:
            from .analysis import compute_pld_from_ledger

            pld = compute_pld_from_ledger(ledger)
            print(f"  PLD (pessimistic, tight)    epsilon = {pld.get_epsilon(args.delta):.4f}")
    except (OverflowError, ZeroDivisionError, RecursionError, MemoryError) as exc:
        raise ValueError(f"the analysis could not bound this ledger ({type(exc).__name__}: {exc})") from None
    if status == SIGNATURE_OK:
        return _EXIT_OK
    if unverified:
        print(
            f"integrity: {status}: "
            + ("a key was given but the ledger is not signed" if key is not None else "suspicious content (see above)")
            + f"; exit status {_EXIT_UNVERIFIED}"
        )
        return _EXIT_UNVERIFIED
    return _EXIT_OK


def _cmd_privacy(args) -> int:
    from .analysis.compute_dp_sgd_privacy import main as cdsp_main

    return cdsp_main(
        [
            f"--N={args.N}",
            f"--batch_size={args.batch_size}",
            f"--noise_multiplier={args.noise_multiplier}",
            f"--epochs={args.epochs}",
            f"--delta={args.delta}",
        ]
    ) or 0


def _cmd_noise(args) -> int:
    from .analysis import compute_noise

    sigma = compute_noise(args.N, args.batch_size, args.epsilon, args.epochs, args.delta)
    print(
        f"noise multiplier {sigma:.4f} gives epsilon <= {args.epsilon:g} at delta={args.delta:g} for "
        f"{args.epochs:g} epochs of Poisson-sampled batches (q = {args.batch_size}/{args.N}, add/remove-one)"
    )
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_demo

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
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pytorch-privacy`` console script."""
    args = build_parser().parse_args(argv)
    handler = {"demo": _cmd_demo, "audit": _cmd_audit, "privacy": _cmd_privacy, "noise": _cmd_noise}[args.command]
    try:
        return handler(args)
    except (ValueError, OSError) as exc:
        print(f"pytorch-privacy {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001
        if args.command != "audit":
            raise
        # exit status 1 means "tampered": an unexpected failure must not read as it
        print(f"pytorch-privacy audit: error: unexpected {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
