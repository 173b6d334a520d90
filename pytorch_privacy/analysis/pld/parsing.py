"""Event parsing: a (composed) :class:`DpEvent` or ledger event to per-step specifications and counts.

Part of :mod:`pytorch_privacy.analysis.pld` (see the package docstring for the method).
"""

from __future__ import annotations

import math

from ...dp_query.events import (
    equivalent_gaussian_noise_multiplier,
    ADD_OR_REMOVE_ONE,
    REPLACE_ONE,
    ComposedEvent,
    DpEvent,
    GaussianEvent,
    LaplaceEvent,
    NoOpEvent,
    NonPrivateEvent,
    PoissonSampledEvent,
    SampledWithoutReplacementEvent,
    SelfComposedEvent,
    ShuffledEvent,
    UnsupportedEvent,
    relation_of,
)
from ...dp_query.event_registry import EventTypeRegistry
from .._extensions import RULE_MODULES
from .curves import _Spec

#: ``event class -> fn(event) -> DpEvent``: the event in terms the PLD accountant knows (e.g. a
#: tree or matrix-factorisation run as the Gaussian mechanism it is), filled by
#: :func:`register_pld_equivalent`.
_EQUIVALENTS = EventTypeRegistry("register_pld_equivalent", RULE_MODULES)


def register_pld_equivalent(event_cls: type):
    """Decorator: ``fn(event) -> DpEvent`` rewrites an ``event_cls`` event *exactly* as events the
    PLD accountant accounts (Gaussian, Laplace, sampled, shuffled, composed).  It must not loosen
    the bound: only an equivalent mechanism (or a sound upper bound of it) is allowed."""
    return _EQUIVALENTS.register(event_cls)


class _Parsed:
    def __init__(self):
        self.specs: dict[_Spec, int] = {}
        self.non_private = False

    def add(self, spec: _Spec, count: int):
        if count > 0:
            self.specs[spec] = self.specs.get(spec, 0) + count


def _base_kind(ev: DpEvent):
    if isinstance(ev, GaussianEvent):
        return "gaussian", ev.noise_multiplier
    if isinstance(ev, LaplaceEvent):
        return "laplace", ev.noise_multiplier
    if isinstance(ev, (ComposedEvent, SelfComposedEvent)):
        # several Gaussian releases of one sample = one Gaussian (exact; see the helper)
        z = equivalent_gaussian_noise_multiplier(ev)
        return None if z is None else ("gaussian", z)
    return None


def _releases_nothing(ev: DpEvent) -> bool:
    """NoOp, or infinite noise (the output is independent of the data)."""
    if isinstance(ev, NoOpEvent):
        return True
    base = _base_kind(ev)
    return base is not None and math.isinf(base[1])


def _parse_sampled(event: DpEvent, q: float, sampling: str, count: int, relation: str, out: _Parsed) -> None:
    """A sampling event (rate ``q``, ``sampling`` in {"poisson", "wor"}) around a base mechanism."""
    inner = event.event
    if q == 0 or _releases_nothing(inner):
        return
    if isinstance(inner, NonPrivateEvent):
        out.non_private = True
        return
    base = _base_kind(inner)
    if base is None:
        raise ValueError(
            f"the PLD accountant supports {type(event).__name__} of a GaussianEvent or LaplaceEvent "
            f"(or compositions of Gaussians on the same sample) only, got {inner!r}"
        )
    kind, scale = base
    if scale == 0:
        out.non_private = True
    elif q >= 1.0:
        out.add(_Spec(kind, scale, "none", 1.0, relation), count)
    else:
        out.add(_Spec(kind, scale, sampling, q, relation), count)


def _parse(event: DpEvent, count: int, relation: str, out: _Parsed) -> None:
    if not isinstance(event, DpEvent):
        raise TypeError(f"expected a DpEvent, got {type(event).__name__}")
    if count == 0 or _releases_nothing(event):
        return
    if isinstance(event, NonPrivateEvent):
        out.non_private = True
        return
    if isinstance(event, UnsupportedEvent):
        raise ValueError(f"the PLD accountant cannot account {event!r}" + (f": {event.reason}" if event.reason else ""))
    if isinstance(event, SelfComposedEvent):
        _parse(event.event, count * event.count, relation, out)
        return
    if isinstance(event, ComposedEvent):
        for e in event.events:
            _parse(e, count, relation, out)
        return
    base = _base_kind(event)
    if base is None and not isinstance(event, (PoissonSampledEvent, SampledWithoutReplacementEvent, ShuffledEvent)):
        rewrite = _EQUIVALENTS.lookup(event)
        if rewrite is not None:
            _parse(rewrite(event), count, relation, out)
            return
    if base is not None:
        kind, scale = base
        if scale == 0:
            out.non_private = True
        else:
            out.add(_Spec(kind, scale, "none", 1.0, relation), count)
        return
    if isinstance(event, PoissonSampledEvent):
        _parse_sampled(event, event.sampling_probability, "poisson", count, relation, out)
        return
    if isinstance(event, SampledWithoutReplacementEvent):
        if relation != REPLACE_ONE:
            raise ValueError(
                "SampledWithoutReplacementEvent is stated under the replace-one relation; use "
                "PLDAccountant(neighboring_relation='replace_one')"
            )
        q = event.sample_size / event.source_dataset_size if event.sample_size else 0.0
        _parse_sampled(event, q, "wor", count, relation, out)
        return
    if isinstance(event, ShuffledEvent):
        if relation != REPLACE_ONE:
            raise ValueError(
                "ShuffledEvent is accounted under the replace-one relation; use "
                "PLDAccountant(neighboring_relation='replace_one')"
            )
        if event.steps == 0:
            return
        if event.steps_per_epoch == 0:
            raise ValueError("ShuffledEvent with steps_per_epoch=0 is malformed")
        epochs = -(-event.steps // event.steps_per_epoch)
        # one un-amplified event per (started) epoch: no amplification is claimed
        _parse(event.event, count * epochs, relation, out)
        return
    raise ValueError(f"the PLD accountant does not support {type(event).__name__}: {event!r}")


def _check_relation(event: DpEvent, relation: str) -> None:
    rel = relation_of(event)  # raises ValueError on a mix inside the event
    if rel == REPLACE_ONE and relation == ADD_OR_REMOVE_ONE:
        raise ValueError(
            "event is stated under the replace-one relation but this PLDAccountant uses "
            "add_or_remove_one; create PLDAccountant(neighboring_relation='replace_one')"
        )
