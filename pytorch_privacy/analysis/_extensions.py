"""The analysis modules of mechanism families defined outside the core accountants.

Each registers, on import, how its events are accounted: RDP rules
(:func:`~pytorch_privacy.analysis.rdp_accountant.register_rdp_rule`) and PLD equivalents
(:func:`~pytorch_privacy.analysis.pld.parsing.register_pld_equivalent`).  The accountants' registries
(:class:`~pytorch_privacy.dp_query.event_registry.EventTypeRegistry`) import them all once, on
their first unknown event, so they know every event the package defines without importing them
eagerly.
"""

from __future__ import annotations

RULE_MODULES: tuple[str, ...] = (
    "pytorch_privacy.analysis.tree_aggregation",
    "pytorch_privacy.analysis.distributed",
    "pytorch_privacy.analysis.matrix_factorization",
)
