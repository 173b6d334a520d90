"""Privacy-budget enforcement: refuse a step *before* it would exceed ``(epsilon, delta)``.

The spent budget is a function of the :class:`~pytorch_privacy.dp_query.PrivacyLedger` alone
(plus whatever the accountant held when it was given): after ``n`` recorded samples it is
``accountant.compose(ledger.to_event()).get_epsilon(target_delta)``.  Before step ``n+1`` the
optimizer asks :meth:`PrivacyBudget.check` with that step's event; the step is allowed iff

    epsilon(ledger + this step) <= target_epsilon

and otherwise :class:`PrivacyBudgetExceeded` is raised and nothing is released, recorded or
applied.  So the last step taken is exactly the last one whose cumulative epsilon is within
the target, and a resumed run (ledger restored from a checkpoint) continues the same account.
Several optimizers sharing one ledger (e.g. GAN discriminator phases) share one budget.

Cost: the accountant is kept composed up to the ledger's current length, and one step is
composed into a copy of it (``accountant.copy().compose(step_event)``), so a check costs one
composition and one ``get_epsilon``, independent of the number of steps so far.  For
``sampling="shuffle"`` ledgers, whose epoch structure depends on the order of steps, and for steps
whose event has a run grouper (tree aggregation, matrix factorisation: noise correlated across
steps, accounted per whole run by ``PrivacyLedger.to_event``), the whole ledger is recomposed into
a fresh accountant instead.
"""

from __future__ import annotations

import warnings

import math
from typing import Any

from ..dp_query.events import DpEvent
from ..dp_query.privacy_ledger import LedgerRun, PrivacyLedger

__all__ = ["PrivacyBudget", "PrivacyBudgetExceeded", "step_event"]


class PrivacyBudgetExceeded(RuntimeError):
    """Raised *before* a step whose release would make the cumulative epsilon exceed the target.

    Attributes: ``epsilon`` (what the refused step would have reached), ``target_epsilon``,
    ``target_delta`` and ``steps`` (samples recorded in the ledger, i.e. steps taken).
    """

    def __init__(self, message: str, *, epsilon: float, target_epsilon: float, target_delta: float, steps: int):
        super().__init__(message)
        self.epsilon = epsilon
        self.target_epsilon = target_epsilon
        self.target_delta = target_delta
        self.steps = steps


def step_event(ledger: PrivacyLedger, event: DpEvent) -> DpEvent:
    """The event of one sample running ``event`` under the ledger's *current* sampling settings,
    e.g. ``PoissonSampledEvent(q, event)`` (the same event the ledger will store for it)."""
    run = LedgerRun(
        count=1,
        population_size=ledger.population_size,
        sampling=ledger.sampling,
        selection_probability=ledger.selection_probability if ledger.sampling == "poisson" else None,
        batch_size=ledger.batch_size,
        event=event,
    )
    return run.sampled_event(1)


def _whole_ledger(ledger: PrivacyLedger, event: DpEvent) -> bool:
    """Whether one more step must be accounted by recomposing the whole ledger: shuffled epochs,
    and events with a run grouper (their privacy is not a per-step composition)."""
    from ..dp_query.ledger_groupers import run_grouper_for

    return ledger.sampling == "shuffle" or run_grouper_for(event) is not None


def _settings(ledger: PrivacyLedger) -> tuple:
    q = ledger.selection_probability if ledger.sampling == "poisson" else None
    return (ledger.population_size, ledger.sampling, q, ledger.batch_size)


