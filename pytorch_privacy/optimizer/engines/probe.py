"""Probes that establish, from data flow, what per-example engines may assume about a model.

DP-SGD clips each example's gradient.  That bounds an example's influence only if

1. **examples are independent**: example ``i``'s loss depends on example ``i`` alone.  An
   operation that mixes examples (``x - x.mean(0)``, batch statistics, ``F.batch_norm(...,
   training=True)``, a loss normalised over the batch) lets one record move every other
   record's gradient, so clipping each gradient bounds nothing; and
2. the engine knows **which dimension of every activation is the batch**.  Guessing it from
   sizes is wrong whenever a sequence length happens to equal the batch size.

:func:`check_independence` verifies (1) by perturbing one example and checking that no other
example's loss moves; when one does, it re-runs the model with forward hooks to name the first
module (in execution order) whose output mixes examples.  :func:`trace_batch_dims` establishes
(2) by running the model on two batches of different sizes and recording, for every call of the
given modules, which dimension of its input and output changes with the batch size (the batch
dimension), or that none does (a shared, unbatched input such as a position table indexed by
``arange(T)``).  Sizes that merely coincide with the batch size never matter: only dimensions
that *follow* the batch size are batch dimensions.

Both are run on the first batch of each input signature (shapes without the batch dimension,
dtypes, devices) and model state (training flags, trainable parameters) and cached; probes run
with the global RNG forked and reseeded identically for each forward (so dropout draws the same
masks in the runs being compared and the caller's RNG stream is untouched), and buffers
(running statistics, counters) restored afterwards.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .scan import ModelScan, scan_model

__all__ = [
    "IndependenceError",
    "check_independence",
    "input_signature",
    "model_signature",
    "CallLayout",
    "trace_batch_dims",
    "verified_independent",
    "is_verified",
    "scan_and_verify",
    "isolated",
    "batch_dim_between",
    "map_batched",
]


class IndependenceError(ValueError):
    """The model (or loss) mixes examples: one example's loss depends on another example."""


def _leaves(x: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(x) if isinstance(t, torch.Tensor)]


def input_signature(inputs: Any, targets: Any) -> tuple:
    """Hashable description of a batch without its batch size: per tensor leaf its trailing
    shape, dtype and device, plus the pytree structure."""
    sig = []
    for part in (inputs, targets):
        leaves, spec = pytree.tree_flatten(part)
        sig.append(str(spec))
        sig.extend(
            (tuple(t.shape[1:]), t.dtype, t.device.type) if isinstance(t, torch.Tensor) else (type(t).__name__, repr(t)[:64])
            for t in leaves
        )
    return tuple(sig)


def model_signature(model: nn.Module) -> tuple:
    """Hashable description of the model's structure and mode: every module (identity and
    training flag) and every parameter (identity and ``requires_grad``)."""
    return scan_model(model).signature


def map_batched(x: Any, batch: int, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    return pytree.tree_map(lambda t: fn(t) if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == batch else t, x)


@contextlib.contextmanager
def isolated(model: nn.Module, seed: int) -> Iterator[Callable[[], None]]:
    """Fork the global RNG and snapshot buffers; yields ``reset()`` which restores the buffers
    and reseeds the forked RNG identically (so each forward draws the same dropout masks)."""
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})

    def reset() -> None:
        with torch.no_grad():
            for b, v in buffers:
                b.copy_(v)
        torch.manual_seed(seed)

    with torch.random.fork_rng(devices=devices):
        try:
            reset()
            yield reset
        finally:
            with torch.no_grad():
                for b, v in buffers:
                    b.copy_(v)


def _perturb(inputs: Any, batch: int, j: int, gen: torch.Generator) -> tuple[Any, bool]:
    """``inputs`` with example ``j`` replaced (float leaves: noise added; integer/bool leaves:
    another example's values, or shuffled values); ``changed`` says whether anything changed."""
    changed = False

    def one(t: torch.Tensor) -> torch.Tensor:
        nonlocal changed
        if t.dim() == 0 or t.shape[0] != batch:
            return t
        out = t.clone()
        if t.is_floating_point() or t.is_complex():
            scale = float(t.detach().abs().float().mean()) + 1.0
            noise = torch.randn(t.shape[1:], generator=gen, dtype=torch.float64).to(t.dtype).to(t.device)
            out[j] = t[j] + noise * scale
        else:
            for k in range(batch):
                if k != j and not torch.equal(t[k], t[j]):
                    out[j] = t[k]
                    break
            else:
                flat = t[j].reshape(-1)
                if flat.numel() > 1:
                    out[j] = flat[torch.randperm(flat.numel(), generator=gen).to(flat.device)].reshape(t[j].shape)
        if not torch.equal(out, t):
            changed = True
        return out

    return pytree.tree_map(lambda t: one(t) if isinstance(t, torch.Tensor) else t, inputs), changed


