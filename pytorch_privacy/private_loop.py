"""``make_private``: turn a plain PyTorch training setup into a private one, loop unchanged.

A plain loop::

    loader = DataLoader(dataset, batch_size=64, shuffle=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    criterion = nn.CrossEntropyLoss()
    for x, y in loader:
        optimizer.zero_grad()
        loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()

becomes private by adding one import and one call (the loop body is untouched)::

    from pytorch_privacy import make_private
    model, optimizer, loader = make_private(model, optimizer, loader, criterion=criterion,
                                            max_grad_norm=1.0, noise_multiplier=1.1)

What the call does:

* **loader**: a :class:`PrivateLoader` (a :class:`~pytorch_privacy.optimizer.DPDataLoader`)
  over the same dataset that samples each batch by Poisson sampling at
  ``q = loader.batch_size / len(loader.dataset)`` (``len(loader)`` batches per epoch, the same
  collate function and worker settings) and remembers the last batch it yielded.
* **optimizer**: a :class:`PrivateOptimizer`, a
  :class:`~pytorch_privacy.optimizer.DPGaussianOptimizer` around the original optimizer whose
  ledger is built from the loader (``q`` is never typed).  Its :meth:`~PrivateOptimizer.step`
  recomputes the per-example gradients of the loader's last batch with the gradient engine,
  clips them to ``max_grad_norm``, adds Gaussian noise ``N(0, (sigma C)^2)`` once, divides by
  the expected batch size ``q N``, steps the original optimizer and records the step.  The
  gradients left by the user's ``loss.backward()`` are discarded: they are not private.  **Cost:
  one extra forward and backward pass per step** (the user's own pass is wasted; move to
  ``optimizer.fit_batch(x, y)`` to avoid it).  For a ``DistributedDataParallel`` model over
  several ranks, the gradient all-reduce of the user's backward is switched off
  (``model.require_backward_grad_sync = False``, as inside ``model.no_sync()``): the gradients it
  would average are discarded, and the private step reduces its own sums, once.
* **criterion**: the user's batch loss, e.g. ``nn.CrossEntropyLoss()`` (mean-reduced).  The
  per-example loss ``l_i`` is derived from it: an ``nn`` loss module with a ``reduction``
  attribute is copied with ``reduction="none"`` (extra dimensions are averaged for ``"mean"``,
  summed for ``"sum"`` and ``"batchmean"``); any other callable ``f`` is evaluated on one-example
  slices, ``l_i = f(out[i:i+1], y[i:i+1])`` (``torch.func.vmap``, or a Python loop where
  ``vmap`` fails).  On the first non-empty batch ``criterion(out, y)`` must equal
  ``mean_i l_i`` (``loss_reduction="mean"``) or ``sum_i l_i`` (``"sum"``) to a relative
  ``1e-5``; otherwise ``ValueError``: the loss is not a sum or mean of per-example terms (a loss
  normalised by a batch statistic, a class-weighted mean...), and DP-SGD could not reproduce it.

The mean's ``1/B`` is a per-example constant: the private step uses ``grad l_i`` and divides the
noisy clipped sum by the public ``q N`` (for ``loss_reduction="sum"``: by 1, the noisy clipped
sum itself), so the gradient has the scale of the user's loss without the realised batch size
ever entering the release.

Noise: give ``noise_multiplier`` (sigma), or a budget ``target_epsilon`` / ``target_delta`` /
``epochs``: sigma is then calibrated with :func:`pytorch_privacy.analysis.compute_noise` for
``ceil(epochs * len(loader))`` steps at ``q`` (exact RDP, tight conversion), and the same budget
is enforced by the optimizer with the RDP accountant (one accountant per plan): every planned step
is allowed, a step past the plan raises
:class:`~pytorch_privacy.optimizer.PrivacyBudgetExceeded` before anything is released.

Limits: one ``optimizer.step()`` per loader batch (a second step on the same batch is refused:
the ledger would count two independent Poisson samples); the batch must be ``(inputs, targets)``
or ``(*inputs, targets)`` (else pass ``split_batch=``); transforms applied inside the loop to
``x`` other than a move to the model's device are not seen by the recomputation (put them in the
dataset or the model).
"""

