"""Mixed precision: the private part of a step runs in full precision.

Under ``torch.autocast`` (bf16 on CPU or GPU, fp16 on GPU) the forward and the backward of the
per-example gradients run in half precision, but the private arithmetic does not:

* per-record squared norms are accumulated in float32 (``engines.base.accumulation_dtype``; the
  ghost rules and the materialised route both use it), so norms come out float32;
* clip coefficients ``min(1, C / ||g_i||)`` are computed from those float32 norms;
* the clipped sums are contracted in float32 (the ghost engine upcasts its half-precision
  activations and output gradients before the contraction), into a float32 sample state shaped
  like the (float32) parameters;
* the Gaussian noise is drawn and added in float32, and the release is divided by ``D`` in float32.

:func:`full_precision` is the context the optimizer wraps around clipping, summing and noising:
it disables autocast, which would otherwise run the sums' matrix products in half precision.

fp16 and loss scaling (:class:`DPLossScaler`).  In fp16 the output gradients of small losses
underflow, so the loss is multiplied by a scale ``s`` before the backward pass (the per-example
losses in fp32, ``s * loss_i``), giving per-example gradients ``s g_i``.  They are unscaled
*before* clipping, inside the per-example view the query sees: norms ``||s g_i|| / s``, clip
coefficients ``c_i = min(1, C / ||g_i||)`` from those, and the clipped sum as
``sum_i (c_i / s) (s g_i)`` in fp32.  (Clipping the scaled gradients to ``C`` and unscaling after
would shrink every clipped record by ``s``: the sensitivity would be ``C / s`` while the ledger
says ``C``, and the noise ``sigma C`` would swamp the signal.)

Overflow.  A record whose scaled gradient overflows fp16 has a non-finite norm; it is dropped
(contributes exactly zero), the optimizer's rule for any non-finite record, and the step is still
taken: the noise is drawn and released, and the ledger records the step.  Skipping the step when
some record overflows, as ``GradScaler.step`` does, would not be sound: whether a step happens
would then depend on one record, and nothing noises that bit.  For the same reason the scale is a
*public constant* across steps: :class:`DPLossScaler` reads ``GradScaler.get_scale()`` once and
never calls ``GradScaler.update`` with an overflow flag.  A scale that backs off after an overflow
is state that depends on one record and changes which *other* records overflow at the next step,
so one example could change many records' contributions (unbounded sensitivity).  Choose a static
scale that leaves headroom (e.g. ``2**10``-``2**12`` for losses of order 1; the dropped-record
count, :attr:`~pytorch_privacy.optimizer.DPOptimizer.dropped_records`, says when it is too high).
bf16 has fp32's exponent range and needs no scaling.

A dynamic scale (:class:`DynamicDPLossScaler`) is sound when it moves only on a *released*
quantity: a noised count of the records dropped at each step.  Each record either enters the
clipped sum (norm at most ``C``) or is dropped and counted (``1``), never both.  Released as
``(sum + N(0, sigma^2 C^2 I), count + N(0, sigma_o^2))`` and rescaled by the noise, one record
moves the pair by at most ``max(1/sigma, 1/sigma_o)``, which is ``1/sigma`` when
``sigma_o >= sigma``: the pair is the same Gaussian mechanism, with the same sampling, as the
gradient release alone.  The ledger's event is unchanged and the count costs no privacy.  The
scale is then post-processing of released values, like any public schedule.  (This needs each
record in one sensitive pass of the step, which :meth:`DynamicDPLossScaler.fit_batch` ensures: a
record seen by ``k`` passes could be counted ``k`` times.)
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch

from ..engines.base import PerExampleGradients
from ..samplers import split_into_physical_batches

__all__ = ["full_precision", "DPLossScaler", "DynamicDPLossScaler", "UnscaledGradients"]


@contextlib.contextmanager
def full_precision() -> Iterator[None]:
    """Disable ``torch.autocast`` (CPU and, where present, CUDA) inside the block."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.autocast("cpu", enabled=False))
        if torch.cuda.is_available():
            stack.enter_context(torch.autocast("cuda", enabled=False))
        yield


def fp32_under_autocast() -> contextlib.AbstractContextManager:
    """:func:`full_precision` when autocast is on (where the optimizer clips, sums and noises);
    otherwise a no-op context (nothing to disable, and entering autocast contexts costs time)."""
    on = torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda")
    return full_precision() if on else contextlib.nullcontext()


