"""The strict schema of ledger files: one run of identical samples (:class:`LedgerRun`), the
sampling schemes, and the readers that refuse anything but the exact format (bounded size and
nesting, ints that are ints, finite probabilities; no coercion).  See ``docs/ledger_format.md``.

This module imports neither torch nor numpy.
"""

from __future__ import annotations

import enum
import json
import math
from typing import Any

import attrs

from .events import (
    DpEvent,
    NeighboringRelation,
    PoissonSampledEvent,
    SampledWithoutReplacementEvent,
    SelfComposedEvent,
    ShuffledEvent,
    event_from_dict,
)

__all__ = [
    "LIMITS", "SamplingScheme", "SAMPLING_SCHEMES", "LedgerRun", "RUN_KEYS", "int_field", "prob_field", "run_from_dict",
    "check_event_ints", "json_depth_ok", "parse_json", "check_population", "check_q",
]

#: Hard limits of the file reader, refused with ``ValueError`` before any analysis:
#:
#: * ``max_file_bytes``: files above 64 MiB are refused before they are read;
#: * ``max_depth``: JSON nesting deeper than 32 levels (a real ledger is about 8 deep);
#: * ``max_runs``: at most 100,000 runs;
#: * ``max_steps``: a run's count and the ledger's total steps are at most 10**9;
#: * ``max_int``: population and batch sizes and event integers are at most 2**53 (exact in a
#:   float);
#: * ``max_event_nodes``: at most 100,000 events in all runs together.
LIMITS: dict[str, int] = {
    "max_file_bytes": 64 * 2**20,
    "max_depth": 32,
    "max_runs": 100_000,
    "max_steps": 10**9,
    "max_int": 2**53,
    "max_event_nodes": 100_000,
}


class SamplingScheme(str, enum.Enum):
    """How the records of one sample (step) are drawn.  A ``str`` enum: members compare equal
    to, and serialise as, their values (``"poisson"``)."""

    #: each record independently with probability ``selection_probability`` (add/remove-one)
    POISSON = "poisson"
    #: a uniformly random subset of ``batch_size`` records (replace-one)
    WITHOUT_REPLACEMENT = "without_replacement"
    #: consecutive batches of ``batch_size`` from a fresh permutation each epoch, accounted with
    #: ``N // batch_size`` steps per epoch (safe with or without ``drop_last``; replace-one)
    SHUFFLE = "shuffle"
    #: every record, every sample (full-batch training; add/remove-one)
    FULL = "full"
    #: consecutive batches of ``batch_size`` in the **same order every epoch** (no reshuffling;
    #: replace-one), ``N // batch_size`` steps per epoch.  This is the data order of DP-FTRL
    #: (Kairouz et al. 2021): a record recurs exactly once per epoch, ``N // B - 1`` or more steps
    #: apart, which the tree accounting uses (``tree_events.group_tree_steps``).  An FTRL run sets
    #: ``PrivacyLedger(N, sampling="fixed_order", batch_size=B)`` (``ledger.set_sampling`` likewise)
    #: for a loader that yields the same ``N // B`` (or ``ceil(N / B)``) batches in the same order
    #: every epoch, and records one ``TreeAggregationStepEvent`` per batch from the first batch
    #: on, ``starts_tree=1`` on each restart.  A loader that reshuffles every epoch is ``"shuffle"``
    #: (a record may then take part in consecutive steps across an epoch boundary).  Other events
    #: under this scheme are accounted as one un-amplified release per step (no parallel
    #: composition over an epoch is claimed, since the ledger merges non-adjacent runs).
    FIXED_ORDER = "fixed_order"

    def __str__(self) -> str:
        return self.value

    @property
    def neighboring_relation(self) -> NeighboringRelation:
        """The neighbouring relation this scheme's events are stated under."""
        if self in (SamplingScheme.WITHOUT_REPLACEMENT, SamplingScheme.SHUFFLE, SamplingScheme.FIXED_ORDER):
            return NeighboringRelation.REPLACE_ONE
        return NeighboringRelation.ADD_OR_REMOVE_ONE


#: The scheme names, in a fixed order.
SAMPLING_SCHEMES = tuple(s.value for s in SamplingScheme)


