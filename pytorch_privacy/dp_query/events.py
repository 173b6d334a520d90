"""Privacy events: small immutable descriptions of what a mechanism did to the data.

A query returns one event per sample (``get_noised_result``); the :class:`PrivacyLedger`
wraps it with the sampling scheme of that sample and stores it; the analysis package turns a
(composed) event into an (epsilon, delta) bound.  The shapes follow dp-accounting's ``DpEvent``
hierarchy so that results can be cross-checked against it.

Every event is a frozen ``attrs`` class and round-trips through JSON without loss::

    ev = PoissonSampledEvent(0.01, GaussianEvent(1.1))
    assert event_from_json(ev.to_json()) == ev

This module imports neither torch nor numpy: an auditor reads a ledger with the analysis package
alone.

Neighbouring relations
----------------------
A sampling event fixes the neighbouring relation its amplification bound is stated under:
:class:`PoissonSampledEvent` is *add-or-remove-one* (Mironov, Talwar, Zhang 2019),
:class:`SampledWithoutReplacementEvent` is *replace-one* (Wang, Balle, Kasiviswanathan 2019).
:class:`ShuffledEvent` (fixed-size batches from a random permutation each epoch) has no
amplification bound here; the analysis accounts it, conservatively, as one un-amplified
mechanism per epoch (parallel composition over the disjoint batches of an epoch) and says so.
The analysis refuses to mix relations silently.
"""

from __future__ import annotations

import enum
import json
import math
from typing import Any, ClassVar

import attrs

from .._lazy import import_optional

__all__ = [
    "ADD_OR_REMOVE_ONE",
    "REPLACE_ONE",
    "DpEvent",
    "NoOpEvent",
    "NonPrivateEvent",
    "UnsupportedEvent",
    "GaussianEvent",
    "LaplaceEvent",
    "PoissonSampledEvent",
    "SampledWithoutReplacementEvent",
    "ShuffledEvent",
    "SelfComposedEvent",
    "ComposedEvent",
    "event_from_dict",
    "event_from_json",
    "MAX_EVENT_DEPTH",
    "NeighboringRelation",
    "relation_of",
    "neighbouring_relation",
    "equivalent_gaussian_noise_multiplier",
]

class NeighboringRelation(str, enum.Enum):
    """How neighbouring datasets differ (spelled as dp-accounting spells it).  A ``str`` enum:
    members compare equal to, and serialise as, their values (``"add_or_remove_one"``)."""

    #: Neighbouring datasets differ by adding or removing one record.
    ADD_OR_REMOVE_ONE = "add_or_remove_one"
    #: Neighbouring datasets differ by replacing one record (same size).
    REPLACE_ONE = "replace_one"

    def __str__(self) -> str:
        return self.value


ADD_OR_REMOVE_ONE = NeighboringRelation.ADD_OR_REMOVE_ONE
REPLACE_ONE = NeighboringRelation.REPLACE_ONE

_REGISTRY: dict[str, type["DpEvent"]] = {}

#: Torch-free modules that define the events of further mechanism families (tree aggregation,
#: discrete and distributed sums, matrix factorisation).  They register themselves on import;
#: :func:`event_from_dict` imports them when it meets a kind it does not know yet.
EVENT_MODULES: tuple[str, ...] = (
    "pytorch_privacy.dp_query.tree_events",
    "pytorch_privacy.dp_query.distributed_events",
    "pytorch_privacy.dp_query.matrix_factorization_events",
)


def _load_event_modules() -> None:
    import_optional(EVENT_MODULES)


def _to_float(value) -> float:
    """attrs converter: a real number to ``float``; bools and strings are refused (``TypeError``).

    (A plain ``float`` converter would silently accept ``True`` or ``"1.5"`` and make the
    validators' type checks dead code.)
    """
    if isinstance(value, (bool, str, bytes)) or not hasattr(value, "__float__"):
        raise TypeError(f"expected a real number, got {value!r} ({type(value).__name__})")
    return float(value)


