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
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch

from ..engines.base import PerExampleGradients
from ..samplers import split_into_physical_batches

__all__ = ["full_precision", "DPLossScaler", "UnscaledGradients"]


@contextlib.contextmanager
def full_precision() -> Iterator[None]:
    """Disable ``torch.autocast`` (CPU and, where present, CUDA) inside the block."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.autocast("cpu", enabled=False))
        if torch.cuda.is_available():
            stack.enter_context(torch.autocast("cuda", enabled=False))
        yield


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
    engine per loss function)."""

    def __init__(self, loss_fn: Callable, scale: float):
        self.loss_fn, self.scale = loss_fn, scale

    def __call__(self, output: Any, targets: Any) -> torch.Tensor:
        losses = self.loss_fn(output, targets)
        return losses.float() * self.scale if isinstance(losses, torch.Tensor) else losses


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