class UnscaledGradients(PerExampleGradients):
    """The per-example view of gradients computed from losses scaled by ``scale``: every value the
    query sees (norms, weighted sums, materialised rows, losses) is divided by ``scale`` first,
    in fp32 or wider."""

    def __init__(self, inner: PerExampleGradients, scale: float):
        self._inner = inner
        self._scale = float(scale)
        self.names = tuple(inner.names)

    @property
    def losses(self) -> torch.Tensor:
        return self._inner.losses / self._scale

    @property
    def num_records(self) -> int:
        return self._inner.num_records

    def norms(self) -> torch.Tensor:
        n = self._inner.norms()
        return (n if n.dtype in (torch.float32, torch.float64) else n.float()) / self._scale

    def weighted_sum(self, coefficients: torch.Tensor) -> dict[str, torch.Tensor]:
        wide = coefficients if coefficients.dtype in (torch.float32, torch.float64) else coefficients.float()
        return self._inner.weighted_sum(wide / self._scale)  # sum_i (c_i / s)(s g_i): exact zeros stay zeros

    def materialize(self) -> dict[str, torch.Tensor]:
        return {n: g.float() / self._scale if g.dtype not in (torch.float32, torch.float64) else g / self._scale
                for n, g in self._inner.materialize().items()}


class _ScaledLoss:
    """``loss_fn(out, y) * scale`` in fp32 (one object per base loss: the optimizer keeps one
    engine per loss function).

    The scale is held as a 0-dim tensor updated in place: a compiled engine then sees the same
    graph input at every scale (a Python float would be a constant of the graph, and each new
    scale of a dynamic scaler would compile a new graph)."""

    def __init__(self, loss_fn: Callable, scale: float):
        self.loss_fn = loss_fn
        self._scale = torch.tensor(float(scale), dtype=torch.float32)

    @property
    def scale(self) -> float:
        return float(self._scale)

    @scale.setter
    def scale(self, value: float) -> None:
        self._scale.fill_(float(value))

    def __call__(self, output: Any, targets: Any) -> torch.Tensor:
        losses = self.loss_fn(output, targets)
        return losses.float() * self._scale if isinstance(losses, torch.Tensor) else losses


class DPLossScaler:
    """A static loss scale for fp16 private steps (see the module docstring for why static).

    Args:
        scale: a positive finite float, or a ``torch.amp.GradScaler`` whose current
            ``get_scale()`` is read once (``GradScaler.update`` is never called).

    :meth:`fit_batch` is ``DPOptimizer.fit_batch`` with the scaled loss: per-example gradients of
    ``scale * loss_i`` (physical chunks and microbatches as configured on the optimizer),
    unscaled before clipping, one noised release, one ledger entry; it returns the mean
    (unscaled) loss.  Run it under ``torch.autocast(..., dtype=torch.float16)``.
    """

    def __init__(self, scale: Any = 2.0**12):
        if isinstance(scale, torch.amp.GradScaler):
            if not scale.is_enabled():
                raise ValueError("the GradScaler is disabled; pass an enabled one or a float scale")
            scale = float(scale.get_scale())
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (0 < float(scale) < float("inf")):
            raise ValueError(f"scale must be a positive finite number or a torch.amp.GradScaler, got {scale!r}")
        self.scale = float(scale)
        self._losses: dict[int, _ScaledLoss] = {}

    def scaled_loss(self, loss_fn: Callable) -> Callable:
        """``loss_fn`` times the scale (the same object on every call for one ``loss_fn``)."""
        wrapped = self._losses.get(id(loss_fn))
        if wrapped is None or wrapped.loss_fn is not loss_fn:
            wrapped = self._losses[id(loss_fn)] = _ScaledLoss(loss_fn, self.scale)
        wrapped.scale = self.scale  # a dynamic scale moves between steps
        return wrapped

    def unscale(self, per_example: PerExampleGradients) -> PerExampleGradients:
        """The per-example view the query must see (:class:`UnscaledGradients`)."""
        return UnscaledGradients(per_example, self.scale)

    def fit_batch(self, optimizer: Any, inputs: Any, targets: Any) -> torch.Tensor:
        """One private step of ``optimizer`` (a :class:`~pytorch_privacy.optimizer.DPOptimizer`)
        on a logical batch with the scaled loss; returns the mean unscaled loss."""
        from ..engines.base import batch_size_of

        optimizer.zero_grad()
        n = batch_size_of(inputs, targets)
        b = optimizer._microbatch_size_for(n)
        loss_fn = self.scaled_loss(optimizer.loss_fn)
        loss_sum = None
        for cx, cy in split_into_physical_batches(inputs, targets, optimizer.max_physical_batch_size, multiple_of=b or 1):
            pe = self.unscale(optimizer.per_example_gradients(cx, cy, loss_fn=loss_fn, microbatch_size=b))
            optimizer.accumulate_pass(pe, sensitive=True)
            s = pe.losses.detach().sum()
            loss_sum = s if loss_sum is None else loss_sum + s
            optimizer.clip_and_accumulate()
        optimizer.step()
        return loss_sum / max(n, 1)


