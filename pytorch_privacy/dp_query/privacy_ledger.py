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

import hashlib
import hmac
import json
import math
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import attrs

from .events import (
    ComposedEvent,
    DpEvent,
    GaussianEvent,
    NoOpEvent,
    PoissonSampledEvent,
    SampledWithoutReplacementEvent,
    SelfComposedEvent,
    ShuffledEvent,
    event_from_dict,
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

#: Integrity verdicts (:attr:`PrivacyLedger.integrity`, ``pytorch-privacy audit``).
UNSIGNED = "unsigned"
SIGNATURE_OK = "signature OK"
TAMPERED = "tampered"

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


class LedgerIntegrityError(ValueError):
    """The ledger's digest or signature does not match its content: it was edited (tampered)."""


def _canonical_bytes(content: dict[str, Any]) -> bytes:
    try:
        return json.dumps(
            content, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
        ).encode("ascii")
    except (TypeError, ValueError) as exc:
        raise TypeError(f"ledger content is not plain JSON (check metadata): {exc}") from None


def content_digest(content: dict[str, Any]) -> str:
    """Hex SHA-256 of the canonical JSON of ``content`` (sorted keys, no whitespace, ASCII,
    no NaN).  ``content`` is the ledger dict without its ``digest`` and ``signature`` fields."""
    return hashlib.sha256(_canonical_bytes(content)).hexdigest()


def _key_bytes(key: bytes | str) -> bytes:
    if isinstance(key, str):
        key = key.encode("utf-8")
    if not isinstance(key, (bytes, bytearray)):
        raise TypeError(f"key must be bytes or str, got {type(key).__name__}")
    if len(key) == 0:
        raise ValueError("the signing key is empty")
    return bytes(key)


def hmac_signature(content: dict[str, Any], key: bytes | str) -> str:
    """Hex HMAC-SHA256 of the canonical JSON of ``content`` under ``key``."""
    return hmac.new(_key_bytes(key), _canonical_bytes(content), hashlib.sha256).hexdigest()


def _ed25519_kind(key: Any) -> str | None:
    """``"private"`` / ``"public"`` for an Ed25519 key of the optional ``cryptography`` package,
    else ``None`` (the package is imported only when it is already installed)."""
    try:
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:  # pragma: no cover - optional dependency
        return None
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "private"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "public"
    return None


def _sign(content: dict[str, Any], key: Any) -> dict[str, str]:
    kind = _ed25519_kind(key)
    if kind == "private":
        return {"algorithm": "ed25519", "value": key.sign(_canonical_bytes(content)).hex()}
    if kind == "public":
        raise TypeError("signing needs the Ed25519 private key (the public key only verifies)")
    return {"algorithm": "hmac-sha256", "value": hmac_signature(content, key)}

#: ``poisson``: each record independently with probability ``selection_probability``.
#: ``without_replacement``: a uniformly random subset of ``batch_size`` records.
#: ``shuffle``: consecutive batches of ``batch_size`` from a fresh permutation each epoch
#: (accounted with ``N // batch_size`` steps per epoch, safe with or without ``drop_last``).
#: ``full``: every record, every sample (full-batch training).
SAMPLING_SCHEMES = ("poisson", "without_replacement", "shuffle", "full")


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
        return _run_from_dict(d, 0)


def _int_field(where: str, v: Any, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"corrupt ledger: {where} must be a JSON integer, got {v!r:.60} ({type(v).__name__})")
    if not lo <= v <= hi:
        raise ValueError(f"corrupt ledger: {where} must be in [{lo}, {hi}], got {v!r:.60}")
    return v


def _prob_field(where: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"corrupt ledger: {where} must be a JSON number, got {v!r:.60} ({type(v).__name__})")
    if not (math.isfinite(v) and 0 < v <= 1):
        raise ValueError(f"corrupt ledger: {where} must be in (0, 1], got {v!r}")
    return float(v)


_RUN_KEYS = {
    "poisson": {"count", "population_size", "sampling", "event", "selection_probability"},
    "without_replacement": {"count", "population_size", "sampling", "event", "batch_size"},
    "shuffle": {"count", "population_size", "sampling", "event", "batch_size"},
    "full": {"count", "population_size", "sampling", "event"},
}


def _run_from_dict(d: Any, i: int) -> LedgerRun:
    where = f"run {i}"
    if not isinstance(d, dict):
        raise ValueError(f"corrupt ledger: {where} must be a JSON object, got {type(d).__name__}")
    sampling = d.get("sampling")
    if not isinstance(sampling, str) or sampling not in SAMPLING_SCHEMES:
        raise ValueError(f"corrupt ledger: {where} has sampling {sampling!r:.60}; expected one of {SAMPLING_SCHEMES}")
    required = _RUN_KEYS[sampling]
    keys = set(d)
    if keys != required:
        raise ValueError(
            f"corrupt ledger: {sampling} {where} has fields {sorted(map(str, keys))[:8]}, "
            f"expected exactly {sorted(required)}"
        )
    n = _int_field(f"{where} population_size", d["population_size"], 1, LIMITS["max_int"])
    count = _int_field(f"{where} count", d["count"], 1, LIMITS["max_steps"])
    q = b = None
    if sampling == "poisson":
        q = _prob_field(f"{where} selection_probability", d["selection_probability"])
    elif sampling in ("without_replacement", "shuffle"):
        b = _int_field(f"{where} batch_size", d["batch_size"], 1, n)
    try:
        event = event_from_dict(d["event"])
    except ValueError as exc:
        raise ValueError(f"corrupt ledger: {where}: {exc}") from None
    _check_event_ints(event, where)
    return LedgerRun(count=count, population_size=n, sampling=sampling, selection_probability=q, batch_size=b, event=event)


def _check_event_ints(event: DpEvent, where: str) -> int:
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
                stack.extend(v)
            elif isinstance(v, int) and not isinstance(v, bool):
                hi = LIMITS["max_steps"] if a.name in ("count", "steps") else LIMITS["max_int"]
                if v > hi:
                    raise ValueError(f"corrupt ledger: {where}: {e.kind} {a.name} {v} exceeds the limit {hi}")
    return nodes


def _json_depth_ok(obj: Any, max_depth: int) -> None:
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


def _no_duplicates(pairs: list) -> dict:
    d = dict(pairs)
    if len(d) != len(pairs):
        seen = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"corrupt ledger: duplicate key {dup!r:.60} in a JSON object")
    return d


