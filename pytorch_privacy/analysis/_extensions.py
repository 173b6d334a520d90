"""The analysis modules of mechanism families defined outside the core accountants.

Each registers, on import, how its events are accounted: RDP rules
(:func:`~pytorch_privacy.analysis.rdp_accountant.register_rdp_rule`) and PLD equivalents
(:func:`~pytorch_privacy.analysis.pld.parsing.register_pld_equivalent`).  An accountant that meets
an event type it does not know imports them all once (:func:`load_rule_modules`), so it knows
every event the package defines without importing them eagerly.
"""

from __future__ import annotations

import importlib

RULE_MODULES: tuple[str, ...] = (
    "pytorch_privacy.analysis.tree_aggregation",
    "pytorch_privacy.analysis.distributed",
    "pytorch_privacy.analysis.matrix_factorization",
)


def load_rule_modules() -> None:
    """Import every module of :data:`RULE_MODULES` (a family missing from this build is skipped)."""
    for mod in RULE_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name != mod:
                raise
