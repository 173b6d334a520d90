"""Restarting the state of another query on a schedule (TF Privacy's ``restart_query``).

:class:`RestartQuery` wraps a query that has ``reset_state(noised_results, global_state)`` (the
tree-aggregation queries of :mod:`.tree_aggregation_query`).  After each release it asks its
:class:`RestartIndicator` whether to restart, and if so calls the inner query's ``reset_state``,
so the next step starts a new tree (and records ``TreeAggregationStepEvent(..., starts_tree=1)``).
DP-FTRL restarts its tree at every epoch (Kairouz et al. 2021, Section 4): with
:class:`EpochRestartIndicator` each record takes part at most once per tree.

Indicator states are plain ints or floats, so the global state goes through ``state_dict``.
"""

from __future__ import annotations

import abc
import math
import time
from typing import Any, Callable

import attrs

from .dp_query import DPQuery
from .events import DpEvent

__all__ = [
    "RestartIndicator",
    "PeriodicRoundRestartIndicator",
    "EpochRestartIndicator",
    "PeriodicTimeRestartIndicator",
    "RestartQuery",
    "RestartGlobalState",
]


def _check_int(name: str, value, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value!r}")
    return value


class RestartIndicator(abc.ABC):
    """Says, after each release, whether to restart: ``next(state) -> (flag, new_state)``."""

    @abc.abstractmethod
    def initialize(self) -> Any:
        """The initial indicator state (a plain number)."""

    @abc.abstractmethod
    def next(self, state: Any) -> tuple[bool, Any]:
        """Whether to restart after the release just made, and the advanced state."""


class PeriodicRoundRestartIndicator(RestartIndicator):
    """Restart after every ``period``-th release; with ``warmup`` (``1 <= warmup < period``) the
    first restart is after release ``warmup`` and then every ``period`` releases.

    The state is the number of releases so far; ``next`` returns ``True`` when the new count
    ``c`` has ``c % period == warmup`` (``warmup`` 0 when not given), as in TF Privacy.
    """

    def __init__(self, period: int, warmup: int | None = None):
        if isinstance(period, bool) or not isinstance(period, int):
            raise TypeError(f"period must be an int, got {type(period).__name__}")
        if period < 1:
            raise ValueError(f"Restart period should be equal or larger than 1, got {period}")
        if warmup is None:
            warmup = 0
        elif isinstance(warmup, bool) or not isinstance(warmup, int):
            raise TypeError(f"warmup must be an int or None, got {type(warmup).__name__}")
        elif warmup <= 0 or warmup >= period:
            raise ValueError(f"Warmup must be between 1 and `period`-1={period - 1}, got {warmup}")
        self.period = period
        self.warmup = warmup

    def initialize(self) -> int:
        return 0

    def next(self, state: int) -> tuple[bool, int]:
        count = _check_int("indicator state", state, 0) + 1
        return count % self.period == self.warmup, count


class EpochRestartIndicator(PeriodicRoundRestartIndicator):
    """Restart at the end of every ``epochs_per_tree`` epoch(s) of ``steps_per_epoch`` steps: the
    tree of DP-FTRL restarted each epoch (one tree per pass over the data)."""

    def __init__(self, steps_per_epoch: int, epochs_per_tree: int = 1):
        self.steps_per_epoch = _check_int("steps_per_epoch", steps_per_epoch, 1)
        self.epochs_per_tree = _check_int("epochs_per_tree", epochs_per_tree, 1)
        super().__init__(steps_per_epoch * epochs_per_tree)


class PeriodicTimeRestartIndicator(RestartIndicator):
    """Restart at the first release more than ``period_seconds`` after the last restart (or the
    start).  The state is the time of the last restart; ``clock`` (default ``time.time``) is the
    time source (tests pass a fake one)."""

    def __init__(self, period_seconds: float, clock: Callable[[], float] = time.time):
        if isinstance(period_seconds, bool) or not isinstance(period_seconds, (int, float)):
            raise TypeError(f"period_seconds must be a number, got {type(period_seconds).__name__}")
        if not (period_seconds > 0) or math.isinf(period_seconds):
            raise ValueError(f"Restart period_seconds should be larger than 0 and finite, got {period_seconds}")
        if not callable(clock):
            raise TypeError("clock must be a no-arg function returning seconds")
        self.period_seconds = float(period_seconds)
        self._clock = clock

    def initialize(self) -> float:
        return float(self._clock())

    def next(self, state: float) -> tuple[bool, float]:
        now = float(self._clock())
        if now - float(state) > self.period_seconds:
            return True, now
        return False, float(state)


