"""The per-example gradient engine interface and its registry.

An engine turns ``(model, loss_fn, inputs, targets)`` into per-example gradient information
for the model's *trainable* parameters.  The optimizer only talks to :class:`GradientEngine`
and :class:`PerExampleGradients`; faster engines (ghost norms, book-keeping) are added with
:func:`register_engine`, never by editing the optimizer.

Engines that never materialise per-example gradients implement :meth:`PerExampleGradients.norms`
and :meth:`PerExampleGradients.weighted_sum` only; queries that only clip by norm use those
(:meth:`DPQuery.accumulate_records_by_norm`), others call :meth:`materialize`.
"""

from __future__ import annotations

import abc
import math
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from .scan import scan_model

__all__ = [
    "GradientEngine",
    "PerExampleGradients",
    "MaterializedGradients",
    "register_engine",
    "get_engine",
    "available_engines",
    "select_engine",
    "call_model",
    "batch_size_of",
    "num_records_for",
    "empty_gradients",
    "accumulation_dtype",
    "contract_records",
]

LossFn = Callable[[Any, Any], torch.Tensor]


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(inputs)``; a tuple/list is splatted as positional args, a dict as keywords."""
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(inputs)


def batch_size_of(inputs: Any, targets: Any = None) -> int:
    """The batch size: the common leading dimension of every tensor leaf of ``inputs`` (and of
    ``targets`` when given).

    Every tensor leaf (of a tensor, or a tuple/list/dict nest of tensors) carries the batch
    dimension first; non-tensor leaves (flags, strings) are passed through unchanged.
    ``ValueError`` when there is no tensor, a 0-dim tensor, or two sizes differ (naming both).
    """
    sizes: list[tuple[str, int]] = []
    for what, x in (("inputs", inputs), ("targets", targets)):
        for t in torch.utils._pytree.tree_leaves(x):
            if isinstance(t, torch.Tensor):
                if t.dim() == 0:
                    raise ValueError(f"{what} must carry a leading batch dimension; got a 0-dim tensor")
                sizes.append((what, int(t.shape[0])))
    if not sizes or sizes[0][0] != "inputs":
        raise ValueError("inputs hold no tensor; at least one tensor with a batch dimension is needed")
    first = sizes[0][1]
    for what, n in sizes[1:]:
        if n != first:
            raise ValueError(
                f"mismatched batch sizes: inputs have {first} examples but {what} have {n}; every "
                "tensor of a batch needs the same leading dimension"
            )
    return first


def num_records_for(batch_size: int, microbatch_size: int | None) -> int:
    """Number of records for ``batch_size`` examples grouped by ``microbatch_size``.

    ``None`` (or 1) means one record per example.  ``microbatch_size`` must divide the batch
    size (TF Privacy's ``num_microbatches`` convention), otherwise ``ValueError``.
    """
    if microbatch_size is None:
        return batch_size
    if isinstance(microbatch_size, bool) or not isinstance(microbatch_size, int) or microbatch_size < 1:
        raise ValueError(f"microbatch_size must be a positive int or None, got {microbatch_size!r}")
    if batch_size % microbatch_size:
        raise ValueError(
            f"microbatch_size={microbatch_size} does not divide the batch size {batch_size}; "
            "use a batch size that is a multiple of it (or drop the last partial microbatch)"
        )
    return batch_size // microbatch_size


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype to accumulate squared norms in: float32 for half types, else ``dtype`` itself."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) or not dtype.is_floating_point else dtype


class PerExampleGradients(abc.ABC):
    """Per-example (or per-microbatch) gradients of one batch, for the trainable parameters.

    ``names`` fixes the order of parameters; trees returned are ``dict[name, Tensor]``.
    """

    names: tuple[str, ...]
    #: whether :meth:`weighted_sum_of` forms only the parameters asked for (a caller streaming
    #: the parameters may then ask one at a time; otherwise it asks once for all of them)
    streams_by_name: bool = False

    @property
    @abc.abstractmethod
    def losses(self) -> torch.Tensor:
        """Per-example losses, shape ``[B]`` (detached)."""

    @property
    @abc.abstractmethod
    def num_records(self) -> int:
        """Number of records (examples, or microbatches) the gradients are grouped into."""

    @abc.abstractmethod
    def norms(self) -> torch.Tensor:
        """Per-record L2 norm over all trainable parameters together, shape ``[num_records]``."""

    @abc.abstractmethod
    def weighted_sum(self, coefficients: torch.Tensor) -> dict[str, torch.Tensor]:
        """``sum_i coefficients[i] * grad_i`` per parameter.

        Engines that do not materialise (ghost) give exact zeros for records whose coefficient
        is exactly 0, even when those records' gradients are not finite (no ``0 * NaN``).
        The tensors returned are new ones the caller owns (the step accumulator keeps a first
        chunk's sums as its sample state): never views of parameters, of ``.grad`` or of data
        the engine reuses."""

    def weighted_sum_of_finite(self, coefficients: torch.Tensor) -> dict[str, torch.Tensor]:
        """:meth:`weighted_sum` for a caller that has checked every record's norm is finite
        (an engine may then skip masking records of coefficient 0); by default the same."""
        return self.weighted_sum(coefficients)

    def weighted_sum_of(self, coefficients: torch.Tensor, names, *, finite: bool = False) -> dict[str, torch.Tensor]:
        """:meth:`weighted_sum` (:meth:`weighted_sum_of_finite` with ``finite=True``) for the
        parameters ``names`` only.  A caller that streams the parameters (the DDP and FSDP2
        releases: one parameter's sum at a time, written into a buffer or reduced, and freed
        before the next) asks for one name per call; an engine that can form one parameter's sum
        alone overrides this and sets :attr:`streams_by_name` (the ghost engine and materialised
        gradients do).  By default every sum is formed and the others are dropped."""
        full = (self.weighted_sum_of_finite if finite else self.weighted_sum)(coefficients)
        return {n: full[n] for n in names}

    def materialize(self) -> dict[str, torch.Tensor]:
        """Per-record gradients ``{name: Tensor[num_records, *param.shape]}``."""
        raise NotImplementedError(f"{type(self).__name__} does not materialise per-example gradients")


class MaterializedGradients(PerExampleGradients):
    """Per-record gradients held in memory (the general case)."""

    streams_by_name = True

    def __init__(self, grads: dict[str, torch.Tensor], losses: torch.Tensor):
        self._grads = grads
        self._losses = losses
        self.names = tuple(grads)
        self._norms: torch.Tensor | None = None

    @property
    def losses(self) -> torch.Tensor:
        return self._losses

    @property
    def num_records(self) -> int:
        return next(iter(self._grads.values())).shape[0] if self._grads else 0

    def norms(self) -> torch.Tensor:
        if self._norms is None:
            sq = None
            for g in self._grads.values():
                s = g.reshape(g.shape[0], math.prod(g.shape[1:])).to(accumulation_dtype(g.dtype)).pow(2).sum(1)
                sq = s if sq is None else sq + s
            if sq is None:
                sq = self._losses.new_zeros(self.num_records, dtype=torch.float32)
            self._norms = sq.sqrt()
        return self._norms

    def weighted_sum(self, coefficients: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            n: contract_records(coefficients, g) for n, g in self._grads.items()
        }

    def weighted_sum_of(self, coefficients: torch.Tensor, names, *, finite: bool = False) -> dict[str, torch.Tensor]:
        return {n: contract_records(coefficients, self._grads[n]) for n in names}

    def materialize(self) -> dict[str, torch.Tensor]:
        return self._grads


def contract_records(coefficients: torch.Tensor, per_record: torch.Tensor) -> torch.Tensor:
    """``sum_r coefficients[r] * per_record[r]`` as one matrix-vector product (two dispatched
    kernels; ``coefficients @ flat`` dispatches three, ``torch.tensordot`` about six)."""
    if per_record.dim() == 2:  # already [R, n] (a bias): no reshape either way
        return torch.mv(per_record.t(), coefficients.to(per_record.dtype))
    flat = per_record.reshape(per_record.shape[0], math.prod(per_record.shape[1:]))
    return torch.mv(flat.t(), coefficients.to(flat.dtype)).reshape(per_record.shape[1:])


def empty_gradients(params: dict[str, torch.Tensor], losses: torch.Tensor | None = None) -> MaterializedGradients:
    """Per-example gradients of an empty batch (Poisson sampling can draw one): zero records.

    ``norms()`` is empty and ``weighted_sum`` returns zeros shaped like each parameter.
    """
    grads = {n: p.detach().new_zeros((0,) + tuple(p.shape)) for n, p in params.items()}
    if losses is None:
        dev = next(iter(params.values())).device if params else None
        losses = torch.zeros(0, device=dev)
    return MaterializedGradients(grads, losses)


class GradientEngine(abc.ABC):
    """Computes per-example gradients of ``loss_fn(model(x), y)`` for one model.

    Args:
        model: the module; its parameters with ``requires_grad=True`` are trained.
        loss_fn: ``loss_fn(output, target) -> Tensor[B]`` per-example losses.
    """

    name: ClassVar[str] = ""
    #: higher is tried first by :func:`select_engine`.
    priority: ClassVar[int] = 0

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        self.model = model
        self.loss_fn = loss_fn

    @classmethod
    def unsupported_reason(cls, model: nn.Module) -> str | None:
        """``None`` when this engine handles ``model``, else a sentence saying why not."""
        return None

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """Trainable parameters by name (tied parameters appear once)."""
        return scan_model(self.model).trainable

    def lockstep_ready(self, inputs: Any, targets: Any) -> bool:
        """Whether :meth:`compute` on a batch of this input signature runs exactly one forward and
        one backward pass through the model (no independence probe, no batch-layout trace, no
        fallback engine), and :meth:`lockstep_empty_pass` the same passes on zero examples.  FSDP2's
        per-unit steps need it: every rank must run the same sequence of forwards
        (:mod:`~pytorch_privacy.optimizer.distributed.fsdp`).  ``False`` unless an engine knows."""
        return False

    def lockstep_empty_pass(self, inputs: Any, targets: Any) -> None:
        """The forward and backward pass of :meth:`compute` on a batch of zero examples (hooks
        fire, nothing is computed for any record); only where :meth:`lockstep_ready` said so."""
        raise NotImplementedError(f"the {self.name!r} engine has no lockstep passes")

    @abc.abstractmethod
    def compute(self, inputs: Any, targets: Any, *, microbatch_size: int | None = None) -> PerExampleGradients:
        """Per-example gradients; with ``microbatch_size`` b, one record per consecutive group of
        b examples holding the gradient of that group's *mean* loss (TF Privacy microbatches)."""


_ENGINES: dict[str, type[GradientEngine]] = {}


def register_engine(cls: type[GradientEngine]) -> type[GradientEngine]:
    """Class decorator: make an engine available by ``cls.name`` (and to ``engine="auto"``)."""
    if not cls.name:
        raise ValueError("an engine class needs a non-empty `name`")
    _ENGINES[cls.name] = cls
    return cls


def available_engines() -> dict[str, type[GradientEngine]]:
    """All registered engines by name."""
    return dict(_ENGINES)


def get_engine(name: str) -> type[GradientEngine]:
    """The engine class registered as ``name`` (``ValueError`` listing the known ones if absent)."""
    try:
        return _ENGINES[name]
    except KeyError:
        raise ValueError(f"unknown gradient engine {name!r}; registered: {sorted(_ENGINES)}") from None


def select_engine(model: nn.Module, name: Any = "auto") -> Callable[..., GradientEngine]:
    """The engine factory for ``model``: by name, or the highest-priority registered engine that
    supports it.  ``name`` may also be a factory ``(model, loss_fn) -> GradientEngine``: an engine
    class, or a ``functools.partial`` of one with its options (checked against the model and
    returned as is), e.g. ``functools.partial(CompiledEngine, mode="reduce-overhead")``."""
    if callable(name) and not isinstance(name, str):
        cls = name if isinstance(name, type) else getattr(name, "func", None)
        if isinstance(cls, type) and issubclass(cls, GradientEngine):
            reason = cls.unsupported_reason(model)
            if reason:
                raise ValueError(f"engine {cls.name!r} cannot handle this model: {reason}")
        return name
    if not isinstance(name, str):
        raise TypeError(f"engine must be a registered engine name or an engine factory, got {name!r}")
    if name != "auto":
        cls = get_engine(name)
        reason = cls.unsupported_reason(model)
        if reason:
            raise ValueError(f"engine {name!r} cannot handle this model: {reason}")
        return cls
    reasons = []
    for cls in sorted(_ENGINES.values(), key=lambda c: -c.priority):
        reason = cls.unsupported_reason(model)
        if reason is None:
            return cls
        reasons.append(f"{cls.name}: {reason}")
    raise ValueError("no gradient engine supports this model:\n  " + "\n  ".join(reasons))
