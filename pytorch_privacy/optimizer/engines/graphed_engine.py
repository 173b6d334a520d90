"""The graphed engine: the per-record gradients and the clipped sum replayed as CUDA graphs.

On a GPU at moderate batch sizes the eager engines are bound by the host: a DP step of the
MNIST CNN dispatches about 230 ATen ops, and on an H100 it takes the same 5 ms at batch 256 and
at 1024 (docs/distributed.md).  This engine records the two pieces of the step that hold almost
all of those ops once per padded batch size, as CUDA graphs, and replays them:

1. **records**: ``vmap(grad(loss))`` over the records, with every record's norm
   (:func:`~.compiled_engine.per_record_function`), into static buffers;
2. **sums**: given the clip coefficients the query computed from those norms,
   ``sum_r c_r * grad_r`` for every parameter, into one flat buffer.

Between the two, the query runs as for any engine: it reads the norms, computes its
coefficients, and asks for the weighted sum (:meth:`GraphedGradients.weighted_sum`).  The query
contract is unchanged, and so is everything after it (noise, division, ledger, optimizer): those
are a few dozen ops.  Without CUDA (or with ``capture=False``) the same code runs eagerly on the
same static buffers, which is how the CPU tests check it.

Padding, and why it contributes nothing.  Batches are padded to
:func:`~.compiled_engine.bucket_size` with copies of their first record (the model sees only
valid inputs; ``vmap`` evaluates every record alone, and the model is verified not to mix
examples, :func:`~.probe.verified_independent`).  The norms and losses the query sees are sliced
to the real records; the coefficients of padded rows are set to exactly 0, and the sums graph
replaces every row whose coefficient is 0 by zeros before contracting (so a padded or dropped
record adds exactly zero, even when its gradient is NaN).

What a captured graph assumes (checked where it can be, else documented):

* the parameters and buffers stay where they are: the optimizer updates them in place.  Their
  storage, shapes and strides are compared at every step and the graphs are captured again if
  they moved (``model.to(...)``, ``p.data = ...``);
* the inputs are tensors (or nests of tensors) whose leading dimension is the batch; other
  inputs run on the eager functorch path;
* the model and the loss compute the same function of their tensors at every step: Python-side
  state that changes between steps (a flag read in ``forward``) is captured once.  Dropout draws
  from torch's CUDA generator, which graph replays advance;
* graphs are keyed on the autocast state and on every module's train/eval mode, so a step under
  ``torch.autocast``, or with a layer switched to ``eval()``, gets its own.

A pass whose gradients are still referenced when the next pass of the same padded size replays
its graph (a multi-pass step holding several passes) is first copied out of the static buffers
(:meth:`GraphedGradients.evict`), so no pass ever reads another's gradients.
"""

from __future__ import annotations

import weakref
import warnings
from typing import Any, Callable

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .base import PerExampleGradients, batch_size_of, empty_gradients, num_records_for, register_engine
from .compiled_engine import bucket_size, per_record_function
from .functional import split_params
from .functorch_engine import FunctorchEngine, _split_groups
from .scan import ModelScan

__all__ = ["GraphedEngine", "GraphedGradients"]


def _masked_sums(grads: dict[str, torch.Tensor], coef: torch.Tensor) -> torch.Tensor:
    """``sum_r coef[r] * grads[n][r]`` for every parameter, flattened and concatenated in the
    order of ``grads``; rows with ``coef == 0`` are replaced by zeros first (no ``0 * NaN``)."""
    keep = coef != 0
    out = []
    for g in grads.values():
        rows = torch.where(keep.reshape((-1,) + (1,) * (g.dim() - 1)), g, 0)
        flat = rows.reshape(rows.shape[0], -1)
        out.append(torch.mv(flat.t(), coef.to(flat.dtype)))
    return torch.cat(out) if len(out) > 1 else out[0]


