"""Privacy events of tree aggregation (DP-FTRL; Kairouz et al. 2021, "Practical and Private
(Deep) Learning without Sampling or Shuffling", Appendix D).

This module imports neither torch nor numpy (an auditor reads ledgers without them).

A tree-aggregation query releases, at each step, a noisy prefix sum (or its increment) built
from the nodes of a binary tree of Gaussian noise.  The ledger records one
:class:`TreeAggregationStepEvent` per step; the step that starts a new tree (the first one, and
each restart) has ``starts_tree=1``.  Consecutive identical steps merge into one ledger run, so a
ledger grows with the number of restarts, not of steps.  The run grouper registered here
(:func:`group_tree_steps`) splits the steps into trees and bounds, from the ledger's sampling
settings, how often and how far apart one record takes part in each tree; the analysis accounts
each tree as a whole (:mod:`pytorch_privacy.analysis.tree_aggregation`) and adds the trees' RDP.

Neighbouring relations
----------------------
A tree whose nodes hold ``N(0, (noise_multiplier * C)^2)`` noise, with a record taking part in a
known set of leaves, is a Gaussian mechanism of L2 sensitivity ``C * sqrt(sum_nodes c_node^2)``
(``c_node``: the record's leaves under the node) when neighbours differ by the record's presence in
its leaves: that is *add-or-remove-one* for full-batch training (every record in every step) and
the "zero-out" relation of Kairouz et al. (Definition 1.1; dp-accounting's ``REPLACE_SPECIAL``).
Under *replace-one* the record's leaves change by up to ``2C`` and the RDP is four times larger.
Batches formed by position in a data order (``"shuffle"``, ``"fixed_order"``) give a participation
pattern only under replace-one (adding a record shifts every later record's batch), so the grouper
wraps those trees in :class:`ReplaceOneEvent`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, ClassVar

import attrs

from .events import REPLACE_ONE, ComposedEvent, DpEvent, SelfComposedEvent, _check_event, _finite_nonneg, _to_float
from .ledger_groupers import loader_positions, participation, register_run_grouper, split_sequences

if TYPE_CHECKING:  # pragma: no cover
    from .ledger_schema import LedgerRun

__all__ = [
    "TreeAggregationStepEvent",
    "SingleEpochTreeAggregationEvent",
    "TreeAggregationEvent",
    "ReplaceOneEvent",
    "group_tree_steps",
]


def _check_flag(instance, attribute, value):  # noqa: ARG001
    if isinstance(value, bool) or value not in (0, 1):
        raise ValueError(f"{attribute.name} must be 0 or 1, got {value!r}")


def _check_nonneg_int(instance, attribute, value):  # noqa: ARG001
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{attribute.name} must be a non-negative integer, got {value!r}")


def _to_int_tuple(value) -> tuple:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,)
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(f"step_counts must be an integer or a sequence of integers, got {value!r:.80}")
    return tuple(value)


def _check_step_counts(instance, attribute, value):  # noqa: ARG001
    if not value:
        raise ValueError("step_counts must hold at least one tree's step count (got an empty sequence)")
    for s in value:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise ValueError(f"step_counts must hold non-negative integers, got {s!r:.40} in {value!r:.80}")


@attrs.frozen
class TreeAggregationStepEvent(DpEvent):
    """One step of a tree-aggregation query: each tree node holds Gaussian noise of stddev
    ``noise_multiplier`` times the L2 clip of one record; ``starts_tree`` is 1 on the first step of
    a tree (start or restart) and 0 otherwise.  Not composable step by step: its privacy depends
    on the whole tree (how many steps, how often and how far apart a record takes part)."""

    kind: ClassVar[str] = "tree_step"
    noise_multiplier: float = attrs.field(converter=_to_float, validator=_finite_nonneg("noise_multiplier"))
    starts_tree: int = attrs.field(default=0, validator=_check_flag)


@attrs.frozen
class SingleEpochTreeAggregationEvent(DpEvent):
    """Tree aggregation over one pass of the data, with restarts: ``step_counts[i]`` steps in the
    ``i``-th tree, and each record takes part **at most once across all the trees** (dp-accounting's
    ``SingleEpochTreeAggregationDpEvent``, same semantics and RDP: ``alpha * d / (2 sigma^2)`` with
    ``d = floor(log2(max(step_counts))) + 1`` the most nodes above one leaf).

    A record that takes part once in *each* tree is a composition of one event per tree (or a
    :class:`TreeAggregationEvent` per tree with ``max_participation=1``), not this event.
    ``step_counts`` is an integer or a sequence of non-negative integers (stored as a tuple).
    """

    kind: ClassVar[str] = "single_epoch_tree_aggregation"
    noise_multiplier: float = attrs.field(converter=_to_float, validator=_finite_nonneg("noise_multiplier"))
    step_counts: tuple[int, ...] = attrs.field(converter=_to_int_tuple, validator=_check_step_counts)


@attrs.frozen
class TreeAggregationEvent(DpEvent):
    """One tree of ``total_steps`` leaves (no restart) in which one record takes part at most
    ``max_participation`` times, with at least ``min_separation`` steps strictly between two of
    its participations (consecutive steps: ``min_separation=0``; the convention of TF Privacy's
    ``tree_aggregation_accountant``).  Its RDP is ``alpha * S / (2 sigma^2)`` with ``S`` the
    worst-case ``sum_nodes c_node^2`` over such participation patterns (Kairouz et al. 2021,
    Appendix D.2)."""

    kind: ClassVar[str] = "tree_aggregation"
    noise_multiplier: float = attrs.field(converter=_to_float, validator=_finite_nonneg("noise_multiplier"))
    total_steps: int = attrs.field(validator=_check_nonneg_int)
    max_participation: int = attrs.field(validator=_check_nonneg_int)
    min_separation: int = attrs.field(validator=_check_nonneg_int)


@attrs.frozen
class ReplaceOneEvent(DpEvent):
    """``event`` whose participation bound holds for neighbouring datasets that differ by
    replacing one record in place (its batches unchanged): trees over shuffled or fixed-order
    batches.  Accounted under replace-one only (sensitivity ``2C`` per participation); an
    add-or-remove-one accountant refuses it."""

    kind: ClassVar[str] = "replace_one"
    neighboring_relation: ClassVar[str] = REPLACE_ONE
    event: DpEvent = attrs.field(validator=_check_event)


# ------------------------------------------------------------------------------------------
# the run grouper: ledger runs of tree steps -> one event per tree
# ------------------------------------------------------------------------------------------
def _settings(r: "LedgerRun") -> tuple:
    return (r.sampling, r.population_size, r.batch_size)


@register_run_grouper(TreeAggregationStepEvent)
def group_tree_steps(runs: tuple["LedgerRun", ...], positions: tuple[int, ...] | None = None) -> DpEvent:
    """Turn the ledger runs of :class:`TreeAggregationStepEvent` steps into the accounted events.

    * Trees: a new tree starts at each step with ``starts_tree=1`` (and at the first step).
    * Noise: a tree whose steps record different noise multipliers is accounted with the smallest
      (each node's noise is at least that; more noise is post-processing of less).
    * Per tree of ``T`` steps, from the runs' sampling settings (``spe = N // B`` steps per epoch):

      ========================  ===================================  ===================  ============
      sampling                  max_participation                    min_separation       relation
      ========================  ===================================  ===================  ============
      ``"full"``                ``T``                                0                    either
      ``"fixed_order"``         ``ceil(T / spe)``                    ``spe - 1``          replace-one
      ``"shuffle"``             epochs the tree's steps touch         0                    replace-one
      ``"poisson"``, ``wor``    refused (``ValueError``)
      ========================  ===================================  ===================  ============

      ``min_separation`` counts the steps strictly between two participations.  With a fresh
      permutation each epoch a record may sit in the last batch of one epoch and the first of the
      next, so 0 is the only sound separation for ``"shuffle"``.  Epochs are counted from each
      tree's position in its loader's batches (``positions``: the steps recorded before it under
      the same settings, :func:`~.ledger_groupers.loader_positions`), so steps of other queries
      on the same loader are counted too; a tree they interleave with gets separation 0.
    * Trees compose: the result is one :class:`TreeAggregationEvent` per tree (identical trees
      merged into a :class:`SelfComposedEvent`), wrapped in :class:`ReplaceOneEvent` for
      ``"shuffle"`` and ``"fixed_order"`` sampling.

    A tree whose steps change sampling settings is refused: restart the tree (``starts_tree=1``)
    when the loader changes.
    """
    if positions is None:  # runs alone: taken as consecutive steps of one loader
        positions = tuple(loader_positions(runs))
    counts: dict[DpEvent, int] = {}
    for tree, mult, start, span in split_sequences(runs, positions, lambda e: e.starts_tree == 1):
        first = tree[0][0]
        for r, _ in tree:
            if r.sampling in ("poisson", "without_replacement"):
                raise ValueError(
                    f"tree-aggregation steps recorded with {r.sampling!r} sampling are refused: no "
                    "amplification by sampling is claimed for tree aggregation, and a sampled record may "
                    "take part in every step of a tree (the full-batch bound, far above what DP-FTRL "
                    "needs). Record DP-FTRL steps with the loader's real scheme: sampling='fixed_order' "
                    "(same batches every epoch), 'shuffle' (a new permutation every epoch) or 'full'"
                )
            if _settings(r) != _settings(first):
                raise ValueError(
                    f"one tree spans steps with different sampling settings {_settings(first)} and "
                    f"{_settings(r)}; restart the tree (starts_tree=1) when the data loader changes"
                )
        steps = sum(k for _, k in tree)
        sigma = min(r.event.noise_multiplier for r, _ in tree)
        # (a tree of multiplicity > 1 has one step: one participation wherever it lies)
        part, gap = participation(first.sampling, first.population_size, first.batch_size, start, span, steps)
        sep = gap - 1  # a tree's separation counts the steps strictly between two participations
        ev: DpEvent = TreeAggregationEvent(sigma, steps, part, sep)
        if first.sampling in ("shuffle", "fixed_order"):
            ev = ReplaceOneEvent(ev)
        counts[ev] = counts.get(ev, 0) + mult
    parts = [e if c == 1 else SelfComposedEvent(e, c) for e, c in counts.items()]
    return parts[0] if len(parts) == 1 else ComposedEvent(tuple(parts))
