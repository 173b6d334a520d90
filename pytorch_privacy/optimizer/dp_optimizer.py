"""Private training: :class:`DPOptimizer` wraps any ``torch.optim.Optimizer`` around a DP query.

One private step (DP-SGD, Abadi et al. 2016, in the query formulation of TF Privacy)::

    g_i      = grad_theta loss(model(x_i), y_i)              per record i of the logical batch
    clipped  = sum_i g_i * min(1, C / ||g_i||)                 (query: clip and sum)
    released = (clipped + N(0, (sigma C)^2 I)) / D             (query: noise and normalise)
    p.grad   = released[p];  optimizer.step()

``D`` is a public constant (the *expected* batch size ``q*N`` under Poisson sampling, or the
expected number of microbatches), never the realised batch size: the latter depends on the
private data.  ``||g_i||`` is the L2 norm over all trainable parameters together.

The wrapper is a ``torch.optim.Optimizer`` whose ``param_groups``, ``state`` and ``defaults``
are those of the wrapped optimizer, so LR schedulers (``StepLR(dp_optimizer, ...)``) and code
that edits ``param_groups`` keep working.  Frozen parameters (``requires_grad=False``) are
neither differentiated nor noised; their ``.grad`` stays ``None``.
"""

from __future__ import annotations

import contextlib
import warnings
from collections import OrderedDict
from typing import Any, Callable

import torch
from torch import nn

from ..dp_query.dp_query import DPQuery
from ..dp_query.events import DpEvent
from ..dp_query.privacy_ledger import PrivacyLedger
from ..dp_query.randomness import RandomSource
from . import checkpoint, validation
from .budget import PrivacyBudget, PrivacyBudgetExceeded
from .checkpoint import STATE_DICT_FORMAT, STATE_DICT_VERSION, find_random_sources, restore_sources, snapshot_sources
from .consistency import SamplingMonitor
from .metrics import step_metrics
from .noise_reuse import NoiseReuseGuard
from .wiring import attach_ledger, check_optimizer_covers, check_wrapped_objects, make_budget
from .engines.scan import scan_model
from .engines.base import GradientEngine, MaterializedGradients, PerExampleGradients, batch_size_of, call_model
from .engines.base import empty_gradients, select_engine
from .layer_swap import swap_layers_for_optimizer
from .step_accumulator import JOINT, PASS_CLIPPING_MODES, StepAccumulator, combine_gradients
from .samplers import split_into_physical_batches
from .distributed.setup import setup_distributed
from .distributed.precision import fp32_under_autocast

__all__ = ["DPOptimizer", "STATE_DICT_FORMAT", "STATE_DICT_VERSION"]

LossFn = Callable[[Any, Any], torch.Tensor]


def check_pos_int(name: str, v) -> int | None:
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
        raise ValueError(f"{name} must be a positive integer or None, got {v!r}")
    return v