def _tolerance(losses: torch.Tensor) -> torch.Tensor:
    eps = 1e-10 if losses.dtype == torch.float64 else 2e-5
    return eps * (losses.abs() + 1e-3)


def _first_tensor(x: Any) -> torch.Tensor | None:
    if isinstance(x, torch.Tensor):
        return x
    for t in _leaves(x):
        return t
    return None


@dataclass
class _Recorder:
    """Forward hooks on every module recording ``(name, module, first input, first output)``."""

    model: nn.Module
    calls: list

    @contextlib.contextmanager
    def hooks(self) -> Iterator[None]:
        handles = []
        for name, m in self.model.named_modules():

            def hook(mod, args, out, name=name):
                x, y = _first_tensor(args), _first_tensor(out)
                self.calls.append((name, mod, None if x is None else x.detach(), None if y is None else y.detach()))

            handles.append(m.register_forward_hook(hook))
        try:
            yield
        finally:
            for h in handles:
                h.remove()


def batch_dim_between(a: torch.Size, b: torch.Size, sa: int, sb: int) -> int | None:
    """The one dimension whose size is ``sa`` in ``a`` and ``sb`` in ``b`` (all others equal)."""
    if len(a) != len(b):
        return None
    diff = [d for d in range(len(a)) if a[d] != b[d]]
    if len(diff) == 1 and a[diff[0]] == sa and b[diff[0]] == sb:
        return diff[0]
    return None


def _locate(model, loss_fn, call, inputs, perturbed, targets, batch, j, reset) -> str:
    """Name where examples first mix: the first module (in completion order) whose output for
    the untouched examples changes when only example ``j`` changes."""
    runs = []
    small = map_batched(inputs, batch, lambda t: t[: batch - 1])
    for x in (inputs, perturbed, small):
        rec = _Recorder(model, [])
        reset()
        with torch.no_grad(), rec.hooks():
            try:
                call(model, x)
            except Exception:  # noqa: BLE001 - localisation is best effort
                return ""
        runs.append(rec.calls)
    full, pert, smaller = runs
    if not (len(full) == len(pert) == len(smaller)):
        return ""
    keep = [i for i in range(batch) if i != j]

    def others_moved(t0, t1, t2) -> bool | None:
        if t0 is None or t1 is None or t2 is None or t0.shape != t1.shape:
            return None
        d = batch_dim_between(t0.shape, t2.shape, batch, batch - 1)
        if d is None:
            return None
        idx = torch.tensor(keep, device=t0.device)
        a, b = t0.index_select(d, idx), t1.index_select(d, idx)
        if not a.is_floating_point():
            return not torch.equal(a, b)
        return bool(((a - b).abs() > 1e-5 * (a.abs() + 1e-3)).any())

    for (name, mod, x0, y0), (_, _, x1, y1), (_, _, x2, y2) in zip(full, pert, smaller):
        if not others_moved(y0, y1, y2):
            continue
        if others_moved(x0, x1, x2):
            # the input was already mixed: the mixing op sits in the parent's own code
            parent = name.rpartition(".")[0]
            pmod = dict(model.named_modules()).get(parent, model)
            return (
                f"examples first mix in the forward of {parent or '<root>'!r} ({type(pmod).__name__}), in an operation "
                f"between its submodules, before it calls {name!r} ({type(mod).__name__})"
            )
        kind = type(mod).__name__
        where = "its forward, or an operation between its submodules," if len(list(mod.children())) else "its forward"
        return (
            f"the first module whose output mixes examples is {name or '<root>'!r} ({kind}): {where} combines values "
            "across the batch dimension"
        )
    return "every module's output is per-example, so the mixing happens in loss_fn (e.g. a loss normalised over the batch)"


