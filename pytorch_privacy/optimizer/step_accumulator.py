"""One private step, accumulated over backward passes and physical chunks.

:class:`StepAccumulator` is the engine room of :class:`~pytorch_privacy.optimizer.DPOptimizer`:
it holds the per-example gradients of the *pending* passes of one step, clips them with the
query, merges the partial sums of several physical chunks, and releases the noised result once.
It can be used directly by custom training loops; the optimizer only adds parameters, ledger,
budget and metrics around it.

Vocabulary
----------
* A **record** is one example (or one microbatch, see below): the unit whose contribution is
  clipped to ``C``.
* A **pass** is one backward computation over a batch: ``sensitive`` (private data; per-example
  gradients are clipped and noised) or ``public`` (data that carries no privacy cost, e.g. the
  generator's fake samples in a GAN; its plain mean gradient is added unclipped and unnoised).
* A **flush** (:meth:`StepAccumulator.flush`) closes a group of passes over *the same records*
  (one physical chunk) and accumulates them into the step's sample state with
  ``merge_sample_states``.  The step's noise is drawn once, by :meth:`StepAccumulator.finish`.

Several sensitive passes per step
---------------------------------
Let ``g_{i,p}`` be record ``i``'s gradient in sensitive pass ``p = 1..k`` of a flush.

``pass_clipping="joint"`` (mode A, default)
    one record is the *sum over passes*: ``r_i = clip_C(sum_p g_{i,p})``.  The sensitivity of
    ``sum_i r_i`` is ``C`` (one example is one record), so the query, its noise and its ledger
    event are exactly those of a single pass.  All sensitive passes of a flush must have the same
    records in the same order (same number of records).

``pass_clipping="per_pass"`` (mode B)
    every pass is clipped separately: record ``i`` contributes ``sum_p clip_C(g_{i,p})``, whose
    L2 norm is at most ``k*C``.  The noise is scaled by ``k`` so that the ledger event stays the
    query's own event, exactly: the accumulator feeds the query the records
    ``sum_p clip_C(g_{i,p}) / k`` (norm <= ``C``, so the query's sensitivity ``C`` holds) and
    multiplies the released result by ``k`` (post-processing)::

        released = k * (sum_i sum_p clip_C(g_{i,p}) / k + N(0, (sigma C)^2 I))
                 = sum_i sum_p clip_C(g_{i,p}) + N(0, (k sigma C)^2 I)

    i.e. noise stddev ``sigma * k * C`` for sensitivity ``k * C``: noise multiplier ``sigma``,
    which is what ``GaussianEvent(sigma)`` in the ledger says.  (The alternative, keeping the
    noise at ``sigma*C`` and recording ``GaussianEvent(sigma/k)``, is not done: the event would
    no longer be the query's.)  The passes need not have equal sizes (one example may appear in
    each pass at most once).  ``k`` must be the same for every flush of a step.  Mode B needs
    queries whose preprocessed records are clipped records (Gaussian sum / average queries);
    others are refused with a ``ValueError``.

Public passes add ``grad(mean_j loss_j)`` over their batch to the released result.

Non-finite gradients
--------------------
A record whose gradient norm is NaN or infinite is **dropped**: its clip coefficient and its
row are set to zero before accumulation, so it contributes nothing (exactly like a record of
zero norm).  This is a per-record transformation, so the sensitivity and the ledger are
unchanged, and it runs on the device without a host synchronisation.  The step still happens
(noise is added, the ledger counts it).  The number of dropped records is kept as a device
tensor (:attr:`StepAccumulator.dropped`).  A public pass with a non-finite gradient is dropped
as a whole.  Materialised gradients are zeroed row-wise here; engines that keep gradients
implicit (ghost norms) must give exact zeros for records with coefficient 0 (their contract);
on the CPU, where the check costs no device sync, a batch with a dropped record takes the
materialised route instead (same value, so the branch reveals nothing).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..dp_query import pytree
from ..dp_query.delegating_query import DelegatingQuery
from ..dp_query.dp_query import DPQuery, SumAggregationDPQuery
from ..dp_query.gaussian_query import GaussianSumQuery
from ..dp_query.normalized_query import NormalizedQuery
from .engines.base import MaterializedGradients, PerExampleGradients, empty_gradients

__all__ = [
    "JOINT", "PER_PASS", "PASS_CLIPPING_MODES", "StepAccumulator", "DeferredSums", "EmptyGradients", "combine_gradients",
]

#: Mode A: sum each record's gradients over the sensitive passes, then clip once.
JOINT = "joint"
#: Mode B: clip each sensitive pass separately; noise scaled by the number of sensitive passes.
PER_PASS = "per_pass"
PASS_CLIPPING_MODES = (JOINT, PER_PASS)


def _row_mask(good: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return good.reshape((-1,) + (1,) * (like.dim() - 1))


class _FiniteRecords(PerExampleGradients):
    """View of a :class:`PerExampleGradients` in which non-finite records are zero.

    ``norms()`` reports ``+inf`` for a dropped record (so a norm-based query gives it clip
    coefficient ``C/inf = 0``); ``weighted_sum`` zeroes its coefficient, and for materialised
    gradients also its row (``0 * NaN`` would still be NaN).
    """

    def __init__(self, inner: PerExampleGradients, good: torch.Tensor | None = None):
        self._inner = inner
        self.names = tuple(inner.names)
        raw = inner.norms()
        finite = (raw - raw) == 0  # isfinite in two dispatched ops (x - x is 0 unless x is inf or NaN)
        self.good = finite if good is None else (good & finite)
        self._mat: dict[str, torch.Tensor] | None = None
        #: whether the mask lives on the CPU and no record was dropped (there the check costs no
        #: device sync; on accelerators: ``False``, records are masked without looking)
        self._all_good = self.good.device.type == "cpu" and bool(self.good.all())
        self._norms = raw if self._all_good else torch.where(self.good, raw, float("inf"))

    def all_good_on_cpu(self) -> bool:
        """``True`` when the mask lives on the CPU and no record was dropped."""
        return self._all_good

    @property
    def losses(self) -> torch.Tensor:
        return self._inner.losses

    @property
    def num_records(self) -> int:
        return self._inner.num_records

    def norms(self) -> torch.Tensor:
        return self._norms

    def weighted_sum(self, coefficients: torch.Tensor) -> dict[str, torch.Tensor]:
        if self._all_good:  # nothing dropped: the coefficients as they are, no masking
            return self._inner.weighted_sum_of_finite(coefficients)
        c = torch.where(self.good, coefficients, 0.0)
        if isinstance(self._inner, MaterializedGradients):
            return {
                n: torch.tensordot(c.to(g.dtype), torch.where(_row_mask(self.good, g), g, 0), dims=([0], [0]))
                for n, g in self._inner.materialize().items()
            }
        if self.good.device.type == "cpu":  # and a record was dropped (all_good_on_cpu)
            # a dropped record poisons an implicit weighted sum (0 * NaN = NaN): on the CPU the
            # check costs no device sync, so take the materialised route for this batch
            return {
                n: torch.tensordot(c.to(g.dtype), g, dims=([0], [0])) for n, g in self.materialize().items()
            }
        # on accelerators, engines that do not materialise must give exact zeros for records
        # with a zero coefficient (documented engine contract); checking would need a host sync
        return self._inner.weighted_sum(c)

    @property
    def streams_by_name(self) -> bool:  # type: ignore[override]
        return self._all_good and self._inner.streams_by_name

    def weighted_sum_of(self, coefficients: torch.Tensor, names, *, finite: bool = False) -> dict[str, torch.Tensor]:
        if self._all_good:  # nothing dropped: one parameter at a time, as the engine can
            return self._inner.weighted_sum_of(coefficients, names, finite=True)
        return super().weighted_sum_of(coefficients, names)  # masked: every sum, the others dropped

    def materialize(self) -> dict[str, torch.Tensor]:
        if self._mat is None:
            self._mat = {
                n: torch.where(_row_mask(self.good, g), g, 0) for n, g in self._inner.materialize().items()
            }
        return self._mat


def plain_gaussian_sum(query: DPQuery) -> GaussianSumQuery | None:
    """The :class:`~pytorch_privacy.dp_query.GaussianSumQuery` that accumulates for ``query`` when
    accumulating a batch onto a fresh sample state is exactly its
    :meth:`~pytorch_privacy.dp_query.GaussianSumQuery.sum_records_by_norm`: ``query`` is one, or
    a chain of :class:`~pytorch_privacy.dp_query.DelegatingQuery` wrappers (a normalised average,
    a ledger) that forward the sample state and the accumulation unchanged to one, and none of
    them overrides how the zero state is made or records are added.  ``None`` otherwise."""
    fwd = ("initial_sample_state", "accumulate_records_by_norm")
    while isinstance(query, DelegatingQuery):
        if any(getattr(type(query), m) is not getattr(DelegatingQuery, m) for m in fwd):
            return None
        query = query.inner_query
    if not isinstance(query, GaussianSumQuery):
        return None
    own = {
        "initial_sample_state": SumAggregationDPQuery,
        "accumulate_records_by_norm": GaussianSumQuery,
        "accumulate_preprocessed_record": GaussianSumQuery,
        "sum_records_by_norm": GaussianSumQuery,
    }
    if any(getattr(type(query), m) is not getattr(base, m) for m, base in own.items()):
        return None
    return query


def in_place_release(query: DPQuery) -> bool:
    """Whether ``query`` is the built-in :class:`~pytorch_privacy.dp_query.GaussianSumQuery`, or a
    :class:`~pytorch_privacy.dp_query.NormalizedQuery` of one, releasing and merging with their
    own methods (no subclass overrides them): then ``get_noised_result_in_place`` gives exactly
    ``get_noised_result``'s values in tensors the caller owns (:meth:`StepAccumulator.finish`)."""
    if isinstance(query, NormalizedQuery):
        for m in ("get_noised_result", "get_noised_result_in_place"):
            if getattr(type(query), m) is not getattr(NormalizedQuery, m):
                return False
        if type(query).merge_sample_states is not DelegatingQuery.merge_sample_states:
            return False
        query = query.numerator_query
    if not isinstance(query, GaussianSumQuery):
        return False
    own = ("get_noised_result", "get_noised_result_in_place", "merge_sample_states", "accumulate_preprocessed_record")
    return all(getattr(type(query), m) is getattr(GaussianSumQuery, m) for m in own)


