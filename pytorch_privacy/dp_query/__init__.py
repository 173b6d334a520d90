"""Differentially private queries in the shape of TF Privacy's ``DPQuery``, and the ledger.

Events (:mod:`.events`) and the ledger (:mod:`.privacy_ledger`) import without torch; the query
classes load torch on first access (PEP 562 lazy attributes), so
``from pytorch_privacy.dp_query import PrivacyLedger`` works on an auditor's machine without it.
"""

from __future__ import annotations

from .._lazy import lazy_attributes

from .events import (  # noqa: F401
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
    event_from_dict,
    event_from_json,
    neighbouring_relation,
    relation_of,
    NeighboringRelation,
    equivalent_gaussian_noise_multiplier,
)
from .ledger_schema import SamplingScheme  # noqa: F401
from .privacy_ledger import LedgerRun, PrivacyLedger  # noqa: F401

_LAZY = {
    "DPQuery": ".dp_query",
    "SumAggregationDPQuery": ".dp_query",
    "DelegatingQuery": ".delegating_query",
    "GaussianSumQuery": ".gaussian_query",
    "NormalizedQuery": ".normalized_query",
    "GaussianAverageQuery": ".normalized_query",
    "NestedQuery": ".nested_query",
    "NoPrivacySumQuery": ".no_privacy_query",
    "NoPrivacyAverageQuery": ".no_privacy_query",
    "QuantileEstimatorQuery": ".quantile_estimator_query",
    "QuantileAdaptiveClipSumQuery": ".quantile_adaptive_clip_sum_query",
    "compute_sum_noise_multiplier": ".quantile_adaptive_clip_sum_query",
    "combined_noise_multiplier": ".quantile_adaptive_clip_sum_query",
    "QueryWithLedger": ".query_with_ledger",
}

__getattr__, __dir__, __all__ = lazy_attributes(
    __name__,
    globals(),
    _LAZY,
    eager=[
        "ADD_OR_REMOVE_ONE", "REPLACE_ONE", "ComposedEvent", "DpEvent", "GaussianEvent", "LaplaceEvent",
        "NoOpEvent", "NonPrivateEvent", "PoissonSampledEvent", "SampledWithoutReplacementEvent",
        "SelfComposedEvent", "ShuffledEvent", "UnsupportedEvent", "event_from_dict", "event_from_json",
        "neighbouring_relation", "relation_of", "NeighboringRelation", "SamplingScheme",
        "equivalent_gaussian_noise_multiplier", "LedgerRun", "PrivacyLedger",
    ],
)

