"""Whole-run accounting of mechanisms whose privacy is not a composition of per-step events.

A tree-aggregation (DP-FTRL) or matrix-factorisation query adds noise that is correlated across
steps: the privacy of a run depends on the whole sequence (how many steps, how often and how far
apart one record takes part), not on a sum over steps.  Such a query still records one event per
step in the ledger (append-only, valid after every step, so budgets can be enforced), and
registers a *run grouper* for its step event's class: :meth:`PrivacyLedger.to_event` hands every
ledger run whose event is of that class (in order, with its sampling settings) to the grouper,
which returns the one event the analysis accounts for them all.

This module imports neither torch nor numpy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from .event_registry import EventTypeRegistry
from .events import EVENT_MODULES, DpEvent

if TYPE_CHECKING:  # pragma: no cover
    from .ledger_schema import LedgerRun

__all__ = ["register_run_grouper", "run_grouper_for", "epochs_touched", "loader_positions", "split_sequences", "participation"]

RunGrouper = Callable[[tuple["LedgerRun", ...], tuple[int, ...]], DpEvent]
_GROUPERS = EventTypeRegistry("register_run_grouper", EVENT_MODULES)


def register_run_grouper(event_cls: type) -> Callable[[RunGrouper], RunGrouper]:
    """Decorator: ``fn(runs, positions) -> DpEvent`` accounts every ledger run whose event is an
    ``event_cls`` (``runs`` in ledger order, each a :class:`LedgerRun` copy with its ``count``,
    sampling scheme, population and batch size; ``positions[i]`` the number of steps recorded
    before ``runs[i]`` under the same ``(sampling, population_size, batch_size)``, in the whole
    ledger: the run's position in its loader's stream of batches).  ``fn`` raises ``ValueError``
    for a sequence it cannot account soundly (say which and what to do)."""
    return _GROUPERS.register(event_cls)


def run_grouper_for(event: DpEvent) -> RunGrouper | None:
    """The grouper registered for ``event``'s class (or a base class), else ``None``."""
    return _GROUPERS.lookup(event)


def loader_positions(runs) -> list[int]:
    """For each run (in ledger order), the steps recorded before it under the same
    ``(sampling, population_size, batch_size)``: its position in that loader's batches, the
    ledger being recorded from the loader's first batch, every batch a step."""
    seen: dict[tuple, int] = {}
    out = []
    for r in runs:
        key = (r.sampling, r.population_size, r.batch_size)
        out.append(seen.get(key, 0))
        seen[key] = seen.get(key, 0) + r.count
    return out


def epochs_touched(population_size: int, batch_size: int, offset: int, steps: int) -> int:
    """How many epochs of shuffled fixed-size batches the ``steps`` consecutive steps starting at
    loader position ``offset`` touch: a record takes part at most once in each.  An epoch is
    ``N // B`` steps for a loader that drops the short last batch and ``ceil(N / B)`` for one that
    keeps it; the larger count of the two is returned (the ledger does not say which)."""
    if steps <= 0:
        return 0
    lengths = {max(1, population_size // batch_size), -(-population_size // batch_size)}
    return max((offset + steps - 1) // length - offset // length + 1 for length in lengths)


def split_sequences(runs, positions, starts: Callable[[DpEvent], bool]) -> list[tuple[list, int, int, int]]:
    """The runs of one correlated-noise family split into noise sequences (trees, MF sequences) at
    the steps whose event ``starts`` one (and at the first step): ``[(parts, repeats, start,
    span)]``, in ledger order.

    ``parts`` is a list of ``(run, steps of that run in the sequence)``; ``repeats`` how many
    identical sequences the entry stands for (a run of ``k`` steps that each start a sequence is
    ``k - 1`` one-step sequences, then the first step of the next); ``start`` the loader position
    of the sequence's first step and ``span`` the loader steps from its first to its last step
    (more than its own steps when steps of other queries on the same loader interleave)."""
    out: list[list] = []
    for r, pos in zip(runs, positions):
        first = starts(r.event)
        if first or not out:
            if first and r.count > 1:
                out.append([[(r, 1)], r.count - 1, pos, 1])
            n = 1 if first else r.count
            out.append([[(r, n)], 1, pos + r.count - n, n])
        else:
            seq = out[-1]
            seq[0].append((r, r.count))
            seq[3] = pos + r.count - seq[2]
    return [tuple(x) for x in out]


def participation(sampling: str, population_size: int, batch_size: int | None, start: int, span: int, steps: int) -> tuple[int, int]:
    """``(max_participation, min_gap)`` of one record in a noise sequence of ``steps`` steps lying
    in the ``span`` consecutive loader steps from loader position ``start``: at most how many of
    the sequence's steps may hold it, and the least difference of their indices in the sequence.

    * ``"fixed_order"``: the same batch every epoch of ``spe = N // B`` steps, so at most
      ``ceil(span / spe)`` times, ``spe`` apart (1 apart when other steps interleave: the
      sequence's indices skip them).
    * ``"shuffle"``: a fresh permutation every epoch, so once in every epoch touched
      (:func:`epochs_touched`), possibly in consecutive steps across an epoch boundary.
    * anything else (full batches, sampling without a participation bound): every step, 1 apart.
    """
    if sampling == "fixed_order":
        spe = max(1, population_size // batch_size)
        return min(steps, -(-span // spe)), (spe if span == steps else 1)
    if sampling == "shuffle":
        return min(steps, epochs_touched(population_size, batch_size, start, span)), 1
    return steps, 1
