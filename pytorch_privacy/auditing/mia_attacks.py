"""Membership-inference attack scores: the per-example statistics the attacks threshold, trained
attackers (logistic regression, a small MLP), and LiRA (Carlini et al. 2022) with shadow models.

Every function here returns *membership scores*: higher means "more likely a member".
:mod:`.membership_inference` turns scores into ROC curves, advantages and epsilon lower bounds.
"""

from __future__ import annotations

from typing import Callable

import attrs
import numpy as np
import torch
from scipy import stats

from ._model import evaluating

__all__ = [
    "log_softmax_np",
    "confidence_scores",
    "true_class_probabilities",
    "lira_statistic",
    "lira_scores",
    "train_attacker",
    "ShadowModels",
    "train_shadow_models",
]


def log_softmax_np(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax of a ``(n, C)`` float array (stable: max subtracted first)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def confidence_scores(logits: np.ndarray) -> np.ndarray:
    """The model's confidence ``max_j softmax(logits)_j`` for each example (Yeom et al. 2018;
    Salem et al. 2019): members tend to receive more confident predictions."""
    return np.exp(log_softmax_np(logits).max(axis=1))


def true_class_probabilities(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``softmax(logits)[y]`` for each example: the probability given to the true label."""
    lp = log_softmax_np(logits)
    return np.exp(lp[np.arange(lp.shape[0]), np.asarray(labels, dtype=np.int64)])


def lira_statistic(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """LiRA's per-example statistic ``phi = log(p_y / (1 - p_y))`` with ``p_y`` the true-class
    probability (Carlini et al. 2022, Sec. 4.3), computed stably as
    ``z_y - logsumexp_{j != y} z_j`` so that it stays finite for confident models."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if z.ndim != 2 or z.shape[1] < 2:
        raise ValueError(f"logits must be (n, C) with C >= 2 classes, got shape {z.shape}")
    idx = np.arange(z.shape[0])
    zy = z[idx, y]
    others = z.copy()
    others[idx, y] = -np.inf
    m = others.max(axis=1)
    lse = m + np.log(np.exp(others - m[:, None]).sum(axis=1))
    return zy - lse


def _gaussian_fit(values: np.ndarray, mask: np.ndarray, fixed_variance: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and std of ``values`` (shadows x examples) over the rows where ``mask``;
    the std is pooled over all columns when ``fixed_variance`` or a column has < 2 rows (and is
    the plain std of all masked values when no column has 2)."""
    count = mask.sum(axis=0)
    total = np.where(mask, values, 0.0).sum(axis=0)
    mean = total / np.maximum(count, 1)
    resid2 = np.where(mask, (values - mean) ** 2, 0.0)
    pooled_dof = int(count.sum()) - int((count > 0).sum())
    if pooled_dof > 0:
        pooled = np.sqrt(resid2.sum() / pooled_dof)
    else:  # one shadow per example: no replicate anywhere, so the spread across examples it is
        pooled = float(np.std(values[mask])) if mask.any() else 1.0
    if fixed_variance:
        std = np.full(mean.shape, pooled)
    else:
        std = np.where(count >= 2, np.sqrt(resid2.sum(axis=0) / np.maximum(count - 1, 1)), pooled)
    return mean, np.maximum(std, 1e-8)


def lira_scores(
    target_stat: np.ndarray,
    shadow_stats: np.ndarray,
    shadow_in: np.ndarray,
    online: bool = True,
    fixed_variance: bool = False,
) -> np.ndarray:
    """Likelihood-ratio attack scores (Carlini, Chien, Nasr, Song, Terzis, Tramer 2022).

    Args:
        target_stat: ``(n,)`` the target model's :func:`lira_statistic` on the examples.
        shadow_stats: ``(n_shadow, n)`` the same statistic under each shadow model.
        shadow_in: ``(n_shadow, n)`` booleans, whether the example was in that shadow's training set.
        online: fit both the IN and the OUT Gaussian and return the log likelihood ratio
            ``log N(phi; mu_in, s_in^2) - log N(phi; mu_out, s_out^2)``; offline (``False``) fits
            only OUT and returns ``(phi - mu_out) / s_out``, the one-sided test statistic (its
            ranking equals the paper's ``1 - p``-value score).
        fixed_variance: one variance pooled over all examples (the paper's choice with few
            shadow models, e.g. fewer than 64).

    Offline needs at least one OUT shadow per example, online also one IN shadow; per-example
    variances need two (a pooled variance is used where there are fewer).
    """
    t = np.asarray(target_stat, dtype=np.float64)
    s = np.asarray(shadow_stats, dtype=np.float64)
    m = np.asarray(shadow_in)
    if t.ndim != 1 or s.ndim != 2 or s.shape[1] != t.shape[0] or m.shape != s.shape:
        raise ValueError(
            f"shapes must be target_stat (n,), shadow_stats and shadow_in (n_shadow, n); got "
            f"{t.shape}, {s.shape}, {m.shape}"
        )
    if m.dtype != bool:
        raise TypeError("shadow_in must be a boolean array (True where the example trained the shadow)")
    if not (np.all(np.isfinite(t)) and np.all(np.isfinite(s))):
        raise ValueError("target_stat and shadow_stats must be finite")
    if np.any((~m).sum(axis=0) == 0):
        raise ValueError("some examples have no OUT shadow model: train more shadow models (n_shadow >= 2)")
    mu_out, sd_out = _gaussian_fit(s, ~m, fixed_variance)
    if not online:
        return (t - mu_out) / sd_out
    if np.any(m.sum(axis=0) == 0):
        raise ValueError("online LiRA needs an IN shadow model for every example: train more shadow models")
    mu_in, sd_in = _gaussian_fit(s, m, fixed_variance)
    return stats.norm.logpdf(t, mu_in, sd_in) - stats.norm.logpdf(t, mu_out, sd_out)


def _init_layer(fan_in: int, fan_out: int, g: torch.Generator) -> list[torch.Tensor]:
    bound = 1.0 / np.sqrt(fan_in)
    w = (torch.rand(fan_in, fan_out, generator=g, dtype=torch.float64) * 2 - 1) * bound
    b = (torch.rand(fan_out, generator=g, dtype=torch.float64) * 2 - 1) * bound
    return [w.requires_grad_(), b.requires_grad_()]


def train_attacker(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_eval: np.ndarray,
    kind: str = "logistic",
    seed: int = 0,
    hidden: int = 32,
    steps: int = 200,
    weight_decay: float = 1e-3,
) -> np.ndarray:
    """Train a membership classifier on ``(x_train, y_train)`` and return its scores on ``x_eval``.

    ``kind="logistic"``: logistic regression; ``kind="mlp"``: one hidden layer of ``hidden`` ReLU
    units.  Both train full-batch in float64 with Adam (lr 0.05 for ``steps`` steps, L2 penalty
    ``weight_decay``) on features standardised with the training split's mean and std; weights are
    drawn from a private generator seeded with ``seed`` (torch's global RNG is untouched).  The
    score is the logit of "member".  Training runs on one intra-op thread (restored after): for
    problems this small, more threads only add synchronisation overhead.
    """
    if kind not in ("logistic", "mlp"):
        raise ValueError(f"kind must be 'logistic' or 'mlp', got {kind!r}")
    xt = np.asarray(x_train, dtype=np.float64)
    xe = np.asarray(x_eval, dtype=np.float64)
    yt = np.asarray(y_train, dtype=np.float64)
    if xt.ndim != 2 or xe.ndim != 2 or xt.shape[1] != xe.shape[1] or yt.shape != (xt.shape[0],):
        raise ValueError(f"features must be (n, d) with matching d and labels (n,), got {xt.shape}, {xe.shape}, {yt.shape}")
    if not (np.any(yt == 1) and np.any(yt == 0)):
        raise ValueError("the attacker's training split needs both members and non-members")
    mu, sd = xt.mean(axis=0), xt.std(axis=0)
    sd = np.where(sd > 0, sd, 1.0)
    xt_t = torch.from_numpy((xt - mu) / sd)
    xe_t = torch.from_numpy((xe - mu) / sd)
    y_t = torch.from_numpy(yt)
    g = torch.Generator().manual_seed(int(seed))
    d = xt.shape[1]
    params = _init_layer(d, 1, g) if kind == "logistic" else _init_layer(d, hidden, g) + _init_layer(hidden, 1, g)

    def forward(x: torch.Tensor) -> torch.Tensor:
        if kind == "logistic":
            return (x @ params[0] + params[1]).squeeze(1)
        h = torch.relu(x @ params[0] + params[1])
        return (h @ params[2] + params[3]).squeeze(1)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a few hundred tiny full-batch steps: threads only add overhead
    try:
        _adam(params, lambda: torch.nn.functional.binary_cross_entropy_with_logits(forward(xt_t), y_t)
              + weight_decay * sum((p**2).sum() for p in params[::2]), steps)
        with torch.no_grad():
            return forward(xe_t).numpy().copy()
    finally:
        torch.set_num_threads(threads)


def _adam(params: list[torch.Tensor], loss_fn: Callable[[], torch.Tensor], steps: int, lr: float = 0.05,
          betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
    """Full-batch Adam (Kingma and Ba 2015) written out: ``torch.optim`` imports the compiler
    stack on first use, which costs seconds, far more than these few hundred tiny steps."""
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for t in range(1, steps + 1):
        grads = torch.autograd.grad(loss_fn(), params)
        with torch.no_grad():
            for p, g, mi, vi in zip(params, grads, m, v):
                mi.mul_(betas[0]).add_(g, alpha=1 - betas[0])
                vi.mul_(betas[1]).addcmul_(g, g, value=1 - betas[1])
                step = lr * (1 - betas[1] ** t) ** 0.5 / (1 - betas[0] ** t)
                p.addcdiv_(mi, vi.sqrt().add_(eps * (1 - betas[1] ** t) ** 0.5), value=-step)


@attrs.frozen(eq=False)
class ShadowModels:
    """Shadow models' LiRA statistics on a pool of examples.

    Attributes:
        stats: ``(n_shadow, n)`` :func:`lira_statistic` of each shadow model on each example.
        in_mask: ``(n_shadow, n)`` whether the example was in that shadow model's training set.
        models: the trained shadow models (kept only when asked; else an empty tuple).
    """

    stats: np.ndarray
    in_mask: np.ndarray
    models: tuple = ()

    def columns(self, index: np.ndarray) -> "ShadowModels":
        """The same shadows restricted to the examples ``index`` (e.g. a slice or the target's
        members / non-members within the pool)."""
        return ShadowModels(self.stats[:, index], self.in_mask[:, index], self.models)


def _balanced_halves(n: int, n_shadow: int, rng: np.random.Generator) -> np.ndarray:
    """``(n_shadow, n)`` mask: each shadow trains on half of the pool and, when ``n_shadow`` is
    even, each example is IN exactly half of the shadows (Carlini et al. 2022's design)."""
    mask = np.zeros((n_shadow, n), dtype=bool)
    if n_shadow % 2 == 0:
        for j in range(n):
            mask[rng.permutation(n_shadow)[: n_shadow // 2], j] = True
    else:
        for i in range(n_shadow):
            mask[i, rng.permutation(n)[: n // 2]] = True
    return mask


def train_shadow_models(
    model_fn: Callable[[], torch.nn.Module],
    train_fn: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], object],
    data: tuple[torch.Tensor, torch.Tensor],
    n_shadow: int,
    seed: int = 0,
    keep_models: bool = False,
    batch_size: int = 1024,
) -> ShadowModels:
    """Train ``n_shadow`` shadow models on random halves of ``data`` and score every example.

    ``data = (x, y)`` is the pool (typically the target model's members and non-members
    together, so that each has IN and OUT shadows); ``model_fn()`` builds a fresh model,
    ``train_fn(model, x_in, y_in)`` trains it in place the way the target was trained.  With an
    even ``n_shadow`` each example is IN exactly half of the shadows.  Affordable for small
    models only: it trains ``n_shadow`` models (Carlini et al. use 16 to 256).

    Returns the shadows' :func:`lira_statistic` on all of ``x`` (eval mode, no grad) and the
    IN mask, for :func:`lira_scores` (or ``run_attacks(..., shadow=...)``).
    """
    if isinstance(n_shadow, bool) or not isinstance(n_shadow, int) or n_shadow < 2:
        raise ValueError(f"n_shadow must be an int >= 2 (each example needs IN and OUT shadows), got {n_shadow!r}")
    if not callable(model_fn) or not callable(train_fn):
        raise TypeError("model_fn and train_fn must be callables: model_fn() -> Module, train_fn(model, x, y)")
    x, y = data
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor) or x.shape[0] != y.shape[0]:
        raise TypeError("data must be a pair of tensors (x, y) with the same first dimension")
    n = int(x.shape[0])
    if n < 2:
        raise ValueError("the pool needs at least 2 examples")
    mask = _balanced_halves(n, n_shadow, np.random.default_rng(seed))
    out = np.empty((n_shadow, n), dtype=np.float64)
    models = []
    labels = y.detach().cpu().numpy()
    for i in range(n_shadow):
        model = model_fn()
        idx = torch.from_numpy(np.nonzero(mask[i])[0])
        train_fn(model, x[idx], y[idx])
        with evaluating(model):
            logits = torch.cat([model(x[j : j + batch_size]) for j in range(0, n, batch_size)])
        out[i] = lira_statistic(logits.detach().double().cpu().numpy(), labels)
        if keep_models:
            models.append(model)
    return ShadowModels(out, mask, tuple(models))