class PrivacyBudget:
    """A target ``(target_epsilon, target_delta)`` enforced against a ledger with an accountant.

    Args:
        target_epsilon: the largest cumulative epsilon allowed (> 0), or ``None`` to only
            *monitor* epsilon (metrics) without refusing steps.
        target_delta: the delta at which epsilon is computed, in (0, 1).
        accountant: a :class:`~pytorch_privacy.analysis.PrivacyAccountant` (default: a fresh
            ``RdpAccountant()`` from :mod:`pytorch_privacy.analysis`, imported here, lazily).
            Anything it already composed counts as spent (e.g. earlier training phases); it is
            never modified (copies are composed).
        neighboring_relation: the relation of the default accountant: ``"add_or_remove_one"``
            (Poisson sampling) or ``"replace_one"`` (fixed-size batches: shuffling or sampling
            without replacement).  :class:`DPOptimizer` derives it from its ledger.

    ``epsilon(ledger)`` is the spent epsilon; ``check(ledger, event)`` raises
    :class:`PrivacyBudgetExceeded` if one more sample with query event ``event`` would exceed
    the target (``epsilon > target_epsilon``; equality is allowed).
    """

    def __init__(
        self,
        target_epsilon: float | None,
        target_delta: float,
        accountant: Any = None,
        *,
        neighboring_relation: str = "add_or_remove_one",
    ):
        if target_epsilon is not None:
            if isinstance(target_epsilon, bool) or not isinstance(target_epsilon, (int, float)):
                raise TypeError(f"target_epsilon must be a number or None, got {type(target_epsilon).__name__}")
            if not math.isfinite(target_epsilon) or target_epsilon <= 0:
                raise ValueError(f"target_epsilon must be finite and > 0, got {target_epsilon!r}")
            target_epsilon = float(target_epsilon)
        if isinstance(target_delta, bool) or not isinstance(target_delta, (int, float)):
            raise TypeError(f"target_delta must be a number in (0, 1), got {target_delta!r}")
        if not 0 < target_delta < 1:
            raise ValueError(f"target_delta must be in (0, 1), got {target_delta!r} (e.g. 1/N or smaller)")
        #: the default accountant refines its orders: a grid epsilon within the target decides fast
        self._grid_fast_path = accountant is None
        if accountant is None:
            try:
                from ..analysis import RdpAccountant
            except (ImportError, AttributeError) as exc:  # pragma: no cover - depends on the install
                raise ImportError(
                    "the default accountant (pytorch_privacy.analysis.RdpAccountant) is not available; "
                    "pass accountant=... explicitly"
                ) from exc
            # the calibration's accountant and conversion (exact RDP, order refined continuously):
            # one accountant per plan, so a run calibrated for epsilon may take every planned step
            accountant = RdpAccountant(neighboring_relation=neighboring_relation, refine=True)
        for meth in ("compose", "get_epsilon", "copy"):
            if not callable(getattr(accountant, meth, None)):
                raise TypeError(f"accountant must implement compose/get_epsilon/copy; {type(accountant).__name__} lacks {meth}")
        self.target_epsilon = target_epsilon
        self.target_delta = float(target_delta)
        self._base = accountant.copy()
        self._delta_checked: set[int] = set()
        self.reset()

    def check_delta(self, population_size: int, *, stacklevel: int = 3) -> None:
        """Warn (once per population size) when ``target_delta >= 1/N``."""
        if population_size not in self._delta_checked:
            self._delta_checked.add(population_size)
            from .consistency import check_target_delta

            check_target_delta(self.target_delta, population_size, stacklevel=stacklevel + 1)

    def reset(self) -> None:
        """Drop the cached composition (call after replacing a ledger's contents)."""
        self._cache: tuple | None = None  # (ledger, n_samples, accountant)
        self._pending: tuple | None = None  # (ledger, n_after, accountant_after, settings, event)

    # -- internals -----------------------------------------------------------------------
    def _from_scratch(self, ledger: PrivacyLedger):
        acc = self._base.copy()
        if len(ledger):
            acc.compose(ledger.to_event())
        return acc

    def _current(self, ledger: PrivacyLedger):
        n = len(ledger)
        c = self._cache
        if c is not None and c[0] is ledger and c[1] == n:
            return c[2]
        p = self._pending
        if p is not None and p[0] is ledger and p[1] == n and n > 0:
            last = ledger.last_run
            if (last.population_size, last.sampling, last.selection_probability, last.batch_size) == p[3] and (
                last.event == p[4]
            ):
                self._cache = (ledger, n, p[2])
                self._pending = None
                return p[2]
        acc = self._from_scratch(ledger)
        self._cache = (ledger, n, acc)
        self._pending = None
        return acc

    # -- public API ----------------------------------------------------------------------
    def epsilon(self, ledger: PrivacyLedger) -> float:
        """Epsilon spent so far (everything in ``ledger``, plus the accountant's prior content)."""
        if not isinstance(ledger, PrivacyLedger):
            raise TypeError(f"ledger must be a PrivacyLedger, got {type(ledger).__name__}")
        self.check_delta(ledger.population_size)
        return float(self._current(ledger).get_epsilon(self.target_delta))

    def epsilon_after(self, ledger: PrivacyLedger, event: DpEvent) -> float:
        """Epsilon after one more sample running ``event`` under the ledger's current settings."""
        if not isinstance(ledger, PrivacyLedger):
            raise TypeError(f"ledger must be a PrivacyLedger, got {type(ledger).__name__}")
        if not isinstance(event, DpEvent):
            raise TypeError(f"event must be a DpEvent, got {type(event).__name__}")
        self.check_delta(ledger.population_size)
        n = len(ledger)
        if _whole_ledger(ledger, event):
            tmp = PrivacyLedger.from_dict(ledger.to_dict())
            tmp.record_sample(event)
            acc = self._from_scratch(tmp)
        else:
            acc = self._current(ledger).copy()
            acc.compose(step_event(ledger, event))
        self._pending = (ledger, n + 1, acc, _settings(ledger), event)
        return float(acc.get_epsilon(self.target_delta))

    def check(self, ledger: PrivacyLedger, event: DpEvent) -> float:
        """Raise :class:`PrivacyBudgetExceeded` if one more sample with ``event`` would exceed
        ``target_epsilon``; else return the epsilon after it.  Never records anything.

        The decision is the accountant's (refined) epsilon against the target.  With the default
        accountant, while the grid epsilon (an upper bound: refinement only lowers it) is already
        within the target, the step is allowed without refining: the same decision, about 50x
        cheaper per step (0.05 ms against 2.6 ms)."""
        if self.target_epsilon is not None and self._grid_fast_path and not _whole_ledger(ledger, event):
            from ..analysis.conversion import get_privacy_spent

            self.check_delta(ledger.population_size)
            acc = self._current(ledger).copy()
            acc.compose(step_event(ledger, event))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                grid = float(get_privacy_spent(acc.orders, acc.rdp, target_delta=self.target_delta)[0])
            if grid <= self.target_epsilon:
                self._pending = (ledger, len(ledger) + 1, acc, _settings(ledger), event)
                return grid
        eps = self.epsilon_after(ledger, event)
        if self.target_epsilon is not None and not eps <= self.target_epsilon:
            raise PrivacyBudgetExceeded(
                f"privacy budget exhausted: step {len(ledger) + 1} would bring epsilon to {eps:.6g} > "
                f"target_epsilon={self.target_epsilon:g} at delta={self.target_delta:g}. The step was "
                "refused before anything was released; stop training (or plan a larger budget).",
                epsilon=eps,
                target_epsilon=self.target_epsilon,
                target_delta=self.target_delta,
                steps=len(ledger),
            )
        return eps

    def __repr__(self) -> str:
        return (
            f"PrivacyBudget(target_epsilon={self.target_epsilon!r}, target_delta={self.target_delta!r}, "
            f"accountant={type(self._base).__name__})"
        )

