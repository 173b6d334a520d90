r"""Privacy events of matrix-factorisation (MF) mechanisms, and the ledger's run grouper for them.

A :class:`~pytorch_privacy.dp_query.matrix_factorization_query.MatrixFactorizationQuery` adds the
correlated noise ``sigma C_clip (C^{-1} z)_t`` at step ``t``; the ledger records one
:class:`MatrixFactorizationStepEvent` per step (consecutive identical steps merge into one run).
The privacy of the run is that of the Gaussian mechanism on ``C G`` with sensitivity ``sens(C)``,
which depends on the whole run (its length and how often and how far apart one record takes
part), so :func:`group_matrix_factorization_runs` (registered with
:func:`~pytorch_privacy.dp_query.ledger_groupers.register_run_grouper`) turns the runs into one
whole-run event from the ledger's sampling settings:

==========================  =====================================================================
ledger sampling             whole-run event
==========================  =====================================================================
``"fixed_order"``           :class:`MatrixFactorizationReplaceOneEvent` with ``max_participation`` = epochs
                            ``ceil(T / s)`` and ``min_separation`` = ``s`` steps per epoch
                            (``N // batch_size``); replace-one
``"shuffle"``               a fresh order each epoch: ``max_participation`` = epochs,
                            ``min_separation`` = 1 (two epochs may use a record back to back);
                            replace-one
``"poisson"``               with ``partitions >= bands`` (banded sampling: the data split in
                            ``partitions`` groups, step ``t`` Poisson-samples group ``t mod p``):
                            :class:`AmplifiedBandedMatrixFactorizationEvent`, DP-SGD over
                            ``ceil(T / p)`` rounds at ``sigma / max column norm`` (Choquette-Choo et
                            al. 2023, "(Amplified) Banded Matrix Factorization", Sec. 4); with
                            ``partitions < bands``: **no amplification**, every step may hold the
                            record (``max_participation = T``, ``min_separation = 1``)
``"without_replacement"``   no amplification: ``max_participation = T``, ``min_separation = 1``;
                            replace-one
``"full"``                  every step holds every record: ``T`` participations, separation 1
==========================  =====================================================================

The sensitivity is exact for banded Toeplitz strategies with ``bands <= min_separation`` and for
small runs; otherwise it is an upper bound
(:func:`~pytorch_privacy.dp_query.matrix_factorization.strategy_sensitivity_squared`).  A step
with ``starts=1`` begins a fresh noise sequence (a new query): the runs between two starts are one
mechanism, and the mechanisms compose.

This module imports neither torch nor numpy (numpy is imported when a run is grouped).
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, ClassVar

import attrs

from .events import ADD_OR_REMOVE_ONE, REPLACE_ONE, ComposedEvent, DpEvent, SelfComposedEvent, _finite_nonneg, _to_float
from .ledger_groupers import loader_positions, participation, register_run_grouper, split_sequences

if TYPE_CHECKING:  # pragma: no cover
    from .ledger_schema import LedgerRun

__all__ = [
    "MatrixFactorizationStepEvent",
    "MatrixFactorizationEvent",
    "MatrixFactorizationReplaceOneEvent",
    "AmplifiedBandedMatrixFactorizationEvent",
    "group_matrix_factorization_runs",
]


def _check_flag(instance, attribute, value):  # noqa: ARG001
    if isinstance(value, bool) or value not in (0, 1):
        raise ValueError(f"{attribute.name} must be 0 or 1, got {value!r}")


def _check_pos_int(instance, attribute, value):  # noqa: ARG001
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{attribute.name} must be a positive integer, got {value!r}")


def _check_positive(instance, attribute, value):  # noqa: ARG001
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{attribute.name} must be finite and > 0, got {value!r}")


def _check_strategy(instance, attribute, value):  # noqa: ARG001
    if not isinstance(value, str):
        raise TypeError(f"strategy must be a JSON string (Strategy.to_json()), got {type(value).__name__}")
    try:
        spec = json.loads(value)
    except (ValueError, RecursionError):
        raise ValueError(f"strategy must be a strategy's JSON spec, got {value[:60]!r}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("type"), str):
        raise ValueError(f"strategy must be a JSON object with a 'type', got {value[:60]!r}")


def _check_prob(instance, attribute, value):  # noqa: ARG001
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{attribute.name} must be in [0, 1], got {value!r}")


@attrs.frozen
class MatrixFactorizationStepEvent(DpEvent):
    """One step of a matrix-factorisation query.

    Args:
        noise_multiplier: ``sigma``, the stddev of ``z`` over the clip norm (the noise of step ``t``
            is ``sigma C_clip (C^{-1} z)_t``).
        strategy: the strategy's canonical JSON (``Strategy.to_json()``).
        partitions: the loader cycles over this many disjoint groups of the data (banded sampling:
            step ``t`` samples group ``t mod partitions``); 1 for ordinary loaders.
        starts: 1 on the first step of a noise sequence (a fresh query), else 0.

    Not composable step by step: its privacy depends on the whole run (see the module docstring).
    """

    kind: ClassVar[str] = "mf_step"
    noise_multiplier: float = attrs.field(converter=_to_float, validator=_finite_nonneg("noise_multiplier"))
    strategy: str = attrs.field(validator=_check_strategy)
    partitions: int = attrs.field(default=1, validator=_check_pos_int)
    starts: int = attrs.field(default=0, validator=_check_flag)


@attrs.frozen
class MatrixFactorizationEvent(DpEvent):
    """A whole MF run: the Gaussian mechanism with L2 sensitivity ``sensitivity`` (in units of the clip
    norm, add-or-remove-one; doubled under replace-one) and noise stddev ``noise_multiplier``.

    ``steps``, ``max_participation`` and ``min_separation`` record the participation the sensitivity
    was computed for.  Either neighbouring relation applies (Poisson, full-batch and
    without-replacement loaders); :class:`MatrixFactorizationReplaceOneEvent` is the same run on a
    loader of fixed-size batches, accounted under replace-one only.
    """

    kind: ClassVar[str] = "matrix_factorization"
    noise_multiplier: float = attrs.field(converter=_to_float, validator=_finite_nonneg("noise_multiplier"))
    sensitivity: float = attrs.field(converter=_to_float, validator=_check_positive)
    steps: int = attrs.field(validator=_check_pos_int)
    max_participation: int = attrs.field(validator=_check_pos_int)
    min_separation: int = attrs.field(validator=_check_pos_int)


@attrs.frozen
class MatrixFactorizationReplaceOneEvent(MatrixFactorizationEvent):
    """:class:`MatrixFactorizationEvent` of a run on fixed-size batches (fixed order, shuffled,
    without replacement): its participation bound holds under replace-one neighbours only."""

    kind: ClassVar[str] = "matrix_factorization_replace_one"
    neighboring_relation: ClassVar[str] = REPLACE_ONE


@attrs.frozen
class AmplifiedBandedMatrixFactorizationEvent(DpEvent):
    """A banded MF run with banded Poisson sampling (Choquette-Choo et al. 2023, Sec. 4): as private
    as ``rounds`` steps of the Poisson-subsampled Gaussian with rate ``sampling_probability`` and
    noise multiplier ``noise_multiplier / column_norm``.  Neighbouring relation: add-or-remove-one.
    """

    kind: ClassVar[str] = "amplified_banded_mf"
    neighboring_relation: ClassVar[str] = ADD_OR_REMOVE_ONE
    noise_multiplier: float = attrs.field(converter=_to_float, validator=_finite_nonneg("noise_multiplier"))
    column_norm: float = attrs.field(converter=_to_float, validator=_check_positive)
    sampling_probability: float = attrs.field(converter=_to_float, validator=_check_prob)
    rounds: int = attrs.field(validator=_check_pos_int)


# -- the run grouper ----------------------------------------------------------------------------
def _settings(r: "LedgerRun") -> tuple:
    e = r.event
    return (r.population_size, r.sampling, r.selection_probability, r.batch_size, e.noise_multiplier, e.strategy, e.partitions)


def _whole_run_event(parts: list[tuple["LedgerRun", int]], start: int = 0, span: int | None = None) -> DpEvent:
    from .matrix_factorization import max_column_norm, strategy_from_spec, strategy_sensitivity_squared

    first = parts[0][0]
    for r, _ in parts[1:]:
        if _settings(r) != _settings(first):
            raise ValueError(
                "a matrix-factorisation noise sequence changed its sampling, noise multiplier, strategy or "
                f"partitions mid-run ({_settings(first)[:4]} -> {_settings(r)[:4]}); the noise stays correlated, "
                "so start a new MatrixFactorizationQuery (starts=1) when changing any of them"
            )
    ev: MatrixFactorizationStepEvent = first.event
    steps = sum(n for _, n in parts)
    strategy = strategy_from_spec(ev.strategy)
    strategy.check_steps(steps)
    sigma = ev.noise_multiplier
    if first.sampling == "poisson" and strategy.bands is not None and strategy.bands <= ev.partitions:
        col = max_column_norm(strategy, steps)
        rounds = -(-steps // ev.partitions)
        return AmplifiedBandedMatrixFactorizationEvent(sigma, col, first.selection_probability, rounds)
    cls = MatrixFactorizationReplaceOneEvent
    span = steps if span is None else span
    k, sep = participation(first.sampling, first.population_size, first.batch_size, start, span, steps)
    if first.sampling not in ("fixed_order", "shuffle", "without_replacement"):
        cls = MatrixFactorizationEvent  # full batches or Poisson without banded sampling: either relation
    sens2, _how = strategy_sensitivity_squared(strategy, steps, k, sep)
    return cls(sigma, math.sqrt(sens2), steps, min(k, steps), sep)


@register_run_grouper(MatrixFactorizationStepEvent)
def group_matrix_factorization_runs(runs: tuple["LedgerRun", ...], positions: tuple[int, ...] | None = None) -> DpEvent:
    """The run grouper of :class:`MatrixFactorizationStepEvent` (see the module docstring): one
    whole-run event per noise sequence, composed."""
    if positions is None:  # runs alone: taken as consecutive steps of one loader
        positions = tuple(loader_positions(runs))
    events: list[DpEvent] = []
    for parts, repeats, start, span in split_sequences(runs, positions, lambda e: bool(e.starts)):
        # (`repeats` one-step sequences each hold a record at most once, wherever they sit)
        one = _whole_run_event(parts, start, span)
        events.append(one if repeats == 1 else SelfComposedEvent(one, repeats))
    return events[0] if len(events) == 1 else ComposedEvent(tuple(events))
