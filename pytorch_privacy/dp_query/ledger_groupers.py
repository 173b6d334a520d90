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

from .events import DpEvent, _load_event_modules

if TYPE_CHECKING:  # pragma: no cover
    from .ledger_schema import LedgerRun

__all__ = ["register_run_grouper", "run_grouper_for"]

RunGrouper = Callable[[tuple["LedgerRun", ...]], DpEvent]
_GROUPERS: dict[type, RunGrouper] = {}


def register_run_grouper(event_cls: type) -> Callable[[RunGrouper], RunGrouper]:
    """Decorator: ``fn(runs) -> DpEvent`` accounts every ledger run whose event is an
    ``event_cls`` (``runs`` in ledger order, each a :class:`LedgerRun` copy with its ``count``,
    sampling scheme, population and batch size).  ``fn`` raises ``ValueError`` for a sequence it
    cannot account soundly (say which and what to do)."""
    if not (isinstance(event_cls, type) and issubclass(event_cls, DpEvent)):
        raise TypeError(f"register_run_grouper needs a DpEvent subclass, got {event_cls!r}")

    def deco(fn: RunGrouper) -> RunGrouper:
        _GROUPERS[event_cls] = fn
        return fn

    return deco


def run_grouper_for(event: DpEvent) -> RunGrouper | None:
    """The grouper registered for ``event``'s class (or a base class), else ``None``."""
    if not _GROUPERS:
        _load_event_modules()
    for cls in type(event).__mro__:
        fn = _GROUPERS.get(cls)
        if fn is not None:
            return fn
    return None
