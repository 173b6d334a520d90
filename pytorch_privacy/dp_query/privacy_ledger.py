"""The privacy ledger: a record of every private access to the data.

For each *sample* (one optimizer step, one release) the ledger stores the population size, the
sampling scheme with its parameter, and the privacy event of the queries run on that sample.
Consecutive identical samples are stored as one *run* ``(count, population_size, sampling,
parameter, event)``, so a million-step training run with fixed settings is a few hundred bytes on
disk and loads in microseconds.  The ledger summarises itself without replaying entries and
converts to one composed :class:`~pytorch_privacy.dp_query.events.DpEvent` for the analysis.

This module imports neither torch nor numpy.

File format (JSON, version 2; the full specification is ``docs/ledger_format.md``)::

    {"format": "pytorch_privacy.ledger", "version": 2,
     "current": {...},
     "runs": [{"count": 14062, "population_size": 60000, "sampling": "poisson",
               "selection_probability": 0.0042666, "event": {...}}, ...],
     "metadata": {...},
     "digest": {"algorithm": "sha256", "value": "<hex>"},
     "signature": {"algorithm": "hmac-sha256", "value": "<hex>"}}   # optional

The digest is SHA-256 of the canonical JSON (sorted keys, no whitespace, ASCII) of every field
except ``digest`` and ``signature``; the optional signature is HMAC-SHA256 of the same bytes
with a user key.  Files are read strictly: bounded size and nesting, exact schema, no coercion
(:data:`LIMITS`).  Version-1 files (no digest) still load, as *unsigned*.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import attrs

from .ledger_schema import (  # noqa: F401  (LIMITS, SAMPLING_SCHEMES and LedgerRun re-exported)
    LIMITS,
    SamplingScheme,
    SAMPLING_SCHEMES,
    LedgerRun,
    check_event_ints,
    check_population,
    check_q,
    int_field,
    json_depth_ok,
    parse_json,
    prob_field,
    run_from_dict,
)
from .ledger_groupers import epochs_touched, loader_positions, register_run_grouper, run_grouper_for  # noqa: F401
from .ledger_audit import SUSPICIOUS, event_str, suspicious_content  # noqa: F401  (re-exported)
from .ledger_integrity import (  # noqa: F401  (re-exported)
    SIGNATURE_OK,
    TAMPERED,
    UNSIGNED,
    LedgerIntegrityError,
    content_digest,
    hmac_signature,
    sign_content,
    verify_integrity,
)
from .events import (
    ShuffledEvent,
    ComposedEvent,
    NeighboringRelation,
    DpEvent,
    GaussianEvent,
    NoOpEvent,
)

__all__ = [
    "PrivacyLedger",
    "LedgerRun",
    "LedgerIntegrityError",
    "LEDGER_FORMAT",
    "LEDGER_VERSION",
    "SAMPLING_SCHEMES",
    "LIMITS",
    "UNSIGNED",
    "SIGNATURE_OK",
    "TAMPERED",
    "content_digest",
    "hmac_signature",
    "SUSPICIOUS",
    "suspicious_content",
]

LEDGER_FORMAT = "pytorch_privacy.ledger"
#: Version written by this release.  Version 1 (no digest) is still read, as unsigned.
LEDGER_VERSION = 2
_READABLE_VERSIONS = (1, 2)




class PrivacyLedger:
    """Records, per sample, the population size, sampling scheme and privacy event.

    Args:
        population_size: number of records in the private dataset (N).
        selection_probability: Poisson sampling rate q in (0, 1] (expected batch = q*N).
            Required for ``sampling="poisson"``.
        sampling: one of :data:`SAMPLING_SCHEMES`.  Record what the data loader really does:
            shuffled fixed-size batches are *not* Poisson sampling and are accounted without
            amplification.
        batch_size: fixed batch size, required for ``"without_replacement"`` and ``"shuffle"``.
        metadata: free-form JSON-serialisable dict saved with the ledger (model, dataset, ...).

    ``len(ledger)`` is the number of samples (steps) recorded.
    """

    def __init__(
        self,
        population_size: int,
        selection_probability: float | None = None,
        *,
        sampling: str = "poisson",
        batch_size: int | None = None,
        metadata: dict[str, Any] | None = None,
    ):
        self._runs: list[LedgerRun] = []
        self.metadata: dict[str, Any] = dict(metadata or {})
        #: ``None`` for a ledger built in memory; after reading a file (or dict) one of
        #: :data:`UNSIGNED` or :data:`SIGNATURE_OK` (a tampered file is refused with
        #: :class:`LedgerIntegrityError`), explained by :attr:`integrity_detail`.
        self.integrity: str | None = None
        self.integrity_detail: str = "built in memory"
        self.set_sampling(population_size, selection_probability, sampling=sampling, batch_size=batch_size)

    # -- settings ------------------------------------------------------------------------
    def set_sampling(
        self,
        population_size: int,
        selection_probability: float | None = None,
        *,
        sampling: str = "poisson",
        batch_size: int | None = None,
    ) -> None:
        """Change the sampling settings for the samples recorded from now on."""
        population_size = check_population(population_size)
        if sampling not in SAMPLING_SCHEMES:
            raise ValueError(f"sampling must be one of {SAMPLING_SCHEMES}, got {sampling!r}")
        if sampling == "poisson":
            if selection_probability is None and batch_size is not None:
                selection_probability = batch_size / population_size
            selection_probability = check_q(selection_probability)
            batch_size = None
        elif SamplingScheme(sampling).neighboring_relation == NeighboringRelation.REPLACE_ONE:
            if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
                raise ValueError(f"sampling={sampling!r} needs a positive integer batch_size, got {batch_size!r}")
            if batch_size > population_size:
                raise ValueError(f"batch_size {batch_size} exceeds population_size {population_size}")
            selection_probability = batch_size / population_size
        else:  # full
            selection_probability, batch_size = 1.0, None
        self._population_size = population_size
        self._sampling = sampling
        self._q = selection_probability
        self._batch_size = batch_size

    @property
    def population_size(self) -> int:
        return self._population_size

    @property
    def selection_probability(self) -> float:
        return self._q

    @property
    def sampling(self) -> str:
        return self._sampling

    @property
    def batch_size(self) -> int | None:
        return self._batch_size

    @property
    def expected_batch_size(self) -> float:
        """``q * N``: the public denominator for averages under the current settings."""
        return self._q * self._population_size

    # -- recording -----------------------------------------------------------------------
    def record_sample(self, event: DpEvent, count: int = 1) -> None:
        """Record ``count`` samples, each running the queries whose combined event is ``event``."""
        if not isinstance(event, DpEvent):
            raise TypeError(f"event must be a DpEvent, got {type(event).__name__}")
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"count must be a positive integer, got {count!r}")
        sel_q = self._q if self._sampling == "poisson" else None
        if self._runs:
            last = self._runs[-1]
            if (
                (last.event is event or last.event == event)
                and last.sampling == self._sampling
                and last.population_size == self._population_size
                and last.selection_probability == sel_q
                and last.batch_size == self._batch_size
            ):
                last.count += count
                return
        self._runs.append(
            LedgerRun(
                count=count,
                population_size=self._population_size,
                sampling=self._sampling,
                selection_probability=sel_q,
                batch_size=self._batch_size,
                event=event,
            )
        )

    def record_gaussian_sample(self, noise_multiplier: float, count: int = 1) -> None:
        """Shortcut: ``record_sample(GaussianEvent(noise_multiplier), count)``."""
        self.record_sample(GaussianEvent(noise_multiplier), count)

    # -- reading -------------------------------------------------------------------------
    def __len__(self) -> int:
        return sum(r.count for r in self._runs)

    @property
    def steps(self) -> int:
        """Number of samples recorded (same as ``len``)."""
        return len(self)

    @property
    def runs(self) -> tuple[LedgerRun, ...]:
        """The stored runs of identical consecutive samples, in order."""
        return tuple(attrs.evolve(r) for r in self._runs)

    @property
    def last_run(self) -> LedgerRun | None:
        """A copy of the most recent run (``None`` for an empty ledger), in O(1)."""
        return attrs.evolve(self._runs[-1]) if self._runs else None

    def entries(self) -> Iterator[LedgerRun]:
        """Every sample, one by one (each a ``LedgerRun`` with ``count=1``).  Prefer :attr:`runs`."""
        for r in self._runs:
            one = attrs.evolve(r, count=1)
            for _ in range(r.count):
                yield one

    def groups(self) -> dict[tuple, int]:
        """Distinct settings -> number of samples, merged across non-adjacent runs.

        Keys are ``(sampling, population_size, selection_probability, batch_size, event)``.
        """
        out: dict[tuple, int] = {}
        for r in self._runs:
            key = (r.sampling, r.population_size, r.selection_probability, r.batch_size, r.event)
            out[key] = out.get(key, 0) + r.count
        return out

    def to_event(self) -> DpEvent:
        """The whole ledger as one composed event (``NoOpEvent`` for an empty ledger).

        Runs with identical settings are grouped (composition is commutative) except shuffled
        runs, whose epoch structure depends on their order: a shuffled run is accounted once per
        epoch it *touches*, counted from its position in the loader's epochs (see
        :func:`_shuffled_events`), so a run that starts mid-epoch and crosses an epoch boundary
        counts both epochs.
        """
        parts: list[DpEvent] = []
        shuffled: list[tuple[LedgerRun, int]] = []
        grouped: dict[tuple, int] = {}
        firsts: dict[tuple, LedgerRun] = {}
        whole_run: dict[Any, list[tuple[LedgerRun, int]]] = {}
        for r, pos in zip(self._runs, loader_positions(self._runs)):
            grouper = run_grouper_for(r.event)
            if grouper is not None:
                whole_run.setdefault(grouper, []).append((attrs.evolve(r), pos))
                continue
            if r.sampling == "shuffle":
                shuffled.append((r, pos))
                continue
            key = (r.sampling, r.population_size, r.selection_probability, r.batch_size, r.event)
            grouped[key] = grouped.get(key, 0) + r.count
            firsts.setdefault(key, r)
        for key, n in grouped.items():
            parts.append(firsts[key].sampled_event(n))
        parts.extend(_shuffled_events(shuffled))
        for grouper, items in whole_run.items():
            parts.append(grouper(tuple(r for r, _ in items), tuple(p for _, p in items)))
        if not parts:
            return NoOpEvent()
        return parts[0] if len(parts) == 1 else ComposedEvent(tuple(parts))

    def summary(self) -> str:
        """A short human-readable description: steps, runs, distinct groups."""
        lines = [
            f"PrivacyLedger: {len(self)} samples in {len(self._runs)} runs, "
            f"{len(self.groups())} distinct settings"
        ]
        for (sampling, n, q, b, ev), count in self.groups().items():
            desc = f"q={q:.6g}" if q is not None else f"batch={b}"
            lines.append(f"  {count:>10d} x {sampling:<20s} N={n:<9d} {desc:<16s} {event_str(ev)}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (
            f"PrivacyLedger(steps={len(self)}, runs={len(self._runs)}, "
            f"population_size={self._population_size}, sampling={self._sampling!r}, q={self._q:.6g})"
        )

    def __eq__(self, other) -> bool:
        if not isinstance(other, PrivacyLedger):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    # -- persistence ---------------------------------------------------------------------
    def _content(self) -> dict[str, Any]:
        return {
            "format": LEDGER_FORMAT,
            "version": LEDGER_VERSION,
            "current": {
                "population_size": self._population_size,
                "sampling": self._sampling,
                "selection_probability": self._q,
                "batch_size": self._batch_size,
            },
            "runs": [r.to_dict() for r in self._runs],
            "metadata": self.metadata,
        }

    def to_dict(self, *, key: bytes | str | None = None) -> dict[str, Any]:
        """JSON-ready dict of the whole ledger: format, version, current settings, runs, metadata,
        the content ``digest`` and, with ``key``, an HMAC-SHA256 ``signature``.

        Raises ``TypeError`` if :attr:`metadata` is not plain JSON (dicts, lists, strings, finite
        numbers, bools, None).
        """
        content = self._content()
        out = dict(content)
        out["digest"] = {"algorithm": "sha256", "value": content_digest(content)}
        if key is not None:
            out["signature"] = sign_content(content, key)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, key: bytes | str | None = None) -> "PrivacyLedger":
        """Read a ledger dict strictly and check its integrity.

        * Schema: exactly the fields of the format, JSON types without coercion, the limits of
          :data:`LIMITS`; anything else raises ``ValueError``.
        * Digest (version 2): recomputed and compared; a mismatch or a missing digest raises
          :class:`LedgerIntegrityError` ("tampered").  Version-1 dicts have none and read as
          :data:`UNSIGNED`.
        * Signature: with ``key`` (bytes/str for HMAC-SHA256, or an Ed25519 public key of the
          optional ``cryptography`` package), the signature must match (else
          :class:`LedgerIntegrityError`) and :attr:`integrity` is :data:`SIGNATURE_OK`; without a
          signature, or without ``key``, the ledger reads as :data:`UNSIGNED` (see
          :attr:`integrity_detail`).  A digest alone only detects careless edits: whoever edits
          the file can recompute it.
        """
        if not isinstance(d, dict) or d.get("format") != LEDGER_FORMAT:
            raise ValueError("not a pytorch_privacy ledger (missing or wrong 'format' field)")
        version = d.get("version")
        if isinstance(version, bool) or version not in _READABLE_VERSIONS:
            raise ValueError(
                f"ledger format version {version!r:.40} is not supported by this release "
                f"(reads {list(_READABLE_VERSIONS)}); use the pytorch_privacy release that wrote it"
            )
        json_depth_ok(d, LIMITS["max_depth"])
        integrity, detail = verify_integrity(d, version, key)
        content_keys = {"format", "version", "current", "runs", "metadata"}
        allowed = content_keys | ({"digest", "signature"} if version >= 2 else set())
        if set(d) - allowed:
            raise ValueError(f"corrupt ledger: unknown top-level field(s) {sorted(map(str, set(d) - allowed))[:5]}")
        if content_keys - set(d):
            raise ValueError(f"corrupt ledger: missing top-level field(s) {sorted(content_keys - set(d))}")
        runs = d["runs"]
        if not isinstance(runs, list):
            raise ValueError(f"corrupt ledger: 'runs' must be a list, got {type(runs).__name__}")
        if len(runs) > LIMITS["max_runs"]:
            raise ValueError(
                f"ledger has {len(runs)} runs, more than LIMITS['max_runs'] = {LIMITS['max_runs']}; refused"
            )
        metadata = d["metadata"]
        if not isinstance(metadata, dict):
            raise ValueError(f"corrupt ledger: 'metadata' must be a JSON object, got {type(metadata).__name__}")
        ledger = _ledger_from_current(cls, d["current"], metadata)
        parsed = []
        total = nodes = 0
        for i, r in enumerate(runs):
            run = run_from_dict(r, i)
            total += run.count
            if total > LIMITS["max_steps"]:
                raise ValueError(
                    f"ledger records more than LIMITS['max_steps'] = {LIMITS['max_steps']} steps; refused"
                )
            nodes += check_event_ints(run.event, f"run {i}")
            if nodes > LIMITS["max_event_nodes"]:
                raise ValueError(
                    f"ledger holds more than LIMITS['max_event_nodes'] = {LIMITS['max_event_nodes']} events; refused"
                )
            parsed.append(run)
        ledger._runs = parsed
        ledger.integrity, ledger.integrity_detail = integrity, detail
        return ledger

    def to_json(self, *, key: bytes | str | None = None) -> str:
        """Compact JSON of :meth:`to_dict` (with the digest, and a signature when ``key`` is given)."""
        return json.dumps(self.to_dict(key=key), separators=(",", ":"), allow_nan=False)

    @classmethod
    def from_json(cls, s: str | bytes, *, key: bytes | str | None = None) -> "PrivacyLedger":
        """Parse ledger JSON strictly (size, nesting, duplicate keys, NaN refused) and read it with
        :meth:`from_dict`."""
        return cls.from_dict(parse_json(s), key=key)

    def save(self, path: str | os.PathLike, *, key: bytes | str | None = None) -> None:
        """Write the ledger as JSON, atomically (a crash never leaves a half-written file).

        With ``key`` (bytes or str) the file is signed with HMAC-SHA256; keep the key apart from
        the file (whoever holds it can sign any ledger).  With an Ed25519 private key of the
        optional ``cryptography`` package it is signed with Ed25519 instead, and verified with the
        public key alone.
        """
        path = os.fspath(path)
        text = self.to_json(key=key)
        directory = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=".ledger-", dir=directory)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike, *, key: bytes | str | None = None) -> "PrivacyLedger":
        """Read a ledger written by :meth:`save`.  ``ValueError`` on a corrupt, foreign or oversized
        file (checked before it is read), :class:`LedgerIntegrityError` on a tampered one."""
        limit = LIMITS["max_file_bytes"]
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > limit:
                raise ValueError(
                    f"ledger file is {size} bytes, larger than LIMITS['max_file_bytes'] = {limit}; refused unread"
                )
            data = f.read(limit + 1)  # a pipe or device reports size 0: read no more than the limit
        return cls.from_json(data, key=key)


def _ledger_from_current(cls, cur: Any, metadata: dict) -> PrivacyLedger:
    keys = {"population_size", "sampling", "selection_probability", "batch_size"}
    if not isinstance(cur, dict) or set(cur) != keys:
        got = sorted(map(str, cur)) if isinstance(cur, dict) else type(cur).__name__
        raise ValueError(f"corrupt ledger: 'current' must have exactly the fields {sorted(keys)}, got {got}")
    sampling = cur["sampling"]
    if not isinstance(sampling, str) or sampling not in SAMPLING_SCHEMES:
        raise ValueError(f"corrupt ledger: current sampling {sampling!r:.60}; expected one of {SAMPLING_SCHEMES}")
    n = int_field("current population_size", cur["population_size"], 1, LIMITS["max_int"])
    q, b = cur["selection_probability"], cur["batch_size"]
    if sampling == "poisson":
        q = prob_field("current selection_probability", q)
        if b is not None:
            raise ValueError(f"corrupt ledger: current poisson settings have batch_size {b!r:.40} (expected null)")
    elif SamplingScheme(sampling).neighboring_relation == NeighboringRelation.REPLACE_ONE:
        b = int_field("current batch_size", b, 1, n)
        if isinstance(q, bool) or q != b / n:
            raise ValueError(f"corrupt ledger: current selection_probability {q!r:.40} is not batch_size / population_size")
        q = None
    else:
        if isinstance(q, bool) or q != 1.0 or b is not None:
            raise ValueError("corrupt ledger: current 'full' settings need selection_probability 1.0 and batch_size null")
        q = None
    ledger = cls(n, q, sampling=sampling, batch_size=b, metadata=metadata)
    return ledger


def _shuffled_events(runs: list[tuple[LedgerRun, int]]) -> list[DpEvent]:
    """One :class:`ShuffledEvent` per shuffled run, accounting every epoch the run touches.

    Each run comes with its position in its loader's batches (:func:`loader_positions`: the steps
    recorded before it under the same settings), so a run that starts mid-epoch and crosses an
    epoch boundary counts both epochs (:func:`epochs_touched`).  The run is accounted as a
    :class:`ShuffledEvent` whose ``steps`` count from the start of the first epoch touched
    (rounded up to reach every epoch touched): one un-amplified step per epoch touched.  (Counted
    by its length alone, a run of 10 steps starting at step 5 of a 10-step epoch was one epoch,
    while a record can take part in it twice.)
    """
    out: list[DpEvent] = []
    for r, pos in runs:
        spe = max(1, r.population_size // r.batch_size)
        touched = epochs_touched(r.population_size, r.batch_size, pos, r.count)
        steps = max(pos % spe + r.count, (touched - 1) * spe + 1)  # ceil(steps / spe) == touched
        out.append(ShuffledEvent(steps_per_epoch=spe, steps=steps, event=r.event))
    return out