class DeferredSums(Mapping):
    """A step's clipped sums, each formed when read: the sample state that
    :class:`StepAccumulator` keeps with ``begin(..., defer_sums=True)`` (the distributed steps:
    DDP forms each sum straight into its flat all-reduce buffer, FSDP2 reduce-scatters and frees
    one bucket of sums at a time, so that the clipped sum of the whole model never lies in memory
    beside the buffer, or at all).

    ``state[name]`` is ``base[name] + sum_r c_r g_r`` for that parameter: the last chunk's sum
    (``records.weighted_sum_of``) plus the earlier chunks' sums (``base``, a plain state, or
    ``None``), in the dtype ``0 + S`` would have on the template; each read forms it again, and
    :meth:`take` reads it and lets go of it.  Records that cannot form one parameter alone
    (``streams_by_name`` false: a batch with a dropped record, a wrapper engine) form every sum
    at the first read, each kept until taken.  :meth:`evaluate` forms the plain state at once."""

    def __init__(self, records: PerExampleGradients, coefficients: torch.Tensor, template: dict, base: dict | None):
        self._records, self._c, self._template, self._base = records, coefficients, template, base
        self._formed: dict[str, torch.Tensor] | None = None

    def _settle(self, name: str, s: torch.Tensor) -> torch.Tensor:
        t = self._template[name]
        if s.dtype != t.dtype:  # as 0 (of the template's dtype) + S
            s = s.to(torch.promote_types(s.dtype, t.dtype))
        return s if self._base is None else self._base[name] + s

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._template:
            raise KeyError(name)
        if not self._records.streams_by_name:
            if self._formed is None:
                self._formed = self._records.weighted_sum(self._c)
            return self._settle(name, self._formed[name])
        return self._settle(name, self._records.weighted_sum_of(self._c, (name,))[name])

    def take(self, name: str) -> torch.Tensor:
        """``self[name]``, after which nothing of ``name`` is held here any more (the earlier
        chunks' sum, or the sum formed with every other one)."""
        s = self[name]
        if self._base is not None:  # the base is this object's own (the state it replaced)
            self._base.pop(name)
        if self._formed is not None:
            self._formed.pop(name)
        return s

    def __iter__(self):
        return iter(self._template)

    def __len__(self) -> int:
        return len(self._template)

    def evaluate(self) -> dict[str, torch.Tensor]:
        """Every parameter's sum: the plain sample state."""
        full = self._records.weighted_sum(self._c)
        return {n: self._settle(n, full[n]) for n in self._template}


