"""The fallback engine: one ``torch.func.grad`` call per record, no vectorisation.

Slow (one forward and backward per example) but correct for any model whose forward runs on a
batch of one, including modules without a vmap batching rule (``nn.RNN``, ``nn.GRU`` in torch
2.13).  :func:`~.base.select_engine` picks it automatically only when no faster engine supports
the model (it has the lowest priority).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.func import grad
from torch.utils import _pytree as pytree

from .base import (
    GradientEngine,
    MaterializedGradients,
    PerExampleGradients,
    batch_size_of,
    empty_gradients,
    num_records_for,
    register_engine,
)
from .base import call_model
from .checkpointing import dense_embedding_gradients, is_saved_tensor_hooks_error, refuse_reentrant_checkpoint
from .functional import check_losses, functional_forward, split_params
from .probe import scan_and_verify

__all__ = ["LoopEngine"]


def _slice_tree(x: Any, start: int, stop: int) -> Any:
    return pytree.tree_map(lambda t: t[start:stop] if isinstance(t, torch.Tensor) else t, x)


@register_engine
class LoopEngine(GradientEngine):
    """Per-record gradients by looping ``torch.func.grad`` over records (examples/microbatches).

    Each record's gradient is the gradient of the mean loss over its examples, computed on a
    slice of the batch that keeps the batch dimension (so the model sees a batch of
    ``microbatch_size`` or 1).  Parameters are passed functionally (tied weights handled,
    ``nn.Parameter`` untouched).  Cost: ``num_records`` forward/backward passes per step.
    """

    name = "loop"
    priority = 0

    #: set once ``torch.func.grad`` met saved-tensor hooks (non-reentrant checkpointing)
    use_autograd: bool = False

    def compute(self, inputs: Any, targets: Any, *, microbatch_size: int | None = None) -> PerExampleGradients:
        """Per-record gradients, materialised and stacked ``[num_records, *param.shape]``.

        Models with non-reentrant activation checkpointing (which ``torch.func.grad`` cannot
        trace) are differentiated with plain ``torch.autograd.grad`` per record instead (same
        values); reentrant checkpointing raises ``ValueError`` (use ``use_reentrant=False``);
        sparse embeddings get dense per-record gradients (see :mod:`.checkpointing`).
        """
        with refuse_reentrant_checkpoint(), dense_embedding_gradients(self.model):
            if not self.use_autograd:
                try:
                    return self._compute(inputs, targets, microbatch_size)
                except RuntimeError as err:
                    if not is_saved_tensor_hooks_error(err):
                        raise
                    self.use_autograd = True
            return self._compute(inputs, targets, microbatch_size, autograd=True)

    def _autograd_record(self, x: Any, y: Any, b: int, names: list[str], params: list[torch.Tensor]):
        """``({name: grad}, losses)`` of one record by ``torch.autograd.grad`` on the module's
        own parameters (dense, zeros for unused parameters)."""
        loss = self.loss_fn(call_model(self.model, x), y)
        check_losses(loss, b)
        gs = torch.autograd.grad(loss.mean(), params, allow_unused=True)
        out = {}
        for n, p, g in zip(names, params, gs):
            out[n] = torch.zeros_like(p) if g is None else (g.to_dense() if g.is_sparse else g).detach()
        return out, loss.detach()

    def _compute(self, inputs: Any, targets: Any, microbatch_size: int | None, autograd: bool = False) -> PerExampleGradients:
        batch = batch_size_of(inputs)
        records = num_records_for(batch, microbatch_size)
        if batch == 0:
            return empty_gradients(self.trainable_parameters())
        scan, _ = scan_and_verify(self.model, self.loss_fn, inputs, targets)
        trainable = scan.trainable
        b = microbatch_size or 1
        if autograd:
            names, plist = list(trainable), list(trainable.values())
            gfn = lambda p, x, y: self._autograd_record(x, y, b, names, plist)  # noqa: E731
        params, consts = split_params(scan)
        model, loss_fn = self.model, self.loss_fn

        def group_loss(p, x, y):
            losses = loss_fn(functional_forward(model, {**p, **consts}, x), y)
            check_losses(losses, b)
            return losses.mean(), losses.detach()

        if not autograd:
            gfn = grad(group_loss, has_aux=True)
        per_record: dict[str, list[torch.Tensor]] = {n: [] for n in params}
        losses = []
        with torch.enable_grad():
            for r in range(records):
                g, loss = gfn(params, _slice_tree(inputs, r * b, (r + 1) * b), _slice_tree(targets, r * b, (r + 1) * b))
                for n in params:
                    per_record[n].append(g[n])
                losses.append(loss)
        grads = {n: torch.stack(v) for n, v in per_record.items()}
        return MaterializedGradients(grads, torch.cat(losses))