from __future__ import annotations

import copy
import math
import numbers
import warnings
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from .optimizer.dp_optimizer import DPOptimizer
from .optimizer.gaussian_optimizer import DPGaussianOptimizer
from .optimizer.engines.base import batch_size_of, call_model
from .optimizer.distributed.sampler import DistributedDPDataLoader
from .optimizer.samplers import DPDataLoader

__all__ = ["make_private", "PrivateLoader", "DistributedPrivateLoader", "PrivateOptimizer", "PerExampleLoss"]

_REDUCTIONS = ("mean", "sum")
#: relative tolerance of the first-batch check ``criterion(out, y) == mean/sum of l_i``
DECOMPOSITION_RTOL = 1e-5


# -- the per-example loss ----------------------------------------------------------------
def _slice(tree: Any, i: int) -> Any:
    return torch.utils._pytree.tree_map(lambda t: t[i : i + 1] if isinstance(t, torch.Tensor) else t, tree)


class PerExampleLoss:
    """``l(out, y) -> Tensor[B]``: the per-example terms of a batch criterion.

    * an ``nn`` loss module with a ``reduction`` attribute: a copy with ``reduction="none"``,
      its non-batch dimensions averaged (``"mean"``) or summed (``"sum"``, ``"batchmean"``);
    * any other callable ``f``: ``l_i = f(out[i:i+1], y[i:i+1])``, under ``torch.func.vmap``
      (a Python loop over the examples where ``vmap`` fails, with a warning).

    Args:
        criterion: the user's batch loss ``criterion(out, y) -> scalar``.
        loss_reduction: how ``criterion`` combines the per-example terms, ``"mean"`` or
            ``"sum"``.  Read from the module's ``reduction`` attribute when it has one.
    """

    def __init__(self, criterion: Callable[[Any, Any], torch.Tensor], loss_reduction: str | None = None):
        if not callable(criterion):
            raise TypeError(f"criterion must be callable: criterion(output, target) -> loss, got {type(criterion).__name__}")
        if loss_reduction is not None and loss_reduction not in _REDUCTIONS:
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        self.criterion = criterion
        red = getattr(criterion, "reduction", None) if isinstance(criterion, nn.Module) else None
        if red is not None:
            if red not in ("mean", "sum", "batchmean", "none"):
                raise ValueError(f"criterion has reduction={red!r}; use 'mean' or 'sum'")
            if red == "none":
                raise ValueError(
                    "criterion has reduction='none': make_private takes the loss of your loop, reduced to a "
                    "scalar (e.g. nn.CrossEntropyLoss() with its default reduction='mean')"
                )
            declared = "sum" if red == "sum" else "mean"
            if loss_reduction is not None and loss_reduction != declared:
                raise ValueError(
                    f"loss_reduction={loss_reduction!r} contradicts the criterion's reduction={red!r}; drop "
                    "loss_reduction= (it is read from the criterion)"
                )
            self.loss_reduction = declared
            # within one example: mean over the other dims for 'mean', sum for 'sum'/'batchmean'
            self._inner = "mean" if red == "mean" else "sum"
            self._module = copy.copy(criterion)
            self._module.reduction = "none"
        else:
            self.loss_reduction = loss_reduction or "mean"
            self._module = None
            self._inner = None
        self._use_loop = False

    def __call__(self, out: Any, y: Any) -> torch.Tensor:
        if self._module is not None:
            losses = self._module(out, y)
            if losses.dim() > 1:
                flat = losses.reshape(losses.shape[0], -1)
                losses = flat.mean(1) if self._inner == "mean" else flat.sum(1)
            return losses
        n = batch_size_of(out, y)
        if n == 0:
            return torch.zeros(0, device=torch.utils._pytree.tree_leaves(out)[0].device)
        if not self._use_loop:
            try:
                one = lambda o, t: self.criterion(  # noqa: E731
                    torch.utils._pytree.tree_map(lambda a: a.unsqueeze(0) if isinstance(a, torch.Tensor) else a, o),
                    torch.utils._pytree.tree_map(lambda a: a.unsqueeze(0) if isinstance(a, torch.Tensor) else a, t),
                ).reshape(())
                return torch.func.vmap(one, randomness="different")(out, y)
            except RuntimeError as err:
                warnings.warn(
                    f"make_private: torch.func.vmap cannot evaluate the criterion per example "
                    f"({str(err).splitlines()[0][:160]}); evaluating it example by example (slower)",
                    RuntimeWarning,
                    stacklevel=2,
                )
                self._use_loop = True
        return torch.stack([self.criterion(_slice(out, i), _slice(y, i)).reshape(()) for i in range(n)])

    def check_decomposes(self, out: Any, y: Any) -> None:
        """``ValueError`` unless ``criterion(out, y)`` is the mean (or sum) of the per-example
        losses to a relative :data:`DECOMPOSITION_RTOL` (``16 * eps`` of the loss's dtype where
        that is larger: bfloat16/float16 losses round the batch reduction itself)."""
        with torch.no_grad():
            full = self.criterion(out, y)
            per = self(out, y)
        if not isinstance(full, torch.Tensor) or full.numel() != 1:
            raise ValueError(
                "criterion(output, target) must return a scalar loss (the one your loop calls backward() on), got "
                f"{getattr(full, 'shape', type(full).__name__)}"
            )
        n = batch_size_of(out, y)
        if per.shape != (n,):
            raise ValueError(f"the per-example losses have shape {tuple(per.shape)}, expected ({n},)")
        # 1e-5 relative; wider only for low-precision losses (bf16/fp16 round the batch mean itself)
        rtol = max(DECOMPOSITION_RTOL, 16 * torch.finfo(full.dtype).eps) if full.is_floating_point() else DECOMPOSITION_RTOL
        full = float(full.double())
        mean, total = float(per.double().mean()), float(per.double().sum())

        def close(a: float, b: float) -> bool:
            return abs(a - b) <= rtol * max(abs(a), abs(b)) + 1e-12

        want = mean if self.loss_reduction == "mean" else total
        if close(full, want):
            return
        hint = ""
        if self._module is None and close(full, total if self.loss_reduction == "mean" else mean):
            other = "sum" if self.loss_reduction == "mean" else "mean"
            hint = f" It equals the {other} of the per-example losses: pass loss_reduction={other!r}."
        raise ValueError(
            f"the criterion is not a {self.loss_reduction} of per-example terms: on this batch of {n} it gives "
            f"{full:.8g}, but the {self.loss_reduction} of its per-example losses (each example alone) is "
            f"{want:.8g}.{hint} A loss normalised by a batch statistic (a class-weighted mean, ignore_index "
            "targets, a batch-normalised or contrastive loss) has no per-example decomposition that DP-SGD "
            "can clip; use a per-example form of the loss"
        )


