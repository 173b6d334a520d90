"""Up-front checks that a model can be trained with per-example gradient clipping.

DP-SGD bounds each example's influence by clipping its own gradient (Abadi et al. 2016).  That
is only meaningful when an example's gradient depends on that example alone, and when nothing
else learned from the data escapes the clipped, noised update.  :func:`validate_model` rejects
layers that break either property, naming the layer and the fix:

* ``BatchNorm*`` / ``SyncBatchNorm`` normalising with batch statistics (training mode, or no
  running statistics): every output depends on the whole batch.  In eval mode with running
  statistics it is a fixed affine map per channel and is fine, trainable or frozen.
* ``InstanceNorm*`` with ``track_running_stats=True`` in training mode: outputs are
  per-example, but the running statistics (used at evaluation) are updated from the private
  batch without clipping or noise.
* ``nn.Embedding(max_norm=...)``: renormalises the rows the batch looks up, in place, during
  forward: a data-dependent, non-private change of the weights.
* Lazy modules not yet initialised: run one forward pass (on public data) first.

The checks are a registry (:data:`LAYER_CHECKS`, :func:`register_layer_check`): module type ->
function returning ``None`` or the problem, looked up along the module's MRO.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.nn.modules.lazy import LazyModuleMixin

__all__ = ["validate_model", "replace_batchnorm", "register_layer_check", "LAYER_CHECKS", "find_problems"]

LayerCheck = Callable[[nn.Module], "str | None"]

_BN_FIX = (
    "replace it with GroupNorm/LayerNorm, e.g. pytorch_privacy.optimizer.validation.replace_batchnorm(model), "
    "or put the layer in eval mode / freeze it (layer.eval() with running statistics; note model.train() "
    "switches it back)"
)


def _check_batchnorm(m: nn.Module) -> str | None:
    if m.training or m.running_mean is None or m.running_var is None:
        why = "is in training mode" if m.training else "has no running statistics"
        return f"{why}, so it normalises with batch statistics and mixes examples; {_BN_FIX}"
    return None


def _check_instancenorm(m: nn.Module) -> str | None:
    if m.training and m.track_running_stats:
        return (
            "tracks running statistics in training mode: they are updated from the private batch without "
            "clipping or noise; construct it with track_running_stats=False, or replace it with GroupNorm"
        )
    return None


def _check_embedding(m: nn.Module) -> str | None:
    if m.max_norm is not None:
        return (
            "has max_norm, which renormalises the looked-up rows of its weight in place during forward "
            "(a non-private, data-dependent update); use max_norm=None"
        )
    return None


def _check_lazy(m: nn.Module) -> str | None:
    if isinstance(m, LazyModuleMixin) and m.has_uninitialized_params():
        return "has uninitialised (lazy) parameters; run one forward pass on public or dummy data first"
    return None


#: module type -> check (``None`` when fine, else the problem and the fix)
LAYER_CHECKS: dict[type, LayerCheck] = {
    _BatchNorm: _check_batchnorm,
    _InstanceNorm: _check_instancenorm,
    nn.Embedding: _check_embedding,
    LazyModuleMixin: _check_lazy,
}


def register_layer_check(module_type: type, check: LayerCheck) -> None:
    """Add (or replace) the check for ``module_type`` and its subclasses."""
    if not isinstance(module_type, type):
        raise TypeError(f"module_type must be a class, got {module_type!r}")
    if not callable(check):
        raise TypeError("check must be callable: check(module) -> str | None")
    LAYER_CHECKS[module_type] = check


def _checks_for(m: nn.Module) -> list[LayerCheck]:
    return [LAYER_CHECKS[k] for k in type(m).__mro__ if k in LAYER_CHECKS]


def find_problems(model: nn.Module) -> list[str]:
    """Every problem found, one sentence each naming the layer (qualified name and class)."""
    problems = []
    for name, m in model.named_modules():
        for check in _checks_for(m):
            why = check(m)
            if why:
                problems.append(f"layer {name or '<root>'!r} ({type(m).__name__}) {why}")
    return problems


def validate_model(model: nn.Module, engine=None) -> None:
    """Raise ``ValueError`` if ``model`` cannot be trained with per-example clipping.

    Checks that it has trainable parameters, that no layer mixes examples or leaks the batch
    (see the module docstring), and, with ``engine`` (a name such as ``"ghost"``/``"auto"``, or
    an engine class or instance), that the engine supports it.  The message names every
    offending layer and the fix.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    problems = find_problems(model)
    if problems:
        raise ValueError("model cannot be trained with per-example gradient clipping:\n  " + "\n  ".join(problems))
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(
            "model has no trainable parameters (all have requires_grad=False); unfreeze the layers to train"
        )
    if engine is not None:
        from .engines import GradientEngine, select_engine

        if isinstance(engine, GradientEngine):
            engine = type(engine)
        if isinstance(engine, type) and issubclass(engine, GradientEngine):
            why = engine.unsupported_reason(model)
            if why:
                raise ValueError(f"engine {engine.name!r} cannot handle this model: {why}")
        elif isinstance(engine, str):
            select_engine(model, engine)
        else:
            raise TypeError(f"engine must be a name, a GradientEngine class or instance, got {type(engine).__name__}")