def _capture(fn: Callable[[], Any]) -> tuple[torch.cuda.CUDAGraph, Any]:
    """``fn`` warmed up on a side stream (lazy cuBLAS/cuDNN set-up happens outside the capture),
    then captured: ``(graph, fn's outputs, which each replay overwrites)``.  Capturing runs
    nothing: the outputs hold their values only after a replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # thread_local: another thread's CUDA calls (a data loader's pinning, say) do not break it
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        out = fn()
    return graph, out


def _tensor_signature(tensors) -> tuple:
    return tuple((t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t.device) for t in tensors)


class _Slot:
    """Static buffers and the two graphs (or, uncaptured, the two functions) of one padded size."""

    def __init__(self, per_record: Callable, params: dict, consts: dict, xs: list, ys: list, specs: tuple,
                 size: int, group: int, capture: bool):
        self.signature = self._signature(params, consts)
        rows = size * group
        self.x = [torch.empty((rows,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device) for t in xs]
        self.y = [torch.empty((rows,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device) for t in ys]
        self.capture = capture
        self.live: weakref.ref | None = None
        xspec, yspec = specs

        def records():
            x, y = pytree.tree_unflatten(self.x, xspec), pytree.tree_unflatten(self.y, yspec)
            if group > 1:
                x, y = _split_groups(x, group), _split_groups(y, group)
            g, sq, losses = per_record(params, consts, x, y)
            return g, sq.sqrt(), losses

        self.load(xs, ys)
        if capture:
            self._records_graph, (self.grads, self.norms, self.losses) = _capture(records)
            self._records_graph.replay()
        else:
            self._records_fn = records
            self.grads, self.norms, self.losses = records()
        self.coef = torch.zeros_like(self.norms)
        self.sizes = [g[0].numel() for g in self.grads.values()]

        def sums():
            return _masked_sums(self.grads, self.coef)

        if capture:
            self._sums_graph, self.flat = _capture(sums)
        else:
            self._sums_fn = sums

    @staticmethod
    def _signature(params: dict, consts: dict) -> tuple:
        return tuple(params), tuple(consts), _tensor_signature(params.values()), _tensor_signature(consts.values())

    def holds(self, params: dict, consts: dict) -> bool:
        """Whether ``params`` and ``consts`` are the tensors the graphs read (same storage,
        shapes, strides and dtypes): the optimizer updates them in place."""
        return self._signature(params, consts) == self.signature

    def load(self, xs: list, ys: list) -> None:
        """The batch into the static inputs; the rows past it repeat its first row."""
        for static, t in zip(self.x + self.y, xs + ys):
            n = t.shape[0]
            static[:n].copy_(t)
            if n < static.shape[0]:
                static[n:].copy_(t[:1].expand((static.shape[0] - n,) + tuple(t.shape[1:])))

    def run_records(self) -> None:
        if self.capture:
            self._records_graph.replay()
        else:
            self.grads, self.norms, self.losses = self._records_fn()

    def run_sums(self, coefficients: torch.Tensor) -> torch.Tensor:
        """A new flat tensor: the padded coefficients (0 past the real records) contracted with
        the current per-record gradients."""
        r = coefficients.shape[0]
        self.coef.zero_()
        self.coef[:r].copy_(coefficients)
        if self.capture:
            self._sums_graph.replay()
            return self.flat.clone()
        return self._sums_fn()


class GraphedGradients(PerExampleGradients):
    """Per-record gradients held in a :class:`_Slot`'s static buffers, sliced to the real
    records; :meth:`weighted_sum` replays the slot's sums graph.  Exact zeros for records with
    coefficient 0 (padded, or dropped as non-finite), as the engine contract asks."""

    def __init__(self, slot: _Slot, records: int, batch: int):
        self._slot: _Slot | None = slot
        self.names = tuple(slot.grads)
        self._records = records
        self._grads = {n: g[:records] for n, g in slot.grads.items()}
        # the norms and losses are copied out (two small copies): callers keep them (metrics,
        # logged losses) past the next replay; the gradients stay in the buffers (see evict)
        self._norms = slot.norms[:records].clone()
        self._losses = slot.losses[:batch].clone()
        slot.live = weakref.ref(self)

    @property
    def losses(self) -> torch.Tensor:
        return self._losses

    @property
    def num_records(self) -> int:
        return self._records

    def norms(self) -> torch.Tensor:
        return self._norms

    def evict(self) -> None:
        """Copy these gradients out of the static buffers (the slot is about to replay)."""
        if self._slot is None:
            return
        self._grads = {n: g.clone() for n, g in self._grads.items()}
        self._slot = None

    def weighted_sum(self, coefficients: torch.Tensor) -> dict[str, torch.Tensor]:
        if self._slot is not None:
            flat = self._slot.run_sums(coefficients)
            sizes = self._slot.sizes
        else:
            flat = _masked_sums(self._grads, coefficients)
            sizes = [g[0].numel() for g in self._grads.values()]
        parts = flat.split(sizes)
        return {n: part.view(g.shape[1:]) for (n, g), part in zip(self._grads.items(), parts)}

    def materialize(self) -> dict[str, torch.Tensor]:
        """The per-record gradients: views of the slot's buffers until the next pass of this
        padded size replays them (this object is copied out then, but a tensor taken from it
        earlier is not: clone what you keep)."""
        return self._grads


@register_engine
class GraphedEngine(FunctorchEngine):
    """Per-example gradients and their clipped sum as two CUDA graphs per padded batch size
    (see the module docstring: what is captured, why padding adds nothing, what a graph assumes).

    Same models as :class:`~.functorch_engine.FunctorchEngine`.  The first batch of each padded
    size (:func:`~.compiled_engine.bucket_size`; about four sizes per doubling) captures; later
    ones replay.  Not chosen by ``engine="auto"``: ask for it with ``engine="graphed"``.  For
    CUDA: on one H100 it took the MNIST CNN's DP step from 5.8 ms to 2.1 ms at batch 1024
    (non-private 1.7 ms; docs/distributed.md).  On the CPU it runs eagerly and is slower than the
    functorch engine.  Memory: each padded size keeps its per-record gradients and its graphs'
    private memory pools for the engine's lifetime.

    Args:
        model, loss_fn: see :class:`~.base.GradientEngine`.
        capture: ``None`` (default): capture CUDA graphs when the parameters are on a CUDA device,
            else run the same code eagerly; ``False``: always eagerly (tests, debugging).
        pad: pad batches to :func:`~.compiled_engine.bucket_size` (``True``), or keep a slot per
            batch size (``False``; for fixed-size batches).
        chunk_size: ``vmap`` chunk size, as for the functorch engine.
    """

    name = "graphed"
    priority = 4  # never picked by "auto"

    def __init__(self, model: nn.Module, loss_fn, *, capture: bool | None = None, pad: bool = True,
                 chunk_size: int | None = None):
        super().__init__(model, loss_fn, chunk_size=chunk_size)
        self.capture, self.pad = capture, pad
        self._slots: dict[tuple, _Slot] = {}
        self._warned_eager = False
        self._moved = 0

    def _compute(self, inputs: Any, targets: Any, microbatch_size: int | None, scan: ModelScan) -> PerExampleGradients:
        batch = batch_size_of(inputs)
        records = num_records_for(batch, microbatch_size)
        if batch == 0:
            return empty_gradients(scan.trainable)
        xs, xspec = pytree.tree_flatten(inputs)
        ys, yspec = pytree.tree_flatten(targets)
        leaves = xs + ys
        if not all(isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == batch for t in leaves):
            self._warn_eager("an input or target that is not a tensor with the batch as its leading dimension")
            return super()._compute(inputs, targets, microbatch_size, scan)
        params, consts = split_params(scan)
        group = microbatch_size or 1
        size = bucket_size(records) if self.pad else records
        device = next(iter(params.values())).device
        capture = device.type == "cuda" and self.capture is not False
        autocast = (torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))
        modes = tuple(m.training for m in self.model.modules())  # train/eval is read in forward: captured
        key = (group, size, xspec, yspec, tuple((t.shape[1:], t.dtype, t.device) for t in leaves), autocast, modes)
        slot = self._slots.get(key)
        if slot is not None and not slot.holds(params, consts):  # parameters moved: capture again
            slot = None
            self._moved += 1
            if self._moved == 3:
                warnings.warn(
                    "graphed engine: the parameters have moved in memory 3 times since their graphs were captured "
                    "(a model whose parameters are reallocated at every step, as FSDP2 unsharding may do, or "
                    "p.data = ... in the loop); each move captures the graphs again, which is slower than not "
                    "capturing at all. Keep the parameters in place, or use engine='functorch'",
                    RuntimeWarning, stacklevel=5,
                )
        if slot is None:
            fn = per_record_function(self.model, self.loss_fn, self.chunk_size, group > 1)
            try:
                slot = _Slot(fn, params, consts, xs, ys, (xspec, yspec), size, group, capture)
            except RuntimeError as err:
                if not capture:
                    raise
                # the capture failed, not the model (an op that syncs with the host, say): the same
                # code runs eagerly for this size; a model error re-raises there
                slot = _Slot(fn, params, consts, xs, ys, (xspec, yspec), size, group, False)
                self._warn_eager(f"CUDA graph capture failed ({str(err).splitlines()[0][:200]})")
            self._slots[key] = slot
        else:
            held = slot.live() if slot.live is not None else None
            if held is not None:  # an earlier pass still holds this slot's buffers
                held.evict()
            slot.load(xs, ys)
            slot.run_records()
        return GraphedGradients(slot, records, batch)

    def _warn_eager(self, why: str) -> None:
        if not self._warned_eager:
            self._warned_eager = True
            warnings.warn(f"graphed engine: {why}; such batches run eagerly (correct, without the speed-up)",
                          RuntimeWarning, stacklevel=5)
