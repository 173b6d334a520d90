"""Data-parallel private steps: clipped sums reduced once, noise added once, one ledger entry.

With ``W`` processes (``torch.distributed``, one model replica each, e.g. a
``torch.nn.parallel.DistributedDataParallel`` model) one logical DP-SGD step is::

    S_r      = sum_{i in B_r} clip_C(g_i)                 on every rank r (its own examples)
    S + N    = sum_r S_r + N(0, (sigma C)^2 I)            one all-reduce (SUM) of one flat buffer
    released = (S + N) / D                                D = q N global, the same on every rank

Block noise (the Gaussian sum and average queries, i.e. ``DPGaussianOptimizer``).  Each rank
flattens its local sum ``S_r`` into one buffer of ``L`` elements and, before the all-reduce, adds
``N(0, (sigma C)^2)`` to the elements of *its own block* ``[r L / W, (r + 1) L / W)`` only, drawn
by its own query (same stddev, its own generator).  The blocks partition the buffer, so after the
all-reduce every coordinate carries exactly one Gaussian draw of stddev ``sigma C``, made by
exactly one rank: the world releases what one process holding the global batch would release,
``S + N(0, (sigma C)^2 I)``, for sensitivity ``C`` (one example lives on one rank).  This costs
one collective per step (as a non-private DDP step) and ``1/W`` of the noise draws per rank.  (A
rank knows the noise it drew, so it could recover the un-noised global sum of its own block: as
in any data-parallel training, the ranks of one job are inside the privacy boundary; what leaves
it is the noised release and the ledger.)  It needs the ranks' draws to be independent: identical
generator states would put the same noise vector in every block, a correlated Gaussian whose
privacy loss is unbounded along the difference of two blocks.  So every noisy step carries, in its
one all-reduce, a 63-bit fingerprint of where each rank's generator stands before its draw
(:meth:`~.fingerprints.RankChecks.noise_fingerprint`), and every rank refuses the step, before anything is
applied or recorded, when two fingerprints are equal: ranks seeded alike, or every rank restoring
one checkpoint (rank 0's, say, whose OS-seeded generator state then becomes every rank's).  The
check runs at every step, so it also sees a restore or a reseed made between steps.  Each rank's
generator is part of its own ``state_dict``: a resume needs every rank's checkpoint, not rank 0's
alone (or ``load_state_dict(..., fresh_randomness=True)``).  (The
alternative that splits the noise as ``N(0, (sigma C)^2 / W)`` on every coordinate of every rank
gives the same total, but draws ``W`` times as many normals.)

Same settings on every rank.  Each rank clips (and noises its block) with its own query, while
rank 0's ledger accounts for rank 0's settings; a rank built with a larger clip or less noise would
release more than the ledger says.  Every step's collective carries a hash of each rank's query
type, global state and per-pass noise factor (:meth:`~.fingerprints.RankChecks.settings_fingerprint`), and
every rank refuses the step when they differ.

Independent sampling.  With the optimizer's ``data_loader`` (a
:class:`~.sampler.DistributedPoissonSampler` per rank), the same collective carries a hash of each
rank's sampling-generator state before its last draw (:meth:`~.fingerprints.RankChecks.sampling_fingerprint`):
two equal ones mean two ranks drew their parts with one inclusion pattern (example ``i`` of one
part in exactly when example ``i`` of the other is), which the Poisson analysis does not allow, and
every rank refuses the step.  The sampler checks its generators once, at construction; this sees a
generator reseeded alike later.

Other queries (adaptive clipping: a global state updated from a noised count; any query with its
own ``get_noised_result``).  The clipped sums are all-reduced un-noised, rank 0's query draws the
noise once on the global sum (``acc.finish``), and the released value is broadcast, so every
replica applies rank 0's release: one noise stream, at the cost of a second collective (see
:attr:`DistributedStep.last_volume_bytes`).  It works for every query whose sample states merge
by addition (all built-in ones).

Dropped-record count.  With a :class:`~.precision.DynamicDPLossScaler` (attribute
:attr:`DistributedStep.count_stddev` set), the same all-reduce (FSDP2: reduce-scatter, the
element repeated in every segment) carries one more element: each
rank's count of records dropped this step plus ``N(0, sigma_o^2 / W)`` from its own generator.
The sum is the world's count with noise ``N(0, sigma_o^2)``, released once to every rank
(:attr:`DistributedStep.last_noised_count`); why it costs no privacy is in :mod:`.precision`.

Ledger and budget.  Only rank 0 records the step (with the global ``q``: the ledger is built from a
:class:`~pytorch_privacy.optimizer.distributed.DistributedDPDataLoader`, whose ``q`` and ``N`` are
global).  The budget is decided on rank 0, before anything is released, and the decision travels
with the step's collective, so every rank refuses the step together
(:class:`~pytorch_privacy.optimizer.budget.PrivacyBudgetExceeded` on all ranks).  Unlike one
process, the generators are *not* rewound after a refusal: the noised sums already crossed the
ranks in the collective, and the same normals on a later attempt would cancel in the difference
of the two reduced buffers.  Nor after a step in which no rank took a sensitive pass (public
passes only): its buffer carried every rank's block noise to every rank just the same.

Public passes (no privacy cost) are averaged over the ranks in the same all-reduce, so the replicas
stay equal; every rank must take them.  Physical batches and several passes are clipped and merged
locally; nothing is communicated until
:meth:`~pytorch_privacy.optimizer.DPOptimizer.step` ends the logical step.  A rank with an empty
local batch still joins the collectives (it contributes a zero sum).
"""

