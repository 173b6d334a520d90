"""Data-parallel private steps: clipped sums reduced once, noise added once, one ledger entry.

With ``W`` processes (``torch.distributed``, one model replica each, e.g. a
``torch.nn.parallel.DistributedDataParallel`` model) one logical DP-SGD step is::

    S_r      = sum_{i in B_r} clip_C(g_i)                 on every rank r (its own examples)
    S        = sum_r S_r                                  one all-reduce (SUM) of one flat buffer
    released = (S + N(0, (sigma C)^2 I)) / D              on rank 0 only (the query), D = q N global
    broadcast released from rank 0                        every replica applies the same update

Noise once.  The noise is drawn once, by rank 0's query, on the *global* sum, and the released
value is broadcast, so the world releases exactly what one process holding the global batch would
release: ``N(0, (sigma C)^2)`` per coordinate, for sensitivity ``C`` (one example lives on one
rank).  The alternative (every rank adds ``N(0, (sigma C)^2 / W)`` to its local sum before the
all-reduce) gives the same total variance *only if every rank is honest and alive*, needs every
rank's generator to be secure, ties the query's noise logic to the reduction, and breaks for
queries whose release is not "sum + Gaussian" (adaptive clipping updates a global state from the
noised count).  Drawing on rank 0 works for every query whose sample states merge by addition (all
built-in ones), keeps one noise stream to checkpoint (rank 0's), and costs one extra broadcast of
the released gradient (see :attr:`DistributedStep.last_volume_bytes`).

Ledger and budget.  Only rank 0 records the step (with the global ``q``: the ledger is built from a
:class:`~pytorch_privacy.optimizer.distributed.DistributedDPDataLoader`, whose ``q`` and ``N`` are
global).  The budget is decided on rank 0, before anything is released, and the decision is
broadcast with the release, so every rank refuses the step together
(:class:`~pytorch_privacy.optimizer.budget.PrivacyBudgetExceeded` on all ranks).

Public passes (no privacy cost) are averaged over the ranks in the same all-reduce, so the replicas
stay equal; every rank must take them.  Physical batches and several passes are clipped and merged
locally; nothing is communicated until
:meth:`~pytorch_privacy.optimizer.DPOptimizer.step` ends the logical step.  A rank with an empty
local batch still joins the collectives (it contributes a zero sum).
"""

from __future__ import annotations

import pickle
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from ...dp_query import pytree

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


def unwrap_ddp(model: nn.Module) -> tuple[nn.Module, bool]:
    """``(model.module, True)`` for a ``DistributedDataParallel`` model, else ``(model, False)``.

    Per-example gradients are computed on the inner module (functional calls and
    ``torch.autograd.grad``), so DDP's own gradient all-reduce never runs: its reducer hooks only
    fire after a forward through the DDP wrapper followed by ``backward()`` into ``.grad``."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module, True
    return model, False


class DistributedStep:
    """The collective part of one private step (used by :class:`~pytorch_privacy.optimizer.DPOptimizer`
    when its model is a ``DistributedDataParallel``).

    Args:
        process_group: the group to reduce over (default: the default group, which must be
            initialised with ``torch.distributed.init_process_group``).

    Attributes: ``rank``, ``world_size``, :attr:`last_volume_bytes` (bytes each rank contributed to
    the step's collectives: the all-reduced sums plus the broadcast release) and
    :attr:`last_global_examples` (the world's number of examples in the step).
    """

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
        """Flush ``acc`` (a :class:`~pytorch_privacy.optimizer.StepAccumulator`), all-reduce the
        clipped sums once, release on rank 0 (``check(event)`` first: it may raise
        :class:`~pytorch_privacy.optimizer.budget.PrivacyBudgetExceeded`), broadcast.

        Returns ``(result, new_global_state, event)`` on every rank, the same values everywhere;
        raises the refusal on every rank when rank 0's ``check`` refuses."""
        acc.flush()
        if self.world_size == 1:  # nothing to reduce: the single-process release
            self.last_global_examples, self.last_volume_bytes = local_examples, 0
            result, new_state, event = acc.finish(global_state)
            if check is not None and event is not None:
                check(event)
            return result, new_state, event
        reduced = self._reduce(acc, local_examples)
        if reduced is None:  # no rank took a sensitive pass: nothing is released
            return None, global_state, None
        wide, device, volume = reduced
        return self._release(acc, global_state, check, wide, device, volume)

    def _reduce(self, acc, local_examples: int):
        """All-reduce the clipped sums, the public gradients and the step counters in one flat
        buffer; ``None`` when no rank took a sensitive pass, else ``(dtype, device, bytes)``."""
        query = acc.query
        has_sensitive = acc.sample_state is not None
        state = acc.sample_state if has_sensitive else query.initial_sample_state(acc.template)
        self._check_additive(query, state)
        leaves, spec = pytree.flatten(state)
        wide = torch.float64 if any(t.dtype == torch.float64 for t in leaves) else torch.float32
        device = leaves[0].device if leaves else torch.device("cpu")
        # public passes (unclipped, unnoised) are averaged over the ranks, so the replicas stay equal
        public = acc.num_public_passes > 0
        names = list(acc.template)
        pub = [acc.public.get(n, torch.zeros_like(acc.template[n])) for n in names] if public else []
        # one flat buffer: the sums, the public gradients, then [has a sensitive pass, examples,
        # ranks with a public pass] (counts are exact in fp32 up to 2^24 per step)
        flat = torch.cat(
            [t.detach().reshape(-1).to(wide) for t in leaves + pub]
            + [torch.tensor([float(has_sensitive), float(local_examples), float(public)], dtype=wide, device=device)]
        )
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
        volume = flat.numel() * flat.element_size()
        any_sensitive, examples = bool(flat[-3] > 0), int(round(float(flat[-2])))
        if public:
            if int(round(float(flat[-1]))) != self.world_size:
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
        control = torch.zeros(2, dtype=torch.long)
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
