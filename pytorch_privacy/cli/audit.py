"""``pytorch-privacy audit``: integrity verdict, suspicious content, and the bound recomputed in
a child process under time and memory limits."""

from __future__ import annotations

import math
import os
import sys
import time

from .demo_command import _check_output_path
from .plot import _require_matplotlib, epsilon_curve, plot_epsilon_curve


#: exit statuses of ``audit``
_EXIT_OK, _EXIT_TAMPERED, _EXIT_ERROR, _EXIT_UNVERIFIED = 0, 1, 2, 3


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


#: At most this many lines of the ledger summary are printed.
AUDIT_SUMMARY_LINES = 25


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


#: How an accountant line says that this accountant cannot bound the ledger.
_NOT_COMPUTED = "not computed: "

#: Label column of the audit's accountant lines (every label fits, so the epsilons line up).
_LABEL_WIDTH = 28


def _analysis_steps(ledger, delta: float, pld: bool):
    """The audit's analysis, one printable line at a time (a generator, so that a time limit can
    stop it between accountants).  An empty ledger released nothing: epsilon 0 from every
    accountant (the classic moments conversion would otherwise report log(1/delta)/lambda > 0)."""
    from ..analysis import DEFAULT_ORDERS, compute_rdp_from_ledger, get_privacy_spent, get_privacy_spent_moments

    def line(label: str, eps: float, note: str = "") -> str:
        return f"  {label:<{_LABEL_WIDTH}}epsilon = {eps:.4f}" + (f"   ({note})" if note else "")

    yield f"delta = {delta:g}"
    empty = len(ledger) == 0
    if empty:
        yield line("RDP (tight conversion)", 0.0, "empty ledger: nothing released")
        yield line("moments accountant, classic", 0.0, "empty ledger")
        if pld:
            yield line("PLD (pessimistic, tight)", 0.0, "empty ledger")
        return
    rdp = compute_rdp_from_ledger(ledger, DEFAULT_ORDERS)
    eps, _, order = get_privacy_spent(DEFAULT_ORDERS, rdp, target_delta=delta)
    yield line("RDP (tight conversion)", eps, f"order {order:g}")
    # moments accountant: log moment alpha(lambda) = lambda * RDP(lambda + 1)
    lambdas = [o - 1.0 for o in DEFAULT_ORDERS]
    eps_m, _, lam_m = get_privacy_spent_moments(lambdas, [l * r for l, r in zip(lambdas, rdp)], target_delta=delta)
    yield line("moments accountant, classic", eps_m, f"lambda {lam_m:g}")
    if pld:
        eps_pld, why = _pld_epsilon(ledger, delta)
        if why is None:
            yield line("PLD (pessimistic, tight)", eps_pld)
        else:  # the --plot curve then leaves PLD out (the parent sees _NOT_COMPUTED)
            yield f"  {'PLD (pessimistic, tight)':<{_LABEL_WIDTH}}{_NOT_COMPUTED}{why}"


def _pld_epsilon(ledger, delta: float) -> tuple[float, str | None]:
    """The PLD epsilon of the ledger, or ``(nan, reason)`` when the PLD accountant cannot account
    its events.  Tree-aggregation events are accounted as their equivalent Gaussian mechanisms
    (exact: :func:`~pytorch_privacy.analysis.tree_aggregation.pld_accountant_for`)."""
    from ..analysis.tree_aggregation import pld_accountant_for

    try:
        acc = pld_accountant_for(ledger.to_event())
    except ValueError as exc:
        return math.nan, f"the PLD accountant does not support this ledger's events ({exc})"
    return acc.get_epsilon(delta), None


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
            args.partial = getattr(args, "partial", False) or _NOT_COMPUTED in line
        return True
    # import the analysis before forking, so the child's time and memory go to the analysis
    from .. import analysis  # noqa: F401
    from ..analysis import compute_pld_from_ledger, compute_rdp_from_ledger  # noqa: F401

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
                if _NOT_COMPUTED in text:
                    args.partial = True
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
        args.partial = True
        return True
    print(f"pytorch-privacy audit: error: ledger refused: {reason}", file=sys.stderr)
    return None


def _load_ledger(path: str, key):
    """``PrivacyLedger.load`` with one wording for every file that is not a ledger (missing,
    a directory, binary, foreign JSON, corrupt), naming the user's path."""
    from ..dp_query.privacy_ledger import LedgerIntegrityError, PrivacyLedger

    try:
        return PrivacyLedger.load(path, key=key)
    except LedgerIntegrityError:
        raise
    except FileNotFoundError:
        raise ValueError(f"{path} is not a ledger file (no such file)") from None
    except IsADirectoryError:
        raise ValueError(f"{path} is not a ledger file (it is a directory)") from None
    except PermissionError:
        raise ValueError(f"{path} is not a ledger file this user can read (permission denied)") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a ledger file (binary content, not UTF-8 JSON)") from None
    except OSError as exc:
        raise ValueError(f"{path} is not a ledger file ({exc.strerror or exc})") from None
    except (ValueError, TypeError, RecursionError) as exc:
        raise ValueError(f"{path} is not a ledger file ({exc})") from None


def _summary_lines(ledger) -> list[str]:
    """The ledger summary with a grammatical header ("94 steps in 1 run, 1 distinct setting")."""
    lines = ledger.summary().splitlines()
    header = (
        f"PrivacyLedger: {_plural(len(ledger), 'step')} in {_plural(len(ledger.runs), 'run')}, "
        f"{_plural(len(ledger.groups()), 'distinct setting')}"
    )
    return [header] + lines[1:]


def _cmd_audit(args) -> int:
    from ..dp_query.privacy_ledger import (
        SIGNATURE_OK,
        TAMPERED,
        UNSIGNED,
        LedgerIntegrityError,
        suspicious_content,
    )

    args.started = time.monotonic()
    if args.plot is not None:
        _check_output_path(args.plot, "--plot", overwrite=True)
        _require_matplotlib()
    key = _read_key(args)
    try:
        ledger = _load_ledger(args.ledger, key)
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
    lines = _summary_lines(ledger)
    print("\n".join(lines[:AUDIT_SUMMARY_LINES]))
    if len(lines) > AUDIT_SUMMARY_LINES:
        print(f"  ... {_plural(len(lines) - AUDIT_SUMMARY_LINES, 'more setting')}")

    results = _bounded_analysis(ledger, args)
    if results is None:
        return _EXIT_ERROR
    if args.plot is not None:
        target = args.target_epsilon
        if target is None:
            t = ledger.metadata.get("target_epsilon") if isinstance(ledger.metadata, dict) else None
            if isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) and t > 0:
                target = float(t)
        # PLD only if the audit computed it within its limits (the plot's last point repeats it)
        curve = epsilon_curve(ledger, args.delta, pld=not args.no_pld and not getattr(args, "partial", False))
        plot_epsilon_curve(curve, args.plot, target_epsilon=target, title=os.path.basename(args.ledger))
        print(f"plot: epsilon against steps written to {args.plot}")
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