from __future__ import annotations

import pickle
from typing import Any, Callable, Iterator

import attrs
import torch
import torch.distributed as dist
from torch import nn

from ...dp_query import pytree
from ...dp_query.gaussian_query import GaussianSumQuery
from ...dp_query.normalized_query import NormalizedGlobalState, NormalizedQuery
from ..step_accumulator import DeferredSums
from .fingerprints import RankChecks

__all__ = ["DistributedStep", "unwrap_ddp"]

#: refusal codes broadcast from rank 0 with each release
_OK, _REFUSED, _ERROR = 0, 1, 2


def _dump_spec(spec: Any) -> Any:
    try:
        return ("json", torch.utils._pytree.treespec_dumps(spec))
    except Exception:  # a container without a serialisable schema: pickle the spec itself
        return ("object", spec)


def _load_spec(dumped: Any) -> Any:
    kind, value = dumped
    return torch.utils._pytree.treespec_loads(value) if kind == "json" else value


def wide_dtype(tensors) -> torch.dtype:
    """The dtype in which the steps reduce sums: float64 when one of ``tensors`` is, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def unwrap_ddp(model: nn.Module) -> tuple[nn.Module, bool]:
    """``(model.module, True)`` for a ``DistributedDataParallel`` model, else ``(model, False)``.

    Per-example gradients are computed on the inner module (functional calls and
    ``torch.autograd.grad``), so DDP's own gradient all-reduce never runs: its reducer hooks only
    fire after a forward through the DDP wrapper followed by ``backward()`` into ``.grad``."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module, True
    return model, False


def _gaussian_part(query: Any, global_state: Any) -> tuple[Any, Any]:
    """The Gaussian sum query inside ``query`` and its global state (see :func:`linear_release_divisor`)."""
    if isinstance(query, NormalizedQuery):
        return query.numerator_query, global_state.numerator_state
    return query, global_state


def linear_release_divisor(query: Any, global_state: Any) -> float | None:
    """``D`` when ``query.get_noised_result(S)`` is exactly ``(S + N(0, stddev^2 I)) / D``: the
    built-in :class:`~pytorch_privacy.dp_query.GaussianSumQuery` (``D = 1``) and a
    :class:`~pytorch_privacy.dp_query.NormalizedQuery` of one (its public denominator), with their
    own ``get_noised_result`` (not a subclass's); ``None`` otherwise."""
    divisor = 1.0
    if isinstance(query, NormalizedQuery):
        if type(query).get_noised_result is not NormalizedQuery.get_noised_result:
            return None
        if not isinstance(global_state, NormalizedGlobalState):
            return None
        divisor, query = global_state.denominator, query.numerator_query
    if (
        isinstance(query, GaussianSumQuery)
        and type(query).get_noised_result is GaussianSumQuery.get_noised_result
        and type(query).noise_in_place is GaussianSumQuery.noise_in_place
    ):
        return divisor
    return None


