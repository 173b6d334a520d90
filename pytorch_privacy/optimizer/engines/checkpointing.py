"""Activation checkpointing and sparse embedding gradients in the per-example engines.

* **Reentrant checkpointing** (``torch.utils.checkpoint.checkpoint(..., use_reentrant=True)``,
  torch's old default) runs the wrapped forward under ``no_grad`` and recomputes it inside
  ``backward()``: ``torch.func`` transforms cannot trace it, ``torch.autograd.grad`` refuses it,
  and forward hooks see outputs without gradients (so a hook-based engine would silently miss
  the checkpointed layers).  :func:`refuse_reentrant_checkpoint` makes any such call during an
  engine's forward raise a ``ValueError`` naming the fix, ``use_reentrant=False``.
* **Non-reentrant checkpointing** uses saved-tensor hooks, which ``torch.func.grad``/``vmap``
  do not support (:func:`is_saved_tensor_hooks_error` recognises the error); plain autograd does,
  which is what the loop engine then uses.
* **Sparse embeddings** (``nn.Embedding(sparse=True)``, ``nn.EmbeddingBag(sparse=True)``) only
  change the *storage* of the gradient.  Per-example gradients are dense by nature, so
  :func:`dense_embedding_gradients` computes them with ``sparse=False`` for the duration of an
  engine call (the values are identical; the optimizer receives dense gradients).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

from torch import nn
from torch.utils import checkpoint as _checkpoint

__all__ = [
    "REENTRANT_MESSAGE",
    "refuse_reentrant_checkpoint",
    "is_saved_tensor_hooks_error",
    "dense_embedding_gradients",
]

REENTRANT_MESSAGE = (
    "the model uses reentrant activation checkpointing (torch.utils.checkpoint.checkpoint or "
    "checkpoint_sequential with use_reentrant=True), which recomputes the forward inside backward() and "
    "cannot give per-example gradients; pass use_reentrant=False"
)

_lock = threading.Lock()
_depth = 0
_original_apply = None


def _refusing_apply(cls, *args, **kwargs):
    raise ValueError(REENTRANT_MESSAGE)


@contextlib.contextmanager
def refuse_reentrant_checkpoint() -> Iterator[None]:
    """Within the block, a reentrant ``torch.utils.checkpoint`` call raises ``ValueError``
    (:data:`REENTRANT_MESSAGE`) instead of running.  Nests; restores torch on exit."""
    global _depth, _original_apply
    fn_cls = getattr(_checkpoint, "CheckpointFunction", None)
    if fn_cls is None:  # pragma: no cover - a torch without the reentrant implementation
        yield
        return
    with _lock:
        if _depth == 0:
            _original_apply = fn_cls.__dict__.get("apply")
            fn_cls.apply = classmethod(_refusing_apply)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                if _original_apply is None:
                    del fn_cls.apply  # back to the inherited autograd.Function.apply
                else:
                    fn_cls.apply = _original_apply
                _original_apply = None


def is_saved_tensor_hooks_error(err: BaseException) -> bool:
    """Whether ``err`` is torch.func's refusal of saved-tensor hooks (non-reentrant
    checkpointing, or another ``saved_tensors_hooks`` user, inside ``grad``/``vmap``)."""
    return isinstance(err, RuntimeError) and "saved tensor hooks" in str(err)


@contextlib.contextmanager
def dense_embedding_gradients(model: nn.Module) -> Iterator[None]:
    """Within the block, every ``nn.Embedding``/``nn.EmbeddingBag`` of ``model`` with
    ``sparse=True`` computes dense gradients (same values); restored on exit."""
    flipped = [m for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse]
    for m in flipped:
        m.sparse = False
    try:
        yield
    finally:
        for m in flipped:
            m.sparse = True
