"""The compiled engine: per-example gradients and their norms as one ``torch.compile`` graph.

The eager engines issue a handful of small kernels per layer and per step (hooks, per-layer
norms, per-layer contractions); on a GPU at moderate batch sizes the step is then bound by
Python and kernel launches rather than by arithmetic.  This engine hands the whole per-record
computation -- ``vmap(grad(loss))`` over the records and every record's squared norm
(accumulated in float32 for half precision) -- to ``torch.compile`` as a single function, so
inductor fuses it into a few kernels, and with ``mode="reduce-overhead"`` on CUDA replays it as
a CUDA graph.  (Writing all gradients into one flat buffer, so that the clipped sum would be a
single product, was measured and dropped: on CPU the concatenation doubled the MNIST CNN's
per-record time, 66 ms against 30 ms at batch 256.)

Static shapes.  A compiled graph (and a CUDA graph above all) is specialised to its input
shapes, and Poisson sampling gives a different batch size at every step.  Batches are
therefore padded up to a few *bucketed* sizes (:func:`bucket_size`: at most 25% padding, about
four sizes per doubling), so a run compiles a handful of graphs, not one per step.

Why the padding contributes nothing (the privacy argument):

* padded records are copies of the batch's first record, so the model sees only valid inputs;
* each record is evaluated by ``vmap`` on its own (and the model has been verified not to mix
  examples, :func:`~.probe.verified_independent`), so a padded record cannot change a real
  record's gradient;
* after the graph, everything the query can see is *sliced* to the real records: the norms,
  the losses, the per-record gradients of :meth:`~.base.PerExampleGradients.materialize`, and
  the rows of the clipped-sum product.  A padded row is never read again, so it contributes
  exactly zero to the sum, whatever its value (even NaN).

Tests: ``tests/optimizer/test_compiled_engine.py`` (padded results equal unpadded ones, a
padded row made NaN leaves the sum unchanged, equality with the functorch engine).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
from torch import nn
from torch.func import grad, vmap
from torch.utils import _pytree as pytree

from .base import MaterializedGradients, PerExampleGradients, accumulation_dtype, batch_size_of, empty_gradients
from .base import num_records_for, register_engine
from .functional import check_losses, functional_forward, split_params
from .scan import ModelScan
from .functorch_engine import FunctorchEngine, _in_dims, _split_groups, _unsqueeze_tree

__all__ = ["CompiledEngine", "PaddedGradients", "bucket_size", "per_record_function"]

#: ``torch.compile`` modes that replay CUDA graphs on CUDA (their outputs live in the graph's
#: static memory and are overwritten by the next replay)
_CUDA_GRAPH_MODES = frozenset({"reduce-overhead", "max-autotune"})


def bucket_size(n: int) -> int:
    """The padded size for ``n`` records: ``n`` rounded up to a multiple of ``2**(k-3)`` where
    ``2**(k-1) <= n < 2**k`` (at most 25% padding; sizes below 8 are padded to 8).

    >>> [bucket_size(n) for n in (1, 8, 9, 100, 256, 257)]
    [8, 8, 10, 112, 256, 320]
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"bucket_size needs a non-negative int, got {n!r}")
    if n <= 8:
        return 8
    step = 2 ** (n.bit_length() - 3)
    return -(-n // step) * step


def _pad_rows(x: Any, n: int, size: int) -> Any:
    """Every tensor leaf with ``n`` leading rows padded to ``size`` rows with copies of row 0."""
    if size == n:
        return x

    def pad(t):
        if not isinstance(t, torch.Tensor) or t.dim() == 0 or t.shape[0] != n:
            return t
        return torch.cat([t, t[:1].expand((size - n,) + tuple(t.shape[1:]))])

    return pytree.tree_map(pad, x)


def per_record_function(model: nn.Module, loss_fn, chunk_size: int | None, grouped: bool) -> Callable:
    """``f(params, consts, x, y) -> (grads, squared norms, losses)``: every record's gradient by
    ``vmap(grad(loss))`` (a record is one example, or with ``grouped`` one group of examples along
    dimension 1, whose mean loss it differentiates) and its squared norm over all parameters,
    accumulated in float32 for half precision.  One pure function of tensors, for the engines
    that compile or capture it (:class:`CompiledEngine`, :class:`~.graphed_engine.GraphedEngine`)."""

    def group_loss(p, consts, x, y):
        out = functional_forward(model, {**p, **consts}, x)
        losses = loss_fn(out, y)
        check_losses(losses)
        return losses.mean(), losses.detach()

    def example_loss(p, consts, x, y):
        return group_loss(p, consts, _unsqueeze_tree(x), _unsqueeze_tree(y))

    inner = group_loss if grouped else example_loss

    def per_record(p, consts, x, y):
        g, losses = vmap(
            grad(inner, has_aux=True), in_dims=(None, None, _in_dims(x), _in_dims(y)),
            randomness="different", chunk_size=chunk_size,
        )(p, consts, x, y)
        sq = sum(t.reshape(t.shape[0], -1).to(accumulation_dtype(t.dtype)).square().sum(1) for t in g.values())
        return g, sq, losses.reshape(-1)

    return per_record


class PaddedGradients(MaterializedGradients):
    """Per-record gradients of a padded batch: the engine's ``{name: Tensor[padded, *shape]}``
    and squared norms (computed in the same graph, in float32 for half precision) are sliced to
    the first ``records`` rows here, once, so nothing downstream can read a padded row.

    A :class:`~.base.MaterializedGradients` in every other respect (a record with a zero
    coefficient and non-finite gradients is masked by the optimizer as for any materialised
    engine)."""

    def __init__(self, grads: dict[str, torch.Tensor], sq_norms: torch.Tensor, losses: torch.Tensor, records: int):
        super().__init__({n: g[:records] for n, g in grads.items()}, losses)
        self._norms = sq_norms[:records].sqrt()
        #: the padded size the graph ran at
        self.padded_records = int(sq_norms.shape[0])


@register_engine
class CompiledEngine(FunctorchEngine):
    """Per-example gradients by ``vmap(grad(loss))`` compiled with ``torch.compile``, on batches
    padded to bucketed sizes (see the module docstring for why the padding contributes nothing).

    Same models as :class:`~.functorch_engine.FunctorchEngine` (vmappable, no layer that mixes
    examples).  The first batch of each bucketed size compiles (seconds to a minute on CPU with
    inductor, which needs a C++ compiler); later ones reuse the graph.  Not chosen by
    ``engine="auto"``: ask for it with ``engine="compiled"``, or pass
    ``functools.partial(CompiledEngine, mode="reduce-overhead")`` as the optimizer's
    ``engine`` for CUDA graphs.

    Args:
        model, loss_fn: see :class:`~.base.GradientEngine`.
        mode: ``torch.compile`` mode: ``None`` (default), ``"reduce-overhead"`` or
            ``"max-autotune"`` (both replay CUDA graphs on CUDA; the outputs are then copied out
            of the graph's static memory, because a step may hold several passes' gradients),
            ``"max-autotune-no-cudagraphs"``.
        backend: ``torch.compile`` backend; ``None`` means :attr:`default_backend`.
        pad: pad batches to :func:`bucket_size` (``True``), or compile each batch size as it
            comes (``False``; only for fixed-size batches).
        chunk_size: ``vmap`` chunk size (bounds peak memory), as for the functorch engine.
    """

    name = "compiled"
    priority = 5  # below functorch: "auto" (and the ghost engine's fallback) never picks it
    #: the backend used when none is given (tests set ``"aot_eager"``: the same tracing and
    #: autograd graph without the C++ code generation).
    default_backend: str = "inductor"

    def __init__(self, model: nn.Module, loss_fn, *, mode: str | None = None, backend: Any = None,
                 pad: bool = True, chunk_size: int | None = None):
        super().__init__(model, loss_fn, chunk_size=chunk_size)
        self.mode = mode
        self.backend = backend or self.default_backend
        self.pad = pad
        self._compiled: dict[bool, Callable] = {}
        self._sizes: set[tuple[bool, int]] = set()
        self._warned_sizes = False

    def _function(self, grouped: bool) -> Callable:
        fn = self._compiled.get(grouped)
        if fn is None:
            fn = torch.compile(self._per_record_fn(grouped), mode=self.mode, backend=self.backend, dynamic=False)
            self._compiled[grouped] = fn
        return fn

    def _per_record_fn(self, grouped: bool) -> Callable:
        per_record = per_record_function(self.model, self.loss_fn, self.chunk_size, grouped)
        # torch._dynamo caches compiled graphs on the code object, and gives up compiling a code
        # object after ``recompile_limit`` graphs; every engine (model, loss) gets its own copy
        # so that engines do not use up each other's graphs
        per_record.__code__ = per_record.__code__.replace()
        return per_record

    def _compute(self, inputs: Any, targets: Any, microbatch_size: int | None, scan: ModelScan) -> PerExampleGradients:
        batch = batch_size_of(inputs)
        records = num_records_for(batch, microbatch_size)
        if batch == 0:
            return empty_gradients(scan.trainable)
        params, consts = split_params(scan)
        b = microbatch_size or 1
        size = bucket_size(records) if self.pad else records
        self._note_size(b > 1, size)
        x, y = _pad_rows(inputs, batch, size * b), _pad_rows(targets, batch, size * b)
        if b > 1:
            x, y = _split_groups(x, b), _split_groups(y, b)
        try:
            grads, sq, losses = self._function(b > 1)(params, consts, x, y)
        except torch._dynamo.exc.TorchDynamoException as err:  # the compiler failed, not the model
            warnings.warn(
                f"compiled engine: torch.compile failed ({str(err).splitlines()[0][:200]}); the eager functorch "
                "engine is used for this model from now on",
                RuntimeWarning,
                stacklevel=4,
            )
            self.fallback = FunctorchEngine(self.model, self.loss_fn, chunk_size=self.chunk_size)
            return self.fallback.compute(inputs, targets, microbatch_size=microbatch_size)
        if self.mode in _CUDA_GRAPH_MODES:
            # CUDA-graph outputs live in the graph's static memory and are overwritten by its next
            # replay; a step can hold several passes' gradients at once (multi-pass steps,
            # physical chunks), so each call keeps its own copy
            grads = {k: v.clone() for k, v in grads.items()}
            sq, losses = sq.clone(), losses.clone()
        return PaddedGradients(grads, sq, losses[:batch], records)

    def _note_size(self, grouped: bool, size: int) -> None:
        self._sizes.add((grouped, size))
        limit = getattr(torch._dynamo.config, "recompile_limit", 8)
        if len(self._sizes) > limit and not self._warned_sizes:
            self._warned_sizes = True
            warnings.warn(
                f"compiled engine: {len(self._sizes)} distinct padded batch shapes so far, above torch._dynamo's "
                f"recompile_limit ({limit}); later shapes run uncompiled. Use fewer batch sizes (pad=True buckets "
                "them), or raise torch._dynamo.config.recompile_limit",
                RuntimeWarning,
                stacklevel=4,
            )