@attrs.frozen
class RestartGlobalState:
    """The inner query's global state and the indicator's state."""

    inner_query_state: Any
    indicator_state: Any


class RestartQuery(DPQuery):
    """``inner_query`` whose state is reset (``inner_query.reset_state``) whenever
    ``restart_indicator`` says so, right after a release.

    :meth:`get_noised_result` returns the inner query's ``(result, event)`` unchanged, with the
    new global state after the optional restart; accumulation is the inner query's.
    """

    def __init__(self, inner_query: DPQuery, restart_indicator: RestartIndicator):
        if not isinstance(inner_query, DPQuery):
            raise TypeError(f"inner_query must be a DPQuery, got {type(inner_query).__name__}")
        if not callable(getattr(inner_query, "reset_state", None)):
            raise ValueError(f"{type(inner_query).__name__} must define `reset_state` to be composed with `RestartQuery`.")
        if not isinstance(restart_indicator, RestartIndicator):
            raise TypeError(f"restart_indicator must be a RestartIndicator, got {type(restart_indicator).__name__}")
        self._inner_query = inner_query
        self._restart_indicator = restart_indicator

    @property
    def inner_query(self) -> DPQuery:
        return self._inner_query

    @property
    def restart_indicator(self) -> RestartIndicator:
        return self._restart_indicator

    def initial_global_state(self) -> RestartGlobalState:
        return RestartGlobalState(self._inner_query.initial_global_state(), self._restart_indicator.initialize())

    def derive_sample_params(self, global_state: RestartGlobalState):
        return self._inner_query.derive_sample_params(global_state.inner_query_state)

    def derive_metrics(self, global_state: RestartGlobalState) -> dict[str, float]:
        return self._inner_query.derive_metrics(global_state.inner_query_state)

    def initial_sample_state(self, template):
        return self._inner_query.initial_sample_state(template)

    def preprocess_record(self, params, record):
        return self._inner_query.preprocess_record(params, record)

    def preprocess_records(self, params, batch):
        return self._inner_query.preprocess_records(params, batch)

    def accumulate_preprocessed_record(self, sample_state, preprocessed_record):
        return self._inner_query.accumulate_preprocessed_record(sample_state, preprocessed_record)

    def accumulate_preprocessed_records(self, sample_state, preprocessed_batch):
        return self._inner_query.accumulate_preprocessed_records(sample_state, preprocessed_batch)

    def accumulate_records(self, params, sample_state, batch):
        return self._inner_query.accumulate_records(params, sample_state, batch)

    def accumulate_records_by_norm(self, params, sample_state, norms, weighted_sum):
        return self._inner_query.accumulate_records_by_norm(params, sample_state, norms, weighted_sum)

    def merge_sample_states(self, sample_state_1, sample_state_2):
        return self._inner_query.merge_sample_states(sample_state_1, sample_state_2)

    def get_noised_result(self, sample_state, global_state: RestartGlobalState) -> tuple[Any, RestartGlobalState, DpEvent]:
        result, inner_state, event = self._inner_query.get_noised_result(sample_state, global_state.inner_query_state)
        flag, indicator_state = self._restart_indicator.next(global_state.indicator_state)
        if flag:
            inner_state = self._inner_query.reset_state(result, inner_state)
        return result, RestartGlobalState(inner_state, indicator_state), event

    def reset_state(self, noised_results, global_state: RestartGlobalState) -> RestartGlobalState:
        """Restart the inner query now (the indicator's schedule is kept)."""
        inner = self._inner_query.reset_state(noised_results, global_state.inner_query_state)
        return RestartGlobalState(inner, global_state.indicator_state)
