"""``pytorch-privacy`` console script.

Subcommands:

* ``demo``     train a small CNN privately on scikit-learn's bundled ``digits`` images (no
  download), save the ledger, print the (epsilon, delta) bound.
* ``audit``    check a saved ledger file's integrity (``unsigned``, ``signature OK`` or
  ``tampered``), flag suspicious content, and recompute the bound: RDP, moments accountant and PLD
  side by side (torch is not imported).  Exit status: 0 verified or clean, 1 tampered, 2 refused
  or invalid, 3 unsigned and either suspicious or expected to be signed (``--key``).
* ``privacy``  epsilon of a DP-SGD training plan (like TF Privacy's compute_dp_sgd_privacy), by
  RDP or PLD (``--accountant``).
* ``noise``    the smallest noise multiplier meeting a target epsilon for a training plan.

``audit --plot eps.png`` (and ``demo --plot``) draws epsilon against steps for RDP and PLD at the
given delta; it needs matplotlib (``pip install 'pytorch_privacy[plot]'``).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Sequence

__all__ = ["main", "build_parser", "epsilon_curve", "plot_epsilon_curve", "ENGINE_CHOICES"]

#: ``--engine`` values: ``auto`` and every built-in engine (a test checks this against the registry;
#: the list is spelled out so that building the parser does not import torch).
ENGINE_CHOICES = ("auto", "ghost", "functorch", "loop")


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


def _positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {s!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {s}")
    return v


def _nonnegative_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {s!r}") from None
    if not (v >= 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {s}")
    return v


def _delta(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"delta must be a number in (0, 1), got {s!r}") from None
    if not 0 < v < 1:
        raise argparse.ArgumentTypeError(f"delta must be in (0, 1), got {s}")
    return v


def _file_mode(s: str) -> int:
    try:
        v = int(s, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an octal file mode such as 644, got {s!r}") from None
    if not 0 <= v <= 0o777:
        raise argparse.ArgumentTypeError(f"must be an octal file mode between 000 and 777, got {s}")
    return v


# argparse names the type function in some of its messages ("invalid <name> value"): readable names
for _f, _name in (
    (_positive_int, "positive integer"),
    (_positive_float, "positive number"),
    (_nonnegative_float, "non-negative number"),
    (_delta, "delta"),
    (_file_mode, "octal file mode"),
):
    _f.__name__ = _f.__qualname__ = _name


def _version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("pytorch_privacy")
    except PackageNotFoundError:  # running from a source tree
        from . import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the console script (exposed for the docs and tests)."""
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = argparse.ArgumentParser(prog="pytorch-privacy", description=__doc__.split("\n\n")[0], formatter_class=fmt)
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="{demo,audit,privacy,noise}")

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
    d.add_argument("--plot", default=None, help="also draw epsilon against steps (RDP and PLD) into this PNG file")
    d.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")

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
    return p


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


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


#: Label column of the audit's accountant lines (every label fits, so the epsilons line up).
_LABEL_WIDTH = 28


def _analysis_steps(ledger, delta: float, pld: bool):
    """The audit's analysis, one printable line at a time (a generator, so that a time limit can
    stop it between accountants).  An empty ledger released nothing: epsilon 0 from every
    accountant (the classic moments conversion would otherwise report log(1/delta)/lambda > 0)."""
    from .analysis import DEFAULT_ORDERS, compute_rdp_from_ledger, get_privacy_spent, get_privacy_spent_moments

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
        from .analysis import compute_pld_from_ledger

        acc = compute_pld_from_ledger(ledger)
        yield line("PLD (pessimistic, tight)", acc.get_epsilon(delta))


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
        args.partial = True
        return True
    print(f"pytorch-privacy audit: error: ledger refused: {reason}", file=sys.stderr)
    return None


