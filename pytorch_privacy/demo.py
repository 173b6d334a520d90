"""The bundled demo: DP-SGD on scikit-learn's ``digits`` images (8x8, 1797 images, no download).

``pytorch-privacy demo`` trains a small CNN with :class:`DPGaussianOptimizer` on Poisson-sampled
batches, records every step in a :class:`PrivacyLedger`, saves the ledger after every epoch
(atomically, so an interrupted run loses nothing already accounted), and prints accuracy and the
running (epsilon, delta) bound, with a ``tqdm`` progress bar over each epoch's steps when tqdm is
installed.  The ledger file is made readable by others (mode 0644 unless told otherwise:
:meth:`PrivacyLedger.save` writes through a private temporary file), and ``plot_path`` draws epsilon
against steps (RDP and PLD; needs matplotlib).  Without scikit-learn it falls back to a synthetic
digits-shaped dataset (and says so).
"""

from __future__ import annotations

import math
import os
import time

import torch
from torch import nn

__all__ = ["DigitsCNN", "load_digits_tensors", "run_demo"]


class DigitsCNN(nn.Module):
    """A small tanh CNN for 1x8x8 images (GroupNorm-free: no layer mixes examples)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.Tanh(),
            nn.MaxPool2d(2),  # 4x4
            nn.Conv2d(16, 32, 3, padding=1),
            nn.Tanh(),
            nn.MaxPool2d(2),  # 2x2
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * 2 * 2, 32), nn.Tanh(), nn.Linear(32, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def load_digits_tensors(seed: int = 0, test_fraction: float = 0.2):
    """``(x_train, y_train, x_test, y_test, source)``; images scaled to [0, 1], shape ``[n, 1, 8, 8]``."""
    g = torch.Generator().manual_seed(seed)
    try:
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.tensor(d.target, dtype=torch.long)
        source = "scikit-learn digits (1797 real 8x8 images)"
    except ImportError:  # pragma: no cover - exercised only without scikit-learn
        n = 1797
        y = torch.randint(0, 10, (n,), generator=g)
        protos = torch.rand(10, 1, 8, 8, generator=g)
        x = (protos[y] + 0.3 * torch.randn(n, 1, 8, 8, generator=g)).clamp(0, 1)
        source = "synthetic digits-shaped data (scikit-learn not installed: pip install scikit-learn)"
    perm = torch.randperm(len(y), generator=g)
    n_test = int(len(y) * test_fraction)
    te, tr = perm[:n_test], perm[n_test:]
    return x[tr], y[tr], x[te], y[te], source


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return acc


def _progress_factory(enabled: bool):
    """``tqdm`` (one bar per epoch, removed when the epoch ends) or a pass-through."""
    if enabled:
        try:
            from tqdm.auto import tqdm

            return lambda it, **kw: tqdm(it, leave=False, unit="step", **kw)
        except ImportError:
            pass
    return lambda it, **kw: it


def _save_ledger(ledger, path: str, mode: int | None) -> None:
    """Save atomically, then set the file's permissions; errors name the user's path (not the
    temporary file the atomic write goes through)."""
    try:
        ledger.save(path)
        if mode is not None:
            os.chmod(path, mode)
    except OSError as exc:
        raise ValueError(f"cannot save the ledger to {path}: {exc.strerror or exc}") from None


def _make_canaries(model: nn.Module, m: int | None, clip: float, seed: int, log):
    """The demo's gradient canaries (``None`` without ``--audit``)."""
    if m is None:
        return None
    from .auditing.canaries import GradientCanaries

    d = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= d:
        raise ValueError(f"audit needs between 1 and {d} canaries (one model coordinate each), got {m!r}")
    canaries = GradientCanaries(model, m, l2_norm_clip=clip, kind="dirac", seed=seed + 1000)
    log(
        f"audit: {m} gradient canaries (Dirac, norm C), {canaries.num_included} of them in (each with "
        "probability 1/2), sampled at q like the real examples"
    )
    return canaries


