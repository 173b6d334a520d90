"""A map from privacy-event classes to handlers, filled by the modules that define them.

The accountants and the ledger look up how to treat an event (its RDP, its PLD equivalent, how
its ledger runs are grouped) by the event's class; the handlers of the mechanism families beyond
the core ones live in modules of their own and register on import.  :class:`EventTypeRegistry`
is that map: lookup along the class's MRO, and on the first miss the families' modules are
imported (once), so a handler is found without anyone importing its module by hand.

This module imports neither torch nor numpy.
"""

from __future__ import annotations

from typing import Any, Callable

from .._lazy import import_optional
from .events import DpEvent

__all__ = ["EventTypeRegistry"]


class EventTypeRegistry:
    """``event class -> handler``.

    Args:
        name: the registering function's name (for error messages).
        modules: absolute names of the modules that register handlers on import; imported once,
            on the first lookup that finds nothing.
    """

    def __init__(self, name: str, modules: tuple[str, ...]):
        self._name = name
        self._modules = tuple(modules)
        self._handlers: dict[type, Any] = {}
        self._loaded = False

    def register(self, event_cls: type) -> Callable[[Any], Any]:
        """Decorator registering its function as the handler of ``event_cls`` (and subclasses)."""
        if not (isinstance(event_cls, type) and issubclass(event_cls, DpEvent)):
            raise TypeError(f"{self._name} needs a DpEvent subclass, got {event_cls!r}")

        def deco(fn):
            self._handlers[event_cls] = fn
            return fn

        return deco

    def lookup(self, event: DpEvent) -> Any | None:
        """The handler of ``event``'s class or its nearest registered base class, else ``None``."""
        for cls in type(event).__mro__:
            fn = self._handlers.get(cls)
            if fn is not None:
                return fn
        if not self._loaded:
            self._loaded = True
            import_optional(self._modules)
            return self.lookup(event)
        return None