class DistributedStep(RankChecks):
    """The collective part of one private step (used by :class:`~pytorch_privacy.optimizer.DPOptimizer`
    when its model is a ``DistributedDataParallel``).

    Args:
        process_group: the group to reduce over (default: the default group, which must be
            initialised with ``torch.distributed.init_process_group``).

    Attributes: ``rank``, ``world_size``, :attr:`last_volume_bytes` (bytes each rank contributed to
    the step's collectives: the all-reduced sums plus the broadcast release) and
    :attr:`last_global_examples` (the world's number of examples in the step).
    """

    #: the optimizer defers forming the clipped sums of the built-in Gaussian queries to the release
    #: (:class:`~pytorch_privacy.optimizer.step_accumulator.DeferredSums`), which writes them into
    #: its flat buffer one parameter at a time (no second model-sized copy of the sums); ``False``
    #: (an instance setting, the same on every rank): the sums are formed at each flush and copied
    #: into the buffer at the release
    defers_sums = True

    def __init__(self, process_group: Any = None):
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError(
                "a DistributedDataParallel model needs an initialised process group: call "
                "torch.distributed.init_process_group(...) before building the optimizer (see docs/distributed.md)"
            )
        self.group = process_group
        self.rank = dist.get_rank(process_group)
        self.world_size = dist.get_world_size(process_group)
        self.last_volume_bytes = 0
        self.last_global_examples: int | None = None
        #: set by :class:`~.precision.DynamicDPLossScaler`: the stddev ``sigma_o`` of the noise on
        #: the world's count of dropped records, carried in the step's one all-reduce (each rank
        #: adds ``N(0, sigma_o^2 / W)`` to its own count); ``None``: no count is released
        self.count_stddev: float | None = None
        #: the released (noised) world count of the last step's dropped records, or ``None``
        self.last_noised_count: float | None = None
        #: the :class:`~.sampler.DistributedPoissonSampler` of the optimizer's ``data_loader`` (set
        #: by :func:`~.setup.setup_distributed`), or ``None``: every step compares its generator's
        #: state before its last draw across the ranks (:meth:`sampling_fingerprint`)
        self.sampler: Any = None
        #: block noise: draw the next step's normals for this rank's block while the step's
        #: all-reduce is in flight (:meth:`~pytorch_privacy.dp_query.randomness.RandomSource.prefetch_normal`:
        #: the same values, in the same stream order, as drawing them next step)
        self.prefetch_noise = True
        #: whether the last release's tensors are this step's own (views of its flat buffer), so
        #: the optimizer may clean them in place (as :attr:`.StepAccumulator.result_owned`)
        self.last_result_owned = False
        self._checked_additive = False
        #: rank 0: the pickled header last broadcast; other ranks: the header last received
        self._last_blob: bytes | None = None
        self._header: Any = None

    @property
    def is_recorder(self) -> bool:
        """Whether this rank records the ledger and decides the budget (rank 0)."""
        return self.rank == 0

    def begin_step(self) -> None:
        """Called when a step begins (``zero_grad``); nothing to do for replicated models."""

    def gather_for_pass(self) -> None:
        """Called before each pass of the multi-pass API; nothing to do for replicated models
        (FSDP2 unshards the model there, see :meth:`.fsdp.FSDPStep.gather_for_pass`)."""

    def lockstep(self, chunks: list, engine: Any, start: Callable[[], None], acc: Any = None) -> Iterator[tuple[Any, Any]]:
        """The physical chunks of a ``fit_batch`` step, as they are: replicated models need no
        agreement between the ranks before the step's one collective (FSDP2 does, see
        :meth:`.fsdp.FSDPStep.lockstep`)."""
        yield from chunks

    def release_params(self, params: dict[str, nn.Parameter]) -> dict[str, nn.Parameter]:
        """The parameters the released gradients are written to (the step's own, for DDP)."""
        return params

    def local_num_microbatches(self, num_microbatches: int) -> int:
        """``num_microbatches`` is the global count; each rank splits its batch into
        ``num_microbatches / W`` groups (so the denominator ``num_microbatches`` stays right)."""
        if num_microbatches % self.world_size:
            raise ValueError(
                f"num_microbatches={num_microbatches} is the global number of microbatches and must be a multiple "
                f"of the world size {self.world_size}; or use microbatch_size= (works for any batch size)"
            )
        return num_microbatches // self.world_size

    def _src(self) -> int:
        return dist.get_global_rank(self.group, 0) if self.group is not None else 0

    def _check_additive(self, query, state) -> None:
        # the all-reduce computes merge_sample_states over ranks only if merging is addition
        if self._checked_additive:
            return
        merged, _ = pytree.flatten(query.merge_sample_states(state, state))
        leaves, _ = pytree.flatten(state)
        if len(merged) != len(leaves) or not all(torch.allclose(m, 2 * s) for m, s in zip(merged, leaves)):
            raise ValueError(
                f"{type(query).__name__} merges sample states by something other than addition; its sums "
                "cannot be all-reduced across ranks. Use a sum-aggregation query (Gaussian sum/average, "
                "adaptive clipping)"
            )
        self._checked_additive = True

    def finish(
        self, acc, global_state: Any, local_examples: int, check: Callable[[Any], None] | None = None
    ) -> tuple[Any, Any, Any]:
        """Flush ``acc`` (a :class:`~pytorch_privacy.optimizer.StepAccumulator`) and release the
        step once for the world: block noise and one all-reduce for the Gaussian sum/average
        queries; otherwise all-reduce the clipped sums, release on rank 0, broadcast.  Rank 0
        calls ``check(event)`` before anything is applied (it may raise
        :class:`~pytorch_privacy.optimizer.budget.PrivacyBudgetExceeded`).

        Returns ``(result, new_global_state, event)`` on every rank, the same values everywhere;
        raises the refusal on every rank when rank 0's ``check`` refuses."""
        acc.flush()
        self.last_noised_count = None
        self.last_result_owned = False
        if self.world_size == 1:  # nothing to reduce: the single-process release
            self.last_global_examples, self.last_volume_bytes = local_examples, 0
            result, new_state, event = acc.finish(global_state)
            if check is not None and event is not None:
                check(event)
            return result, new_state, event
        divisor = linear_release_divisor(acc.query, global_state)
        if divisor is not None:  # Gaussian sum/average: noise before the one all-reduce
            return self._noise_then_reduce(acc, global_state, local_examples, check, divisor)
        acc.settle()  # the general path reduces the sums as the query holds them
        reduced = self._reduce(acc, local_examples, global_state)
        if reduced is None:  # no rank took a sensitive pass: nothing is released
            return None, global_state, None
        wide, device, volume = reduced
        return self._release(acc, global_state, check, wide, device, volume)

    def _noise_then_reduce(self, acc, global_state, local_examples: int, check, divisor: float):
        """The one-collective step for queries whose release is ``(S + N(0, (sigma C)^2 I)) / D``
        (see the module docstring, "Block noise").

        Every rank flattens its local sum into one buffer of ``L`` elements and noises the block
        ``[r L / W, (r + 1) L / W)`` of it with its own query (same stddev, own generator); one
        all-reduce of ``[buffer, public gradients, counters]`` gives every rank ``S + N`` with
        each coordinate noised exactly once; every rank then divides by ``D`` (and scales by the
        per-pass factor), as the query would."""
        from ..budget import PrivacyBudgetExceeded

        deferred = isinstance(acc.sample_state, DeferredSums)  # formed below, one parameter at a time
        query, has_sensitive, leaves, spec, wide, device, public, names, pub = self._local_parts(acc)
        n_sum = sum(t.numel() for t in leaves)
        # one flat buffer: the sums, the public gradients, the ranks' fingerprints (step_fingerprint:
        # noise, settings, sampling), [the noised dropped count,] then 5 counters
        m = self.step_fingerprint_size
        k = m + (5 if self.count_stddev is None else 6)
        if deferred:
            flat = torch.empty(n_sum + sum(t.numel() for t in pub) + k, dtype=wide, device=device)
            pos, dtypes = 0, []
            for n, t in zip(names, leaves):
                s = acc.sample_state.take(n)
                dtypes.append(s.dtype)
                flat[pos : pos + t.numel()] = s.reshape(-1)
                pos += t.numel()
            for t in pub:
                flat[pos : pos + t.numel()] = t.reshape(-1)
                pos += t.numel()
            flat[pos:] = 0
        else:
            flat = torch.cat(
                [t.detach().reshape(-1).to(wide) for t in leaves + pub] + [torch.zeros(k, dtype=wide, device=device)]
            )
            dtypes = [t.dtype for t in leaves]
        gauss, gauss_state = _gaussian_part(query, global_state)
        lo, hi = (n_sum * self.rank) // self.world_size, (n_sum * (self.rank + 1)) // self.world_size
        stddev = gauss_state.stddev
        draws = hi > lo and not (isinstance(stddev, (int, float)) and stddev == 0)
        fingerprint = self.step_fingerprint(query, flat.device, draws, global_state, acc.noise_scale)  # before the draw
        code, mine, header = _OK, None, None
        try:
            new_gauss, event = gauss.noise_in_place(flat[lo:hi], gauss_state)  # this rank's block, in place
            if self.is_recorder and check is not None and event is not None:
                check(event)
        except PrivacyBudgetExceeded as exc:
            header = (str(exc), exc.epsilon, exc.target_epsilon, exc.target_delta, exc.steps)
            code, mine = _REFUSED, exc
        except Exception as exc:  # the others still join the all-reduce, then stop with this rank
            code, mine = _ERROR, exc
        flat[-5:] = torch.tensor(
            [float(has_sensitive), float(local_examples), float(public), float(code == _REFUSED), float(code == _ERROR)]
        )
        if self.count_stddev is not None:
            flat[-6] = self._local_noised_count(acc, gauss)
        flat[-k : -k + m] = torch.tensor(fingerprint, dtype=flat.dtype)
        work = dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
        if self.prefetch_noise and draws and code == _OK:
            gauss.generator.prefetch_normal((hi - lo,), device=flat.device, dtype=flat.dtype)  # while it is in flight
        work.wait()
        self.last_volume_bytes = flat.numel() * flat.element_size()
        tail = flat[-k:].tolist()  # one sync
        self.last_noised_count = tail[m] if self.count_stddev is not None else None
        any_sensitive, examples, n_public, n_refused, n_errors = (round(v) for v in tail[-5:])
        self.last_global_examples = examples
        self.refuse_step(tail[:m])
        if n_refused or n_errors:
            return self._stop(header, mine, bool(n_refused) and not n_errors)
        if public:
            if n_public != self.world_size:
                raise ValueError(
                    "a public pass was taken on some ranks only; take public passes on every rank (each on its "
                    "share of the public batch: the ranks' public gradients are averaged)"
                )
            pos = n_sum
            for n in names:
                t = acc.template[n]
                acc.public[n] = (flat[pos : pos + t.numel()].reshape(t.shape) / self.world_size).to(t.dtype)
                pos += t.numel()
        if not any_sensitive:  # no data released; the draws stay spent: the reduced buffer showed them to every rank
            return None, global_state, None
        released = flat[:n_sum]  # in place, then views (no extra pass over the parameters)
        if divisor != 1.0:  # the query's "/ D" (as NormalizedQuery: a true division)
            released.div_(divisor)
        if acc.noise_scale != 1:  # the per-pass factor (mode B)
            released.mul_(acc.noise_scale)
        self.last_result_owned = True  # views of this step's flat buffer (or casts of them)
        pos, total = 0, []
        for t, dtype in zip(leaves, dtypes):
            view = released[pos : pos + t.numel()].view(t.shape)
            total.append(view if view.dtype == dtype else view.to(dtype))
            pos += t.numel()
        new_state = global_state if gauss_state is global_state else attrs.evolve(global_state, numerator_state=new_gauss)
        result = dict(zip(names, total)) if deferred else pytree.unflatten(total, spec)
        return result, new_state, event

    def _local_noised_count(self, acc, gauss) -> float:
        """This rank's share of the released dropped-record count: the records it dropped in the
        current step plus ``N(0, sigma_o^2 / W)`` from its own generator (split noise: the ``W``
        independent shares sum to ``N(0, sigma_o^2)``)."""
        dropped = 0.0
        if acc.dropped is not None:
            before = 0.0 if acc.dropped_at_begin is None else float(acc.dropped_at_begin)
            dropped = float(acc.dropped) - before
        z = float(gauss.generator.normal((), device="cpu", dtype=torch.float64))
        return dropped + self.count_stddev / self.world_size**0.5 * z

    def _stop(self, header: Any, mine: BaseException | None, refused: bool):
        """Every rank raises: the budget's refusal (message from rank 0) or a failure."""
        from ..budget import PrivacyBudgetExceeded

        self._last_blob = None
        if not refused:
            if mine is not None:
                raise mine
            raise RuntimeError("rank 0 failed to release the step; this rank stops with it")
        box = [header]
        dist.broadcast_object_list(box, src=self._src(), group=self.group)
        if mine is not None:
            raise mine
        msg, eps, target_eps, target_delta, steps = box[0]
        raise PrivacyBudgetExceeded(msg, epsilon=eps, target_epsilon=target_eps, target_delta=target_delta, steps=steps)

    def _local_parts(self, acc):
        """What a rank contributes to a step's collective: ``(query, has a sensitive pass, the
        local sum's leaves and spec, the wide dtype (fp32, fp64 for fp64 sums), device, has a
        public pass, parameter names, the public gradients)``.  Public passes (unclipped,
        unnoised) are averaged over the ranks, so the replicas stay equal.  Deferred sums
        (:class:`~pytorch_privacy.optimizer.step_accumulator.DeferredSums`, the built-in Gaussian
        route: additive) are not formed here: their leaves are the template's, and ``spec`` is
        ``None``."""
        query = acc.query
        has_sensitive = acc.sample_state is not None
        if isinstance(acc.sample_state, DeferredSums):
            leaves, spec = list(acc.template.values()), None
        else:
            state = acc.sample_state if has_sensitive else query.initial_sample_state(acc.template)
            self._check_additive(query, state)
            leaves, spec = pytree.flatten(state)
        wide = wide_dtype(leaves)
        device = leaves[0].device if leaves else torch.device("cpu")
        public = acc.num_public_passes > 0
        names = list(acc.template)
        pub = [acc.public.get(n, torch.zeros_like(acc.template[n])) for n in names] if public else []
        return query, has_sensitive, leaves, spec, wide, device, public, names, pub

    def _reduce(self, acc, local_examples: int, global_state: Any):
        """All-reduce the clipped sums, the public gradients, the ranks' settings fingerprints and
        the step counters in one flat buffer (refused on every rank when the settings differ);
        ``None`` when no rank took a sensitive pass, else ``(dtype, device, bytes)``."""
        query, has_sensitive, leaves, spec, wide, device, public, names, pub = self._local_parts(acc)
        # one flat buffer: the sums, the public gradients, the settings and sampling fingerprints, then [has a
        # sensitive pass, examples, ranks with a public pass] (counts are exact in fp32 up to 2^24)
        settings = self.agreement_fingerprint(query, global_state, acc.noise_scale)
        flat = torch.cat(
            [t.detach().reshape(-1).to(wide) for t in leaves + pub]
            + [torch.tensor(settings + [float(has_sensitive), float(local_examples), float(public)], dtype=wide,
                            device=device)]
        )
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
        volume = flat.numel() * flat.element_size()
        tail = flat[-3 - len(settings) :].tolist()
        self.refuse_disagreement(tail[: len(settings)])
        any_sensitive, examples = tail[-3] > 0, int(round(tail[-2]))
        if public:
            if int(round(tail[-1])) != self.world_size:
                raise ValueError(
                    "a public pass was taken on some ranks only; take public passes on every rank (each on its "
                    "share of the public batch: the ranks' public gradients are averaged)"
                )
            pos = sum(t.numel() for t in leaves)
            for n in names:
                t = acc.template[n]
                acc.public[n] = (flat[pos : pos + t.numel()].reshape(t.shape) / self.world_size).to(t.dtype)
                pos += t.numel()
        self.last_global_examples = examples
        if not any_sensitive:
            self.last_volume_bytes = volume
            return None
        pos, total = 0, []
        for t in leaves:
            total.append(flat[pos : pos + t.numel()].reshape(t.shape).to(t.dtype))
            pos += t.numel()
        acc.sample_state = pytree.unflatten(total, spec)

        return wide, device, volume

    def _release(self, acc, global_state, check, wide, device, volume):
        """Rank 0 releases (one noise draw for the world) and broadcasts the result."""
        from ..budget import PrivacyBudgetExceeded

        # rank 0 releases; then a 2-entry control tensor [code, header changed], the header (new
        # global state, event, result structure) only when it changed since the last step, and
        # the flat release
        result = None
        control = torch.zeros(2, dtype=torch.long, device=device)  # NCCL needs device tensors
        header: list[Any] = [None]
        refused: BaseException | None = None
        if self.is_recorder:
            try:
                result, new_state, event = acc.finish(global_state)  # the one noise draw of the world
                if check is not None and event is not None:
                    check(event)
                r_leaves, r_spec = pytree.flatten(result)
                header = [(new_state, event, _dump_spec(r_spec), [(tuple(t.shape), t.dtype) for t in r_leaves])]
                blob = pickle.dumps(header[0])
                control[:] = torch.tensor([_OK, int(blob != self._last_blob)])
                self._last_blob = blob
            except PrivacyBudgetExceeded as exc:
                header = [(str(exc), exc.epsilon, exc.target_epsilon, exc.target_delta, exc.steps)]
                control[:], refused = torch.tensor([_REFUSED, 1]), exc
            except Exception as exc:  # tell the other ranks, or they wait in the broadcast forever
                header = [f"{type(exc).__name__}: {exc}"]
                control[:] = torch.tensor([_ERROR, 1])
                dist.broadcast(control, src=self._src(), group=self.group)
                dist.broadcast_object_list(header, src=self._src(), group=self.group)
                raise
        dist.broadcast(control, src=self._src(), group=self.group)
        code, changed = int(control[0]), bool(control[1])
        if changed:
            dist.broadcast_object_list(header, src=self._src(), group=self.group)
            if not self.is_recorder and code == _OK:
                self._header = header[0]
        if code == _REFUSED:
            self._last_blob = None
            if self.is_recorder:
                raise refused
            msg, eps, target_eps, target_delta, steps = header[0]
            raise PrivacyBudgetExceeded(msg, epsilon=eps, target_epsilon=target_eps, target_delta=target_delta, steps=steps)
        if code == _ERROR:
            raise RuntimeError(f"rank 0 failed to release the step ({header[0]}); this rank stops with it")
        new_state, event, r_spec, shapes = header[0] if self.is_recorder else self._header
        if self.is_recorder:
            out = torch.cat([t.detach().reshape(-1).to(wide) for t in pytree.flatten(result)[0]])
        else:
            out = torch.empty(sum(torch.Size(s).numel() for s, _ in shapes), dtype=wide, device=device)
        dist.broadcast(out, src=self._src(), group=self.group)
        volume += out.numel() * out.element_size()
        self.last_volume_bytes = volume
        if not self.is_recorder:
            pos, parts = 0, []
            for shape, dtype in shapes:
                n = torch.Size(shape).numel()
                parts.append(out[pos : pos + n].reshape(shape).to(dtype))
                pos += n
            result = pytree.unflatten(parts, _load_spec(r_spec))  # rank 0 already applied acc.noise_scale
        return result, new_state, event
