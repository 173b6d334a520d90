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
import os
import sys
import time
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
    a.add_argument(
        "--time-limit", type=float, default=9.0,
        help="seconds the audit (reading and analysis) may take before the analysis is stopped and "
        "the ledger refused (default 9, which keeps the whole command under 10 s; 0: none)",
    )
    a.add_argument(
        "--memory-limit-mb", type=float, default=700.0,
        help="address space (MiB) the analysis may add to what is loaded (~310 MiB) before it is stopped "
        "(default 700, which keeps the command under 1 GiB; 0: none)",
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


#: At most this many lines of the ledger summary are printed.
AUDIT_SUMMARY_LINES = 25

_EXIT_OK, _EXIT_TAMPERED, _EXIT_ERROR, _EXIT_UNVERIFIED = 0, 1, 2, 3


def _read_key(args):
    if args.public_key_file is not None:
        try:
            from cryptography.hazmat.primitives import serialization
            from cryptography.hazmat.primitives.asymmetric import ed25519
        except ImportError:
            raise ValueError("--public-key-file needs the optional 'cryptography' package") from None
        with open(args.public_key_file, "rb") as f:
            pem = f.read(1 << 20)
        try:
            key = serialization.load_pem_public_key(pem)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{args.public_key_file} is not a PEM public key ({exc})") from None
        if not isinstance(key, ed25519.Ed25519PublicKey):
            raise ValueError(f"{args.public_key_file} holds a {type(key).__name__}, not an Ed25519 public key")
        return key
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


def _analysis_steps(ledger, delta: float, pld: bool):
    """The audit's analysis, one printable line at a time (a generator, so that a time limit can
    stop it between accountants)."""
    from .analysis import DEFAULT_ORDERS, compute_rdp_from_ledger, get_privacy_spent, get_privacy_spent_moments

    rdp = compute_rdp_from_ledger(ledger, DEFAULT_ORDERS)
    eps, _, order = get_privacy_spent(DEFAULT_ORDERS, rdp, target_delta=delta)
    yield f"delta = {delta:g}"
    yield f"  RDP (tight conversion)      epsilon = {eps:.4f}   (order {order:g})"
    # moments accountant: log moment alpha(lambda) = lambda * RDP(lambda + 1)
    lambdas = [o - 1.0 for o in DEFAULT_ORDERS]
    eps_m, _, lam_m = get_privacy_spent_moments(lambdas, [l * r for l, r in zip(lambdas, rdp)], target_delta=delta)
    yield f"  moments accountant (classic) epsilon = {eps_m:.4f}   (lambda {lam_m:g})"
    if pld:
        from .analysis import compute_pld_from_ledger

        acc = compute_pld_from_ledger(ledger)
        yield f"  PLD (pessimistic, tight)    epsilon = {acc.get_epsilon(delta):.4f}"


def _vm_bytes() -> int | None:
    """This process's address space (Linux ``/proc``), or ``None`` where unknown."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def _analysis_worker(conn, ledger, delta: float, pld: bool, memory_bytes: int | None) -> None:
    try:
        if memory_bytes:
            import resource

            vm = _vm_bytes()
            if vm is not None:
                soft, hard = resource.getrlimit(resource.RLIMIT_AS)
                cap = vm + memory_bytes
                if hard != resource.RLIM_INFINITY:
                    cap = min(cap, hard)
                resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
        for line in _analysis_steps(ledger, delta, pld):
            conn.send(("line", line))
        conn.send(("done", ""))
    except MemoryError as exc:
        conn.send(("error", f"the analysis needed more than the memory limit ({exc or 'MemoryError'})"))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which exits 2
        conn.send(("error", f"the analysis could not bound this ledger ({type(exc).__name__}: {exc})"))
    finally:
        conn.close()


def _bounded_analysis(ledger, args) -> bool | None:
    """Run the analysis in a forked child limited to ``--time-limit`` seconds (counted from the
    start of the audit) and ``--memory-limit-mb`` MiB of address space beyond what is loaded (RLIMIT_AS; Linux), printing its lines as they come.  Returns ``True`` when at least
    the RDP bound was printed, ``None`` (after printing the reason) when the ledger is refused.
    Where ``fork`` is unavailable the analysis runs in-process, without limits."""
    import multiprocessing as mp

    pld = not args.no_pld
    time_limit = args.time_limit if args.time_limit and args.time_limit > 0 else None
    memory = int(args.memory_limit_mb * 2**20) if args.memory_limit_mb and args.memory_limit_mb > 0 else None
    if "fork" not in mp.get_all_start_methods():
        for line in _analysis_steps(ledger, args.delta, pld):
            print(line)
        return True
    # import the analysis before forking, so the child's time and memory go to the analysis
    from . import analysis  # noqa: F401
    from .analysis import compute_pld_from_ledger, compute_rdp_from_ledger  # noqa: F401

    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_analysis_worker, args=(child, ledger, args.delta, pld, memory), daemon=True)
    sys.stdout.flush()
    proc.start()
    child.close()
    deadline = None if time_limit is None else args.started + time_limit
    printed = 0
    reason = None
    try:
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                reason = (
                    f"the analysis did not finish within the time limit of {time_limit:g} s "
                    "(--time-limit; 0 for none)"
                )
                break
            if not parent.poll(remaining):
                continue
            try:
                kind, text = parent.recv()
            except EOFError:
                reason = "the analysis process ended without a result (killed, or out of memory)"
                break
            if kind == "line":
                print(text)
                printed += 1
            elif kind == "done":
                break
            else:
                reason = text
                break
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join()
        parent.close()
    if reason is None:
        return True
    if printed >= 2:  # the RDP bound is out; only the tighter accountants are missing
        print(f"  (not computed: {reason})")
        return True
    print(f"pytorch-privacy audit: error: ledger refused: {reason}", file=sys.stderr)
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

    args.started = time.monotonic()
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

    results = _bounded_analysis(ledger, args)
    if results is None:
        return _EXIT_ERROR
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