def _finite_nonneg(name: str):
    def check(instance, attribute, value):  # noqa: ARG001
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a real number, got {value!r}")
        if not math.isfinite(value) or value < 0:
            raise ValueError(
                f"{name} must be finite and >= 0, got {value!r} "
                "(a release that reveals nothing is a NoOpEvent)"
            )

    return check


def _check_event(instance, attribute, value):  # noqa: ARG001
    if not isinstance(value, DpEvent):
        raise TypeError(f"{attribute.name} must be a DpEvent, got {type(value).__name__}")


class DpEvent:
    """Base class of privacy events.  Subclasses are frozen attrs classes with a ``kind`` tag."""

    kind: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("kind"):
            _REGISTRY[cls.kind] = cls

    # -- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: ``{"kind": ..., field: value, ...}`` with nested events as dicts."""
        out: dict[str, Any] = {"kind": self.kind}
        for a in attrs.fields(type(self)):
            v = getattr(self, a.name)
            if isinstance(v, DpEvent):
                v = v.to_dict()
            elif isinstance(v, tuple):
                v = [e.to_dict() if isinstance(e, DpEvent) else e for e in v]
            out[a.name] = v
        return out

    def to_json(self) -> str:
        """Compact canonical JSON (sorted keys) of :meth:`to_dict`."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))


@attrs.frozen
class NoOpEvent(DpEvent):
    """Nothing about the private data was released (e.g. a public pass)."""

    kind: ClassVar[str] = "noop"


@attrs.frozen
class NonPrivateEvent(DpEvent):
    """Data were released without privacy (infinite epsilon)."""

    kind: ClassVar[str] = "non_private"


@attrs.frozen
class UnsupportedEvent(DpEvent):
    """A mechanism the analysis cannot account; any bound that contains it is refused."""

    kind: ClassVar[str] = "unsupported"
    reason: str = ""


@attrs.frozen
class GaussianEvent(DpEvent):
    """The Gaussian mechanism with L2 sensitivity 1 and noise stddev ``noise_multiplier``.

    ``noise_multiplier`` = noise stddev / L2 sensitivity (clip norm).  0 means no noise.
    """

    kind: ClassVar[str] = "gaussian"
    noise_multiplier: float = attrs.field(validator=_finite_nonneg("noise_multiplier"), converter=_to_float)


@attrs.frozen
class LaplaceEvent(DpEvent):
    """The Laplace mechanism with L1 sensitivity 1 and scale ``noise_multiplier``."""

    kind: ClassVar[str] = "laplace"
    noise_multiplier: float = attrs.field(validator=_finite_nonneg("noise_multiplier"), converter=_to_float)


def _check_prob(instance, attribute, value):  # noqa: ARG001
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{attribute.name} must be a number in [0, 1], got {value!r}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{attribute.name} must be in [0, 1], got {value!r}")


@attrs.frozen
class PoissonSampledEvent(DpEvent):
    """``event`` run on a Poisson sample: each record included independently with prob. ``q``.

    Neighbouring relation: add-or-remove-one.
    """

    kind: ClassVar[str] = "poisson_sampled"
    neighboring_relation: ClassVar[str] = ADD_OR_REMOVE_ONE
    sampling_probability: float = attrs.field(converter=_to_float, validator=_check_prob)
    event: DpEvent = attrs.field(validator=_check_event)


def _check_pos_int(instance, attribute, value):  # noqa: ARG001
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{attribute.name} must be a non-negative integer, got {value!r}")


def _check_strictly_pos_int(instance, attribute, value):  # noqa: ARG001
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{attribute.name} must be a positive integer, got {value!r}")


@attrs.frozen
class SampledWithoutReplacementEvent(DpEvent):
    """``event`` run on a uniformly random subset of fixed size ``sample_size`` out of
    ``source_dataset_size`` records.  Neighbouring relation: replace-one."""

    kind: ClassVar[str] = "sampled_without_replacement"
    neighboring_relation: ClassVar[str] = REPLACE_ONE
    source_dataset_size: int = attrs.field(validator=_check_pos_int)
    sample_size: int = attrs.field(validator=_check_pos_int)
    event: DpEvent = attrs.field(validator=_check_event)

    def __attrs_post_init__(self):
        if self.sample_size > self.source_dataset_size:
            raise ValueError(
                f"sample_size ({self.sample_size}) exceeds source_dataset_size "
                f"({self.source_dataset_size})"
            )


@attrs.frozen
class ShuffledEvent(DpEvent):
    """``steps`` steps of ``event`` on consecutive fixed-size batches of a random permutation.

    Each epoch of ``steps_per_epoch`` steps touches every record exactly once.  No
    amplification is claimed: the analysis accounts one un-amplified ``event`` per (started)
    epoch, which is a valid bound by parallel composition.  Neighbouring relation: replace-one.
    """

    kind: ClassVar[str] = "shuffled"
    neighboring_relation: ClassVar[str] = REPLACE_ONE
    steps_per_epoch: int = attrs.field(validator=_check_strictly_pos_int)
    steps: int = attrs.field(validator=_check_pos_int)
    event: DpEvent = attrs.field(validator=_check_event)


@attrs.frozen
class SelfComposedEvent(DpEvent):
    """``event`` composed with itself ``count`` times."""

    kind: ClassVar[str] = "self_composed"
    event: DpEvent = attrs.field(validator=_check_event)
    count: int = attrs.field(validator=_check_pos_int)


def _to_event_tuple(events) -> tuple:
    return tuple(events)


def _check_events(instance, attribute, value):  # noqa: ARG001
    for e in value:
        if not isinstance(e, DpEvent):
            raise TypeError(f"ComposedEvent.events must hold DpEvents, got {type(e).__name__}")


@attrs.frozen
class ComposedEvent(DpEvent):
    """Sequential composition of ``events`` (a tuple)."""

    kind: ClassVar[str] = "composed"
    events: tuple = attrs.field(converter=_to_event_tuple, validator=_check_events, factory=tuple)


#: Deepest nesting of events (an event inside a sampling/composition event counts one level)
#: that :func:`event_from_dict` reads.  Real events are 2-4 levels deep; the bound keeps a
#: hostile file from exhausting the stack.
MAX_EVENT_DEPTH = 16

# JSON type of each serialised field, by the annotation of the attrs field.  Files are read
# without coercion: an int field takes a JSON integer only (not 1.0, "1" or true), a float field
# takes a JSON number (integer or float, never a bool or a string), a str field a string.
_FIELD_TYPES = {
    "float": "number", "int": "int", "str": "str", "DpEvent": "event", "tuple": "events", "tuple[int, ...]": "ints",
}


def _field_type(cls: type, a: "attrs.Attribute") -> str:
    """JSON type of an event field from its annotation (a string under ``from __future__ import
    annotations``, else the class itself)."""
    name = a.type if isinstance(a.type, str) else getattr(a.type, "__name__", repr(a.type))
    ftype = _FIELD_TYPES.get(name)
    if ftype is None:
        raise TypeError(
            f"event class {cls.__name__} field {a.name!r} has type {name!r}; serialisable event fields "
            f"are annotated with one of {sorted(_FIELD_TYPES)}"
        )
    return ftype


def _field_value(kind: str, name: str, ftype: str, v: Any, depth: int) -> Any:
    where = f"{kind!r} event field {name!r}"
    if ftype == "number":
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"{where} must be a JSON number, got {v!r} ({type(v).__name__})")
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"{where} must be finite, got {v!r}")
        return v
    if ftype == "int":
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{where} must be a JSON integer, got {v!r} ({type(v).__name__})")
        return v
    if ftype == "str":
        if not isinstance(v, str):
            raise ValueError(f"{where} must be a string, got {type(v).__name__}")
        return v
    if ftype == "event":
        return _event_from_dict(v, depth + 1)
    if ftype == "events":
        if not isinstance(v, list):
            raise ValueError(f"{where} must be a list of events, got {type(v).__name__}")
        return tuple(_event_from_dict(e, depth + 1) for e in v)
    if ftype == "ints":
        if not isinstance(v, list) or any(isinstance(x, bool) or not isinstance(x, int) for x in v):
            raise ValueError(f"{where} must be a list of JSON integers, got {v!r:.80}")
        return tuple(v)
    raise AssertionError(ftype)  # pragma: no cover


def _event_from_dict(d: Any, depth: int) -> DpEvent:
    if depth > MAX_EVENT_DEPTH:
        raise ValueError(f"privacy events nested deeper than {MAX_EVENT_DEPTH} levels are refused")
    if not isinstance(d, dict):
        raise ValueError(f"not a serialised privacy event: expected a JSON object, got {type(d).__name__}")
    kind = d.get("kind")
    if not isinstance(kind, str):
        raise ValueError(f"a serialised privacy event needs a string 'kind', got {kind!r:.80}")
    cls = _REGISTRY.get(kind)
    if cls is None:
        _load_event_modules()
        cls = _REGISTRY.get(kind)
    if cls is None:
        raise ValueError(f"unknown privacy event kind {kind[:80]!r}; known: {sorted(_REGISTRY)}")
    fields = attrs.fields(cls)
    names = {a.name for a in fields}
    extra = set(d) - names - {"kind"}
    if extra:
        raise ValueError(f"{kind!r} event has unknown field(s) {sorted(map(str, extra))[:5]}; fields: {sorted(names)}")
    missing = names - set(d)
    if missing:
        raise ValueError(f"{kind!r} event lacks field(s) {sorted(missing)}")
    kwargs = {a.name: _field_value(kind, a.name, _field_type(cls, a), d[a.name], depth) for a in fields}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"malformed {kind!r} event: {exc}") from None


def event_from_dict(d: dict[str, Any]) -> DpEvent:
    """Inverse of :meth:`DpEvent.to_dict`, strict.

    Every field of the event's kind must be present and no other; values are taken without
    coercion (an integer field refuses ``1.0``, ``"1"`` and ``true``; a number field refuses
    strings, bools and non-finite values); events nest at most :data:`MAX_EVENT_DEPTH` deep.
    Anything else raises ``ValueError``.
    """
    return _event_from_dict(d, 0)


def event_from_json(s: str) -> DpEvent:
    """Inverse of :meth:`DpEvent.to_json` (strict, see :func:`event_from_dict`)."""
    try:
        d = json.loads(s)
    except RecursionError:
        raise ValueError("privacy event JSON is nested too deeply") from None
    return event_from_dict(d)


def relation_of(event: DpEvent) -> NeighboringRelation | None:
    """The single neighbouring relation the sampling events inside ``event`` are stated under.

    Returns ``None`` when ``event`` contains no sampling event (then either relation applies,
    with the usual sensitivity convention).  Raises ``ValueError`` when two relations are mixed.
    """
    found: set[str] = set()

    def walk(e: DpEvent):
        rel = getattr(type(e), "neighboring_relation", None)
        if isinstance(rel, str):
            found.add(rel)
        inner = getattr(e, "event", None)
        if isinstance(inner, DpEvent):
            walk(inner)
        for sub in getattr(e, "events", ()) or ():
            walk(sub)

    walk(event)
    if len(found) > 1:
        raise ValueError(
            "event mixes neighbouring relations "
            f"{sorted(found)}; account add/remove and replace-one parts separately"
        )
    return NeighboringRelation(found.pop()) if found else None


def neighbouring_relation(event: DpEvent) -> NeighboringRelation | None:
    """Deprecated name of :func:`relation_of` (kept for one release)."""
    import warnings

    warnings.warn("neighbouring_relation(event) is deprecated; use relation_of(event)", DeprecationWarning, stacklevel=2)
    return relation_of(event)


def equivalent_gaussian_noise_multiplier(event: DpEvent) -> float | None:
    """Noise multiplier of the single Gaussian mechanism equivalent to ``event`` on one sample.

    ``event`` must be built from :class:`GaussianEvent`, :class:`NoOpEvent`,
    :class:`NonPrivateEvent` and (self-)compositions of them; otherwise ``None``.  Several
    Gaussian releases of the same sample (e.g. adaptive clipping's noised sum and noised count)
    form one Gaussian mechanism with the stacked sensitivities, whose noise multiplier is
    ``(sum_i sigma_i^-2)^(-1/2)``; accounting them as one sampled event is exact.  Returns
    ``inf`` when nothing is released and ``0.0`` when something is released without noise.
    """

    def inv_var(e: DpEvent) -> float | None:
        if isinstance(e, GaussianEvent):
            return math.inf if e.noise_multiplier == 0.0 else e.noise_multiplier ** -2
        if isinstance(e, NoOpEvent):
            return 0.0
        if isinstance(e, NonPrivateEvent):
            return math.inf
        if isinstance(e, SelfComposedEvent):
            v = inv_var(e.event)
            return None if v is None else (0.0 if e.count == 0 else e.count * v)
        if isinstance(e, ComposedEvent):
            total = 0.0
            for sub in e.events:
                v = inv_var(sub)
                if v is None:
                    return None
                total += v
            return total
        return None

    try:
        v = inv_var(event)
    except (OverflowError, RecursionError):
        v = -1.0  # a sigma below ~1e-154: take the scaled route below
    if v is None:
        return None
    if v == 0.0 and not _has_gaussian(event):
        return math.inf
    if v > 0.0 and math.isfinite(v) and v > 1e-300:
        return v ** -0.5
    return _scaled_equivalent_sigma(event)


def _has_gaussian(event: DpEvent) -> bool:
    stack = [event]
    while stack:
        e = stack.pop()
        if isinstance(e, GaussianEvent):
            return True
        inner = getattr(e, "event", None)
        if isinstance(inner, DpEvent) and not (isinstance(e, SelfComposedEvent) and e.count == 0):
            stack.append(inner)
        stack.extend(getattr(e, "events", ()) or ())
    return False


def _scaled_equivalent_sigma(event: DpEvent) -> float | None:
    """:func:`equivalent_gaussian_noise_multiplier` for extreme sigmas, computed as
    ``sigma_min * (sum_i m_i (sigma_min / sigma_i)^2)^(-1/2)``, which neither overflows nor
    underflows (``m_i`` the multiplicity of ``sigma_i``)."""
    # the terms (sigma_i, multiplicity_i) of sum_i m_i sigma_i^-2, computed as
    # sigma_min * (sum_i m_i (sigma_min / sigma_i)^2)^(-1/2) so that tiny or huge sigmas neither
    # overflow nor underflow; a release without noise makes the whole mechanism noiseless.
    terms: list[tuple[float, float]] = []
    noiseless = False
    stack: list[tuple[DpEvent, float]] = [(event, 1.0)]
    while stack:
        e, mult = stack.pop()
        if isinstance(e, GaussianEvent):
            if e.noise_multiplier == 0.0:
                noiseless = True
            else:
                terms.append((e.noise_multiplier, mult))
        elif isinstance(e, NoOpEvent):
            continue
        elif isinstance(e, NonPrivateEvent):
            noiseless = True
        elif isinstance(e, SelfComposedEvent):
            if e.count:
                stack.append((e.event, mult * e.count))
        elif isinstance(e, ComposedEvent):
            stack.extend((sub, mult) for sub in e.events)
        else:
            return None
    if noiseless:
        return 0.0
    if not terms:
        return math.inf
    smin = min(t for t, _ in terms)
    total = math.fsum(m * (smin / t) ** 2 for t, m in terms)
    return smin / math.sqrt(total)