# -- the loader ----------------------------------------------------------------------------
class _RemembersLastBatch:
    """Mixin of the loaders :func:`make_private` returns: remembers the last batch yielded."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._last_batch: Any = None
        #: how many batches this loader has yielded (all iterations together)
        self.batches_yielded = 0

    def __iter__(self):
        for batch in super().__iter__():
            self._last_batch = batch
            self.batches_yielded += 1
            yield batch

    @property
    def last_batch(self) -> Any:
        """The batch most recently yielded (``None`` before the first)."""
        return self._last_batch


class PrivateLoader(_RemembersLastBatch, DPDataLoader):
    """A :class:`~pytorch_privacy.optimizer.DPDataLoader` that remembers the last batch it
    yielded (:attr:`last_batch`), so that :meth:`PrivateOptimizer.step` knows which batch to
    recompute.  Built by :func:`make_private`; arguments as for ``DPDataLoader``."""


class DistributedPrivateLoader(_RemembersLastBatch, DistributedDPDataLoader):
    """:class:`PrivateLoader` for a data-parallel model (DDP or FSDP2 over several ranks): a
    :class:`~pytorch_privacy.optimizer.distributed.DistributedDPDataLoader` (this rank's share of
    one global Poisson sample) that remembers the last batch it yielded.  Built by
    :func:`make_private`; arguments as for ``DistributedDPDataLoader``."""


def _prepare_data_parallel(model: nn.Module) -> int:
    """The number of ranks a DDP or FSDP2 ``model`` is trained on (1 for any other model): the
    world size of the collective step the optimizer will take (the same detection and process
    group, :func:`~pytorch_privacy.optimizer.distributed.setup.setup_distributed`).  A DDP model over
    several ranks stops all-reducing the gradients of the loop's own backward, which the private
    step discards (``require_backward_grad_sync = False``, as inside ``model.no_sync()``)."""
    from .optimizer.distributed.setup import setup_distributed

    _, step = setup_distributed(model)
    world = 1 if step is None else step.world_size
    if world > 1 and isinstance(model, nn.parallel.DistributedDataParallel):
        model.require_backward_grad_sync = False
    return world


def _private_loader(
    loader: Any, *, generator, secure_mode: bool, world: int = 1
) -> PrivateLoader | DistributedPrivateLoader:
    """The Poisson loader that replaces ``loader``; over ``world > 1`` ranks a
    :class:`DistributedPrivateLoader` whose rate is the global ``q = world * batch_size / N``
    (each rank of a data-parallel loop loads ``batch_size``)."""
    if not isinstance(loader, DataLoader):
        raise TypeError(f"loader must be a torch.utils.data.DataLoader, got {type(loader).__name__}")
    dataset = loader.dataset
    if isinstance(dataset, IterableDataset):
        raise ValueError(
            "the loader's dataset is an IterableDataset; Poisson sampling needs a map-style dataset with len() "
            "and indexing"
        )
    try:
        n = len(dataset)
    except TypeError:
        raise ValueError("the loader's dataset has no len(); Poisson sampling needs the dataset size N") from None
    if n < 1:
        raise ValueError("the loader's dataset is empty")
    collate = loader.collate_fn
    if isinstance(loader, DPDataLoader):  # its collate_fn wraps the user's (empty batches); unwrap it
        collate = getattr(collate, "collate_fn", collate)
    kwargs = {
        "num_workers": loader.num_workers,
        "pin_memory": loader.pin_memory,
        "timeout": loader.timeout,
        "worker_init_fn": loader.worker_init_fn,
        "multiprocessing_context": loader.multiprocessing_context,
        "persistent_workers": loader.persistent_workers,
    }
    if loader.num_workers > 0 and loader.prefetch_factor is not None:
        kwargs["prefetch_factor"] = loader.prefetch_factor
    if isinstance(loader, DPDataLoader):
        rate, steps = loader.sample_rate, len(loader)
        if generator is None and not secure_mode and not isinstance(loader, DistributedDPDataLoader):
            generator = loader.poisson_sampler.random  # (a distributed sampler's source is its rank's own)
        secure_mode = secure_mode or loader.poisson_sampler.secure_mode
    else:
        b = loader.batch_size
        if b is None:
            raise ValueError(
                "the loader has batch_size=None (a custom batch_sampler); make_private needs a fixed batch_size to "
                "set the Poisson rate q = batch_size / len(dataset)"
            )
        if b * world > n:
            raise ValueError(
                f"the loader's batch_size={b}" + (f" on each of {world} ranks" if world > 1 else "")
                + f" exceeds the dataset size {n}"
            )
        rate = b * world / n
        steps = len(loader) if world == 1 else math.ceil(n / (b * world))
    cls = DistributedPrivateLoader if world > 1 else PrivateLoader
    return cls(dataset, rate, steps=steps, generator=generator, secure_mode=secure_mode, collate_fn=collate, **kwargs)


# -- the optimizer -------------------------------------------------------------------------
def _default_split(batch: Any) -> tuple[Any, Any]:
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        if len(batch) == 2:
            return batch[0], batch[1]
        return tuple(batch[:-1]), batch[-1]
    raise ValueError(
        f"cannot tell inputs from targets in a batch of type {type(batch).__name__}; make_private expects "
        "(inputs, targets) or (*inputs, targets) batches, else pass split_batch=lambda batch: (inputs, targets)"
    )


class PrivateOptimizer(DPGaussianOptimizer):
    """The optimizer :func:`make_private` returns: a
    :class:`~pytorch_privacy.optimizer.DPGaussianOptimizer` whose :meth:`step` works inside an
    unchanged ``zero_grad`` / ``backward`` / ``step`` loop.

    :meth:`step` recomputes the per-example gradients of the :class:`PrivateLoader`'s last batch
    (exactly :meth:`fit_batch` on it; the ``.grad`` left by the user's ``loss.backward()`` is
    discarded), then clips, noises, steps and records.  ``zero_grad``, ``param_groups``,
    ``state_dict`` and LR schedulers (on this object or on the original optimizer) keep
    working; ``fit_batch`` and the multi-pass API are still available.

    Args:
        loader: the :class:`PrivateLoader` (or :class:`DistributedPrivateLoader`) the batches come from.
        per_example_loss: the :class:`PerExampleLoss` of the user's criterion.
        split_batch: ``batch -> (inputs, targets)``.
        ``*args``, ``**kwargs``: as for :class:`~pytorch_privacy.optimizer.DPGaussianOptimizer`.
    """

    def __init__(self, *args, loader: PrivateLoader, per_example_loss: PerExampleLoss,
                 split_batch: Callable[[Any], tuple[Any, Any]] | None = None, epsilon_accountant: Any = None,
                 **kwargs):
        super().__init__(*args, loss_fn=per_example_loss, data_loader=loader, **kwargs)
        if epsilon_accountant is None:
            from .analysis import RdpAccountant

            epsilon_accountant = RdpAccountant(refine=True)
        #: the accountant of :meth:`epsilon` with ``accountant="rdp"`` (and of the budget, if any)
        self.epsilon_accountant = epsilon_accountant
        self.private_loader = loader
        self.per_example_loss = per_example_loss
        self.split_batch = split_batch or _default_split
        self._checked_decomposition = False
        self._stepped_batch = 0  # loader.batches_yielded at the last loop step
        self._in_fit = False

    def _to_model_device(self, tree: Any) -> Any:
        p = next(iter(self._trainable().values()))
        return torch.utils._pytree.tree_map(
            lambda t: t.to(p.device) if isinstance(t, torch.Tensor) and t.device != p.device else t, tree
        )

    def fit_batch(self, inputs: Any, targets: Any) -> torch.Tensor:
        """As :meth:`DPOptimizer.fit_batch` (one private step on the given batch)."""
        self._in_fit = True
        try:
            return super().fit_batch(inputs, targets)
        finally:
            self._in_fit = False

    def step(self, closure: None = None) -> torch.Tensor | None:
        """One private step on the loader's last batch: per-example gradients (one extra
        forward and backward), clip, noise, step, record.  Returns the batch's mean
        per-example loss (monitoring only; computed without noise).

        ``RuntimeError`` before the loader has yielded a batch, or when this batch was already
        stepped on.  Inside :meth:`fit_batch` or after :meth:`backward_pass` /
        :meth:`accumulate_pass` it releases those passes instead (the multi-pass API)."""
        if self._in_fit or self._acc.has_passes:
            return super().step(closure)
        if closure is not None:
            raise TypeError("step() does not take a closure")
        loader = self.private_loader
        if loader.last_batch is None:
            raise RuntimeError(
                "optimizer.step() before any batch: iterate the loader returned by make_private (its last batch is "
                "the one step() makes private)"
            )
        if loader.batches_yielded == self._stepped_batch:
            raise RuntimeError(
                "optimizer.step() was already called on this batch; each Poisson batch may be released once (a "
                "second step would be accounted as a fresh sample). Take the next batch from the loader"
            )
        inputs, targets = self.split_batch(loader.last_batch)
        inputs, targets = self._to_model_device(inputs), self._to_model_device(targets)
        if not self._checked_decomposition and batch_size_of(inputs, targets) > 0:
            with torch.no_grad():
                out = call_model(self.model, inputs)
            self.per_example_loss.check_decomposes(out, targets)
            self._checked_decomposition = True
        loss = self.fit_batch(inputs, targets)
        self._stepped_batch = loader.batches_yielded
        return loss

    def epsilon(self, delta: float | None = None, *, accountant: Any = "rdp") -> float:  # type: ignore[override]
        """Epsilon spent so far at ``delta`` (default: ``target_delta``), from the ledger.

        ``accountant``: ``"rdp"`` (default: :attr:`epsilon_accountant`, the one that calibrated
        sigma and enforces the budget; exact RDP with the order optimised continuously), ``"pld"``
        (tighter), or a :class:`~pytorch_privacy.analysis.PrivacyAccountant` instance (copied)."""
        if delta is None:
            if self.budget is None:
                raise ValueError("pass delta: optimizer.epsilon(delta), e.g. delta=1e-5 (no target_delta was given)")
            delta = self.budget.target_delta
        if isinstance(delta, bool) or not isinstance(delta, numbers.Real) or not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta!r}")
        if accountant == "rdp" and self.budget is not None and delta == self.budget.target_delta:
            return self.budget.epsilon(self.ledger)
        from . import analysis

        if accountant == "rdp":
            acc = self.epsilon_accountant.copy()
        elif accountant == "pld":
            acc = analysis.PLDAccountant()
        elif isinstance(accountant, str):
            raise ValueError(f"accountant must be 'rdp', 'pld' or a PrivacyAccountant, got {accountant!r}")
        else:
            acc = accountant.copy()
        if len(self.ledger) == 0:
            return 0.0
        return float(acc.compose_ledger(self.ledger).get_epsilon(float(delta)))


# -- make_private --------------------------------------------------------------------------
def _check_positive(name: str, v: Any, *, allow_zero: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"{name} must be a finite number {'>= 0' if allow_zero else '> 0'}, got {v!r}")
    return float(v)


def _calibrate(loader: PrivateLoader, steps: int, target_epsilon: float, delta: float, accountant: Any) -> float:
    """The smallest sigma (relative 1e-4) whose ``steps`` Poisson steps at the loader's ``q``
    spend at most ``target_epsilon`` at ``delta`` according to ``accountant`` (the one that then
    enforces the budget).  Starts from :func:`pytorch_privacy.analysis.compute_noise` where the
    expected batch size is an integer, and bisects with ``accountant`` itself."""
    from .analysis import compute_noise
    from .analysis.calibration import smallest_noise
    from .dp_query import GaussianEvent, PrivacyLedger

    n, q = len(loader.dataset), loader.sample_rate

    def eps_at(sigma: float) -> float:
        plan = PrivacyLedger(n, q, sampling="poisson")
        plan.record_sample(GaussianEvent(sigma), steps)
        return float(accountant.copy().compose_ledger(plan).get_epsilon(delta))

    b = round(loader.expected_batch_size)
    if 1 <= b <= n and b / n == q:
        start = compute_noise(n, b, target_epsilon, delta=delta, steps=steps)
    else:
        start = 1.0
    return smallest_noise(
        eps_at, target_epsilon, start=start, factor=1.25, plan=f"q={q:.4g}, steps={steps}, delta={delta:g}"
    )


def _check_arguments(
    model, optimizer, criterion, max_grad_norm, noise_multiplier, target_epsilon, target_delta, epochs,
    secure_mode, generator, sampling_generator, seed, optimizer_kwargs,
) -> tuple[float, torch.Generator | None, torch.Generator | None]:
    """Validate :func:`make_private`'s arguments; ``(clip, noise generator, sampling generator)``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if isinstance(optimizer, DPOptimizer):
        raise TypeError("optimizer is already private (a DPOptimizer); pass the plain torch optimizer")
    if criterion is None or not callable(criterion):
        raise TypeError(
            "criterion= is required and must be callable: the loss of your loop, e.g. nn.CrossEntropyLoss() "
            "(optimizer.step() recomputes the per-example gradients with it)"
        )
    for bad in ("ledger", "data_loader", "loss_fn", "query", "l2_norm_clip", "expected_batch_size"):
        if bad in optimizer_kwargs:
            raise TypeError(f"make_private sets {bad!r} itself (from the loader and criterion); do not pass it")
    clip = _check_positive("max_grad_norm", max_grad_norm)
    if (noise_multiplier is None) == (target_epsilon is None):
        raise ValueError(
            "pass exactly one of noise_multiplier (sigma) and target_epsilon (with target_delta and epochs, to "
            f"calibrate sigma); got noise_multiplier={noise_multiplier!r}, target_epsilon={target_epsilon!r}"
        )
    if target_epsilon is not None:
        _check_positive("target_epsilon", target_epsilon)
        if target_delta is None or epochs is None:
            raise ValueError("target_epsilon needs target_delta and epochs (the planned training length) to calibrate sigma")
        epochs = _check_positive("epochs", epochs)
    elif epochs is not None:
        raise ValueError("epochs is only used with target_epsilon (to calibrate sigma); drop it or give target_epsilon")
    else:
        _check_positive("noise_multiplier", noise_multiplier, allow_zero=True)
    if target_delta is not None and (
        isinstance(target_delta, bool) or not isinstance(target_delta, numbers.Real) or not 0 < target_delta < 1
    ):
        raise ValueError(f"target_delta must be in (0, 1), e.g. 1e-5 (below 1/N), got {target_delta!r}")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        if secure_mode:
            raise ValueError("seed= makes the noise reproducible; it cannot be combined with secure_mode=True")
        if generator is not None or sampling_generator is not None:
            raise ValueError("pass seed= or generator=/sampling_generator=, not both")
        generator = torch.Generator().manual_seed(seed)
        sampling_generator = torch.Generator().manual_seed(seed + 1)
    if secure_mode and (generator is not None or sampling_generator is not None):
        raise ValueError("secure_mode=True draws from the OS CSPRNG; do not pass generator=/sampling_generator=")

    return clip, generator, sampling_generator


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    *,
    criterion: Callable[[Any, Any], torch.Tensor],
    max_grad_norm: float,
    noise_multiplier: float | None = None,
    target_epsilon: float | None = None,
    target_delta: float | None = None,
    epochs: float | None = None,
    loss_reduction: str | None = None,
    engine: str = "auto",
    secure_mode: bool = False,
    num_microbatches: int | None = None,
    microbatch_size: int | None = None,
    max_physical_batch_size: int | None = None,
    generator: torch.Generator | None = None,
    sampling_generator: torch.Generator | None = None,
    seed: int | None = None,
    split_batch: Callable[[Any], tuple[Any, Any]] | None = None,
    **optimizer_kwargs: Any,
) -> tuple[nn.Module, PrivateOptimizer, PrivateLoader]:
    """``(model, optimizer, loader)`` made private, for an unchanged training loop (see the
    module docstring for what each returned object does, and the cost).

    Args:
        model: the ``nn.Module`` (returned as is; ``engine="auto"`` may swap fused RNN/attention
            layers in place for drop-ins computing the same function, announced by a warning).
        optimizer: the ``torch.optim.Optimizer`` over ``model``'s parameters.  LR schedulers
            built on it keep working.
        loader: a ``DataLoader`` with a map-style dataset and a ``batch_size``: its batches are
            replaced by Poisson samples at ``q = batch_size / len(dataset)``, ``len(loader)`` per
            epoch.  A ``DPDataLoader`` keeps its ``q`` and sampling generator.  A DDP or FSDP2
            ``model`` over ``W > 1`` ranks gets a :class:`DistributedPrivateLoader` at the global
            ``q = W * batch_size / len(dataset)`` (``batch_size`` per rank; the global dataset).
        criterion: the loss of the loop, ``criterion(output, target) -> scalar`` (mean- or
            sum-reduced over the batch).  Required: :meth:`PrivateOptimizer.step` recomputes the
            per-example gradients with it.
        max_grad_norm: the clip ``C`` > 0 of each example's gradient (L2 over all parameters).
        noise_multiplier: ``sigma`` >= 0; or give ``target_epsilon`` instead.
        target_epsilon, target_delta, epochs: calibrate ``sigma`` so that
            ``ceil(epochs * len(loader))`` steps spend at most ``target_epsilon`` at
            ``target_delta`` (:func:`pytorch_privacy.analysis.compute_noise`), and enforce it:
            further steps raise ``PrivacyBudgetExceeded``.  ``target_delta`` with
            ``noise_multiplier`` only sets the default delta of ``optimizer.epsilon()``.
        loss_reduction: ``"mean"`` (default) or ``"sum"``, for a criterion without a
            ``reduction`` attribute.  ``"sum"`` releases the noisy clipped *sum* (no division).
        engine, secure_mode, num_microbatches, microbatch_size, max_physical_batch_size, generator:
            as for :class:`~pytorch_privacy.optimizer.DPGaussianOptimizer` (``secure_mode`` also
            makes the loader sample from the OS CSPRNG).
        sampling_generator: ``torch.Generator`` of the Poisson sampling (reproducible runs).
        seed: reproducible experiments: seeds both the noise and the sampling generators
            (not with ``secure_mode``; never for a deployment).
        split_batch: ``batch -> (inputs, targets)`` for batches that are not
            ``(inputs, targets)`` / ``(*inputs, targets)`` tuples.
        **optimizer_kwargs: other :class:`~pytorch_privacy.optimizer.DPOptimizer` options
            (``metrics``, ``metrics_callback``, ``pass_clipping``, ``validate``, ``accountant``).

    Returns:
        ``(model, optimizer, loader)``: the same model, a :class:`PrivateOptimizer`, a
        :class:`PrivateLoader`.
    """
    clip, generator, sampling_generator = _check_arguments(
        model, optimizer, criterion, max_grad_norm, noise_multiplier, target_epsilon, target_delta, epochs,
        secure_mode, generator, sampling_generator, seed, optimizer_kwargs,
    )
    if target_epsilon is not None:
        epochs = float(epochs)
    per_example = PerExampleLoss(criterion, loss_reduction)
    if per_example.loss_reduction == "sum" and (num_microbatches is not None or microbatch_size is not None):
        raise ValueError(
            "microbatches average each group's loss; with a sum-reduced criterion use a mean-reduced one instead"
        )
    world = _prepare_data_parallel(model)
    private_loader = _private_loader(loader, generator=sampling_generator, secure_mode=secure_mode, world=world)

    # one accountant per plan: sigma is calibrated with the accountant that enforces the budget
    # and reports epsilon (default: exact RDP with the order optimised continuously, the analysis of
    # compute_noise / compute_dp_sgd_privacy)
    accountant = optimizer_kwargs.pop("accountant", None)
    if accountant is None:
        from .analysis import RdpAccountant

        accountant = RdpAccountant(refine=True)
    if target_epsilon is not None:
        steps = math.ceil(epochs * len(private_loader))
        noise_multiplier = _calibrate(private_loader, steps, float(target_epsilon), float(target_delta), accountant)
    budget = {}
    if target_epsilon is not None:
        budget = {"target_epsilon": float(target_epsilon), "target_delta": float(target_delta), "accountant": accountant}
    elif target_delta is not None:  # monitoring only: the default delta of epsilon()
        budget = {"target_delta": float(target_delta), "accountant": accountant}
    if per_example.loss_reduction == "sum":
        optimizer_kwargs["expected_batch_size"] = 1.0
    private_optimizer = PrivateOptimizer(
        optimizer,
        model,
        l2_norm_clip=clip,
        noise_multiplier=float(noise_multiplier),
        loader=private_loader,
        per_example_loss=per_example,
        split_batch=split_batch,
        epsilon_accountant=accountant,
        engine=engine,
        secure_mode=secure_mode,
        num_microbatches=num_microbatches,
        microbatch_size=microbatch_size,
        max_physical_batch_size=max_physical_batch_size,
        generator=generator,
        **budget,
        **optimizer_kwargs,
    )
    return model, private_optimizer, private_loader