def replace_batchnorm(model: nn.Module, num_groups: int = 32) -> nn.Module:
    """Replace every ``BatchNorm1d/2d/3d`` (and ``SyncBatchNorm``) by ``GroupNorm``, in place.

    Each replacement has ``gcd(num_groups, C)`` groups for ``C`` channels (so it divides ``C``),
    the same ``eps`` and affine setting, the BatchNorm's scale and shift as initial values, and
    the same device, dtype and ``requires_grad``.  Returns ``model`` (or the new ``GroupNorm``
    when ``model`` itself is a BatchNorm).  Build the optimizer *after* calling this.
    """
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
    if isinstance(model, _BatchNorm):
        return _to_groupnorm(model, num_groups)
    for name, child in list(model.named_children()):
        if isinstance(child, _BatchNorm):
            setattr(model, name, _to_groupnorm(child, num_groups))
        else:
            replace_batchnorm(child, num_groups)
    return model


def _to_groupnorm(bn: _BatchNorm, num_groups: int) -> nn.GroupNorm:
    C = bn.num_features
    ref = bn.weight if bn.weight is not None else bn.running_mean
    kw = {} if ref is None else dict(device=ref.device, dtype=ref.dtype)
    gn = nn.GroupNorm(math.gcd(num_groups, C), C, eps=bn.eps, affine=bn.affine, **kw)
    if bn.affine:
        with torch.no_grad():
            gn.weight.copy_(bn.weight)
            gn.bias.copy_(bn.bias)
        gn.weight.requires_grad_(bn.weight.requires_grad)
        gn.bias.requires_grad_(bn.bias.requires_grad)
    gn.train(bn.training)
    return gn


# -- checks at every step (DPOptimizer) --------------------------------------------------
#: on non-CPU devices the finite-weights check runs every this many steps (one host sync each)
FINITE_CHECK_EVERY_ACCELERATOR = 100


def check_no_new_parameters(trainable: dict[str, nn.Parameter], optimizer_param_ids: set[int],
                            known_missing: set[int]) -> None:
    """``ValueError`` naming trainable parameters that are neither in the optimizer nor were left
    out of it knowingly when the DPOptimizer was built (a layer added to the model afterwards
    would otherwise get private gradients that nothing ever applies)."""
    new = [n for n, p in trainable.items() if id(p) not in optimizer_param_ids and id(p) not in known_missing]
    if new:
        raise ValueError(
            f"trainable parameters {new} were added to the model after the DPOptimizer was built; the "
            "optimizer does not hold them, so they would never be updated. Add them with "
            "dp_optimizer.add_param_group({'params': [...]}), freeze them, or rebuild the optimizer"
        )