class DynamicDPLossScaler(DPLossScaler):
    """An fp16 loss scale that backs off and grows like ``torch.amp.GradScaler``, driven by a
    *noised* count of the records dropped at each step (see the module docstring for why that
    count costs no privacy when its noise ``sigma_o >= sigma``).

    After each :meth:`fit_batch`, the number of records the step dropped (non-finite gradients:
    overflow) is released as ``count + N(0, sigma_o^2)``, drawn from the query's own random
    source.  When the released count exceeds ``backoff_threshold`` the scale is multiplied by
    ``backoff_factor``.  After ``growth_interval`` consecutive steps at or below it, the scale is
    multiplied by ``growth_factor``.  The scale stays within ``[min_scale, max_scale]``.  The
    dropped records contribute zero, as with a static scale, and the step is still taken and
    recorded.

    Args:
        init_scale: the first scale (a float, or a ``GradScaler`` whose current scale is read).
        growth_factor, backoff_factor, growth_interval: as for ``GradScaler``.
        count_noise_multiplier: ``sigma_o``, the stddev of the count's noise; at least the
            optimizer's ``noise_multiplier`` (default: equal to it).  A smaller one would cost
            privacy that the ledger does not record, and is refused.
        backoff_threshold: back off when the noised count exceeds it; default
            ``max(0.5, 4 sigma_o)``: with no overflow, a spurious backoff about once in 30,000
            steps.
        min_scale, max_scale: bounds on the scale.

    Needs a :class:`~pytorch_privacy.optimizer.DPGaussianOptimizer` (its ``noise_multiplier``
    fixes ``sigma``), in one process, under DDP or under FSDP2.  Distributed, the count travels in
    the step's one collective: each rank adds its own count plus ``N(0, sigma_o^2 / W)`` from its
    own source, so the world's count is released once with noise ``N(0, sigma_o^2)`` and every
    rank moves its scale identically.  One host sync per step reads the noised count.
    Attributes :attr:`scale` and :attr:`last_noised_count` (released values, safe to log).
    """

    def __init__(
        self,
        init_scale: Any = 2.0**16,
        *,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        count_noise_multiplier: float | None = None,
        backoff_threshold: float | None = None,
        min_scale: float = 1.0,
        max_scale: float = 2.0**24,
    ):
        super().__init__(init_scale)
        if not (growth_factor > 1.0 and 0.0 < backoff_factor < 1.0):
            raise ValueError(f"need growth_factor > 1 and 0 < backoff_factor < 1, got {growth_factor}, {backoff_factor}")
        if isinstance(growth_interval, bool) or not isinstance(growth_interval, int) or growth_interval < 1:
            raise ValueError(f"growth_interval must be a positive int, got {growth_interval!r}")
        if not (0.0 < min_scale <= self.scale <= max_scale < float("inf")):
            raise ValueError(f"need 0 < min_scale <= init_scale <= max_scale < inf, got {min_scale}, {self.scale}, {max_scale}")
        if count_noise_multiplier is not None and not (0.0 <= count_noise_multiplier < float("inf")):
            raise ValueError(f"count_noise_multiplier must be finite and >= 0, got {count_noise_multiplier!r}")
        self.growth_factor, self.backoff_factor, self.growth_interval = growth_factor, backoff_factor, growth_interval
        self.count_noise_multiplier = count_noise_multiplier
        self.backoff_threshold = backoff_threshold
        self.min_scale, self.max_scale = float(min_scale), float(max_scale)
        #: the last released (noised) count of dropped records; ``None`` before the first step
        self.last_noised_count: float | None = None
        self._good_steps = 0

    def count_stddev(self, optimizer: Any) -> float:
        """``sigma_o`` for ``optimizer``: checked against its ``noise_multiplier``."""
        from .ddp import DistributedStep

        sigma = getattr(optimizer, "noise_multiplier", None)
        dist_step = getattr(optimizer, "_dist", None)
        if not isinstance(sigma, (int, float)) or (dist_step is not None and not isinstance(dist_step, DistributedStep)):
            raise ValueError(
                "DynamicDPLossScaler needs a DPGaussianOptimizer (its noise_multiplier fixes the count's noise); use "
                "DPLossScaler (a static scale) for other optimizers"
            )
        sigma_o = float(sigma) if self.count_noise_multiplier is None else float(self.count_noise_multiplier)
        if sigma_o < sigma:
            raise ValueError(
                f"count_noise_multiplier={sigma_o} is below the optimizer's noise_multiplier={sigma}: the count would "
                "cost privacy that the ledger does not record; use at least the noise multiplier"
            )
        return sigma_o

    def fit_batch(self, optimizer: Any, inputs: Any, targets: Any) -> torch.Tensor:
        """:meth:`DPLossScaler.fit_batch` at the current scale, then the noised count of the
        step's dropped records is released and the scale updated from it."""
        sigma_o = self.count_stddev(optimizer)
        dist_step = getattr(optimizer, "_dist", None)
        if dist_step is not None:  # DDP: the count travels, noised, in the step's one all-reduce
            dist_step.count_stddev = sigma_o
        before = optimizer._acc.dropped
        before = None if before is None else before.clone()
        loss = super().fit_batch(optimizer, inputs, targets)
        released = None if dist_step is None else dist_step.last_noised_count
        if released is None:
            if dist_step is not None and dist_step.world_size > 1:  # pragma: no cover - Gaussian queries carry it
                raise ValueError("this DDP step did not carry the dropped-record count (not a Gaussian sum/average)")
            after = optimizer._acc.dropped
            if after is None:
                count: Any = 0.0
            else:
                count = after - before.to(after.device) if before is not None else after
            released = float(self.noised_count(optimizer, count, sigma_o))
        self.update(float(released), sigma_o)
        return loss

    def noised_count(self, optimizer: Any, count: Any, sigma_o: float) -> torch.Tensor:
        """``count + N(0, sigma_o^2)``, the normal drawn from the optimizer's query's first random
        source (the same source, and so the same secure mode, as the gradient noise)."""
        count = torch.as_tensor(count, dtype=torch.float64)
        if sigma_o == 0:
            return count
        sources = optimizer._random_sources
        if not sources:
            raise ValueError("the optimizer's query has no random source to draw the count's noise from")
        return count + sigma_o * sources[0].normal((), device="cpu", dtype=torch.float64)

    def state_dict(self) -> dict[str, Any]:
        """The scale and its growth counter (plain numbers: save it beside the optimizer's)."""
        return {"scale": self.scale, "good_steps": self._good_steps, "last_noised_count": self.last_noised_count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict` (checked against the bounds)."""
        scale = float(state["scale"])
        if not (self.min_scale <= scale <= self.max_scale):
            raise ValueError(f"saved scale {scale} is outside [{self.min_scale}, {self.max_scale}]")
        self.scale, self._good_steps = scale, int(state["good_steps"])
        self.last_noised_count = state.get("last_noised_count")

    def update(self, noised_count: float, count_stddev: float) -> None:
        """Back off or grow from a *released* count whose noise had stddev ``count_stddev``
        (post-processing only)."""
        self.last_noised_count = noised_count
        threshold = self.backoff_threshold
        if threshold is None:
            threshold = max(0.5, 4.0 * count_stddev)
        if noised_count > threshold:
            self.scale = max(self.min_scale, self.scale * self.backoff_factor)
            self._good_steps = 0
            return
        self._good_steps += 1
        if self._good_steps >= self.growth_interval:
            self.scale = min(self.max_scale, self.scale * self.growth_factor)
            self._good_steps = 0