def check_independence(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    inputs: Any,
    targets: Any,
    *,
    call: Callable[[nn.Module, Any], Any] | None = None,
    seed: int = 0,
) -> bool:
    """Check that each example's loss depends on that example alone.

    Perturbs the last example of the batch (noise on float inputs; another example's values
    for integer inputs) and compares every other example's loss before and after, with
    dropout masks and buffers held fixed.  Returns ``True`` when verified, ``False`` when this
    batch cannot verify it (fewer than two examples, or no input could be changed); raises
    :class:`IndependenceError` naming the module or operation where examples mix.

    A tolerance of ``2e-5`` relative (``1e-10`` in float64) absorbs floating-point
    reassociation; mixing below it is not detected.
    """
    from .base import batch_size_of, call_model

    call = call or call_model
    batch = batch_size_of(inputs)
    if batch < 2:
        return False
    j = batch - 1
    gen = torch.Generator().manual_seed(seed + 1)
    perturbed, changed = _perturb(inputs, batch, j, gen)
    if not changed:
        return False
    with isolated(model, seed) as reset, torch.enable_grad():
        base = loss_fn(call(model, inputs), targets)
        reset()
        moved = loss_fn(call(model, perturbed), targets)
        if not isinstance(base, torch.Tensor) or base.dim() != 1 or base.shape != moved.shape:
            return False  # the engine's own loss checks report this
        base, moved = base.detach(), moved.detach()
        others = torch.ones(batch, dtype=torch.bool, device=base.device)
        others[j] = False
        same_nan = base.isnan() & moved.isnan()
        delta = (base - moved).abs()
        bad = others & ~same_nan & ~(delta <= _tolerance(base))
        if not bool(bad.any()):
            return True
        i = int(bad.nonzero()[0, 0])
        where = _locate(model, loss_fn, call, inputs, perturbed, targets, batch, j, reset)
    raise IndependenceError(
        f"examples are not independent: changing only example {j} of a batch of {batch} changed the loss of "
        f"example {i} by {float(delta[i]):.3g}. {where}. DP-SGD clips each example's gradient, which bounds "
        "nothing when examples mix (e.g. x - x.mean(0), batch statistics, F.batch_norm(training=True), a loss "
        "normalised over the batch): make every example's computation use that example alone (GroupNorm/"
        "LayerNorm instead of BatchNorm, see pytorch_privacy.optimizer.validation.replace_batchnorm). Engines "
        "that evaluate each example in isolation (vmap) would silently change such a model's function, so every "
        "engine refuses it."
    )


_VERIFIED: "weakref.WeakKeyDictionary[nn.Module, set]" = weakref.WeakKeyDictionary()


def verified_independent(
    model: nn.Module, loss_fn: Callable, inputs: Any, targets: Any, *, call=None, signature: tuple | None = None
) -> None:
    """Run :func:`check_independence` once per (model state, loss, input signature) and cache
    the verdict on the model (shared by every engine of that model); raises on mixing.
    ``signature``: ``(model_signature(model), input_signature(inputs, targets))`` when the
    caller has computed it already (the ghost engine keys its traced layouts by it too)."""
    if signature is None:
        signature = (model_signature(model), input_signature(inputs, targets))
    key = (signature[0], id(loss_fn), signature[1])
    done = _VERIFIED.setdefault(model, set())
    if key in done:
        return
    if check_independence(model, loss_fn, inputs, targets, call=call):
        done.add(key)


def is_verified(model: nn.Module, loss_fn: Callable, signature: tuple) -> bool:
    """Whether :func:`verified_independent` already holds a verdict for ``signature`` (``(model
    signature, input signature)``), i.e. whether a batch of that signature runs no probe forward."""
    return (signature[0], id(loss_fn), signature[1]) in _VERIFIED.get(model, ())


def scan_and_verify(model: nn.Module, loss_fn: Callable, inputs: Any, targets: Any) -> tuple[ModelScan, tuple]:
    """What every engine does first in a step: one walk of the model (:func:`~.scan.scan_model`)
    and the independence verdict for this model state and batch signature
    (:func:`verified_independent`).  Returns ``(scan, (model signature, input signature))``."""
    scan = scan_model(model)
    signature = (scan.signature, input_signature(inputs, targets))
    verified_independent(model, loss_fn, inputs, targets, signature=signature)
    return scan, signature


