"""PEP 562 lazy attributes for the package ``__init__`` modules (one concept a file, and
importing one subpackage never drags in torch or the others)."""

from __future__ import annotations

import importlib
from typing import Callable


def lazy_attributes(package: str, namespace: dict, mapping: dict[str, str], eager: list[str] = ()) -> tuple[Callable, Callable, list[str]]:
    """``(__getattr__, __dir__, __all__)`` for a package whose public names live in submodules.

    ``mapping`` maps a public name to the relative module defining it; ``eager`` lists names
    already imported into ``namespace``.  A name is imported on first access and cached.
    """
    all_names = sorted(set(mapping) | set(eager))

    def __getattr__(name: str):
        mod = mapping.get(name)
        if mod is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(mod, package), name)
        namespace[name] = value
        return value

    def __dir__():
        return all_names

    return __getattr__, __dir__, all_names


def import_optional(modules: tuple[str, ...] | list[str]) -> None:
    """Import each of ``modules`` (by absolute name); a module missing from this build is
    skipped, an error raised while importing one that exists is not."""
    for mod in modules:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name != mod:
                raise