def check_inputs_match(params: dict[str, torch.Tensor], inputs, targets=None) -> None:
    """Compare the tensors of a batch with the model's parameters: a tensor on another device, or
    a floating-point input of another dtype, is refused with a message that names both.

    Skipped when the parameters themselves span several devices (model parallelism) or several
    floating dtypes (mixed-precision models); the dtype check is skipped under ``torch.autocast``;
    integer inputs (token ids, labels) are never dtype-checked."""
    devices = {p.device for p in params.values()}
    autocast = any(torch.is_autocast_enabled(d.type) for d in devices if d.type in ("cpu", "cuda"))
    dtypes = set() if autocast else {p.dtype for p in params.values() if p.is_floating_point()}
    if not devices:
        return
    for what, x in (("inputs", inputs), ("targets", targets)):
        for t in torch.utils._pytree.tree_leaves(x):
            if not isinstance(t, torch.Tensor):
                continue
            if len(devices) == 1:
                (dev,) = devices
                if t.device != dev:
                    raise ValueError(
                        f"{what} are on device {t.device} but the model's parameters are on {dev}; move the "
                        f"batch with .to('{dev}') (or the model with model.to('{t.device}') before wrapping it)"
                    )
            if what == "inputs" and len(dtypes) == 1 and t.is_floating_point():
                (dt,) = dtypes
                if t.dtype != dt:
                    raise TypeError(
                        f"inputs have dtype {t.dtype} but the model's parameters are {dt}; convert the batch "
                        f"with .to({dt}) (or the model with model.to({t.dtype}))"
                    )


def weights_total(params: dict[str, torch.Tensor]) -> torch.Tensor:
    """A 0-dim tensor (no host sync), the sum of every floating-point parameter's elements: it
    is NaN or infinite if any parameter holds a NaN or an inf.

    One plain sum per parameter, then one over the sums (a NaN or an inf anywhere makes the
    total NaN or infinite: IEEE arithmetic propagates them; on one CPU core a sum costs about
    half an L2 norm, the max-abs norm some 20 times more).  The total can also overflow for
    large finite weights (float32: ~1e38 in all); :func:`check_finite_weights` confirms
    element-wise before refusing."""
    tensors = [p for p in params.values() if p.is_floating_point()]
    if not tensors:
        return torch.zeros(())
    dev, dtype = tensors[0].device, tensors[0].dtype
    with torch.no_grad():  # no graph, so no per-tensor detach (one dispatched op fewer each)
        sums = [p.sum() for p in tensors]
        if any(p.device != dev or p.dtype != dtype for p in tensors):  # model parallel / mixed dtypes
            sums = [s.to(dev, torch.float32) for s in sums]
        return torch.stack(sums).sum()


def nonfinite_weights(params: dict[str, torch.Tensor]) -> list[str]:
    """Names of the parameters that hold NaN or inf: one screen of the total (one host sync),
    element-wise only when the total is not finite."""
    if math.isfinite(float(weights_total(params))):
        return []
    return [n for n, p in params.items() if p.is_floating_point() and not bool(torch.isfinite(p.detach()).all())]


def check_finite_weights(params: dict[str, torch.Tensor]) -> None:
    """``ValueError`` naming the parameters that hold NaN or inf (one host sync)."""
    bad = nonfinite_weights(params)
    if bad:
        raise ValueError(
            f"parameters {bad} hold NaN or inf values: training cannot continue from them (every update "
            "would be non-finite or meaningless). Restore the weights from a checkpoint and look for the "
            "cause (learning rate too large, a bad initialisation, weights edited by hand)"
        )


def check_secure_mode(secure_mode: Any, sources: list) -> bool:
    """``secure_mode`` as a bool: ``TypeError`` for another type, ``ValueError`` when it is set but
    a random source of the query (``sources``) does not draw from the OS CSPRNG."""
    if not isinstance(secure_mode, bool):
        raise TypeError(f"secure_mode must be a bool, got {type(secure_mode).__name__}")
    if secure_mode and not all(src.secure_mode for src in sources):
        raise ValueError(
            "secure_mode=True but the query draws from a non-secure generator; build the query with "
            "secure_mode=True (or generator=RandomSource(secure_mode=True) for queries without that option)"
        )
    return secure_mode
