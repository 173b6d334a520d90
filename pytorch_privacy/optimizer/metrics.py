"""Per-step metrics of :class:`~pytorch_privacy.optimizer.DPOptimizer` (``metrics=True`` or a
``metrics_callback``)."""

from __future__ import annotations

import torch

__all__ = ["step_metrics"]


def step_metrics(opt, qmetrics_before: dict | None) -> dict[str, float]:
    """Named scalars of the step just taken by ``opt`` (a :class:`~.dp_optimizer.DPOptimizer`):
    step, records, mean loss, dropped records, per-example gradient-norm quantiles and the
    fraction clipped (when norms were collected), the query's metrics, and epsilon under a
    budget.  Computed after the release (post-processing)."""
    acc = opt._acc
    m: dict[str, float] = {"step": float(opt._steps), "num_records": float(acc.num_records)}
    if acc.loss_sum is not None and acc.loss_count:
        m["loss"] = float(acc.loss_sum) / acc.loss_count
    m["dropped_records"] = float(opt.dropped_records)
    clip = None
    for key in ("l2_norm_clip", "clip"):
        if qmetrics_before and key in qmetrics_before:
            clip = qmetrics_before[key]
            break
    if acc.norms:
        norms = torch.cat([x.reshape(-1).float() for x in acc.norms])
        norms = norms[torch.isfinite(norms)]
        if norms.numel():
            qs = torch.quantile(norms, torch.tensor([0.1, 0.5, 0.9], device=norms.device))
            m["grad_norm_p10"], m["grad_norm_p50"], m["grad_norm_p90"] = (float(v) for v in qs)
            m["grad_norm_max"] = float(norms.max())
            if clip is not None:
                m["clipped_fraction"] = float((norms > clip).float().mean())
    for k, v in opt._release_query.derive_metrics(opt._global_state).items():
        m[f"query/{k}"] = float(v)
    if opt._budget is not None:
        m["epsilon"] = opt._budget.epsilon(opt._ledger)
    return m