def _finite_float(s: str) -> float:
    v = float(s)
    if not math.isfinite(v):
        raise ValueError(f"corrupt ledger: number {s[:40]!r} overflows a float")
    return v


def _refuse_constant(s: str):
    raise ValueError(f"corrupt ledger: {s} is not allowed in a ledger file")


def _parse_json(text: str | bytes) -> Any:
    limit = LIMITS["max_file_bytes"]
    if len(text) > limit:
        raise ValueError(f"ledger file is larger than {limit} bytes (LIMITS['max_file_bytes']); refused unread")
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text).decode("utf-8")  # UnicodeDecodeError is a ValueError
    try:
        d = json.loads(
            text, object_pairs_hook=_no_duplicates, parse_float=_finite_float, parse_constant=_refuse_constant
        )
    except RecursionError:
        raise ValueError(
            f"corrupt ledger: JSON nested too deeply (the limit is {LIMITS['max_depth']} levels)"
        ) from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"corrupt ledger file: not valid JSON ({exc})") from None
    return d


def _check_population(n) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ValueError(f"population_size must be a positive integer, got {n!r}")
    return n


def _check_q(q) -> float:
    if isinstance(q, bool) or not isinstance(q, (int, float)) or math.isnan(q) or not 0 < q <= 1:
        raise ValueError(
            f"selection_probability must be in (0, 1], got {q!r} "
            "(expected batch size / population size)"
        )
    return float(q)


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
        population_size = _check_population(population_size)
        if sampling not in SAMPLING_SCHEMES:
            raise ValueError(f"sampling must be one of {SAMPLING_SCHEMES}, got {sampling!r}")
        if sampling == "poisson":
            if selection_probability is None and batch_size is not None:
                selection_probability = batch_size / population_size
            selection_probability = _check_q(selection_probability)
            batch_size = None
        elif sampling in ("without_replacement", "shuffle"):
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
        runs, whose epoch structure depends on their order.
        """
        parts: list[DpEvent] = []
        shuffled: list[LedgerRun] = []
        grouped: dict[tuple, int] = {}
        firsts: dict[tuple, LedgerRun] = {}
        for r in self._runs:
            if r.sampling == "shuffle":
                shuffled.append(r)
                continue
            key = (r.sampling, r.population_size, r.selection_probability, r.batch_size, r.event)
            grouped[key] = grouped.get(key, 0) + r.count
            firsts.setdefault(key, r)
        for key, n in grouped.items():
            parts.append(firsts[key].sampled_event(n))
        # consecutive shuffled runs with the same settings form one epoch sequence
        for r in shuffled:
            parts.append(r.sampled_event())
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
            lines.append(f"  {count:>10d} x {sampling:<20s} N={n:<9d} {desc:<16s} {_event_str(ev)}")
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
            out["signature"] = _sign(content, key)
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
        _json_depth_ok(d, LIMITS["max_depth"])
        integrity, detail = _verify(d, version, key)
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
            run = _run_from_dict(r, i)
            total += run.count
            if total > LIMITS["max_steps"]:
                raise ValueError(
                    f"ledger records more than LIMITS['max_steps'] = {LIMITS['max_steps']} steps; refused"
                )
            nodes += _check_event_ints(run.event, f"run {i}")
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
        return cls.from_dict(_parse_json(s), key=key)

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
    n = _int_field("current population_size", cur["population_size"], 1, LIMITS["max_int"])
    q, b = cur["selection_probability"], cur["batch_size"]
    if sampling == "poisson":
        q = _prob_field("current selection_probability", q)
        if b is not None:
            raise ValueError(f"corrupt ledger: current poisson settings have batch_size {b!r:.40} (expected null)")
    elif sampling in ("without_replacement", "shuffle"):
        b = _int_field("current batch_size", b, 1, n)
        if isinstance(q, bool) or q != b / n:
            raise ValueError(f"corrupt ledger: current selection_probability {q!r:.40} is not batch_size / population_size")
        q = None
    else:
        if isinstance(q, bool) or q != 1.0 or b is not None:
            raise ValueError("corrupt ledger: current 'full' settings need selection_probability 1.0 and batch_size null")
        q = None
    ledger = cls(n, q, sampling=sampling, batch_size=b, metadata=metadata)
    return ledger


def _verify(d: dict, version: int, key: bytes | str | None) -> tuple[str, str]:
    """Integrity verdict of a ledger dict: ``(UNSIGNED | SIGNATURE_OK, detail)`` or raise
    :class:`LedgerIntegrityError`."""
    if version == 1:
        if key is not None:
            return UNSIGNED, "version-1 file: no digest and no signature, although a key was given"
        return UNSIGNED, "version-1 file: no digest and no signature"
    content = {k: v for k, v in d.items() if k not in ("digest", "signature")}
    dg = d.get("digest")
    if not (isinstance(dg, dict) and set(dg) == {"algorithm", "value"} and dg["algorithm"] == "sha256"
            and isinstance(dg["value"], str)):
        raise LedgerIntegrityError(
            "tampered: the content digest is missing or malformed (version-2 ledgers carry "
            '{"digest": {"algorithm": "sha256", "value": <hex>}})'
        )
    try:
        actual = content_digest(content)
    except TypeError as exc:
        raise ValueError(f"corrupt ledger: {exc}") from None
    if not hmac.compare_digest(actual.encode(), dg["value"].encode("utf-8", "surrogatepass")):
        raise LedgerIntegrityError(
            "tampered: the SHA-256 content digest does not match the ledger's content "
            "(the file was edited after it was written)"
        )
    sig = d.get("signature")
    if sig is None:
        if "signature" in d:
            raise LedgerIntegrityError("tampered: 'signature' is null")
        if key is not None:
            return UNSIGNED, "digest OK, but the file carries no signature although a key was given"
        return UNSIGNED, "digest OK, no signature: anyone who edits the file can recompute the digest"
    if not (isinstance(sig, dict) and set(sig) == {"algorithm", "value"}
            and sig["algorithm"] in ("hmac-sha256", "ed25519") and isinstance(sig["value"], str)):
        raise LedgerIntegrityError(
            'tampered: malformed signature (expected {"algorithm": "hmac-sha256" or "ed25519", "value": <hex>})'
        )
    algorithm = sig["algorithm"]
    if key is None:
        return UNSIGNED, f"digest OK; carries an {algorithm} signature, NOT verified (no key given)"
    kind = _ed25519_kind(key)
    if kind == "private":
        key = key.public_key()
    expected = "ed25519" if kind else "hmac-sha256"
    if algorithm != expected:
        raise LedgerIntegrityError(
            f"tampered: the file carries an {algorithm} signature but an {expected} key was given"
        )
    if kind:
        from cryptography.exceptions import InvalidSignature

        try:
            key.verify(bytes.fromhex(sig["value"]), _canonical_bytes(content))
        except (InvalidSignature, ValueError):
            raise LedgerIntegrityError(
                "tampered: the Ed25519 signature does not match (the file was edited, or the key is wrong)"
            ) from None
        return SIGNATURE_OK, "ed25519 signature verified with the given public key"
    if not hmac.compare_digest(hmac_signature(content, key).encode(), sig["value"].encode("utf-8", "surrogatepass")):
        raise LedgerIntegrityError(
            "tampered: the HMAC-SHA256 signature does not match (the file was edited, or the key is wrong)"
        )
    return SIGNATURE_OK, "hmac-sha256 signature verified with the given key"


#: Thresholds of :func:`suspicious_content` (content that lowers epsilon and that an honest
#: training run does not produce): a noise multiplier above ``max_noise_multiplier`` (DP-SGD uses
#: 0.3 to 20), a population above ``max_population`` records.
SUSPICIOUS: dict[str, float] = {"max_noise_multiplier": 1e3, "max_population": 1e10}


def suspicious_content(ledger: PrivacyLedger) -> list[str]:
    """Plain-language warnings about content that lowers epsilon and that honest training does
    not write: an empty ledger, NoOp, non-private or unsupported events, zero noise, a noise
    multiplier above ``SUSPICIOUS['max_noise_multiplier']``, a Poisson rate whose expected batch is
    below one record, a population above ``SUSPICIOUS['max_population']``.

    A warning is not proof of tampering (a signed ledger may legitimately contain any of
    these); for an unsigned ledger, whose content anyone may have rewritten, it is the only
    check there is.
    """
    from .events import LaplaceEvent, NonPrivateEvent, UnsupportedEvent, equivalent_gaussian_noise_multiplier

    out: list[str] = []
    runs = ledger._runs
    if not runs:
        out.append("the ledger records no steps at all (epsilon 0): deleting runs leaves exactly this")
    max_sigma = SUSPICIOUS["max_noise_multiplier"]
    max_pop = SUSPICIOUS["max_population"]
    counts: dict[str, int] = {}
    examples: dict[str, str] = {}

    def note(msg: str, count: int, example: str = "") -> None:
        counts[msg] = counts.get(msg, 0) + count
        if example:
            examples.setdefault(msg, example)

    for r in runs:
        stack = [r.event]
        while stack:
            e = stack.pop()
            if isinstance(e, NoOpEvent):
                note("NoOp events (steps that claim to release nothing)", r.count)
            elif isinstance(e, (NonPrivateEvent, UnsupportedEvent)):
                note(f"{e.kind} events (no finite epsilon)", r.count)
            elif isinstance(e, (GaussianEvent, LaplaceEvent)):
                if e.noise_multiplier == 0:
                    note(f"{e.kind} events with zero noise", r.count)
                elif e.noise_multiplier > max_sigma:
                    note(f"{e.kind} noise multiplier above {max_sigma:g}", r.count, f"{e.noise_multiplier:.3g}")
            inner = getattr(e, "event", None)
            if isinstance(inner, DpEvent):
                stack.append(inner)
            stack.extend(getattr(e, "events", ()) or ())
        z = equivalent_gaussian_noise_multiplier(r.event)
        if z is not None and math.isinf(z) and not isinstance(r.event, NoOpEvent):
            note("events equivalent to releasing nothing", r.count)
        if r.sampling == "poisson" and r.selection_probability * r.population_size < 1:
            note(
                "Poisson rates whose expected batch q*N is below one record",
                r.count,
                f"q={r.selection_probability:.3g}, N={r.population_size}",
            )
        if r.population_size > max_pop:
            note(f"population sizes above {max_pop:g} records", r.count, str(r.population_size))
    for msg, n in counts.items():
        ex = f" (e.g. {examples[msg]})" if msg in examples else ""
        out.append(f"{msg}{ex}: {n} step(s)")
    return out


def _event_str(ev: DpEvent) -> str:
    if isinstance(ev, GaussianEvent):
        return f"gaussian(sigma={ev.noise_multiplier:.6g})"
    if isinstance(ev, ComposedEvent):
        return "composed(" + ", ".join(_event_str(e) for e in ev.events) + ")"
    if isinstance(ev, SelfComposedEvent):
        return f"{_event_str(ev.event)}^{ev.count}"
    return ev.kind