@dataclass(frozen=True)
class CallLayout:
    """Where the batch lives in one call of a module, established by :func:`trace_batch_dims`.

    ``in_dim``/``out_dim``: the batch dimension of the first tensor input / the output, or
    ``None`` when that tensor carries no batch dimension (a shared table).  ``in_shape`` /
    ``out_shape`` are the shapes seen with the probe's full batch (checked for unbatched calls).
    ``problem`` is set when the layout is not a plain batch dimension (e.g. the batch merged
    into another dimension by a reshape, or a call count that depends on the batch).
    """

    in_dim: int | None
    out_dim: int | None
    in_shape: tuple
    out_shape: tuple
    problem: str | None = None
    #: the problem concerns the input only (the output has a plain batch dimension)
    input_only: bool = False


def trace_batch_dims(
    model: nn.Module,
    inputs: Any,
    modules: dict[nn.Module, str],
    *,
    call: Callable[[nn.Module, Any], Any] | None = None,
    seed: int = 0,
) -> dict[tuple[int, int], CallLayout]:
    """``{(id(module), k): CallLayout}`` for the ``k``-th call of each module in ``modules``.

    Runs the forward on ``inputs`` (batch ``B``) and on a batch of a different size (the first
    ``B - 1`` examples, or the single example twice when ``B == 1``); the batch dimension of a
    tensor is the one dimension whose size follows the batch size, and a tensor whose shape does
    not change carries no batch dimension.  Grad mode is enabled as in a real step (some torch
    layers take a different path without it).
    """
    from .base import batch_size_of, call_model

    call = call or call_model
    batch = batch_size_of(inputs)
    if batch >= 2:
        other, small = batch - 1, map_batched(inputs, batch, lambda t: t[: batch - 1])
    else:
        other, small = 2, map_batched(inputs, batch, lambda t: torch.cat([t, t]))
    runs: list[dict[int, list[tuple[tuple, tuple]]]] = []
    with isolated(model, seed) as reset, torch.enable_grad():
        for x in (inputs, small):
            seen: dict[int, list[tuple[tuple, tuple]]] = {}
            handles = []

            def hook(mod, args, kwargs, out, seen=seen):
                a = _first_tensor(args) if args else _first_tensor(kwargs)
                y = _first_tensor(out)
                seen.setdefault(id(mod), []).append(
                    (None if a is None else tuple(a.shape), None if y is None else tuple(y.shape))
                )

            for m in modules:
                handles.append(m.register_forward_hook(hook, with_kwargs=True))
            try:
                reset()
                call(model, x)
            finally:
                for h in handles:
                    h.remove()
            runs.append(seen)
    full, smaller = runs
    layouts: dict[tuple[int, int], CallLayout] = {}
    for m, name in modules.items():
        a_calls, b_calls = full.get(id(m), []), smaller.get(id(m), [])
        for k, (in_a, out_a) in enumerate(a_calls):
            if len(a_calls) != len(b_calls):
                layouts[(id(m), k)] = CallLayout(
                    None, None, in_a or (), out_a or (),
                    f"module {name!r} is called {len(a_calls)} times for a batch of {batch} and {len(b_calls)} times "
                    f"for a batch of {other}",
                )
            else:
                layouts[(id(m), k)] = _classify(name, (in_a, out_a), b_calls[k], batch, other)
    return layouts


def _classify(name: str, shapes_a: tuple, shapes_b: tuple, batch: int, other: int) -> CallLayout:
    """The layout of one call from its (input, output) shapes at batch sizes ``batch``/``other``."""
    dims: list[int | None] = []
    problem = None
    input_only = False
    for what, sa, sb in zip(("input", "output"), shapes_a, shapes_b):
        if sa is None or sb is None or sa == sb:
            dims.append(None)
            continue
        d = batch_dim_between(torch.Size(sa), torch.Size(sb), batch, other)
        if d is None and problem is None:
            input_only = what == "input"
            problem = (
                f"the {what} of module {name!r} has shape {sa} for a batch of {batch} and {sb} for a batch of "
                f"{other}: the batch is merged with another dimension (a reshape), so it has no single batch "
                "dimension"
            )
        dims.append(d)
    if problem is not None and input_only and dims[1] is None:
        input_only = False  # the output has no batch dimension either
    return CallLayout(dims[0], dims[1], shapes_a[0] or (), shapes_a[1] or (), problem, input_only)