def _load_ledger(path: str, key):
    """``PrivacyLedger.load`` with one wording for every file that is not a ledger (missing,
    a directory, binary, foreign JSON, corrupt), naming the user's path."""
    from .dp_query.privacy_ledger import LedgerIntegrityError, PrivacyLedger

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
    from .dp_query.privacy_ledger import (
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


# -- plots ------------------------------------------------------------------------------------


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError(
            "--plot needs matplotlib, which is not installed: pip install 'pytorch_privacy[plot]'"
        ) from None


def _prefix_ledger(ledger, steps: int):
    """The ledger of the first ``steps`` steps (a copy; runs are cut at ``steps``)."""
    from .dp_query.privacy_ledger import PrivacyLedger, content_digest

    d = ledger.to_dict()
    d.pop("signature", None)
    d.pop("digest", None)
    runs, left = [], steps
    for r in d["runs"]:
        if left <= 0:
            break
        take = min(left, r["count"])
        runs.append(dict(r, count=take))
        left -= take
    d["runs"] = runs
    d["digest"] = {"algorithm": "sha256", "value": content_digest({k: v for k, v in d.items() if k != "digest"})}
    return PrivacyLedger.from_dict(d)


def _coarse_to_fine(n: int) -> list[int]:
    """Indices ``0 .. n-1`` ordered so that every prefix of the order is spread over the range:
    the last and the first, then midpoints of the gaps, halving the gaps each round."""
    if n <= 0:
        return []
    order, seen = [n - 1, 0], {n - 1, 0}
    step = n - 1
    while step > 1:
        half = step / 2
        k = half
        while k < n - 1:
            i = int(round(k))
            if i not in seen:
                seen.add(i)
                order.append(i)
            k += step
        step = half
    order += [i for i in range(n) if i not in seen]
    return order[:n] if n > 1 else [0]


def epsilon_curve(
    ledger,
    delta: float,
    *,
    points: int = 50,
    pld: bool = True,
    pld_points: int = 25,
    seconds: float = 10.0,
    pld_seconds: float = 5.0,
) -> dict:
    """Epsilon at ``delta`` after the first k steps of ``ledger``, for about ``points`` values of k
    from 0 to ``len(ledger)``: the RDP bound (tight conversion) and, at up to ``pld_points`` of
    them, the PLD bound.

    The cost is bounded: the points are computed coarse to fine (the last step first, then the
    midpoints of the gaps), and each accountant stops adding points once it has used ``seconds``
    (RDP) or ``pld_seconds`` (PLD); the last step is always computed, so a curve is never empty.

    Returns ``{"steps": [...], "rdp": [...], "pld_steps": [...], "pld": [...], "delta": delta}``.
    """
    from .analysis import DEFAULT_ORDERS, compute_pld_from_ledger, compute_rdp_from_ledger, get_privacy_spent

    def rdp_eps(k: int) -> float:
        if k == 0:
            return 0.0
        r = compute_rdp_from_ledger(_prefix_ledger(ledger, k), DEFAULT_ORDERS)
        return float(get_privacy_spent(DEFAULT_ORDERS, r, target_delta=delta)[0])

    def pld_eps(k: int) -> float:
        return 0.0 if k == 0 else float(compute_pld_from_ledger(_prefix_ledger(ledger, k)).get_epsilon(delta))

    def sweep(ks: list[int], f, budget: float) -> dict[int, float]:
        out: dict[int, float] = {}
        t0 = time.monotonic()
        for j, i in enumerate(_coarse_to_fine(len(ks))):
            if j >= 2 and time.monotonic() - t0 > budget:
                break
            out[ks[i]] = f(ks[i])
        return out

    total = len(ledger)
    steps = sorted({round(total * i / max(points - 1, 1)) for i in range(points)}) if total else [0]
    rdp = sweep(steps, rdp_eps, seconds)
    pld_res: dict[int, float] = {}
    if pld and total:
        stride = max(1, math.ceil((len(steps) - 1) / max(pld_points - 1, 1)))
        chosen = steps[::stride]
        if chosen[-1] != steps[-1]:
            chosen.append(steps[-1])
        pld_res = sweep(chosen, pld_eps, pld_seconds)
    rdp_steps, pld_steps = sorted(rdp), sorted(pld_res)
    return {
        "steps": rdp_steps,
        "rdp": [rdp[k] for k in rdp_steps],
        "pld_steps": pld_steps,
        "pld": [pld_res[k] for k in pld_steps],
        "delta": delta,
    }


def plot_epsilon_curve(curve: dict, path: str, *, target_epsilon: float | None = None, title: str = "") -> None:
    """Draw an :func:`epsilon_curve` (epsilon against steps, RDP and PLD) into the PNG file
    ``path``, with a horizontal line at ``target_epsilon`` when given.  Needs matplotlib."""
    _require_matplotlib()
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 3.6), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(curve["steps"], curve["rdp"], label="RDP (tight conversion)", color="tab:blue")
    if curve["pld_steps"]:
        ax.plot(curve["pld_steps"], curve["pld"], "o-", ms=3, label="PLD", color="tab:orange")
    if target_epsilon is not None:
        ax.axhline(target_epsilon, color="tab:red", ls="--", label=f"budget epsilon = {target_epsilon:g}")
    ax.set_xlabel("steps")
    ax.set_ylabel(f"epsilon at delta = {curve['delta']:g}")
    ax.set_title(title or "privacy spent")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    fig.tight_layout()
    try:
        fig.savefig(path, format="png")
    except OSError as exc:
        raise ValueError(f"cannot write the plot to {path}: {exc.strerror or exc}") from None


# -- privacy, noise, demo ----------------------------------------------------------------------


