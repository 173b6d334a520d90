"""Private steps on FSDP2 models (``torch.distributed.fsdp.fully_shard``): global norms, one
reduction of the clipped sums, each rank noising only its own shard.

With ``W`` ranks and a model whose trainable parameters are all sharded by ``fully_shard``
(``DTensor`` parameters, ``Shard(d)`` on a 1-D mesh), one logical step is::

    plan: one all-reduce (MAX) of [physical chunks, needs a whole-model step, NaN/inf in a shard,
          bucket_bytes and defers_sums as (x, -x): the same on every rank]
    per unit: FSDP2 all-gathers each unit for its forward (and backward) and frees it after
      (whole model instead: every unit unsharded once when the step begins, see below)
    g_i, ||g_i||   per example of the rank's local batch (ghost engine; any engine when whole-model)
    after each physical slot, per bucket of parameters (sharded_release.py), the sums formed only now:
      S_r  = sum_{i in slot} clip_C(g_i)                   the bucket's parameters, local
      S[s] += (sum_r S_r)[shard s]                         one reduce-scatter (rank-major buffer)
    S[s] += N(0, (sigma C)^2 I)                            rank s noises its own shard only
    one all-reduce of 5 counters (sensitive, examples, public passes, refusal, failure) and of
      9 W values fingerprinting the ranks' noise and sampling generators (refused if two are
      equal) and privacy settings (refused if two differ)
    released[s] = S[s] / D                                 on rank s
    reshard; p.grad = released[s] (a DTensor shard); optimizer.step() on the shards

(That is the path of the Gaussian sum/average queries.  A query with its own
``get_noised_result`` but a sample state of one tensor per parameter takes a general path: one
all-reduce of the sums, each rank releases its shard with ``query.get_noised_result`` (its own
noise), and a one-entry all-reduce of the ranks' budget/failure codes.)

What the hooks see (torch 2.13).  Data parallelism puts each example on exactly one rank, and that
rank runs the example's whole forward and backward with the layer's *unsharded* weight (FSDP2
all-gathers a unit's shards before its forward and, when it resharded after the forward, again
before its backward).  So the activations and output gradients the per-example engines capture
on rank ``r`` are full-width, and the per-example norm they compute there is already the norm of
the example's gradient over *all* shards: the "global norm over all shards" needs no
communication, and clipping is flat across the shards by construction.  (Summing per-example
squared norms across ranks would be wrong here: rank ``r``'s record ``j`` and rank ``s``'s record
``j`` are different examples.  The sum of squared per-shard norms is what the norm *is*; the tests
check it against the unsharded model on both paths.)  A forward hook registered after
``fully_shard`` runs after FSDP's post-forward hook: a unit that reshards after its forward then
holds its sharded ``DTensor`` parameter again (shape global, storage local); activations and
output gradients are plain full-width tensors either way.

Lockstep.  FSDP2's hooks all-gather in every forward and backward, so every rank must run exactly
the same sequence of forwards and backwards.  The DP engines do not by themselves: a rank with an
empty Poisson batch runs none, ranks split their batches into different numbers of physical
chunks, the independence probe and the batch-layout trace run extra forwards on the first batch
of an input signature (on the ranks that meet it), and a fallback engine may run others.  So
``fit_batch`` plans every step (:meth:`FSDPStep.lockstep`, one all-reduce of seven integers before
its ``zero_grad``): the ranks agree on the number of physical slots (the maximum of their chunk
counts) and on the path.

* **Per-unit** (the default, whenever every rank's engine says
  :meth:`~pytorch_privacy.optimizer.engines.GradientEngine.lockstep_ready` for its batch: the ghost
  engine once this input signature was verified and traced on that rank, while it has not handed
  the model to a fallback engine, and for models without raw parameters; and a zero-example pass
  that worked once, tried collective-free at the end of a whole-model step: a forward such as
  ``x.view(B, -1)`` fails on zero examples, and that signature then stays on whole-model steps,
  with a warning).  Each unit keeps its own
  ``reshard_after_forward`` / ``reshard_after_backward``, so FSDP2 gathers one unit at a time (the
  tests measure one unit's parameters at once, against all of them on the whole-model path).  Every
  rank runs one forward and one backward per slot: its own chunk, or a zero-example pass of the
  engine (:meth:`~pytorch_privacy.optimizer.engines.GradientEngine.lockstep_empty_pass`: the same
  hooks and all-gathers, no record) where it has no examples left.  Exactly one forward of the
  model per slot is enforced: a second one raises ``RuntimeError`` before its all-gather.  The
  engine's backward differentiates with respect to its taps, not the parameters, so FSDP's
  post-backward finds no gradient to reduce-scatter; the step's own reduce-scatter releases the
  noised sums as on the other path.  While the engine scans the model (until the model's forward
  begins), the modules show FSDP2's unsharded parameter objects (their storage is freed until
  their unit's all-gather): the same objects as in a whole-model step, so the cached verdicts and
  layouts apply and the ghost engine's check of parameter uses outside their modules still sees
  every use; from the forward on, a unit not gathered shows its ``DTensor`` shards, so a use
  outside its forward fails as in plain FSDP2 instead of reading freed storage.  The optimizer
  starts the step on full-shaped stand-ins (a broadcast zero each), and the NaN/inf check of the
  weights runs on each rank's shards inside the planning all-reduce (every rank refuses together).
* **Whole model** (any rank's engine would probe, trace or fall back; the functorch and loop
  engines, which differentiate through ``functional_call``: FSDP2's pre-forward hook re-registers
  its own unsharded parameter over the substituted one, and functorch forced onto per-unit steps
  trained to parameters other than one process's, silently; the multi-pass API, whose pass counts
  the optimizer cannot know; :class:`~.precision.DPLossScaler` steps): every unit is unsharded once
  when the step begins, for the multi-pass API at its first pass (``FSDPModule.unshard`` with
  ``reshard_after_forward`` and ``reshard_after_backward`` off; a ``zero_grad()`` alone gathers
  nothing, see :meth:`FSDPStep.begin_step`), every forward is collective-free, and the release reshards and
  restores the units' own settings.  The full parameters then live on every rank during that step.

A wrong path cannot be taken silently: the plan is one collective decision (any rank needing the
whole model sends every rank there), and a per-unit slot that does not run exactly one forward
stops that rank with a ``RuntimeError``.  As for any FSDP2 training, every rank's forward must
call the same units in the same order (data-dependent control flow that skips a unit on one rank
would desynchronise FSDP2 itself).  No per-example gradient of the full model is formed by the
ghost engine (norms by ghost contractions, sums by book-keeping), and the clipped sum ``S_r`` of
the whole model is never formed at once: the release forms, reduces and frees one bucket of
parameters at a time (:mod:`.sharded_release`).

Noise exactly once.  The shards are disjoint and cover every parameter element, so each rank adding
``N(0, (sigma C)^2)`` to each element of its own shard adds it to every element exactly once.  The
ranks' noise must be independent: identical generator states (a common seed) would give two
shards the same noise vector, a correlated (non-isotropic) Gaussian whose privacy loss is
unbounded along the difference of the correlated coordinates.  Every noisy step therefore carries,
in a collective it runs anyway, a 63-bit fingerprint of where each rank's generators stand before
its draws, and refuses on every rank, before anything is applied, when two are equal
(:meth:`~.fingerprints.RankChecks.refuse_shared_noise`): a common seed, or every rank restoring one
checkpoint.

Ledger and budget.  Every rank's query releases an event (the same one: the global state of a
Gaussian sum/average query does not change); rank 0 alone records it with the global ``q`` and
decides the budget; its decision reaches every rank (the counters' all-reduce) before anything is
applied, and a refusal is raised on every rank (the refused step's draws stay spent; no noised
shard has left its rank).  Queries whose
global state is updated from noised data (adaptive clipping) would diverge across ranks: their
sample states are not shaped like the parameters, and they are refused (use DDP for them).
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from ..engines.base import batch_size_of
from ..validation import nonfinite_weights
from ..step_accumulator import DeferredSums, in_place_release
from .ddp import DistributedStep, linear_release_divisor
from .precision import fp32_under_autocast
from .sharded_release import DEFAULT_BUCKET_BYTES, _chunks, reduce_scatter_sums, release_own_shards, scatter_release

__all__ = ["FSDPStep", "is_fsdp_model"]


@dataclass
class _Reduced:
    """What the slots of the current step reduce-scattered (see :meth:`FSDPStep.scatter_chunk`)."""

    #: the world's sums of this rank's shard, ``{name: tensor}``
    shards: dict
    #: whether this rank had a sensitive pass in any slot
    sensitive: bool
    #: bytes this rank handed to the collectives
    volume: int


def _fsdp_api():
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor, Shard

    return FSDPModule, DTensor, Shard


def is_fsdp_model(model: nn.Module) -> bool:
    """Whether ``model`` (or a submodule) was wrapped with ``torch.distributed.fsdp.fully_shard``
    (which needs an initialised process group: without one the answer is ``False`` at no cost)."""
    if not dist.is_available() or not dist.is_initialized():
        return False
    try:
        FSDPModule = _fsdp_api()[0]
    except ImportError:  # pragma: no cover - torch without FSDP2
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


class FSDPStep(DistributedStep):
    """The collective part of a private step on an FSDP2 model (used by
    :class:`~pytorch_privacy.optimizer.DPOptimizer` when its model holds ``fully_shard`` units).

    Args:
        model: the root module; every trainable parameter must be a ``DTensor`` sharded by
            ``fully_shard`` (``Shard(d)`` on one 1-D device mesh).
        per_unit: let ``fit_batch`` steps gather one unit at a time (FSDP2's own hooks) whenever
            every rank's engine can run in lockstep (see the module docstring); ``False``: every
            step unshards the whole model (more memory, no lockstep passes).  Settable later as the
            attribute of the same name, with the same value on every rank.

    Attributes as for :class:`~.ddp.DistributedStep`; :attr:`last_volume_bytes` counts the
    reduce-scattered buffers and the release's all-reduce of 5 counters and ``9 W`` fingerprint
    values (noise, settings, sampling), or for the general path the all-reduced flat buffer (with the
    ``6 W`` settings and sampling fingerprints) and the control all-reduce (its code and the ``3 W`` noise fingerprints; no release is
    broadcast: each rank keeps its shard); :attr:`last_plan_bytes` the planning all-reduce of
    ``fit_batch`` (7 int64); :attr:`last_path` which path the last step took.

    Between steps the units keep the ``reshard_after_forward`` / ``reshard_after_backward`` they
    were built with; a whole-model step switches both off for its duration and restores them."""

    def __init__(self, model: nn.Module, per_unit: bool = True):
        FSDPModule, DTensor, Shard = _fsdp_api()
        self.units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        self.model = model
        #: trainable sharded parameters by name: ``(param, shard dim)``
        self.sharded: dict[str, tuple[nn.Parameter, int]] = {}
        mesh = None
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if not isinstance(p, DTensor):
                raise ValueError(
                    f"parameter {name!r} is not sharded by fully_shard (a plain tensor next to FSDP2 units); apply "
                    "fully_shard to the root module too, so that every trainable parameter is a DTensor"
                )
            if p.device_mesh.ndim != 1 or len(p.placements) != 1 or type(p.placements[0]) is not Shard:
                raise ValueError(
                    f"parameter {name!r} has placements {p.placements} on a {p.device_mesh.ndim}-D mesh; only "
                    "FSDP2's Shard(d) on a 1-D mesh is supported (no HSDP, no tensor parallelism)"
                )
            if mesh is not None and p.device_mesh != mesh:
                raise ValueError("the FSDP2 units of the model live on different device meshes; use one mesh")
            mesh = p.device_mesh
            self.sharded[name] = (p, p.placements[0].dim)
        if mesh is None:
            raise ValueError("the FSDP2 model has no trainable parameters")
        super().__init__(mesh.get_group())
        self.mesh = mesh
        self.per_unit = bool(per_unit)
        self.bucket_bytes = DEFAULT_BUCKET_BYTES
        #: as for DDP (:attr:`~.ddp.DistributedStep.defers_sums`): the optimizer defers forming the
        #: clipped sums until the release reads them, one parameter at a time, and ``fit_batch``
        #: reduce-scatters them bucket by bucket after each physical slot; ``False``: the whole
        #: clipped sum is formed at each flush and reduce-scattered at the release (fewer
        #: collectives with several chunks, a model-sized buffer more); the same on every rank
        self.defers_sums = True
        #: the FSDP parameter groups and their own reshard settings (restored between steps);
        #: read from FSDP2's internals as of torch 2.13: where they differ, every step is whole-model
        try:
            self._groups = [(unit, g) for unit in self.units for g in unit._get_fsdp_state()._fsdp_param_groups]
            self._settings = [
                (unit._get_fsdp_state(), unit._get_fsdp_state()._auto_reshard_after_forward,
                 [(g, g.post_forward_mesh_info, g.reshard_after_backward) for g in unit._get_fsdp_state()._fsdp_param_groups])
                for unit in self.units
            ]
            self._internals = True
        except AttributeError:  # pragma: no cover - another torch's FSDP2
            self._groups, self._settings, self._internals = [], [], False
        #: the path :meth:`lockstep` chose for the step that ``zero_grad`` begins next
        self._planned: str | None = None
        #: the path the last step took: ``"per-unit"`` or ``"whole-model"`` (``None`` before one)
        self.last_path: str | None = None
        #: bytes of the step's planning all-reduce (7 int64 entries; every ``fit_batch``)
        self.last_plan_bytes = 0
        self._root_forwards = 0
        #: per (model, input) signature: did a zero-example pass work (tried on a whole-model step)
        self._empty_ok: dict[tuple, bool] = {}
        self._checked_state = False
        self._checked_dtypes = False
        #: what the slots of the current step reduced (``None`` before the first)
        self._reduced: _Reduced | None = None
        #: whether the whole model is unsharded for a step not yet ended
        self._whole_open = False
        #: whether a step begun by ``zero_grad`` unshards the whole model at its first pass
        self._whole_pending = False

    @property
    def bucket_bytes(self) -> int:
        """Bytes of clipped sums (and public gradients) per reduce-scatter, in the reduction's dtype
        (one parameter at least): a step holds one bucket's sums at a time (see
        :mod:`.sharded_release`).  32 MiB by default; set the same value on every rank."""
        return self._bucket_bytes

    @bucket_bytes.setter
    def bucket_bytes(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"bucket_bytes must be a positive int (bytes per reduce-scatter), got {value!r}")
        self._bucket_bytes = value

    # -- the step's lifecycle (DPOptimizer: fit_batch -> lockstep, zero_grad, _ensure_started, step) --
    def begin_step(self) -> None:
        """Start a step (``zero_grad``).  A step :meth:`lockstep` (``fit_batch``) planned just
        before takes its path: per-unit, or every unit unsharded now for the whole step (an
        all-gather on every rank).  Any other step (the multi-pass API, or a plain loop's
        ``zero_grad()`` before its own forward and ``fit_batch`` / ``make_private``'s ``step()``)
        unshards the whole model at its first pass (:meth:`gather_for_pass`), not here: a loop that
        only zeroes the gradients never holds the gathered model."""
        planned, self._planned = self._planned, None
        self._reduced = None
        if planned == "per-unit":
            self.last_path = planned
            return
        if planned == "whole-model":
            self._unshard_whole_model()
            return
        self._whole_pending = True

    def gather_for_pass(self) -> None:
        """Before a pass of the multi-pass API (or the step's start): unshard every unit for the
        step that ``zero_grad`` began, if it is not yet (see :meth:`begin_step`)."""
        if self._whole_pending:
            self._whole_pending = False
            self._unshard_whole_model()

    def _unshard_whole_model(self) -> None:
        self.last_path = "whole-model"
        self._whole_open = True
        for unit in self.units:  # kept unsharded until end_step (see the module docstring)
            unit.set_reshard_after_forward(False, recurse=False)
            unit.set_reshard_after_backward(False, recurse=False)
        for unit in self.units:
            unit.unshard()
        if self._checked_dtypes:
            return
        for name, full in self.model.named_parameters():
            p = self.sharded.get(name, (full,))[0]
            if full.dtype != p.dtype:
                raise ValueError(
                    f"FSDP2 unshards {name!r} to {full.dtype} but keeps it in {p.dtype}: a MixedPrecisionPolicy with "
                    "param_dtype is not supported (the clipped sums would be formed in that dtype); use "
                    "torch.autocast for mixed precision"
                )
        self._checked_dtypes = True

    def _restore_settings(self) -> None:
        """The units' own ``reshard_after_forward`` / ``reshard_after_backward`` (as the user set them)."""
        for state, auto, groups in self._settings:
            state._auto_reshard_after_forward = auto
            for g, post_forward, after_backward in groups:
                g.post_forward_mesh_info, g.reshard_after_backward = post_forward, after_backward

    def end_step(self) -> None:
        """Reshard every unit (frees the gathered parameters) and restore the units' settings."""
        self._whole_open = self._whole_pending = False
        for unit in self.units:
            unit.reshard()
        self._restore_settings()

    # -- per-unit steps ------------------------------------------------------------------
    def _fsdp_params(self) -> list:
        return [fp for _, g in self._groups for fp in g.fsdp_params]

    def _per_unit_possible(self) -> bool:
        # FSDP2 creates a unit's unsharded parameter objects at its first all-gather (a whole-model step)
        return self.per_unit and self._internals and self._checked_dtypes and all(
            getattr(fp, "_unsharded_param", None) is not None for fp in self._fsdp_params()
        )

    @contextlib.contextmanager
    def _unsharded_objects(self) -> Iterator[None]:
        """Modules hold FSDP2's unsharded parameter objects (storage freed until their unit's
        all-gather) instead of the sharded ``DTensor`` s, so that an engine's scan sees the same
        parameters as in a whole-model step (its cached verdicts, layouts and graph checks are
        keyed by them); afterwards every unit left sharded shows its shards again."""
        from torch.distributed.fsdp._fully_shard._fsdp_param import ShardedState

        params = self._fsdp_params()
        for fp in params:
            if fp.sharded_state == ShardedState.SHARDED:
                full, shard = fp._unsharded_param, fp.sharded_param
                if full.requires_grad != shard.requires_grad:
                    full.requires_grad_(shard.requires_grad)
                fp._setattr_on_modules(full)
        try:
            yield
        finally:
            self._show_shards()

    def _show_shards(self) -> None:
        """Every unit that is sharded now holds its sharded ``DTensor`` parameters on its modules."""
        from torch.distributed.fsdp._fully_shard._fsdp_param import ShardedState

        for fp in self._fsdp_params():
            if fp.sharded_state == ShardedState.SHARDED:
                fp._setattr_on_modules(fp.sharded_param)

    @contextlib.contextmanager
    def _stand_ins(self) -> Iterator[None]:
        """Modules hold full-shaped stand-ins (a broadcast zero: one element of storage) while the
        optimizer starts the step: its record template takes their shapes, dtypes and devices, and
        nothing is gathered (the finite-weights check was made on the shards, by :meth:`lockstep`)."""
        from torch.distributed.fsdp._fully_shard._fsdp_param import ShardedState

        params = [fp for fp in self._fsdp_params() if fp.sharded_state == ShardedState.SHARDED]
        for fp in params:
            shard = fp.sharded_param
            zero = torch.zeros((), dtype=shard.dtype, device=shard.device).expand(shard.shape)
            fp._setattr_on_modules(nn.Parameter(zero, requires_grad=shard.requires_grad))
        try:
            yield
        finally:
            for fp in params:
                fp._setattr_on_modules(fp.sharded_param)

    def _count_root_forward(self, module, args) -> None:
        """Root forward pre-hook (before FSDP's own): the units not gathered show their shards
        again (the unsharded objects of :meth:`_unsharded_objects` have no storage: a use outside
        the unit's forward then fails on a ``DTensor``, as in plain FSDP2, instead of reading freed
        memory); a second forward in one slot is refused."""
        self._show_shards()
        self._root_forwards += 1
        if self._root_forwards > 1:  # before FSDP's own pre-forward hook (prepend): no all-gather issued
            raise RuntimeError(
                "FSDP2 per-unit step: the engine ran a second forward of the model for one physical batch (a "
                "fallback or retry on this rank only), which would desynchronise the ranks' FSDP all-gathers. "
                "Train this model with whole-model unsharding: set optimizer.distributed_step.per_unit = False on every rank"
            )

    def _nonfinite_shards(self) -> list[str]:
        """Names of the parameters whose shard on this rank holds NaN/inf (the optimizer's screen,
        :func:`~pytorch_privacy.optimizer.validation.nonfinite_weights`, on the local shards)."""
        return nonfinite_weights({n: p.to_local() for n, (p, _) in self.sharded.items()})

    def lockstep(self, chunks: list, engine: Any, start: Callable[[], None], acc: Any = None) -> Iterator[tuple[Any, Any]]:
        """Plan a ``fit_batch`` step on every rank (collective: one all-reduce of 7 entries; called
        before the step's ``zero_grad``) and return the physical chunks to compute.

        The ranks agree on the number of physical chunks (the maximum over ranks), on whether any
        rank's engine would run a probe, trace or fallback forward for its batch (then the whole
        world unshards the whole model for this step, as :meth:`begin_step` does), and on whether
        any shard holds NaN/inf (``ValueError`` on every rank), and checks that :attr:`bucket_bytes`
        and :attr:`defers_sums` are the same on every rank (``ValueError`` on every rank).  With ``acc`` (the optimizer's
        :class:`~pytorch_privacy.optimizer.StepAccumulator`) and the built-in Gaussian queries,
        every rank reduce-scatters the slot's clipped sums after each slot (:meth:`scatter_chunk`).
        Per-unit: ``start()`` (the
        optimizer's step start) runs with stand-ins, and the returned generator yields this rank's
        chunks while running a zero-example pass of the engine (its forward and backward, FSDP's
        all-gathers included) in every slot where this rank has no examples; exactly one forward
        of the model per slot is enforced."""
        self._whole_pending = False  # the step's own zero_grad begins it
        if self._whole_open:
            # a pass of the multi-pass API before fit_batch left the whole model gathered: give it
            # back first (no collective), or a per-unit step would take its template from gathered
            # parameters whose storage FSDP2 then frees
            self.end_step()
        ok = self._per_unit_possible() and len(chunks) > 0
        key = None
        if ok:
            try:  # a failure here must not leave this rank out of the all-reduce below
                with self._unsharded_objects():
                    key = self._key(*chunks[0])
                    ok = bool(engine.lockstep_ready(*chunks[0])) and self._empty_ok.get(key) is True
            except Exception:  # noqa: BLE001 - the whole-model step computes the batch (and raises there)
                ok = False
        bad = self._nonfinite_shards()
        device = next(iter(self.sharded.values()))[0].device
        # the settings every rank must share ride along as (x, -x): after MAX they differ somewhere
        # unless max(x) == min(x)
        settings = {"bucket_bytes": self.bucket_bytes, "defers_sums": int(self.defers_sums)}
        plan = torch.tensor(
            [len(chunks), int(not ok), int(bool(bad))] + [v for x in settings.values() for v in (x, -x)],
            dtype=torch.long, device=device,
        )
        dist.all_reduce(plan, op=dist.ReduceOp.MAX, group=self.group)
        self.last_plan_bytes = plan.numel() * plan.element_size()
        values = [int(v) for v in plan.tolist()]
        slots, fallback, nonfinite = values[:3]
        differ = [k for i, k in enumerate(settings) if values[3 + 2 * i] != -values[4 + 2 * i]]
        if differ:
            raise ValueError(
                f"FSDP2: the ranks' distributed_step settings {differ} differ (this rank: "
                f"{ {k: settings[k] for k in differ} }); their collectives would not match. Set them to the same "
                "value on every rank"
            )
        if nonfinite:
            where = f"parameters {bad} hold" if bad else "another rank's shard of the parameters holds"
            raise ValueError(
                f"{where} NaN or inf values: training cannot continue from them. Restore the weights from a "
                "checkpoint and look for the cause (learning rate too large, a bad initialisation)"
            )
        self._planned = "whole-model" if fallback else "per-unit"
        scatter = (lambda: self.scatter_chunk(acc, start)) if self._scatters(acc) else (lambda: None)
        if fallback:  # begin_step (zero_grad, next) unshards the whole model
            return self._whole_model_chunks(chunks, slots, engine, scatter, key)
        return self._per_unit_slots(chunks, slots, engine, start, scatter)

    def _key(self, inputs: Any, targets: Any) -> tuple:
        from ..engines.probe import input_signature
        from ..engines.scan import scan_model

        return scan_model(self.model).signature, input_signature(inputs, targets)

    def _whole_model_chunks(self, chunks: list, slots: int, engine: Any, scatter: Callable[[], None], key: tuple | None):
        """This rank's chunks, and ``scatter()`` after each of the ``slots`` (also those where this
        rank has no chunk); then, once per input signature the engine is ready for, a trial
        zero-example pass while every unit is unsharded (no collective): per-unit steps for that
        signature need it to work on every rank (``x.view(B, -1)`` fails on zero examples).
        ``key``: the signature :meth:`lockstep` computed for the first chunk, if it did."""
        for slot in range(slots):
            if slot < len(chunks):
                yield chunks[slot]
            scatter()
        if not chunks:
            return
        key = self._key(*chunks[0]) if key is None else key
        if not self.per_unit or key in self._empty_ok or not engine.lockstep_ready(*chunks[0]):
            return
        self._root_forwards = 0
        handle = self.model.register_forward_pre_hook(self._count_root_forward, prepend=True)
        try:
            engine.lockstep_empty_pass(*(_empty_of(t) for t in chunks[0]))
            self._empty_ok[key] = self._root_forwards == 1
        except Exception as exc:  # noqa: BLE001 - any failure: this signature stays on whole-model steps
            self._empty_ok[key] = False
            warnings.warn(
                f"FSDP2: the model fails on a batch of zero examples ({type(exc).__name__}: {str(exc)[:160]}), which "
                "per-unit steps run on ranks without examples; steps with this input signature unshard the whole "
                "model instead (make the forward work for zero examples, e.g. x.flatten(1) for x.view(B, -1))",
                RuntimeWarning,
                stacklevel=3,
            )
        finally:
            handle.remove()
        if len(self._empty_ok) > 256:  # many signatures (variable lengths): keep the newest
            self._empty_ok.pop(next(iter(self._empty_ok)))

    def _per_unit_slots(self, chunks: list, slots: int, engine: Any, start: Callable[[], None], scatter: Callable[[], None]):
        self._restore_settings()
        with self._stand_ins():
            start()
        x0, y0 = chunks[0]
        empty = (_empty_of(x0), _empty_of(y0))
        handle = self.model.register_forward_pre_hook(self._count_root_forward, prepend=True)
        try:
            for slot in range(slots):
                self._root_forwards = 0
                cx, cy = chunks[slot] if slot < len(chunks) else empty
                if slot >= len(chunks) or batch_size_of(cx, cy) == 0:  # no examples here: the passes for the others
                    with self._unsharded_objects():
                        engine.lockstep_empty_pass(cx, cy)
                if slot < len(chunks):
                    with self._unsharded_objects():  # the engine scans the parameters of a whole-model step
                        yield cx, cy
                if self._root_forwards != 1:
                    raise RuntimeError(
                        f"FSDP2 per-unit step: {self._root_forwards} forwards of the model in physical slot {slot} "
                        "instead of one; the ranks' FSDP all-gathers no longer match. Train this model with "
                        "whole-model unsharding: set optimizer.distributed_step.per_unit = False on every rank"
                    )
                scatter()
        finally:
            handle.remove()

    # -- the clipped sums, reduced slot by slot (sharded_release.py) ---------------------------
    def _scatters(self, acc: Any) -> bool:
        """Whether ``fit_batch`` reduce-scatters after each slot: the optimizer defers the sums
        (``defers_sums``) of a built-in Gaussian sum/average query (the same on every rank)."""
        return acc is not None and self.defers_sums and in_place_release(acc.query)

    def scatter_chunk(self, acc: Any, start: Callable[[], None]) -> None:
        """After a physical slot (every rank, collective): reduce-scatter the clipped sums
        accumulated since the last call (zeros where this rank had no examples), one bucket at a
        time, and add this rank's shards to the step's; the accumulator's sums are consumed."""
        if not acc.started:  # no chunk on this rank yet: the step's template all the same
            start()
        with torch.no_grad(), fp32_under_autocast():  # the sums in fp32 (this runs inside the user's autocast)
            acc.flush()
            state, acc.sample_state = acc.sample_state, None
            into = None if self._reduced is None else self._reduced.shards  # added bucket by bucket as they arrive
            shards, _, volume = reduce_scatter_sums(self, acc.template, state, None, into=into)
        if self._reduced is None:
            self._reduced = _Reduced(shards, state is not None, volume)
            return
        self._reduced.sensitive = self._reduced.sensitive or state is not None
        self._reduced.volume += volume

    def take_reduced(self) -> _Reduced | None:
        """What :meth:`scatter_chunk` reduced in the current step, or ``None``; forgotten here."""
        reduced, self._reduced = self._reduced, None
        return reduced

    def release_params(self, params: dict[str, nn.Parameter]) -> dict[str, nn.Parameter]:
        """The sharded parameters (the optimizer's) under the names of ``params``."""
        return {n: self.sharded[n][0] if n in self.sharded else p for n, p in params.items()}

    # -- checks --------------------------------------------------------------------------
    def _check_state(self, acc, state=None) -> None:
        if self._checked_state:
            return
        state, template = acc.sample_state if state is None else state, acc.template
        if isinstance(state, DeferredSums):  # the built-in Gaussian route: one sum per parameter by construction
            return
        if not (
            isinstance(state, dict)
            and set(state) == set(template)
            and all(isinstance(state[n], torch.Tensor) and state[n].shape == template[n].shape for n in template)
        ):
            raise ValueError(
                f"under FSDP2 each rank noises its own shard of the sums, which needs a query whose sample state is "
                f"one tensor per parameter (Gaussian sum/average); {type(acc.query).__name__} keeps other state "
                "(e.g. adaptive clipping's noised count), whose release would differ across ranks. Use DDP for it"
            )
        self._checked_state = True

    # -- release -------------------------------------------------------------------------
    def _shard(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for n, t in tensors.items():
            p, d = self.sharded[n]
            local = _chunks(t, self.world_size, d)[self.rank]
            out[n] = local.contiguous()
        return out

    def _as_dtensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        DTensor = _fsdp_api()[1]
        out = {}
        for n, t in tensors.items():
            p, _ = self.sharded[n]
            out[n] = DTensor.from_local(
                t.to(p.dtype), p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
            )
        return out

    def finish(
        self, acc, global_state: Any, local_examples: int, check: Callable[[Any], None] | None = None
    ) -> tuple[Any, Any, Any]:
        """All-reduce the clipped sums (and public gradients, counters) once, keep this rank's
        shard, noise it with this rank's query, let rank 0 decide the budget, reshard.

        Returns ``(result, new_global_state, event)`` with ``result`` (and the accumulator's public
        gradients) as ``DTensor`` shards of the sharded parameters."""
        self.last_noised_count = None
        self.last_result_owned = False
        try:
            acc.flush()
            divisor = linear_release_divisor(acc.query, global_state)
            if divisor is not None:  # Gaussian sum/average: the bucketed reduce-scatter, then noise
                return scatter_release(self, acc, global_state, local_examples, check, divisor)
            acc.settle()  # the general path reduces the whole sums at once
            reduced = self._reduce(acc, local_examples, global_state)
            if acc.public:
                acc.public = self._as_dtensors(self._shard(acc.public))
            if reduced is None:  # no rank took a sensitive pass
                return None, global_state, None
            self.last_volume_bytes = reduced[2]
            self._check_state(acc)
            acc.sample_state = self._shard(acc.sample_state)
            return release_own_shards(self, acc, global_state, check)
        finally:
            self.end_step()

def _empty_of(x: Any) -> Any:
    """``x`` with zero examples (every tensor leaf sliced to ``[:0]``)."""
    return torch.utils._pytree.tree_map(lambda t: t[:0] if isinstance(t, torch.Tensor) and t.dim() > 0 else t, x)


def setup_fsdp(model: nn.Module) -> FSDPStep | None:
    """An :class:`FSDPStep` for a model with ``fully_shard`` units, else ``None``."""
    return FSDPStep(model) if is_fsdp_model(model) else None
