"""pytorch_privacy: differential privacy for PyTorch in the shape of TensorFlow Privacy.

Subpackages: :mod:`pytorch_privacy.dp_query` (queries, events, ledger),
:mod:`pytorch_privacy.analysis` (privacy accounting; imports without torch) and
:mod:`pytorch_privacy.optimizer` (private training).

:func:`make_private` (:mod:`pytorch_privacy.private_loop`) turns a plain training loop's
``(model, optimizer, loader)`` into private ones, loop unchanged.  Names load lazily (PEP 562):
``import pytorch_privacy`` does not import torch.
"""

from __future__ import annotations

from ._lazy import lazy_attributes

__version__ = "0.1.0"

_LAZY = {
    "make_private": ".private_loop",
}

__getattr__, __dir__, __all__ = lazy_attributes(__name__, globals(), _LAZY)