def _pld_epsilon(n: int, q: float, sigma: float, steps: int, delta: float) -> float:
    from .analysis import compute_pld_from_ledger
    from .dp_query import GaussianEvent, PrivacyLedger

    ledger = PrivacyLedger(n, q)
    ledger.record_sample(GaussianEvent(sigma), steps)
    return float(compute_pld_from_ledger(ledger).get_epsilon(delta))


def _cmd_privacy(args) -> int:
    import warnings

    from .analysis.compute_dp_sgd_privacy_lib import check_plan, classic_epsilon, epsilon_for

    q, steps, delta = check_plan(args.N, args.batch_size, args.epochs, args.delta)
    sigma = args.noise_multiplier  # positive and finite (argparse type)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the 1/N warning is printed below
        eps, order = epsilon_for(q, sigma, steps, delta)
        classic_eps, classic_lambda = classic_epsilon(q, sigma, steps, delta)
        eps_pld = _pld_epsilon(args.N, q, sigma, steps, delta) if args.accountant == "pld" else None
    print(
        f"DP-SGD with Poisson sampling rate q = {args.batch_size}/{args.N} = {100 * q:.4g}% and "
        f"noise_multiplier = {sigma:g}, iterated over {_plural(steps, 'step')} ({args.epochs:g} epochs),"
    )
    if args.accountant == "pld":
        print(f"satisfies differential privacy with eps = {eps_pld:.4g} and delta = {delta:g}.")
        print("  accountant: PLD (privacy loss distribution, pessimistic discretisation; --accountant pld)")
        print(f"  for comparison, RDP (tight conversion): eps = {eps:.4g} (order {order:.4g})")
    else:
        print(f"satisfies differential privacy with eps = {eps:.4g} and delta = {delta:g}.")
        print("  accountant: RDP (exact RDP of the subsampled Gaussian, Mironov-Talwar-Zhang 2019, with the")
        print(f"              tight RDP->DP conversion of Balle et al. 2020; --accountant rdp), order {order:.4g}")
        print(
            f"  classic conversion (moments accountant, Abadi et al. 2016): eps = {classic_eps:.4g} "
            f"(order {classic_lambda + 1:.4g})"
        )
    print("  assumed: Poisson sampling (each record independently with probability q at every step),")
    print("           add-or-remove-one neighbouring datasets, steps = ceil(epochs * N / batch_size).")
    if delta > 1.0 / args.N:
        print(f"  warning: delta = {delta:g} exceeds 1/N = {1.0 / args.N:.3g}; choose delta well below 1/N.")
    print("  note: shuffled fixed-size batches are NOT Poisson sampling; this bound does not cover them.")
    return 0


def _cmd_noise(args) -> int:
    from .analysis import compute_noise
    from .analysis.compute_dp_sgd_privacy_lib import check_plan

    sigma = compute_noise(args.N, args.batch_size, args.epsilon, args.epochs, args.delta)
    if args.accountant == "pld":
        # PLD is at least as tight as RDP: the RDP answer meets the target; bisect below it
        q, steps, delta = check_plan(args.N, args.batch_size, args.epochs, args.delta)
        hi, lo = sigma, sigma / 2.0
        while _pld_epsilon(args.N, q, lo, steps, delta) <= args.epsilon:
            hi, lo = lo, lo / 2.0
            if lo < 1e-2:
                raise ValueError(f"target epsilon {args.epsilon:g} is met by every noise multiplier down to {hi:g}")
        while hi - lo > 1e-3 * hi:
            mid = 0.5 * (lo + hi)
            if _pld_epsilon(args.N, q, mid, steps, delta) <= args.epsilon:
                hi = mid
            else:
                lo = mid
        sigma = hi
        accountant = "PLD accountant (privacy loss distribution; --accountant pld)"
    else:
        accountant = "RDP accountant (tight conversion; --accountant rdp)"
    print(
        f"noise multiplier {sigma:.4f} gives epsilon <= {args.epsilon:g} at delta={args.delta:g} for "
        f"{args.epochs:g} epochs of Poisson-sampled batches (q = {args.batch_size}/{args.N}, add/remove-one)"
    )
    print(f"  accountant: {accountant}")
    return 0


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
    _check_device(args.device)
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
        ledger_mode=args.ledger_mode,
        plot_path=args.plot,
        progress=not args.no_progress,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pytorch-privacy`` console script."""
    args = build_parser().parse_args(argv)
    handler = {"demo": _cmd_demo, "audit": _cmd_audit, "privacy": _cmd_privacy, "noise": _cmd_noise}[args.command]
    try:
        return handler(args)
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        print(f"pytorch-privacy {args.command}: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"pytorch-privacy {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pytorch-privacy {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001
        if args.command != "audit":
            raise
        # exit status 1 means "tampered": an unexpected failure must not read as it
        print(f"pytorch-privacy audit: error: unexpected {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
