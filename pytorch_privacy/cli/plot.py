"""Epsilon against steps (RDP and PLD at a delta) and its plot (``audit --plot``, ``demo --plot``), and
the one-run audit's ROC curve and score histogram (``demo --plot --audit``)."""

from __future__ import annotations

import math
import os
import time


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError(
            "--plot needs matplotlib, which is not installed: pip install 'pytorch_privacy[plot]'"
        ) from None


def _prefix_ledger(ledger, steps: int):
    """The ledger of the first ``steps`` steps (a copy; runs are cut at ``steps``)."""
    from ..dp_query.privacy_ledger import PrivacyLedger, content_digest

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
    from ..analysis import DEFAULT_ORDERS, compute_rdp_from_ledger, get_privacy_spent
    from ..analysis.tree_aggregation import pld_accountant_for

    def rdp_eps(k: int) -> float:
        if k == 0:
            return 0.0
        r = compute_rdp_from_ledger(_prefix_ledger(ledger, k), DEFAULT_ORDERS)
        return float(get_privacy_spent(DEFAULT_ORDERS, r, target_delta=delta)[0])

    def pld_eps(k: int) -> float:
        # tree-aggregation events through their equivalent Gaussians, as the audit does
        return 0.0 if k == 0 else float(pld_accountant_for(_prefix_ledger(ledger, k).to_event()).get_epsilon(delta))

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


def audit_plot_path(plot_path: str) -> str:
    """Where ``demo --plot P --audit`` draws the audit: ``P`` with ``_audit`` before the suffix."""
    root, ext = os.path.splitext(plot_path)
    return f"{root}_audit{ext or '.png'}"


def plot_audit(result, path: str, *, claimed: float | None = None, title: str = "") -> None:
    """Draw a one-run audit (:class:`~pytorch_privacy.auditing.one_run.OneRunAuditResult`) into the
    PNG file ``path``: the ROC curve of its canary scores against the inclusion bits (log-log, with
    the chance diagonal and, when ``claimed`` is given, the line ``TPR = e^claimed FPR`` that no
    test of a ``claimed``-DP mechanism can exceed at ``delta = 0``), and the histogram of the scores
    of included and excluded canaries.  Needs matplotlib."""
    _require_matplotlib()
    import matplotlib
    import numpy as np

    from ..auditing.statistics import roc_curve

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    scores, inc = np.asarray(result.scores, dtype=float), np.asarray(result.included, dtype=bool)
    fpr, tpr, _ = roc_curve(inc, scores)
    floor = 1.0 / max(len(scores), 1)
    fig = Figure(figsize=(9.0, 3.6), dpi=100)
    ax, hx = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    keep = (fpr > 0) & (tpr > 0)
    ax.loglog(fpr[keep], tpr[keep], color="tab:blue", label="canary scores")
    grid = np.logspace(np.log10(floor), 0, 50)
    ax.loglog(grid, grid, color="gray", ls=":", label="chance")
    if claimed is not None and math.isfinite(claimed):
        ax.loglog(grid, np.minimum(1.0, math.exp(claimed) * grid), color="tab:red", ls="--", label=f"limit at epsilon {claimed:.2f}")
    ax.set_xlim(floor, 1.0)
    ax.set_ylim(floor, 1.05)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"ROC: empirical epsilon >= {result.epsilon_lower_bound:.2f}")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3, which="both")
    bins = np.histogram_bin_edges(scores, bins=40)
    hx.hist(scores[~inc], bins=bins, alpha=0.6, label=f"out ({int((~inc).sum())})", color="tab:gray")
    hx.hist(scores[inc], bins=bins, alpha=0.6, label=f"in ({int(inc.sum())})", color="tab:orange")
    hx.set_xlabel("canary score")
    hx.set_ylabel("canaries")
    hx.set_title("scores of included and excluded canaries")
    hx.legend(fontsize=8)
    fig.suptitle(title or "one-run audit")
    fig.tight_layout()
    try:
        fig.savefig(path, format="png")
    except OSError as exc:
        raise ValueError(f"cannot write the plot to {path}: {exc.strerror or exc}") from None