@attrs.define(eq=True)
class LedgerRun:
    """``count`` consecutive samples with identical settings and event.

    The ledger hands out copies; mutating one does not change the ledger.
    """

    count: int
    population_size: int
    sampling: str
    selection_probability: float | None
    batch_size: int | None
    event: DpEvent

    def same_settings(self, other: "LedgerRun") -> bool:
        """Whether ``other`` has the same sampling settings and event (counts may differ)."""
        return (
            self.population_size == other.population_size
            and self.sampling == other.sampling
            and self.selection_probability == other.selection_probability
            and self.batch_size == other.batch_size
            and self.event == other.event
        )

    def sampled_event(self, steps: int | None = None) -> DpEvent:
        """The event of ``steps`` (default ``count``) samples of this run, sampling included."""
        steps = self.count if steps is None else steps
        if self.sampling == "shuffle":
            # floor, not ceil: a loader of fixed-size batches drops the last partial one, so an
            # epoch is N // B steps; counting ceil(N / B) would merge steps of two epochs into one
            # and under-count epochs.  Floor over-counts (safely) for loaders that keep it.
            spe = max(1, self.population_size // self.batch_size)
            return ShuffledEvent(steps_per_epoch=spe, steps=steps, event=self.event)
        if self.sampling == "fixed_order":
            # each step on its own (steps_per_epoch=1): sound wherever the run lies in the epoch
            return ShuffledEvent(steps_per_epoch=1, steps=steps, event=self.event)
        if self.sampling == "poisson":
            one: DpEvent = PoissonSampledEvent(self.selection_probability, self.event)
        elif self.sampling == "without_replacement":
            one = SampledWithoutReplacementEvent(self.population_size, self.batch_size, self.event)
        else:  # full
            one = self.event
        return one if steps == 1 else SelfComposedEvent(one, steps)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of this run (the ledger file's ``runs`` entries)."""
        d = {
            "count": self.count,
            "population_size": self.population_size,
            "sampling": self.sampling,
            "event": self.event.to_dict(),
        }
        if self.selection_probability is not None:
            d["selection_probability"] = self.selection_probability
        if self.batch_size is not None:
            d["batch_size"] = self.batch_size
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LedgerRun":
        """Strict inverse of :meth:`to_dict` (see :data:`LIMITS`); ``ValueError`` on anything else."""
        return run_from_dict(d, 0)


def int_field(where: str, v: Any, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"corrupt ledger: {where} must be a JSON integer, got {v!r:.60} ({type(v).__name__})")
    if not lo <= v <= hi:
        raise ValueError(f"corrupt ledger: {where} must be in [{lo}, {hi}], got {v!r:.60}")
    return v


def prob_field(where: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"corrupt ledger: {where} must be a JSON number, got {v!r:.60} ({type(v).__name__})")
    if not (math.isfinite(v) and 0 < v <= 1):
        raise ValueError(f"corrupt ledger: {where} must be in (0, 1], got {v!r}")
    return float(v)


RUN_KEYS = {
    "poisson": {"count", "population_size", "sampling", "event", "selection_probability"},
    "without_replacement": {"count", "population_size", "sampling", "event", "batch_size"},
    "shuffle": {"count", "population_size", "sampling", "event", "batch_size"},
    "full": {"count", "population_size", "sampling", "event"},
    "fixed_order": {"count", "population_size", "sampling", "event", "batch_size"},
}


def run_from_dict(d: Any, i: int) -> LedgerRun:
    where = f"run {i}"
    if not isinstance(d, dict):
        raise ValueError(f"corrupt ledger: {where} must be a JSON object, got {type(d).__name__}")
    sampling = d.get("sampling")
    if not isinstance(sampling, str) or sampling not in SAMPLING_SCHEMES:
        raise ValueError(f"corrupt ledger: {where} has sampling {sampling!r:.60}; expected one of {SAMPLING_SCHEMES}")
    required = RUN_KEYS[sampling]
    keys = set(d)
    if keys != required:
        raise ValueError(
            f"corrupt ledger: {sampling} {where} has fields {sorted(map(str, keys))[:8]}, "
            f"expected exactly {sorted(required)}"
        )
    n = int_field(f"{where} population_size", d["population_size"], 1, LIMITS["max_int"])
    count = int_field(f"{where} count", d["count"], 1, LIMITS["max_steps"])
    q = b = None
    if sampling == "poisson":
        q = prob_field(f"{where} selection_probability", d["selection_probability"])
    elif SamplingScheme(sampling).neighboring_relation == NeighboringRelation.REPLACE_ONE:
        b = int_field(f"{where} batch_size", d["batch_size"], 1, n)
    try:
        event = event_from_dict(d["event"])
    except ValueError as exc:
        raise ValueError(f"corrupt ledger: {where}: {exc}") from None
    check_event_ints(event, where)
    return LedgerRun(count=count, population_size=n, sampling=sampling, selection_probability=q, batch_size=b, event=event)


def check_event_ints(event: DpEvent, where: str) -> int:
    """Refuse event integers above ``max_int`` / ``max_steps``; return the number of events."""
    nodes = 0
    stack = [event]
    while stack:
        e = stack.pop()
        nodes += 1
        for a in attrs.fields(type(e)):
            v = getattr(e, a.name)
            if isinstance(v, DpEvent):
                stack.append(v)
            elif isinstance(v, tuple):
                stack.extend(x for x in v if isinstance(x, DpEvent))
                ints = [x for x in v if isinstance(x, int) and not isinstance(x, bool)]
                if ints and max(ints) > LIMITS["max_steps"]:
                    raise ValueError(
                        f"corrupt ledger: {where}: {e.kind} {a.name} holds {max(ints)}, above the limit {LIMITS['max_steps']}"
                    )
            elif isinstance(v, int) and not isinstance(v, bool):
                hi = LIMITS["max_steps"] if a.name in ("count", "steps", "total_steps") else LIMITS["max_int"]
                if v > hi:
                    raise ValueError(f"corrupt ledger: {where}: {e.kind} {a.name} {v} exceeds the limit {hi}")
    return nodes


def json_depth_ok(obj: Any, max_depth: int) -> None:
    """Iteratively refuse JSON nested deeper than ``max_depth`` (no recursion)."""
    stack = [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, (dict, list)):
            if d > max_depth:
                raise ValueError(
                    f"corrupt ledger: JSON nested deeper than {max_depth} levels (LIMITS['max_depth'])"
                )
            stack.extend((v, d + 1) for v in (o.values() if isinstance(o, dict) else o))


def no_duplicates(pairs: list) -> dict:
    d = dict(pairs)
    if len(d) != len(pairs):
        seen = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"corrupt ledger: duplicate key {dup!r:.60} in a JSON object")
    return d


def finite_float(s: str) -> float:
    v = float(s)
    if not math.isfinite(v):
        raise ValueError(f"corrupt ledger: number {s[:40]!r} overflows a float")
    return v


def refuse_constant(s: str):
    raise ValueError(f"corrupt ledger: {s} is not allowed in a ledger file")


def parse_json(text: str | bytes) -> Any:
    limit = LIMITS["max_file_bytes"]
    if len(text) > limit:
        raise ValueError(f"ledger file is larger than {limit} bytes (LIMITS['max_file_bytes']); refused unread")
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text).decode("utf-8")  # UnicodeDecodeError is a ValueError
    try:
        d = json.loads(
            text, object_pairs_hook=no_duplicates, parse_float=finite_float, parse_constant=refuse_constant
        )
    except RecursionError:
        raise ValueError(
            f"corrupt ledger: JSON nested too deeply (the limit is {LIMITS['max_depth']} levels)"
        ) from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"corrupt ledger file: not valid JSON ({exc})") from None
    return d


def check_population(n) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ValueError(f"population_size must be a positive integer, got {n!r}")
    return n


def check_q(q) -> float:
    if isinstance(q, bool) or not isinstance(q, (int, float)) or math.isnan(q) or not 0 < q <= 1:
        raise ValueError(
            f"selection_probability must be in (0, 1], got {q!r} "
            "(expected batch size / population size)"
        )
    return float(q)