def _step(opt, model: nn.Module, x: torch.Tensor, y: torch.Tensor, canaries, q: float) -> torch.Tensor:
    """One private step; with canaries, the sampled ones join the step and are scored after it."""
    if canaries is None:
        return opt.fit_batch(x, y)
    from .auditing.canaries import canary_step

    loss = canary_step(opt, x, y, canaries.records(canaries.sample(q)))
    canaries.observe_model(model)
    return loss


def _pld_epsilon(ledger, delta: float, eps_rdp: float, log) -> float | None:
    """The PLD bound of the ledger, logged beside the RDP one; ``None`` (and said) when the PLD
    accountant cannot compute it (a noise multiplier so small that one step's loss overflows)."""
    from .analysis import compute_pld_from_ledger

    try:
        eps_pld = compute_pld_from_ledger(ledger).get_epsilon(delta) if len(ledger) else 0.0
    except ValueError as exc:
        log(f"PLD bound not computed ({exc}); the RDP bound {eps_rdp:.3f} stands")
        return None
    log(f"tighter PLD bound for the same ledger: epsilon {eps_pld:.3f} (RDP: {eps_rdp:.3f})")
    return eps_pld


def _finish_audit(canaries, delta: float, confidence: float, eps_rdp: float, eps_pld: float | None, log):
    from .auditing.one_run import one_run_audit

    res = one_run_audit(canaries.scores, canaries.included, delta=delta, confidence=confidence)
    pld_text = "n/a" if eps_pld is None else f"{eps_pld:.3f}"
    log(
        f"audit (one run, {res.m} canaries): empirical epsilon >= {res.epsilon_lower_bound:.3f} "
        f"({100 * confidence:g}% confidence); ledger upper bounds: RDP {eps_rdp:.3f}, PLD {pld_text} "
        f"(delta {delta:g}); {res.correct}/{res.guesses} guesses right"
    )
    if res.epsilon_lower_bound > min(eps_rdp, eps_rdp if eps_pld is None else eps_pld):
        log("WARNING: the empirical lower bound exceeds the claimed epsilon: evidence of a privacy bug")
    return res


