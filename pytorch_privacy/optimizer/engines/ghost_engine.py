"""The ghost-clipping / book-keeping engine: per-example norms and clipped sums without
materialising per-example gradients and without a second backward pass.

One ``compute()`` runs one forward and one backward pass.  Forward hooks, registered on the
modules that own trainable parameters for the duration of the call only, save each call's input
and route its output through a tap that records the output gradient.  The backward pass is
``torch.autograd.grad(loss, anchor)`` where every tap depends on a dummy ``anchor``: autograd
then propagates output gradients through the network but computes no parameter gradient at all
(those are what the rules in :mod:`.ghost_rules` compute per example).  From the saved
activations and output gradients, :class:`GhostGradients` gives exact per-example norms (ghost
norms, Li et al. 2022, arXiv 2110.05679; mixed per layer, Bu et al. 2022, arXiv 2205.10683) and
the clipped sum ``sum_i c_i grad_i`` by einsum (book-keeping, Bu et al. 2022, arXiv 2210.00038).

Soundness (see :mod:`.probe`): independence of examples is verified on the first batch of each
input signature; the batch dimension of every hooked call is *traced* (two batch sizes), never
guessed from sizes, so a sequence length equal to the batch size changes nothing; a call whose
input carries no batch dimension (a position table indexed by ``arange(T)``) has its output
broadcast to the batch so each example gets its own output gradient (verified transparent);
raw parameters of user modules used elementwise are tapped (:mod:`.raw_params`).  Before the
backward pass the autograd graph is walked once; a trainable parameter that is reached other
than through a tapped call (e.g. ``F.linear(h, emb.weight)`` in a parent module) would make
ghost norms wrong, so the engine then warns and hands the model to the next engine (functorch,
or loop) for good; so does a layout the rules cannot use (a batch merged by a reshape).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Iterable

import torch
from torch import nn

from .base import (
    GradientEngine,
    PerExampleGradients,
    available_engines,
    batch_size_of,
    call_model,
    empty_gradients,
    num_records_for,
    register_engine,
)
from .functional import check_losses
from .checkpointing import refuse_reentrant_checkpoint
from .raw_params import RawUseMode, is_raw_owner, raw_parameters, trace_raw_uses
from .ghost_gradients import GhostGradients
from .ghost_taps import (
    CopyTap,
    ForwardRecorder,
    Tap,
    describe,
    is_inplace_view_error,
    params_used_outside,
    verify_expansion,
)
from .probe import input_signature, is_verified, scan_and_verify, trace_batch_dims
from .scan import ModelScan, scan_model
from .ghost_rules import LayerRule, NormPolicy, ghost_rule_for, ghost_rules

__all__ = ["GhostEngine", "GhostGradients"]


def _hooked_modules(
    modules: Iterable[tuple[str, nn.Module]], trainable: dict[str, nn.Parameter]
) -> list[tuple[str, nn.Module, LayerRule | None, dict[str, str]]]:
    """``(module name, module, rule, {local param name: canonical name})`` for every module (of
    ``named_modules()``) that directly owns a trainable parameter."""
    canon = {id(p): n for n, p in trainable.items()}
    out = []
    for mname, m in modules:
        local = {pn: canon[id(p)] for pn, p in m._parameters.items() if p is not None and id(p) in canon}
        if local:
            out.append((mname, m, ghost_rule_for(m), local))
    return out


@register_engine
class GhostEngine(GradientEngine):
    """Ghost norms + book-keeping for models built from supported layers.

    Supported (every trainable parameter must belong to one of these, and be used only through
    that module's forward): ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d``, ``nn.Embedding`` (no
    ``max_norm`` / ``scale_grad_by_freq``), ``nn.LayerNorm``, ``nn.GroupNorm``, ``nn.RMSNorm``,
    ``nn.BatchNorm1d/2d/3d`` in eval mode, and the drop-ins of :mod:`.dp_layers` built from
    ``nn.Linear`` (``DPRNN``, ``DPGRU``, ``DPLSTM``, ``DPMultiheadAttention``); more via
    :func:`~.ghost_rules.register_ghost_rule`.  Frozen parameters,
    buffers, modules called several times and parameters tied between supported modules (e.g. an
    embedding and an output projection) are handled: norms are of the *sum* of all uses.
    Layers must see batch-first activations (leading dimension = batch).

    Args:
        model, loss_fn: see :class:`~.base.GradientEngine`.
        norm_mode: ``"auto"`` (per layer by cost), ``"ghost"`` or ``"materialize"``; see
            :class:`~.ghost_rules.NormPolicy`.
        memory_budget_bytes: per-layer bound on materialised per-example gradients in ``"auto"``.
        check_graph: walk the autograd graph on every call to detect parameter uses that the
            hooks cannot see (cheap; disable only for models known to be safe).
    """

    name = "ghost"
    priority = 20

    def __init__(
        self,
        model: nn.Module,
        loss_fn,
        *,
        norm_mode: str = "auto",
        memory_budget_bytes: int = 256 * 2**20,
        check_graph: bool = True,
    ):
        super().__init__(model, loss_fn)
        self.policy = NormPolicy(norm_mode, memory_budget_bytes)
        self.check_graph = check_graph
        self.fallback: GradientEngine | None = None
        self._warned_ambiguous = False
        self._switched = False  # True once the model is handed to the fallback for good
        self._tap: type[Tap] = Tap
        self._layouts: dict[tuple, tuple] = {}  # input signature -> traced batch layout of every call
        self._hooks_cache: tuple | None = None  # (model signature, hooked modules, raw parameters)
        self._empty_pass = False  # lockstep_empty_pass: run the passes on zero examples

    @classmethod
    def unsupported_reason(cls, model: nn.Module) -> str | None:
        """Why not, naming the first module that holds a trainable parameter without a ghost
        rule (or in an unsupported configuration); ``None`` when every one is covered."""
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        for mname, m, rule, local in _hooked_modules(model.named_modules(), trainable):
            if is_raw_owner(m, rule):
                continue  # a user module's raw parameters: elementwise uses are tapped (.raw_params)
            if rule is None:
                supported = sorted({k.__name__ for k in ghost_rules()})
                return (
                    f"{describe(mname, m)} holds trainable parameters {sorted(local)} and has no ghost rule "
                    f"(supported: {', '.join(supported)}); freeze it, or use engine='functorch'"
                )
            extra = sorted(set(local) - set(rule.param_names))
            if extra:
                return f"{describe(mname, m)} holds trainable parameters {extra} that its ghost rule does not cover"
            why = rule.unsupported_reason(m)
            if why:
                return f"{describe(mname, m)}: {why}"
        return None

    def _fallback_engine(self) -> GradientEngine:
        if self.fallback is None:
            for cls in sorted(available_engines().values(), key=lambda c: -c.priority):
                if cls.priority < self.priority and cls.unsupported_reason(self.model) is None:
                    self.fallback = cls(self.model, self.loss_fn)
                    break
            else:  # pragma: no cover - the loop engine supports everything
                raise ValueError("no fallback engine supports this model")
        return self.fallback

    def compute(self, inputs: Any, targets: Any, *, microbatch_size: int | None = None) -> PerExampleGradients:
        """One forward and one backward pass; returns lazily evaluated :class:`GhostGradients`.

        Falls back for good (with a warning) to the next engine when a parameter is used outside
        its module's forward or a layer sees non-batch-first activations.  If the model modifies
        a hooked layer's output in place, the call is redone with copying taps (remembered).
        """
        try:
            return self._compute(inputs, targets, microbatch_size)
        except RuntimeError as err:
            if self._tap is CopyTap or not is_inplace_view_error(err):
                raise
            self._tap = CopyTap
            return self._compute(inputs, targets, microbatch_size)

    def lockstep_ready(self, inputs: Any, targets: Any) -> bool:
        """``True`` once this input signature was verified and traced (see
        :meth:`~.base.GradientEngine.lockstep_ready`), while the engine has not handed the model to
        a fallback, met a batch unlike its traced layout, or tapped raw parameters."""
        if self._switched or self._warned_ambiguous:
            return False
        scan = scan_model(self.model)
        signature = (scan.signature, input_signature(inputs, targets))
        if not is_verified(self.model, self.loss_fn, signature) or signature not in self._layouts:
            return False
        hooked, raw = self._hooks_for(scan)
        return not raw and all(rule is not None and rule.unsupported_reason(m) is None for _, m, rule, _ in hooked)

    def lockstep_empty_pass(self, inputs: Any, targets: Any) -> None:
        """One forward and one backward pass on zero examples (see
        :meth:`~.base.GradientEngine.lockstep_empty_pass`)."""
        if batch_size_of(inputs, targets) != 0:
            raise ValueError("lockstep_empty_pass takes a batch of zero examples")
        self._empty_pass = True
        try:
            self._compute(inputs, targets, None)
        finally:
            self._empty_pass = False

    def _switch(self, why: str) -> None:
        """Hand the model to the exact fallback engine for good, with a warning saying why."""
        self._switched = True
        warnings.warn(
            f"ghost engine: {why}; using the {self._fallback_engine().name!r} engine for this model instead",
            RuntimeWarning,
            stacklevel=4,
        )

    def _layouts_for(
        self, inputs: Any, targets: Any, hooked, raw: dict, signature: tuple
    ) -> tuple[dict, frozenset, dict] | None:
        """``(layout of every hooked call, unbatched calls broadcast over a leading size-1 dim)``
        for this input signature (traced once, see :func:`~.probe.trace_batch_dims`); ``None``
        after switching to the fallback engine because some call has no batch dimension the
        rules can use."""
        cached = self._layouts.get(signature)
        if cached is not None:
            return cached
        names = {m: mname for mname, m, _, _ in hooked}
        layouts = trace_batch_dims(self.model, inputs, names)
        rules = {id(m): (mname, m, rule) for mname, m, rule, _ in hooked}
        problems = []
        unbatched = set()
        for (mid, k), lay in layouts.items():
            mname, m, rule = rules[mid]
            if rule.output_batched:
                if lay.out_dim != 0 or (lay.problem and not lay.input_only):
                    problems.append(lay.problem or f"{describe(mname, m)} needs its batch in dimension 0 of its output")
            elif lay.problem:
                problems.append(lay.problem)
            elif (lay.in_dim is None) != (lay.out_dim is None) or (lay.in_dim is not None and lay.in_dim != lay.out_dim):
                problems.append(
                    f"{describe(mname, m)} has its batch in dimension {lay.in_dim} of its input but {lay.out_dim} of its "
                    "output"
                )
            elif lay.in_dim is None:
                unbatched.add((mid, k))
            elif lay.in_dim != 0 and not rule.movable_batch_dim(m, len(lay.in_shape), lay.in_dim):
                problems.append(
                    f"{describe(mname, m)} sees its batch in dimension {lay.in_dim} of an input of shape {lay.in_shape}, "
                    "which its ghost rule cannot move to the front"
                )
        lead1: frozenset = frozenset()
        raw_dims: dict = {}
        if not problems and raw:
            raw_dims, bad = trace_raw_uses(self.model, inputs, raw)
            if bad:
                problems.append(bad)
        if not problems and unbatched:
            lead1, bad = verify_expansion(self.model, self.loss_fn, inputs, targets, layouts, unbatched, rules)
            if bad:
                problems.append(bad)
        if problems:
            self._switch("; ".join(problems[:2]))
            return None
        if len(self._layouts) >= 64:  # many input signatures (variable lengths): keep the newest
            self._layouts.pop(next(iter(self._layouts)))
        self._layouts[signature] = (layouts, lead1, raw_dims)
        return self._layouts[signature]

    def _hooks_for(self, scan: ModelScan) -> tuple[list, dict]:
        """``(hooked modules, raw parameters)`` for the model as scanned: derived from the scan
        once per model signature (and set of ghost rules), then reused."""
        key = (scan.signature, len(ghost_rules()))
        if self._hooks_cache is None or self._hooks_cache[0] != key:
            hooked = _hooked_modules(scan.modules, scan.trainable)
            raw = raw_parameters(hooked)
            raw_owners = {id(owner) for owner, *_ in raw.values()}
            self._hooks_cache = (key, [h for h in hooked if id(h[1]) not in raw_owners], raw)
        return self._hooks_cache[1], self._hooks_cache[2]

    def _compute(self, inputs: Any, targets: Any, microbatch_size: int | None) -> PerExampleGradients:
        if self._switched:
            return self._fallback_engine().compute(inputs, targets, microbatch_size=microbatch_size)
        batch = batch_size_of(inputs)
        num_records_for(batch, microbatch_size)
        if batch == 0 and not self._empty_pass:
            return empty_gradients(self.trainable_parameters())
        scan, signature = scan_and_verify(self.model, self.loss_fn, inputs, targets)  # the one walk this step
        trainable = scan.trainable
        b = microbatch_size or 1
        hooked, raw = self._hooks_for(scan)
        for mname, m, rule, local in hooked:  # the model may have changed since selection
            why = "no ghost rule" if rule is None else rule.unsupported_reason(m)
            if why:
                raise ValueError(f"ghost engine: {describe(mname, m)}: {why}; use engine='functorch'")
        traced = self._layouts_for(inputs, targets, hooked, raw, signature)
        if traced is None:
            return self._fallback_engine().compute(inputs, targets, microbatch_size=microbatch_size)
        layouts, lead1_calls, raw_dims = traced
        device = next(iter(trainable.values())).device if trainable else None
        rec = ForwardRecorder(layouts, lead1_calls, raw, raw_dims, batch, self._tap, device)
        calls, mismatch = rec.calls, rec.mismatch
        handles = []
        outside: list[str] = []
        try:
            for mname, m, rule, local in hooked:
                handles.append(m.register_forward_hook(rec.module_hook(mname, rule, local), with_kwargs=True))
            with torch.enable_grad(), refuse_reentrant_checkpoint(), (
                RawUseMode(raw, rec.on_raw_use) if raw else contextlib.nullcontext()
            ), warnings.catch_warnings():
                # FSDP2 warns when a unit returns a view (a tap's output) that an in-place op could
                # detach from its pre-backward hook; autograd refuses in-place ops on a tap's view
                # (the engine then switches to copying taps), so that cannot happen here
                warnings.filterwarnings("ignore", message=r".*returned a view tensor", category=UserWarning)
                output = call_model(self.model, inputs)
                losses = self.loss_fn(output, targets)
                check_losses(losses, batch)
                del output
                if self.check_graph and losses.requires_grad and not mismatch:
                    outside = params_used_outside(losses, trainable)
                if not (outside or mismatch):
                    total = losses.sum() if b == 1 else losses.sum() / b
                    if total.requires_grad and calls:
                        torch.autograd.grad(total, rec.anchor, allow_unused=True)
        finally:
            for h in handles:
                h.remove()
        if mismatch and not outside:
            # shapes that differ from the traced layout for the same input signature (data-dependent
            # shapes): this batch is computed by the exact fallback engine
            del losses, calls
            if not self._warned_ambiguous:
                self._warned_ambiguous = True
                warnings.warn(
                    "ghost engine: " + "; ".join(mismatch[:2]) + "; such batches are computed with the "
                    f"{self._fallback_engine().name!r} engine (exact, slower)",
                    RuntimeWarning,
                    stacklevel=3,
                )
            return self._fallback_engine().compute(inputs, targets, microbatch_size=microbatch_size)
        if outside:
            del losses, calls
            self._switch(
                f"trainable parameter(s) {outside} are used outside the forward of the module that owns "
                "them (e.g. F.linear(h, embedding.weight)), which its hooks cannot see"
            )
            return self._fallback_engine().compute(inputs, targets, microbatch_size=microbatch_size)
        return GhostGradients(trainable, calls, losses.detach(), b, self.policy)