def EmptyGradients(params: dict[str, torch.Tensor]) -> PerExampleGradients:  # noqa: N802 - old class name
    """Per-example gradients of an empty batch: :func:`~.engines.base.empty_gradients` (kept under
    its old name)."""
    return empty_gradients(params)


def _materialize(pe: PerExampleGradients, why: str) -> dict[str, torch.Tensor]:
    try:
        return pe.materialize()
    except NotImplementedError as exc:
        raise ValueError(
            f"{why} needs per-example gradients in memory, but the gradient engine does not "
            f"materialise them ({exc}); use engine='functorch'"
        ) from exc


class StepAccumulator:
    """Accumulates one private step: pending passes -> clipped sums -> one noised release.

    Args:
        query: the query that clips, sums and noises (without a ledger wrapper; the optimizer
            records the ledger itself).
        pass_clipping: :data:`JOINT` (mode A) or :data:`PER_PASS` (mode B); see the module
            docstring for the exact definitions.
        collect_norms: keep the per-record norms of the step (for metrics).

    Use: :meth:`begin` (sample params and the record template), any number of
    :meth:`add_sensitive` / :meth:`add_public` and :meth:`flush`, then :meth:`finish`.
    """

    def __init__(self, query: DPQuery, pass_clipping: str = JOINT, *, collect_norms: bool = False):
        if pass_clipping not in PASS_CLIPPING_MODES:
            raise ValueError(f"pass_clipping must be one of {PASS_CLIPPING_MODES}, got {pass_clipping!r}")
        self.query = query
        self.pass_clipping = pass_clipping
        self.collect_norms = collect_norms
        #: whether ``query.accumulate_records_by_norm`` works (None: not tried yet)
        self.by_norm: bool | None = None
        #: device tensor: records dropped for non-finite gradients since construction
        self.dropped: torch.Tensor | None = None
        self.dropped_at_begin: torch.Tensor | None = None
        #: (query, its plain Gaussian sum or None), resolved once per query object
        self._plain: tuple[DPQuery, GaussianSumQuery | None] | None = None
        self.reset()

    # -- lifecycle -----------------------------------------------------------------------
    def reset(self) -> None:
        """Forget everything about the current step (pending passes, sums, public gradients)."""
        self.params: Any = None
        self.template: dict[str, torch.Tensor] | None = None
        self.sample_state: Any = None
        self.pending: list[PerExampleGradients] = []
        self.public: dict[str, torch.Tensor] = {}
        self.defer_sums = False
        self.num_public_passes = 0
        self.num_sensitive_passes = 0
        self.num_records = 0
        self.passes_per_flush: int | None = None
        self.norms: list[torch.Tensor] = []
        self.loss_sum: torch.Tensor | None = None
        self.loss_count = 0
        #: whether every chunk's sums are fresh tensors of ours (the plain Gaussian route)
        self._state_owned = True
        #: whether the last :meth:`finish` returned tensors the caller owns
        self.result_owned = False

    @property
    def started(self) -> bool:
        """Whether :meth:`begin` was called since the last :meth:`reset`."""
        return self.template is not None

    @property
    def has_passes(self) -> bool:
        """Whether any pass (sensitive or public) was added since :meth:`reset` (its sums may have
        been handed on since: FSDP2 reduce-scatters them after each physical slot)."""
        return bool(self.pending) or self.sample_state is not None or self.num_public_passes > 0 or self.num_sensitive_passes > 0

    def begin(self, global_state: Any, template: dict[str, torch.Tensor], *, defer_sums: bool = False) -> None:
        """Start a step: ``params = query.derive_sample_params(global_state)``; ``template`` is
        one zero-able tensor per trainable parameter (the record structure).

        ``defer_sums=True``: for the built-in Gaussian sum/average queries, the last chunk's
        clipped sums stay unformed (:class:`DeferredSums`) until the release reads them one
        parameter at a time (DDP's and FSDP2's releases); :meth:`settle` or :meth:`finish` forms
        them all."""
        self.params = self.query.derive_sample_params(global_state)
        self.template = dict(template)
        self.defer_sums = defer_sums
        #: :attr:`dropped` when the step began (a refused step restores it)
        self.dropped_at_begin = self.dropped

    def abandon(self) -> None:
        """Give up the current step (refused): its dropped-record count is undone, the rest forgotten."""
        self.dropped = self.dropped_at_begin
        self.reset()

    # -- adding passes -------------------------------------------------------------------
    def _check_names(self, names) -> None:
        if set(names) != set(self.template):
            raise ValueError(
                "gradients do not match the trainable parameters of this step: got "
                f"{sorted(names)}, expected {sorted(self.template)} (were parameters frozen or "
                "unfrozen in the middle of a step?)"
            )

    def add_sensitive(self, per_example: PerExampleGradients) -> None:
        """Add one sensitive pass (kept until the next :meth:`flush`)."""
        if not isinstance(per_example, PerExampleGradients):
            raise TypeError(f"expected PerExampleGradients, got {type(per_example).__name__}")
        self._check_names(per_example.names)
        self.pending.append(per_example)
        self.num_sensitive_passes += 1
        losses = per_example.losses
        if losses is not None and losses.numel():
            s = (losses.detach() if losses.requires_grad else losses).sum()
            self.loss_sum = s if self.loss_sum is None else self.loss_sum + s.to(self.loss_sum.device)
            self.loss_count += losses.numel()

    def add_public(self, grads: dict[str, torch.Tensor]) -> None:
        """Add one public pass: a plain gradient per parameter (missing names count as zero).

        The pass is dropped as a whole if any entry is non-finite (no host sync)."""
        unknown = set(grads) - set(self.template)
        if unknown:
            raise ValueError(f"public gradients for unknown or frozen parameters: {sorted(unknown)}")
        finite = None
        for g in grads.values():
            f = torch.isfinite(g).all()
            finite = f if finite is None else finite & f.to(finite.device)
        for n, g in grads.items():
            t = self.template[n]
            if tuple(g.shape) != tuple(t.shape):
                raise ValueError(f"public gradient for {n!r} has shape {tuple(g.shape)}, expected {tuple(t.shape)}")
            g = torch.where(finite.to(g.device), g, torch.zeros_like(g)).to(t.dtype)
            self.public[n] = g if n not in self.public else self.public[n] + g
        self.num_public_passes += 1

    # -- clipping and accumulation -------------------------------------------------------
    def _count_dropped(self, records: _FiniteRecords) -> None:
        if records.all_good_on_cpu() and self.dropped is not None:  # nothing to add
            return
        bad = (~records.good).sum()
        self.dropped = bad if self.dropped is None else self.dropped + bad.to(self.dropped.device)

    def _is_fresh_state(self, total: Any) -> bool:
        """Whether ``total`` is what adding it to the zero state would give: one tensor per
        template entry, of its shape, dtype and device (else the addition would promote or
        broadcast)."""
        if not pytree.is_flat_dict(total) or total.keys() != self.template.keys():
            return False
        for n, t in self.template.items():
            s = total[n]
            if s.shape != t.shape or s.dtype != t.dtype or s.device != t.device:
                return False
        return True

    def _accumulate(self, records: _FiniteRecords) -> Any:
        """Clip and sum one batch of records into a fresh sample state.

        Fast path: ``query.accumulate_records_by_norm(params, state, norms, weighted_sum)``;
        on ``NotImplementedError`` (remembered) ``query.accumulate_records(params, state,
        materialised_records)``.  For a plain Gaussian sum (:func:`plain_gaussian_sum`) the
        zero state is skipped: its clipped sum is the fresh state (``0 + S = S``), one pass over
        the parameters and one allocation fewer.
        """
        q = self.query
        if self._plain is None or self._plain[0] is not q:
            self._plain = (q, plain_gaussian_sum(q))
        gauss = self._plain[1]
        if gauss is not None and self.defer_sums and in_place_release(q):  # formed when the release reads them
            base = self.settle()
            return gauss.sum_records_by_norm(
                self.params, records.norms(), lambda c: DeferredSums(records, c, self.template, base)
            )
        if gauss is not None:
            total = gauss.sum_records_by_norm(self.params, records.norms(), records.weighted_sum)
            self.by_norm = True
            if self._is_fresh_state(total):  # the engine's fresh tensors, in a dict of our own
                return dict(total)
            return gauss.accumulate_preprocessed_record(gauss.initial_sample_state(self.template), total)
        self._state_owned = False
        state = q.initial_sample_state(self.template)
        if self.by_norm is not False:
            try:
                state = q.accumulate_records_by_norm(self.params, state, records.norms(), records.weighted_sum)
                self.by_norm = True
                return state
            except NotImplementedError:
                self.by_norm = False
        with pytree.records_known_finite():  # masked by _FiniteRecords: no host read of the norms
            return q.accumulate_records(self.params, state, _materialize(records, f"{type(q).__name__}"))

    def flush(self) -> None:
        """Clip the pending sensitive passes (all over the same records) and merge their sum
        into the step's sample state.  A no-op without pending passes."""
        if not self.pending:
            return
        passes, self.pending = self.pending, []
        k = len(passes)
        sizes = [pe.num_records for pe in passes]
        aligned = len(set(sizes)) == 1
        # a record non-finite in one pass is dropped from all of them (one pass: its own mask)
        good = None
        if aligned and k > 1:
            for pe in passes:
                f = torch.isfinite(pe.norms())
                good = f if good is None else good & f
        recs = [_FiniteRecords(pe, good) for pe in passes]
        if aligned:
            self._count_dropped(recs[0])
        else:
            for r in recs:
                self._count_dropped(r)

        if self.pass_clipping == PER_PASS:
            if self.passes_per_flush is None:
                self.passes_per_flush = k
            elif self.passes_per_flush != k:
                raise ValueError(
                    f"pass_clipping='per_pass' needs the same number of sensitive passes in every "
                    f"chunk of a step (the noise is scaled by it): got {k}, earlier {self.passes_per_flush}"
                )

        if k == 1:
            chunk_state = self._accumulate(recs[0])
            self._note(recs[0])
        elif self.pass_clipping == JOINT:
            if not aligned:
                raise ValueError(
                    "pass_clipping='joint' sums each record's gradients over the sensitive passes, so "
                    f"every sensitive pass of a chunk must cover the same records; got sizes {sizes}. "
                    "Call clip_and_accumulate() between passes over different records, or use "
                    "pass_clipping='per_pass'"
                )
            mats = [_materialize(r, "pass_clipping='joint' with several sensitive passes") for r in recs]
            combined = {n: sum(m[n] for m in mats[1:]) + mats[0][n] for n in mats[0]}
            joint = _FiniteRecords(MaterializedGradients(combined, recs[0].losses), recs[0].good)
            chunk_state = self._accumulate(joint)
            self._note(joint)
        else:  # PER_PASS, k > 1
            q = self.query
            self._state_owned = False
            chunk_state = q.initial_sample_state(self.template)
            for r in recs:
                mat = _materialize(r, "pass_clipping='per_pass' with several sensitive passes")
                with pytree.records_known_finite():  # masked by _FiniteRecords
                    pre = q.preprocess_records(self.params, mat)
                try:
                    pytree.check_same_structure(self.template, pre, batched=True)
                except (ValueError, TypeError) as exc:
                    raise ValueError(
                        f"pass_clipping='per_pass' needs a query whose preprocessed records are clipped "
                        f"gradients (a Gaussian sum/average query); {type(q).__name__} preprocesses records "
                        f"into another structure ({exc}). Use pass_clipping='joint'"
                    ) from None
                pre = pytree.tree_map(lambda t: t / k, pre)
                chunk_state = q.accumulate_preprocessed_records(chunk_state, pre)
                self._note(r)
        self.num_records += max(sizes) if aligned else sum(sizes)
        if isinstance(chunk_state, DeferredSums) or self.sample_state is None:  # (deferred: the earlier sums are its base)
            self.sample_state = chunk_state
        else:
            self.sample_state = self.query.merge_sample_states(self.settle(), chunk_state)

    def settle(self) -> Any:
        """The sample state with deferred sums (:class:`DeferredSums`) formed: a plain state."""
        if isinstance(self.sample_state, DeferredSums):
            self.sample_state = self.sample_state.evaluate()
        return self.sample_state

    def _note(self, records: _FiniteRecords) -> None:
        if self.collect_norms:
            self.norms.append(torch.where(records.good, records.norms(), torch.full_like(records.norms(), float("nan"))))

    # -- release -------------------------------------------------------------------------
    @property
    def noise_scale(self) -> int:
        """``k`` for mode B (the released sum is multiplied by it), else 1."""
        if self.pass_clipping == PER_PASS and self.passes_per_flush:
            return self.passes_per_flush
        return 1

    def finish(self, global_state: Any, *, in_place: bool = False) -> tuple[dict[str, torch.Tensor] | None, Any, Any]:
        """Flush, then ``query.get_noised_result`` once: ``(result, new_global_state, event)``.

        ``result`` is ``None`` (and ``event`` ``None``, global state unchanged) when the step had
        no sensitive pass.  Public gradients are *not* included (see :attr:`public`).  Nothing is
        committed here: the caller decides whether to release.

        ``in_place=True`` (the caller discards the sample state after this call): when the sums
        are fresh tensors of this step (the plain Gaussian route) and the query is one of
        :func:`in_place_release`, the noise and the division are applied where the sums lie (the
        same values) and :attr:`result_owned` is set: the result's tensors are the caller's.
        """
        self.flush()
        self.settle()
        self.result_owned = False
        if self.sample_state is None:
            return None, global_state, None
        if in_place and self._state_owned and self.noise_scale == 1 and in_place_release(self.query):
            result, new_global_state, event = self.query.get_noised_result_in_place(self.sample_state, global_state)
            self.sample_state, self.result_owned = None, True  # given up to the result
            return result, new_global_state, event
        result, new_global_state, event = self.query.get_noised_result(self.sample_state, global_state)
        k = self.noise_scale
        if k != 1:
            result = pytree.tree_map(lambda t: t * k, result)
        return result, new_global_state, event


def combine_gradients(
    private: dict[str, torch.Tensor] | None, public: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``private + public`` per parameter (either may lack a name)."""
    out = dict(private) if private is not None else {}
    for n, g in public.items():
        out[n] = g if n not in out else out[n] + g.to(out[n].dtype)
    return out

