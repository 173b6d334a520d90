"""Empirical privacy auditing: lower bounds on epsilon measured on a trained model.

The ledger gives an *upper* bound on epsilon; an audit gives a *lower* bound, with stated
confidence: membership inference (:mod:`.membership_inference`), canaries and the one-run audit
(Steinke, Nasr, Jagielski 2023), secret-sharer exposure (Carlini et al. 2019).  A lower bound
above the claimed epsilon is evidence of a bug; a lower bound far below it is expected (the
bounds are loose for realistic attacks) and is not a privacy guarantee.

Public names load lazily from their modules (one concept a file).
"""

from __future__ import annotations

from .._lazy import lazy_attributes

_LAZY: dict[str, str] = {}

__getattr__, __dir__, __all__ = lazy_attributes(__name__, globals(), _LAZY)