def run_demo(
    *,
    epochs: int = 15,
    batch_size: int = 64,
    noise_multiplier: float = 1.0,
    l2_norm_clip: float = 1.0,
    lr: float = 0.1,
    delta: float = 1e-5,
    seed: int = 0,
    device: str = "cpu",
    engine: str = "auto",
    ledger_path: str | None = "demo_ledger.json",
    ledger_mode: int | None = 0o644,
    plot_path: str | None = None,
    progress: bool = True,
    audit: int | None = None,
    audit_confidence: float = 0.95,
    log=print,
) -> dict:
    """Train privately and return ``{"test_accuracy", "epsilon", "steps", "seconds", ...}``.

    ``ledger_path`` is (over)written after every epoch and then given the permissions
    ``ledger_mode`` (``None``: leave them as :meth:`PrivacyLedger.save` made them, i.e. 0600);
    the command line refuses an existing file unless ``--overwrite``.  ``plot_path``: a PNG of
    epsilon against steps.  ``progress``: a tqdm bar per epoch (when tqdm is installed).

    ``audit=m``: the one-run audit (Steinke, Nasr, Jagielski 2023) in the same run: ``m`` Dirac
    gradient canaries (:class:`~pytorch_privacy.auditing.canaries.GradientCanaries`), each in
    with probability 1/2 and then Poisson-sampled at ``q`` like the real examples (the ledger's
    population counts them), scored by the released gradients; prints ``empirical epsilon >= X
    (95% confidence)`` beside the ledger's RDP/PLD upper bounds, and with ``plot_path`` also
    draws the audit's ROC curve and score histogram (``<plot>_audit.png``).  The result gains
    ``"audit"`` (the :class:`~pytorch_privacy.auditing.one_run.OneRunAuditResult`)."""
    from .analysis import RdpAccountant
    from .dp_query import PrivacyLedger
    from .optimizer import DPDataLoader, DPGaussianOptimizer

    torch.manual_seed(seed)
    x_tr, y_tr, x_te, y_te, source = load_digits_tensors(seed)
    x_tr, y_tr, x_te, y_te = (t.to(device) for t in (x_tr, y_tr, x_te, y_te))
    n = len(y_tr)
    if batch_size > n:
        raise ValueError(f"batch_size {batch_size} exceeds the training set size {n}")
    q = batch_size / n
    log(f"data: {source}; train {n}, test {len(y_te)}")
    log(
        f"DP-SGD: Poisson sampling q={q:.4f} (expected batch {batch_size}), clip C={l2_norm_clip}, "
        f"noise multiplier {noise_multiplier}, lr {lr}, {epochs} epochs, delta {delta:g}"
    )

    model = DigitsCNN().to(device)
    canaries = _make_canaries(model, audit, l2_norm_clip, seed, log)
    population = n + (canaries.num_included if canaries is not None else 0)
    ledger = PrivacyLedger(population, q, metadata={"demo": "digits", "model": "DigitsCNN"})
    opt = DPGaussianOptimizer(
        torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9),
        model,
        nn.CrossEntropyLoss(reduction="none"),
        l2_norm_clip=l2_norm_clip,
        noise_multiplier=noise_multiplier,
        ledger=ledger,
        engine=engine,
    )
    loader = DPDataLoader(
        torch.utils.data.TensorDataset(torch.arange(n)),
        sample_rate=q,
        generator=torch.Generator().manual_seed(seed + 1),
    )
    accountant = RdpAccountant()
    steps_per_epoch = len(loader)
    t0 = time.perf_counter()
    eps = 0.0
    bar = _progress_factory(progress)
    for epoch in range(1, epochs + 1):
        losses = []
        for (idx,) in bar(loader, total=steps_per_epoch, desc=f"epoch {epoch}/{epochs}"):
            idx = idx.to(device)
            losses.append(_step(opt, model, x_tr[idx], y_tr[idx], canaries, q))
        accountant = RdpAccountant().compose_ledger(ledger)
        eps = accountant.get_epsilon(delta)
        if ledger_path:
            _save_ledger(ledger, ledger_path, ledger_mode)
        mean_loss = torch.stack(losses).mean().item() if losses else math.nan
        log(
            f"epoch {epoch:3d}/{epochs}  steps {len(ledger):5d}  loss {mean_loss:.3f}  "
            f"test acc {_accuracy(model, x_te, y_te):.3f}  epsilon {eps:.3f} (delta {delta:g})  "
            f"{time.perf_counter() - t0:.1f}s"
        )
    acc = _accuracy(model, x_te, y_te)
    seconds = time.perf_counter() - t0
    eps_pld = _pld_epsilon(ledger, delta, eps, log)
    log(
        f"done: test accuracy {acc:.3f}, ({eps:.3f}, {delta:g})-DP over {len(ledger)} steps "
        f"({steps_per_epoch} per epoch), {seconds:.1f}s"
    )
    if ledger_path:
        log(f"ledger saved to {ledger_path}; audit it with: pytorch-privacy audit {ledger_path} --delta {delta:g}")
    result = {"test_accuracy": acc, "epsilon": eps, "epsilon_pld": eps_pld, "delta": delta, "steps": len(ledger), "seconds": seconds}
    if canaries is not None:
        result["audit"] = _finish_audit(canaries, delta, audit_confidence, eps, eps_pld, log)
    if plot_path:
        from .cli.plot import epsilon_curve, plot_epsilon_curve

        plot_epsilon_curve(epsilon_curve(ledger, delta), plot_path, title="pytorch-privacy demo (digits)")
        log(f"plot: epsilon against steps written to {plot_path}")
        if canaries is not None:
            from .cli.plot import audit_plot_path, plot_audit

            apath = audit_plot_path(plot_path)
            plot_audit(result["audit"], apath, claimed=eps if eps_pld is None else eps_pld, title="one-run audit of the demo (digits)")
            log(f"plot: the audit's ROC curve and score histogram written to {apath}")
    return result
