"""Canaries for auditing DP-SGD: gradient canaries and input canaries, each included in training
with probability 1/2 (the secret bits the auditor guesses), and a training loop that runs them.

Gradient canaries (white-box; Steinke, Nasr, Jagielski 2023; Nasr et al. 2021)
    A canary is a per-example *gradient* ``C u_i`` for a unit vector ``u_i`` over all trainable
    parameters: ``kind="dirac"`` (one coordinate of one parameter, the paper's white-box canary)
    or ``kind="random"`` (a uniformly random direction).  An included canary is one more record
    of the step: it is Poisson-sampled at the same rate ``q`` as the real examples, enters the
    optimizer's per-record path through the public multi-pass API
    (:meth:`DPOptimizer.accumulate_pass` with ``{name: Tensor[k, *shape]}``), and is clipped,
    summed and noised exactly like a real example's gradient (its norm is ``C``, so clipping
    leaves it unchanged).  No hook in the optimizer is needed.  Its score after training is
    ``sum_t <released gradient_t, u_i>`` (``score="gradient"``: every release is public, so
    this is post-processing) or ``-<theta_T - theta_0, u_i>`` (``score="update"``: the total
    parameter update, for an auditor who only sees the first and last model).

Input canaries (black-box)
    Examples (mislabelled, :func:`mislabelled_canaries`, or out-of-distribution,
    :func:`random_input_canaries`) appended to the training set when
    included; they are sampled with the real data.  Score: the negative loss of the trained
    model on the canary (a member tends to have a lower loss).

The real data and the included canaries are one population of ``n + (number included)`` records,
each Poisson-sampled at ``q``; the ledger is built for that population, so the claimed epsilon
(which does not depend on ``N`` under Poisson sampling) is the guarantee each canary enjoys.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ._model import evaluating

__all__ = [
    "GradientCanaries",
    "InputCanaries",
    "mislabelled_canaries",
    "random_input_canaries",
    "canary_step",
    "train_with_canaries",
]


def _check_m_p(m: Any, inclusion_probability: Any) -> None:
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"m (the number of canaries) must be a positive integer, got {m!r}")
    if not (isinstance(inclusion_probability, (int, float)) and 0 < inclusion_probability < 1):
        raise ValueError(f"inclusion_probability must be in (0, 1) (the audit uses 1/2), got {inclusion_probability!r}")


def _inclusion_bits(m: int, p: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(seed))
    return torch.rand(m, generator=g, dtype=torch.float64) < p


def _trainable(params: Any) -> dict[str, torch.Tensor]:
    if isinstance(params, nn.Module):
        params = {n: p for n, p in params.named_parameters() if p.requires_grad}
    if not isinstance(params, Mapping) or not params:
        raise TypeError("params must be an nn.Module with trainable parameters or a non-empty {name: tensor} dict")
    return dict(params)


class GradientCanaries:
    """``m`` gradient canaries ``C u_i`` over the trainable parameters of a model.

    Args:
        params: the model (its trainable parameters) or ``{name: parameter}``; the canary
            records use these names, shapes, dtype and device.
        m: number of canaries.
        l2_norm_clip: ``C``, the optimizer's clip norm (a canary's gradient norm).
        kind: ``"dirac"`` (distinct random coordinates; needs ``m <=`` the number of
            coordinates) or ``"random"`` (random unit directions; stores an ``m x d`` matrix).
        inclusion_probability: 1/2 for the one-run audit.
        seed: seeds the inclusion bits, the directions and the per-step sampling (separate
            generators, none of them torch's global one).
        included: fixed inclusion bits (bool ``[m]``) instead of random ones (the multi-run
            distinguishing audit decides inclusion per run).
        sampling_seed: seed of the per-step sampling (default derived from ``seed``).

    Attributes: ``included`` (bool ``[m]``, the secret), ``scores`` (float64 ``[m]``).
    """

    def __init__(
        self,
        params: Any,
        m: int,
        *,
        l2_norm_clip: float,
        kind: str = "dirac",
        inclusion_probability: float = 0.5,
        seed: int = 0,
        included: torch.Tensor | None = None,
        sampling_seed: int | None = None,
    ):
        _check_m_p(m, inclusion_probability)
        if not (isinstance(l2_norm_clip, (int, float)) and math.isfinite(l2_norm_clip) and l2_norm_clip > 0):
            raise ValueError(f"l2_norm_clip must be a positive number (the optimizer's C), got {l2_norm_clip!r}")
        if kind not in ("dirac", "random"):
            raise ValueError(f"kind must be 'dirac' or 'random', got {kind!r}")
        named = _trainable(params)
        self.names = list(named)
        self.shapes = [tuple(named[n].shape) for n in self.names]
        self.sizes = [math.prod(s) for s in self.shapes]
        first = named[self.names[0]]
        self.dtype, self.device = first.dtype, first.device
        d = sum(self.sizes)
        self.m, self.kind, self.l2_norm_clip = m, kind, float(l2_norm_clip)
        if included is None:
            self.included = _inclusion_bits(m, inclusion_probability, seed)
        else:
            self.included = torch.as_tensor(included, dtype=torch.bool).reshape(-1).clone().cpu()
            if len(self.included) != m:
                raise ValueError(f"included must have one bit per canary ({m}), got {len(self.included)}")
        g = torch.Generator().manual_seed(int(seed) + 1)
        if kind == "dirac":
            if m > d:
                raise ValueError(f"{m} Dirac canaries need {m} distinct coordinates; the model has {d}: lower m or use kind='random'")
            self.coordinates = torch.randperm(d, generator=g)[:m].to(self.device)
            self.directions = None
        else:
            u = torch.randn(m, d, generator=g, dtype=torch.float64)
            self.directions = (u / u.norm(dim=1, keepdim=True)).to(self.device, torch.float32)
            self.coordinates = None
        self._sampler = torch.Generator().manual_seed(int(seed) + 2 if sampling_seed is None else int(sampling_seed))
        self.scores = torch.zeros(m, dtype=torch.float64)

    @property
    def num_included(self) -> int:
        return int(self.included.sum())

    def sample(self, sample_rate: float) -> torch.Tensor:
        """Indices of the included canaries drawn into this step: each independently with
        probability ``sample_rate`` (Poisson sampling, like the real examples)."""
        draw = torch.rand(self.m, generator=self._sampler, dtype=torch.float64) < sample_rate
        return torch.nonzero(draw & self.included).flatten()

    def _flat(self, idx: torch.Tensor) -> torch.Tensor:
        idx = idx.to(self.device)
        d = sum(self.sizes)
        if self.kind == "dirac":
            out = torch.zeros(len(idx), d, device=self.device, dtype=torch.float32)
            out[torch.arange(len(idx), device=self.device), self.coordinates[idx]] = 1.0
            return out
        return self.directions[idx]

    def records(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{name: Tensor[k, *shape]}``: the gradients ``C u_i`` of canaries ``indices``."""
        flat = self._flat(torch.as_tensor(indices, dtype=torch.long)) * self.l2_norm_clip
        parts = torch.split(flat, self.sizes, dim=1)
        return {n: p.reshape((len(flat),) + s).to(self.dtype) for n, p, s in zip(self.names, parts, self.shapes)}

    def _dots(self, vectors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``<v, u_i>`` for every canary (missing names count as zero)."""
        flat = torch.cat([
            (vectors[n].detach().reshape(-1) if vectors.get(n) is not None else torch.zeros(s, device=self.device)).to(
                self.device, torch.float32
            )
            for n, s in zip(self.names, self.sizes)
        ])
        if self.kind == "dirac":
            return flat[self.coordinates].double().cpu()
        return (self.directions @ flat).double().cpu()

    def observe(self, gradients: Mapping[str, torch.Tensor]) -> None:
        """Add ``<g, u_i>`` of a released gradient ``g`` (``{name: tensor}``) to every score."""
        self.scores += self._dots(gradients)

    def observe_model(self, model: nn.Module) -> None:
        """Add ``<p.grad, u_i>`` of the model's current (released) ``.grad`` s to every score."""
        self.observe({n: p.grad for n, p in model.named_parameters() if n in self.names and p.grad is not None})

    def update_scores(self, before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``-<theta_after - theta_before, u_i>``: the total-update score (gradient descent moves
        against an included canary's direction).  Returned, not accumulated."""
        diff = {n: after[n].detach() - before[n].detach() for n in self.names}
        return -self._dots(diff)


class InputCanaries:
    """``m`` input canaries ``(x_i, y_i)``, each appended to the training set with probability
    ``inclusion_probability`` (seeded): :meth:`training_set` returns the real data plus the
    included canaries, :meth:`score` the negative per-canary loss of a trained model."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor, *, inclusion_probability: float = 0.5, seed: int = 0):
        if not isinstance(inputs, torch.Tensor) or not isinstance(targets, torch.Tensor):
            raise TypeError("inputs and targets must be tensors (one row per canary)")
        if len(inputs) != len(targets):
            raise ValueError(f"inputs ({len(inputs)}) and targets ({len(targets)}) must have one row per canary")
        _check_m_p(len(inputs), inclusion_probability)
        self.inputs, self.targets, self.m = inputs, targets, len(inputs)
        self.included = _inclusion_bits(self.m, inclusion_probability, seed)

    @property
    def num_included(self) -> int:
        return int(self.included.sum())

    def training_set(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The real data followed by the included canaries (moved to ``x``'s device)."""
        keep = self.included.to(self.inputs.device)
        return (
            torch.cat([x, self.inputs[keep].to(x.device, x.dtype)]),
            torch.cat([y, self.targets[keep].to(y.device, y.dtype)]),
        )

    def score(self, model: nn.Module, loss_fn: Callable) -> torch.Tensor:
        """``-loss(model(x_i), y_i)`` per canary (float64, CPU); the model is put in eval mode and
        back."""
        with evaluating(model) as dev:
            losses = loss_fn(model(self.inputs.to(dev)), self.targets.to(dev))
        if losses.dim() != 1 or len(losses) != self.m:
            raise ValueError("loss_fn must return per-example losses (reduction='none')")
        return -losses.double().cpu()


def mislabelled_canaries(
    x: torch.Tensor, y: torch.Tensor, m: int, *, num_classes: int, seed: int = 0, **kwargs
) -> InputCanaries:
    """:class:`InputCanaries` from ``m`` examples of ``(x, y)`` (chosen at random, seeded) given a
    wrong label (uniform over the other classes): examples the model can only fit by memorising.
    Take them from data that is *not* in the training set (e.g. the test split)."""
    if m > len(y):
        raise ValueError(f"m={m} canaries requested from {len(y)} examples")
    g = torch.Generator().manual_seed(int(seed) + 3)
    idx = torch.randperm(len(y), generator=g)[:m]
    shift = torch.randint(1, num_classes, (m,), generator=g).to(y.device)
    return InputCanaries(x[idx], (y[idx] + shift) % num_classes, seed=seed, **kwargs)


def random_input_canaries(
    like: torch.Tensor, m: int, *, num_classes: int, seed: int = 0, **kwargs
) -> InputCanaries:
    """:class:`InputCanaries` of ``m`` out-of-distribution inputs: uniform noise over the range of
    ``like`` (e.g. the training inputs; only its shape, dtype and min/max are read), each with a
    random label.  Seeded; torch's global RNG is not touched."""
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"m (the number of canaries) must be a positive integer, got {m!r}")
    g = torch.Generator().manual_seed(int(seed) + 4)
    lo, hi = float(like.min()), float(like.max())
    x = lo + (hi - lo) * torch.rand((m,) + tuple(like.shape[1:]), generator=g)
    y = torch.randint(0, num_classes, (m,), generator=g)
    return InputCanaries(x.to(like.device, like.dtype), y.to(like.device), seed=seed, **kwargs)


def canary_step(optimizer: Any, inputs: Any, targets: Any, canary_records: Mapping[str, torch.Tensor] | None) -> torch.Tensor:
    """One private step of a :class:`~pytorch_privacy.optimizer.DPOptimizer` on a real batch plus
    gradient-canary records, via its multi-pass API: the real batch's per-example gradients are
    clipped and accumulated (a flush), the canary records are added as a pass over *other* records
    and flushed, then one noised release.  Sensitivity and ledger are those of a plain step.
    Returns the mean loss of the real batch.

    Refused for optimizers with microbatches (a record is then a group of examples, and a canary
    is not one).  The real batch is processed in one physical batch (``max_physical_batch_size``
    is not applied)."""
    if getattr(optimizer, "num_microbatches", None) is not None or getattr(optimizer, "microbatch_size", None) is not None:
        raise ValueError(
            "canaries need one record per example: build the optimizer without num_microbatches/microbatch_size"
        )
    optimizer.zero_grad()
    loss = optimizer.backward_pass(inputs, targets, sensitive=True)
    optimizer.clip_and_accumulate()
    if canary_records:
        k = next(iter(canary_records.values())).shape[0]
        if k:
            optimizer.accumulate_pass(dict(canary_records), sensitive=True)
            optimizer.clip_and_accumulate()
    optimizer.step()
    return loss.detach()


def train_with_canaries(
    model: nn.Module,
    optimizer: Any,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    sample_rate: float,
    steps: int,
    gradient_canaries: GradientCanaries | None = None,
    input_canaries: InputCanaries | None = None,
    score: str = "gradient",
    seed: int = 0,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Train ``steps`` Poisson-sampled steps (rate ``sample_rate``) on ``(x, y)`` plus the included
    canaries, and return the canary scores (float64 ``[m]``, higher = "in").

    Exactly one of ``gradient_canaries`` / ``input_canaries``.  ``score`` (gradient canaries):
    ``"gradient"`` (sum of released gradients along ``u_i``) or ``"update"`` (total parameter
    update).  The sampling generator is seeded with ``seed`` (never torch's global RNG)."""
    if (gradient_canaries is None) == (input_canaries is None):
        raise ValueError("pass exactly one of gradient_canaries= or input_canaries=")
    if score not in ("gradient", "update"):
        raise ValueError(f"score must be 'gradient' or 'update', got {score!r}")
    if not (isinstance(sample_rate, (int, float)) and 0 < sample_rate <= 1):
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    if input_canaries is not None:
        x, y = input_canaries.training_set(x, y)
    gen = torch.Generator().manual_seed(int(seed))
    gc = gradient_canaries
    before = {n: p.detach().clone() for n, p in model.named_parameters()} if gc is not None and score == "update" else None
    for t in range(int(steps)):
        mask = torch.rand(len(y), generator=gen, dtype=torch.float64) < sample_rate
        idx = torch.nonzero(mask).flatten().to(y.device)
        recs = gc.records(gc.sample(sample_rate)) if gc is not None else None
        loss = canary_step(optimizer, x[idx], y[idx], recs)
        if gc is not None and score == "gradient":
            gc.observe_model(model)
        if on_step is not None:
            on_step(t, loss)
    if gc is None:
        return input_canaries.score(model, optimizer.loss_fn)
    if score == "update":
        return gc.update_scores(before, dict(model.named_parameters()))
    return gc.scores.clone()
