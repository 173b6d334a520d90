"""Privacy events of tree aggregation (DP-FTRL; Kairouz et al. 2021, "Practical and Private
(Deep) Learning without Sampling or Shuffling").

This module imports neither torch nor numpy (an auditor reads ledgers without them).

A tree-aggregation query releases, at each step, a noisy prefix sum (or its increment) built
from the nodes of a binary tree of Gaussian noise.  The ledger records one
:class:`TreeAggregationStepEvent` per step; the step that starts a new tree (the first one, and
each restart) has ``starts_tree=1``.  Consecutive identical steps merge into one ledger run, so a
ledger grows with the number of restarts, not of steps.  The analysis groups the steps of each
tree and accounts the tree as a whole (see :mod:`pytorch_privacy.analysis.tree_aggregation`).
"""

from __future__ import annotations

from typing import ClassVar

import attrs

from .events import DpEvent, _finite_nonneg, _to_float

__all__ = ["TreeAggregationStepEvent"]


def _check_flag(instance, attribute, value):  # noqa: ARG001
    if isinstance(value, bool) or value not in (0, 1):
        raise ValueError(f"{attribute.name} must be 0 or 1, got {value!r}")


@attrs.frozen
class TreeAggregationStepEvent(DpEvent):
    """One step of a tree-aggregation query: each tree node holds Gaussian noise of stddev
    ``noise_multiplier`` times the L2 clip of one record; ``starts_tree`` is 1 on the first step of
    a tree (start or restart) and 0 otherwise.  Not composable step by step: its privacy depends
    on the whole tree (how many steps, how often and how far apart a record takes part)."""

    kind: ClassVar[str] = "tree_step"
    noise_multiplier: float = attrs.field(converter=_to_float, validator=_finite_nonneg("noise_multiplier"))
    starts_tree: int = attrs.field(default=0, validator=_check_flag)
