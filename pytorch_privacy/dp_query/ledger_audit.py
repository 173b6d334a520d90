"""Content checks of an unsigned ledger: what lowers epsilon and honest training never writes.

This module imports neither torch nor numpy.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from .events import ComposedEvent, DpEvent, GaussianEvent, NoOpEvent, SelfComposedEvent

if TYPE_CHECKING:  # pragma: no cover
    from .privacy_ledger import PrivacyLedger

__all__ = ["SUSPICIOUS", "suspicious_content", "event_str"]


#: Thresholds of :func:`suspicious_content` (content that lowers epsilon and that an honest
#: training run does not produce): a noise multiplier above ``max_noise_multiplier`` (DP-SGD uses
#: 0.3 to 20), a population above ``max_population`` records.
SUSPICIOUS: dict[str, float] = {"max_noise_multiplier": 1e3, "max_population": 1e10}


def suspicious_content(ledger: "PrivacyLedger") -> list[str]:
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
    runs = ledger.runs
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


def event_str(ev: DpEvent) -> str:
    if isinstance(ev, GaussianEvent):
        return f"gaussian(sigma={ev.noise_multiplier:.6g})"
    if isinstance(ev, ComposedEvent):
        return "composed(" + ", ".join(event_str(e) for e in ev.events) + ")"
    if isinstance(ev, SelfComposedEvent):
        return f"{event_str(ev.event)}^{ev.count}"
    return ev.kind
