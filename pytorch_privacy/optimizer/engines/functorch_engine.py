"""The general engine: ``torch.func.vmap(grad(...))`` over ``functional_call``.

Per-example gradients by automatic vectorisation (the approach of JAX-style DP-SGD, see
Subramani, Vadivelu and Kamath 2021, "Enabling fast differentially private SGD via just-in-time
compilation and vectorization", arXiv 2010.09063).  Any layer with a vmap batching rule works;
``nn.RNN`` and ``nn.GRU`` do not in torch 2.13 and are handed to the loop engine
(:mod:`.loop_engine`) by :func:`~.base.select_engine`.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn
from torch.func import grad, vmap
from torch.utils import _pytree as pytree

from .base import (
    GradientEngine,
    MaterializedGradients,
    PerExampleGradients,
    batch_size_of,
    empty_gradients,
    get_engine,
    num_records_for,
    register_engine,
)
from .checkpointing import dense_embedding_gradients, is_saved_tensor_hooks_error, refuse_reentrant_checkpoint
from .functional import check_losses, functional_forward, split_params
from .probe import scan_and_verify
from .scan import ModelScan

__all__ = ["FunctorchEngine", "NOT_VMAPPABLE", "check_losses", "functional_forward", "split_params"]

#: Module types whose forward has no working vmap batching rule in the supported torch
#: versions (torch 2.13: "output with shape [1, 5] doesn't match the broadcast shape").
#: ``nn.LSTM`` vmaps in float32 only (with a slow fallback and a performance warning).
NOT_VMAPPABLE: tuple[type[nn.Module], ...] = (nn.RNN, nn.GRU)


def _not_vmappable(m: nn.Module) -> bool:
    if isinstance(m, NOT_VMAPPABLE):
        return True
    if isinstance(m, nn.LSTM):
        return any(p.dtype != torch.float32 for p in m.parameters())
    return False


def _is_tensor(t: Any) -> bool:
    return isinstance(t, torch.Tensor)


def _unsqueeze_tree(x: Any) -> Any:
    return pytree.tree_map(lambda t: t.unsqueeze(0) if _is_tensor(t) else t, x)


def _split_groups(x: Any, b: int) -> Any:
    return pytree.tree_map(
        lambda t: t.reshape((t.shape[0] // b, b) + tuple(t.shape[1:])) if _is_tensor(t) else t, x
    )


def _in_dims(x: Any) -> Any:
    """vmap ``in_dims`` for a pytree: 0 for tensor leaves, ``None`` for anything else."""
    if _is_tensor(x):
        return 0
    return pytree.tree_map(lambda t: 0 if _is_tensor(t) else None, x)


@register_engine
class FunctorchEngine(GradientEngine):
    """Per-example gradients by ``vmap(grad(loss))`` over examples (or microbatches).

    Works for any model whose forward is vmappable (most layers; not ``nn.RNN``/``nn.GRU`` nor
    a non-float32 ``nn.LSTM``, see :data:`NOT_VMAPPABLE`, and not layers that mix examples, such as BatchNorm in training
    mode: see :func:`pytorch_privacy.optimizer.validation.validate_model`).  Parameters are
    passed functionally, so tied weights are handled (the gradient of a tied parameter is the
    sum over its uses) and ``nn.Parameter`` is never modified.  Random layers (dropout) draw
    independent randomness per example (``vmap(randomness="different")``).

    Args:
        model, loss_fn: see :class:`~.base.GradientEngine`.
        chunk_size: optional ``vmap`` chunk size bounding peak memory (``None``: all at once).
    """

    name = "functorch"
    priority = 10

    def __init__(self, model: nn.Module, loss_fn, *, chunk_size: int | None = None):
        super().__init__(model, loss_fn)
        self.chunk_size = chunk_size
        self.fallback: GradientEngine | None = None

    @classmethod
    def unsupported_reason(cls, model: nn.Module) -> str | None:
        """Why not, when ``model`` holds a module without a vmap batching rule (see
        :data:`NOT_VMAPPABLE`), frozen or not: the whole forward runs under vmap."""
        for name, m in model.named_modules():
            # the whole forward runs under vmap, so even a frozen RNN/GRU blocks this engine
            if _not_vmappable(m):
                return (
                    f"module {name or '<root>'!r} ({type(m).__name__}) cannot be vmapped by torch.func in "
                    f"torch {torch.__version__.split('+')[0]}; use the 'loop' engine, or the vmappable "
                    "drop-ins pytorch_privacy.optimizer.engines.DPRNN / DPGRU / DPLSTM"
                )
        return None

    def compute(self, inputs: Any, targets: Any, *, microbatch_size: int | None = None) -> PerExampleGradients:
        """Per-example (or per-microbatch) gradients, materialised (see the class docstring).

        If ``vmap`` fails with a ``RuntimeError`` (a layer without a batching rule that
        :meth:`unsupported_reason` does not know of, or non-reentrant activation checkpointing)
        and the loop engine succeeds on the same batch, this engine warns once and uses the loop
        engine from then on.  Reentrant checkpointing raises ``ValueError`` (use
        ``use_reentrant=False``); sparse embeddings get dense per-example gradients (see
        :mod:`.checkpointing`).
        """
        if self.fallback is not None:
            return self.fallback.compute(inputs, targets, microbatch_size=microbatch_size)
        # vmap evaluates each example alone, which would silently change a model that mixes
        # examples; such models are refused instead (see .probe)
        try:
            with refuse_reentrant_checkpoint(), dense_embedding_gradients(self.model):
                scan, _ = scan_and_verify(self.model, self.loss_fn, inputs, targets)
                return self._compute(inputs, targets, microbatch_size, scan)
        except RuntimeError as err:
            loop = get_engine("loop")(self.model, self.loss_fn)
            result = loop.compute(inputs, targets, microbatch_size=microbatch_size)  # re-raises real errors
            if is_saved_tensor_hooks_error(err):
                why = (
                    "torch.func cannot differentiate through non-reentrant activation checkpointing (saved-tensor "
                    "hooks); the loop engine (plain autograd per example) handles it and is used from now on "
                    "(slower; drop the checkpointing, or use engine='ghost', for speed)"
                )
            else:
                why = (
                    f"vmap failed ({str(err).splitlines()[0][:200]}); the loop engine works for this model and is "
                    "used from now on (slower)"
                )
            warnings.warn(f"functorch engine: {why}", RuntimeWarning, stacklevel=2)
            self.fallback = loop
            return result

    def _compute(self, inputs: Any, targets: Any, microbatch_size: int | None, scan: ModelScan) -> PerExampleGradients:
        batch = batch_size_of(inputs)
        num_records_for(batch, microbatch_size)
        if batch == 0:
            return empty_gradients(scan.trainable)
        params, consts = split_params(scan)
        model, loss_fn = self.model, self.loss_fn

        def group_loss(p, x, y):
            out = functional_forward(model, {**p, **consts}, x)
            losses = loss_fn(out, y)
            check_losses(losses)
            return losses.mean(), losses.detach()

        kw = dict(randomness="different", chunk_size=self.chunk_size)
        if microbatch_size is None or microbatch_size == 1:

            def example_loss(p, x, y):
                return group_loss(p, _unsqueeze_tree(x), _unsqueeze_tree(y))

            fn = vmap(grad(example_loss, has_aux=True), in_dims=(None, _in_dims(inputs), _in_dims(targets)), **kw)
            g, losses = fn(params, inputs, targets)
        else:
            xg, yg = _split_groups(inputs, microbatch_size), _split_groups(targets, microbatch_size)
            fn = vmap(grad(group_loss, has_aux=True), in_dims=(None, _in_dims(xg), _in_dims(yg)), **kw)
            g, losses = fn(params, xg, yg)
        return MaterializedGradients(g, losses.reshape(-1))