class DPOptimizer(torch.optim.Optimizer):
    """Differentially private wrapper of any ``torch.optim.Optimizer``.

    ``fit_batch(x, y)`` does one private step::

        per-example grads g_i (engine)  ->  query: clip, sum, noise, normalise  ->  p.grad
        -> optimizer.step()  ->  ledger records the step

    and returns the mean loss (a detached 0-dim tensor; it is computed from private data
    without noise, so it is for monitoring only).

    Args:
        optimizer: any ``torch.optim.Optimizer`` over (a subset of) ``model``'s parameters;
            param groups, per-group options and LR schedulers keep working on the wrapper.
        model: the ``nn.Module``; its parameters with ``requires_grad=True`` are trained.
        loss_fn: ``loss_fn(output, target) -> Tensor[B]``: *per-example* losses
            (``reduction='none'``).  A scalar loss is refused with a ``ValueError``.
        query: the :class:`~pytorch_privacy.dp_query.DPQuery` that clips, sums and noises the
            per-example gradients (records: ``dict[param_name, Tensor]``).  For an average use
            a :class:`~pytorch_privacy.dp_query.NormalizedQuery` with a public denominator.
        num_microbatches: TF Privacy microbatches: split each batch of ``B`` examples into this
            many consecutive groups (``B`` must be a multiple of it); one *record* is then the
            gradient of a group's mean loss, and it is what gets clipped.  See below.
        microbatch_size: the same with a fixed group size instead of a fixed count (suits
            Poisson batches whose size varies; ``B`` must be a multiple of it).
        max_physical_batch_size: split each logical batch of :meth:`fit_batch` into chunks of
            at most this many examples (memory); the privacy math is unchanged.
        engine: per-example gradient engine name, or ``"auto"`` (registry; see
            :mod:`pytorch_privacy.optimizer.engines`).  ``"auto"`` first swaps native
            ``nn.LSTM``/``GRU``/``RNN``/``MultiheadAttention`` layers for DP drop-ins computing
            the same function (announced; see :mod:`pytorch_privacy.optimizer.layer_swap`).  Or a
            factory ``(model, loss_fn) -> GradientEngine`` (a ``functools.partial`` of an engine).
        ledger: a :class:`~pytorch_privacy.dp_query.PrivacyLedger`; wraps ``query`` in a
            :class:`~pytorch_privacy.dp_query.QueryWithLedger` (don't pass one if ``query``
            already has a ledger).
        pass_clipping: ``"joint"`` (mode A) or ``"per_pass"`` (mode B) for steps with several
            sensitive passes (:mod:`pytorch_privacy.optimizer.step_accumulator`).
        target_epsilon, target_delta, accountant: budget enforcement
            (:mod:`pytorch_privacy.optimizer.budget`): a step that would bring the ledger's
            epsilon (at ``target_delta``) above ``target_epsilon`` raises
            :class:`~pytorch_privacy.optimizer.budget.PrivacyBudgetExceeded` *before* anything
            is released.  ``accountant`` defaults to ``RdpAccountant()``.  ``target_delta``
            with an accountant but no ``target_epsilon`` only monitors epsilon (metrics).
            Needs a ledger as the outermost query wrapper (the step's sampling comes from it).
        metrics: compute per-step metrics into :attr:`last_metrics` (costs host syncs; off by
            default, and then nothing is computed).
        metrics_callback: ``callback(metrics: dict)`` after every step (implies ``metrics``).
        validate: reject models with layers that mix examples (BatchNorm in training mode) up
            front, via :func:`pytorch_privacy.optimizer.validation.validate_model`.
        data_loader: the loader the batches come from (a
            :class:`~pytorch_privacy.optimizer.DPDataLoader`, or a shuffling ``DataLoader``).  It
            is the truth about sampling: without ``ledger`` the ledger is built from it; with one,
            their sampling must agree, and every step re-checks it
            (:mod:`pytorch_privacy.optimizer.consistency`).
        secure_mode: require every random source of the query to draw from the OS CSPRNG
            (:mod:`pytorch_privacy.dp_query.randomness`); ``ValueError`` otherwise.

    The ledger matches reality: a step whose batch exceeds the ledger's population is refused, and
    realised batch sizes implausible under the ledger's ``q`` raise a warning
    (:mod:`pytorch_privacy.optimizer.consistency`).  ``target_delta >= 1/N`` warns.

    Misuse stopped at the next step: trainable parameters added to the model after wrapping (and
    not given to the optimizer), batches on another device or of another floating dtype than the
    parameters, and NaN/inf already in a weight.  The finite-weights check costs one pass over the
    parameters; it runs every step for CPU parameters and every
    :data:`~pytorch_privacy.optimizer.validation.FINITE_CHECK_EVERY_ACCELERATOR` steps (one host
    sync) on accelerators.

    Microbatches.  With microbatches a record is a microbatch: the gradient of its mean loss is
    clipped to ``C``, so the query's sensitivity is still ``C`` for adding or removing one
    example *as long as one example changes only one microbatch*, and the average divides by
    the expected number of microbatches (``num_microbatches``, or ``q*N/microbatch_size``).
    Consecutive grouping of a batch satisfies this for replace-one neighbours of a fixed-size
    batch; with Poisson sampling, adding an example shifts later groups, so (as in TF Privacy)
    the per-example guarantee is stated for the microbatch partition as given.

    Several passes per step (GANs, several losses): :meth:`zero_grad`, any number of
    :meth:`backward_pass` (``sensitive=True`` or ``False``) or :meth:`accumulate_pass`, optional
    :meth:`clip_and_accumulate` between physical chunks, then :meth:`step`.  The ledger counts
    one sample per step with a sensitive pass; a step with only public passes releases nothing
    private and is not recorded.

    Non-finite gradients: a record whose gradient norm is NaN/inf is dropped (contributes zero;
    the step, its noise and its ledger entry are unchanged), without a host sync.  A warning is
    issued immediately for CPU tensors, and for CUDA tensors whenever metrics are computed or
    :attr:`dropped_records` is read.  Engines that do not materialise per-example gradients
    (ghost) must return exact zeros for records with a zero coefficient (the engine contract;
    the built-in ones do).  As a last resort against an engine that breaks it, non-finite entries
    of the final gradient are zeroed, so the model never becomes NaN.

    Checkpoints: :meth:`state_dict` / :meth:`load_state_dict` cover the wrapped optimizer, the
    query's configuration and global state (e.g. an adaptive clip), the state of every
    :class:`~pytorch_privacy.dp_query.randomness.RandomSource` of the query (restored exactly, so
    a resume continues the noise stream), the ledger, the step count and the ``data_loader``'s
    sampler.  A checkpoint of a differently configured query or of other sampling settings is
    refused (:mod:`pytorch_privacy.optimizer.checkpoint`).  The dict holds only tensors and plain
    Python containers, so ``torch.load(..., weights_only=True)`` reads it.

    Randomness: the query owns its generators, seeded from OS entropy unless a ``generator`` is
    given, never torch's global RNG (:mod:`pytorch_privacy.dp_query.randomness`).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module,
        loss_fn: LossFn,
        query: DPQuery,
        *,
        num_microbatches: int | None = None,
        microbatch_size: int | None = None,
        max_physical_batch_size: int | None = None,
        engine: str | Callable[..., GradientEngine] = "auto",
        ledger: PrivacyLedger | None = None,
        pass_clipping: str = JOINT,
        target_epsilon: float | None = None,
        target_delta: float | None = None,
        accountant: Any = None,
        metrics: bool = False,
        metrics_callback: Callable[[dict], None] | None = None,
        validate: bool = True,
        data_loader: Any = None,
        secure_mode: bool = False,
    ):
        self._init_optimizer_plumbing()

        check_wrapped_objects(optimizer, model, loss_fn, query, DPOptimizer)
        self.original_optimizer = optimizer
        # DistributedDataParallel: train its inner module; sums are reduced once per step (distributed/)
        model, self._dist = setup_distributed(model, data_loader)
        self.model = model
        self.loss_fn = loss_fn

        #: trainable parameters knowingly left out of the optimizer (warned about once, here)
        self._known_missing = check_optimizer_covers(optimizer, model, self._trainable())

        self._set_batching(num_microbatches, microbatch_size, max_physical_batch_size, pass_clipping)

        if validate:
            self._validate_model(model)
        if engine == "auto":  # fused LSTM/GRU/RNN/attention -> ghost-visible drop-ins (announced)
            swap_layers_for_optimizer(model, optimizer)
        self._engine_cls: Callable[..., GradientEngine] = select_engine(model, engine)
        self._engines: dict[Any, GradientEngine] = {}

        # ledger: the outermost QueryWithLedger is unwrapped and recorded by the optimizer itself,
        # so a step refused by the budget is never recorded
        self.query, self._release_query, self._ledger, self._records_ledger = attach_ledger(query, ledger, data_loader)
        self._budget: PrivacyBudget | None = make_budget(
            target_epsilon, target_delta, accountant, self._ledger, self._records_ledger
        )
        #: ties the real batches to the ledger's sampling (None without a ledger)
        self._consistency = SamplingMonitor(self._ledger, data_loader) if self._ledger is not None else None
        if data_loader is not None and self._consistency is None:
            raise ValueError("data_loader= needs a ledger to check; the query records into none")

        self._metrics_callback = metrics_callback
        self._metrics = bool(metrics) or metrics_callback is not None
        self._acc = StepAccumulator(self._release_query, pass_clipping, collect_norms=self._metrics)
        self._global_state = self._release_query.initial_global_state()
        self._random_sources: list[RandomSource] = find_random_sources(self.query)
        self.secure_mode = validation.check_secure_mode(secure_mode, self._random_sources)
        #: examples in the current step (fit_batch), for the batch-size plausibility test
        self._step_examples: int | None = None
        self._finite_checks = 0
        self._steps, self._run_id = 0, checkpoint.new_run_id()  # the run id: which run a checkpoint is of
        self._reuse_guard = NoiseReuseGuard()  # one process: a step repeating a released step's noise is refused
        #: trainable parameters when the current step began (see :meth:`_ensure_started`)
        self._step_params: dict[str, nn.Parameter] = {}
        self._last_event: DpEvent | None = None
        self._warned_dropped = 0
        self.last_metrics: dict[str, float] | None = None

    def _init_optimizer_plumbing(self) -> None:
        """Hooks and profiling plumbing of ``torch.optim.Optimizer`` (its ``__init__`` is not
        called: param_groups/state/defaults are the wrapped optimizer's)."""
        for kind in ("step", "state_dict", "load_state_dict"):  # _optimizer_{kind}_{pre,post}_hooks
            setattr(self, f"_optimizer_{kind}_pre_hooks", OrderedDict())
            setattr(self, f"_optimizer_{kind}_post_hooks", OrderedDict())
        self._patch_step_function()

    def _set_batching(self, num_microbatches, microbatch_size, max_physical_batch_size, pass_clipping) -> None:
        if num_microbatches is not None and microbatch_size is not None:
            raise ValueError("pass num_microbatches or microbatch_size, not both")
        self.num_microbatches = check_pos_int("num_microbatches", num_microbatches)
        self.microbatch_size = check_pos_int("microbatch_size", microbatch_size)
        self.max_physical_batch_size = check_pos_int("max_physical_batch_size", max_physical_batch_size)
        if pass_clipping not in PASS_CLIPPING_MODES:
            raise ValueError(f"pass_clipping must be one of {PASS_CLIPPING_MODES}, got {pass_clipping!r}")

    # -- torch.optim.Optimizer surface (forwarded) ---------------------------------------
    @property
    def param_groups(self) -> list[dict]:
        """The wrapped optimizer's param groups (the same list: edits apply to it)."""
        return self.original_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.original_optimizer.param_groups = value

    @property
    def state(self):
        """The wrapped optimizer's per-parameter state."""
        return self.original_optimizer.state

    @state.setter
    def state(self, value):
        self.original_optimizer.state = value

    @property
    def defaults(self) -> dict:
        """The wrapped optimizer's defaults."""
        return self.original_optimizer.defaults

    @defaults.setter
    def defaults(self, value):
        self.original_optimizer.defaults = value

    def add_param_group(self, param_group: dict) -> None:
        """Forwarded to the wrapped optimizer; the parameters must belong to ``model``."""
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        model_params = {id(p) for p in self.model.parameters()}
        if any(p.requires_grad and id(p) not in model_params for p in params):
            raise ValueError("add_param_group: parameters must belong to the wrapped model")
        self.original_optimizer.add_param_group(param_group)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(optimizer={type(self.original_optimizer).__name__}, "
            f"query={type(self._release_query).__name__}, ledger={self._ledger is not None}, steps={self._steps})"
        )

    # -- read-only views -----------------------------------------------------------------
    @property
    def ledger(self) -> PrivacyLedger | None:
        """The ledger the steps are recorded in (``None`` without one)."""
        return self._ledger

    @property
    def global_state(self) -> Any:
        """The query's current global state (e.g. the adaptive clip)."""
        return self._global_state

    @property
    def steps(self) -> int:
        """Optimizer steps taken through this wrapper."""
        return self._steps

    @property
    def distributed_step(self) -> Any:
        """The collective part of each step for a DDP or FSDP2 model (a :class:`~.distributed.DistributedStep`
        or :class:`~.distributed.FSDPStep`: e.g. ``opt.distributed_step.per_unit = False``); ``None`` in one process."""
        return self._dist

    @property
    def budget(self) -> PrivacyBudget | None:
        """The :class:`PrivacyBudget` enforced before each step (``None`` without one)."""
        return self._budget

    @property
    def epsilon(self) -> float:
        """Epsilon spent so far at ``target_delta`` (needs a budget/accountant)."""
        if self._budget is None:
            raise RuntimeError("no accountant attached: pass target_delta (and target_epsilon/accountant)")
        return self._budget.epsilon(self._ledger)

    @property
    def dropped_records(self) -> int:
        """Records dropped for non-finite gradients so far (host sync; warns about new ones)."""
        n = 0 if self._acc.dropped is None else int(self._acc.dropped)
        self._warn_dropped(n)
        return n

    # -- internals -----------------------------------------------------------------------
    def _trainable(self) -> dict[str, nn.Parameter]:
        return scan_model(self.model).trainable

    @staticmethod
    def _validate_model(model: nn.Module) -> None:
        validation.validate_model(model)

    def _engine(self, loss_fn: LossFn) -> GradientEngine:
        eng = self._engines.get(loss_fn)
        if eng is None:
            eng = self._engine_cls(self.model, loss_fn)
            self._engines[loss_fn] = eng
        return eng

    def _ensure_started(self) -> None:
        if self._dist is not None:  # FSDP2: the multi-pass step's whole-model unsharding, at its first pass
            self._dist.gather_for_pass()
        if not self._acc.started:
            params = self._trainable()
            if not params:
                raise ValueError("the model has no trainable parameters (all have requires_grad=False)")
            opt_ids = {id(p) for g in self.original_optimizer.param_groups for p in g["params"]}
            shown = params if self._dist is None else self._dist.release_params(params)  # FSDP2: the shards
            validation.check_no_new_parameters(shown, opt_ids, self._known_missing)
            self._check_finite_weights(params)
            self._step_params = params
            defer = self._dist is not None and self._dist.defers_sums  # sums formed per parameter at the release
            self._acc.begin(self._global_state, {n: p.detach() for n, p in params.items()}, defer_sums=defer)

    def _check_finite_weights(self, params: dict[str, nn.Parameter]) -> None:
        on_cpu = all(p.device.type == "cpu" for p in params.values())
        every = 1 if on_cpu else validation.FINITE_CHECK_EVERY_ACCELERATOR
        if self._finite_checks % every == 0:
            validation.check_finite_weights(params)
        self._finite_checks += 1

    def _microbatch_size_for(self, n: int) -> int | None:
        if self.num_microbatches is not None:
            k = self.num_microbatches if self._dist is None else self._dist.local_num_microbatches(self.num_microbatches)
            if n == 0:
                return None
            if n % k:
                raise ValueError(
                    f"batch size {n} is not a multiple of num_microbatches={self.num_microbatches}; use "
                    "batch sizes divisible by it, or microbatch_size=... for variable (Poisson) batch sizes"
                )
            return n // k
        if self.microbatch_size is not None and n % self.microbatch_size:
            raise ValueError(
                f"batch size {n} is not a multiple of microbatch_size={self.microbatch_size}"
            )
        return self.microbatch_size

    def _warn_dropped(self, n: int) -> None:
        if n > self._warned_dropped:
            warnings.warn(
                f"{n - self._warned_dropped} record(s) had non-finite (NaN/inf) gradients and were dropped "
                f"(they contribute zero to the step; {n} in total so far). Check the data and the loss.",
                RuntimeWarning,
                stacklevel=3,
            )
            self._warned_dropped = n

    # -- gradient computation ------------------------------------------------------------
    def per_example_gradients(
        self, inputs: Any, targets: Any, *, loss_fn: LossFn | None = None, microbatch_size: int | None = None
    ) -> PerExampleGradients:
        """Per-example (or per-microbatch) gradients of ``loss_fn(model(inputs), targets)`` for
        the trainable parameters, from the engine; an empty batch gives zero records.

        ``microbatch_size`` defaults to the optimizer's microbatch setting for this batch."""
        n = batch_size_of(inputs, targets)
        if self._consistency is not None:
            self._consistency.check_batch(n)
        if microbatch_size is None:
            microbatch_size = self._microbatch_size_for(n)
        if self._dist is not None:
            self._dist.gather_for_pass()
        if n == 0:
            return empty_gradients(self._trainable())
        validation.check_inputs_match(self._step_params or self._trainable(), inputs, targets)
        pe = self._engine(loss_fn or self.loss_fn).compute(inputs, targets, microbatch_size=microbatch_size)
        losses = pe.losses
        if losses is not None and losses.dim() == 0:
            raise ValueError(
                "loss_fn returned a scalar; DP-SGD needs per-example losses of shape [B] "
                "(e.g. nn.CrossEntropyLoss(reduction='none'))"
            )
        return pe

    def public_gradients(
        self, inputs: Any, targets: Any, *, loss_fn: LossFn | None = None
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Plain gradient of the *mean* loss over a public batch: ``(grads, per_example_losses)``.

        ``grads`` maps trainable parameter names to tensors (parameters the loss does not reach
        are absent).  Nothing is clipped or noised; only use it on data without privacy cost."""
        n = batch_size_of(inputs, targets)
        loss_fn = loss_fn or self.loss_fn
        if self._dist is not None:
            self._dist.gather_for_pass()
        params = self._trainable()
        if n == 0:
            return {}, torch.zeros(0, device=next(iter(params.values())).device)
        with torch.enable_grad():
            out = call_model(self.model, inputs)
            losses = loss_fn(out, targets)
            if not isinstance(losses, torch.Tensor) or losses.dim() == 0 or losses.shape[0] != n:
                raise ValueError(
                    "loss_fn must return per-example losses of shape [B] "
                    f"(B={n}), got {'a scalar' if isinstance(losses, torch.Tensor) and losses.dim() == 0 else getattr(losses, 'shape', type(losses).__name__)}; "
                    "use reduction='none'"
                )
            names = list(params)
            grads = torch.autograd.grad(losses.mean(), [params[k] for k in names], allow_unused=True)
        return {k: g.detach() for k, g in zip(names, grads) if g is not None}, losses.detach()

    # -- the multi-pass API --------------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Start a new step: forget pending passes and sums, and zero/None the ``.grad`` s."""
        self._acc.reset()
        self.original_optimizer.zero_grad(set_to_none=set_to_none)
        if self._dist is not None:  # FSDP2: the step's path (the whole model unsharded at its first pass)
            self._dist.begin_step()

    def backward_pass(
        self, inputs: Any, targets: Any, *, sensitive: bool = True, loss_fn: LossFn | None = None
    ) -> torch.Tensor:
        """Compute one pass's gradients and add them to the current step; returns its mean loss.

        ``sensitive=True``: per-example gradients, clipped and noised at :meth:`step`.
        ``sensitive=False``: the plain gradient of the batch's mean loss, added as is.
        ``loss_fn`` overrides the optimizer's loss for this pass (e.g. real vs fake targets).
        """
        if sensitive:
            pe = self.per_example_gradients(inputs, targets, loss_fn=loss_fn)
            self.accumulate_pass(pe, sensitive=True)
            losses = pe.losses
        else:
            grads, losses = self.public_gradients(inputs, targets, loss_fn=loss_fn)
            self.accumulate_pass(grads, sensitive=False)
        return losses.sum() / max(losses.numel(), 1)

    def accumulate_pass(self, gradients: Any, *, sensitive: bool = True) -> None:
        """Add gradients computed by hand as one pass of the current step.

        Sensitive: a :class:`~pytorch_privacy.optimizer.engines.PerExampleGradients`, or a dict
        ``{name: Tensor[num_records, *param.shape]}`` of per-record gradients.  Public: a dict
        ``{name: Tensor[*param.shape]}`` (missing names are zero).
        """
        self._ensure_started()
        if sensitive:
            if isinstance(gradients, dict):
                leaves = list(gradients.values())
                n = leaves[0].shape[0] if leaves else 0
                gradients = MaterializedGradients(dict(gradients), torch.zeros(0, device=leaves[0].device if leaves else None))
                if any(t.shape[0] != n for t in leaves):
                    raise ValueError("per-record gradients disagree on the number of records")
            self._acc.add_sensitive(gradients)
        else:
            if not isinstance(gradients, dict):
                raise TypeError("public gradients must be a dict {parameter name: gradient}")
            self._acc.add_public(gradients)

    def clip_and_accumulate(self) -> None:
        """Clip the pending sensitive passes and add them to the step's sums (done by
        :meth:`step` anyway).  Call it between physical chunks: the passes pending at a call must
        cover the same records (mode A sums them per record).

        .. warning:: Never call it *between two sensitive passes over the same records*: each
           flush clips its records separately, so a record seen in two flushes contributes up
           to ``2C`` while the ledger records sensitivity ``C``.  Flush only between chunks of
           *different* records.
        """
        self._ensure_started()
        with torch.no_grad(), fp32_under_autocast():  # fp32 sums under autocast
            self._acc.flush()

    def _precheck_budget(self) -> None:
        if self._dist is not None:  # decided on rank 0 inside the collective step
            return
        if self._budget is not None and self._budget.target_epsilon is not None and self._last_event is not None:
            self._budget.check(self._ledger, self._last_event)

    def step(self, closure: None = None) -> None:
        """Release the step: noise once, write ``.grad``, step the wrapped optimizer, record the
        ledger.  Refused with :class:`PrivacyBudgetExceeded` (nothing released or recorded) when
        the step would exceed the budget."""
        if closure is not None:
            raise TypeError("DPOptimizer.step does not take a closure; use fit_batch() or backward_pass()")
        if not self._acc.has_passes:
            raise RuntimeError(
                "no private gradients to apply: call fit_batch(x, y), or backward_pass()/accumulate_pass() "
                "before step(). Gradients from a plain loss.backward() are not private and are ignored"
            )
        self._ensure_started()
        with torch.no_grad(), fp32_under_autocast():
            old_state = self._global_state
            qmetrics_before = self._release_query.derive_metrics(old_state) if self._metrics else None
            enforcing = self._budget is not None and self._budget.target_epsilon is not None
            # the release draws noise before its event is known: keep what a refusal must undo
            examples = self._step_examples
            if examples is None and self.num_microbatches is None and self.microbatch_size is None:
                examples = self._acc.num_records + max((pe.num_records for pe in self._acc.pending), default=0)
            if self._consistency is not None and examples is not None:
                self._consistency.check_batch(examples)
            saved = snapshot_sources(self._random_sources) if enforcing and self._dist is None else None
            self._reuse_guard.start(self._random_sources if self._dist is None else [])
            if self._dist is not None:
                try:  # reduce once, noise once on rank 0, budget decided there and shared
                    check = (lambda ev: self._budget.check(self._ledger, ev)) if enforcing else None
                    result, new_state, event = self._dist.finish(self._acc, old_state, examples or 0, check)
                except PrivacyBudgetExceeded:
                    # the generators are NOT rewound: the noised sums already crossed the ranks,
                    # and the same normals on the next attempt would cancel in a difference
                    self._acc.abandon()
                    raise
                examples = None if examples is None else self._dist.last_global_examples
                self._step_params = self._dist.release_params(self._step_params)
            else:  # the sums are discarded after the release: noise and divide them in place
                result, new_state, event = self._acc.finish(old_state, in_place=True)
                self._reuse_guard.check(self._random_sources, self._acc.abandon)  # before anything is applied
            if event is not None:
                if enforcing and self._dist is None:
                    try:
                        self._budget.check(self._ledger, event)
                    except PrivacyBudgetExceeded:
                        # a refused step leaves no trace: no noise drawn, nothing recorded
                        restore_sources(self._random_sources, saved)
                        self._acc.abandon()
                        raise
                self._reuse_guard.commit()
                if self._records_ledger and (self._dist is None or self._dist.is_recorder):
                    self._ledger.record_sample(event)
                    if self._consistency is not None and examples is not None:
                        self._consistency.observe(examples)
                self._global_state = new_state
                self._last_event = event
            grads = combine_gradients(result, self._acc.public) if self._acc.public else (result or {})
            # this step's trainable parameters (one frozen since gets none); the release's tensors,
            # when they are this step's own, are cleaned in place
            owned = self._acc.result_owned if self._dist is None else self._dist.last_result_owned
            for name, p in self._step_params.items():
                if (g := grads.get(name)) is None or not p.requires_grad:
                    continue
                fix = torch.nan_to_num_ if owned or g.dtype != p.dtype else torch.nan_to_num
                p.grad = fix(g.to(p.dtype), nan=0.0, posinf=0.0, neginf=0.0)  # after the cast: a cast can overflow
            if self._acc.dropped is not None and self._acc.dropped.device.type == "cpu":
                self._warn_dropped(int(self._acc.dropped))
        self.original_optimizer.step()
        self._steps += 1
        if self._metrics:
            self._compute_metrics(qmetrics_before)
        self._acc.reset()

    def fit_batch(self, inputs: Any, targets: Any) -> torch.Tensor:
        """One private step on a logical batch: zero_grad, per-example gradients (in physical
        chunks of ``max_physical_batch_size``), clip, sum, noise once, ``.grad``, step, ledger.

        ``inputs``: a tensor, or a tuple/list (positional) or dict (keyword) of tensors; ``targets`` a tensor
        (or nest).  An empty batch (Poisson) is a noise-only step.  Returns the mean loss (0 if empty)."""
        self._precheck_budget()
        n = batch_size_of(inputs, targets)
        if self._consistency is not None:
            self._consistency.check_batch(n)
        b = self._microbatch_size_for(n)
        chunks = split_into_physical_batches(inputs, targets, self.max_physical_batch_size, multiple_of=b or 1)
        if self._dist is not None:  # FSDP2: the ranks agree on the step's slots and path (distributed/fsdp.py)
            chunks = self._dist.lockstep(list(chunks), self._engine(self.loss_fn), self._ensure_started, self._acc)
        self.zero_grad()
        loss_sum = None
        with contextlib.closing(chunks):
            for cx, cy in chunks:
                pe = self.per_example_gradients(cx, cy, microbatch_size=b)
                self.accumulate_pass(pe, sensitive=True)
                s = (pe.losses.detach() if pe.losses.requires_grad else pe.losses).sum()  # no op for detached losses
                loss_sum = s if loss_sum is None else loss_sum + s
                self.clip_and_accumulate()
        self._step_examples = n
        try:
            self.step()
        finally:
            self._step_examples = None
        return loss_sum / max(n, 1)

    # -- metrics -------------------------------------------------------------------------
    def _compute_metrics(self, qmetrics_before: dict | None) -> None:
        self.last_metrics = step_metrics(self, qmetrics_before)
        if self._metrics_callback is not None:
            self._metrics_callback(dict(self.last_metrics))

    # -- checkpoints ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Wrapped optimizer state, query configuration and global state, random-source states,
        ledger, step count (:mod:`pytorch_privacy.optimizer.checkpoint`)."""
        return checkpoint.build_state_dict(self)

    def load_state_dict(self, state_dict: dict[str, Any], *, fresh_randomness: bool = False, rollback: bool = False) -> None:
        """Restore what :meth:`state_dict` saved (the ledger object updated in place); the run continues
        the same privacy account and noise stream.  Refused (``ValueError``, nothing changed) when the
        query configuration or ledger sampling differs, or when this optimizer has taken more steps than
        the checkpoint holds unless ``rollback=True``, which keeps the ledger and the generators where they
        are (:mod:`~pytorch_privacy.optimizer.checkpoint`).  ``fresh_randomness=True`` reseeds the owned
        generators: for a second run branched from a checkpoint whose continuation was released."""
        checkpoint.load_state_dict(self, state_dict, fresh_randomness=fresh_randomness, rollback=rollback)
