"""Swap torch's fused recurrent and attention layers for the DP drop-ins of :mod:`.dp_layers`.

``nn.LSTM``/``nn.GRU``/``nn.RNN`` run as one fused kernel and ``nn.MultiheadAttention`` uses its
input projection functionally, so the ghost engine cannot see their parameter uses and a model
holding them falls back to a slower engine (an ``nn.LSTM`` classifier then steps about 20x slower
than without privacy).  :func:`swap_to_dp_layers` replaces each of them, in place, by a drop-in
built from ``nn.Linear`` maps (:class:`~.dp_layers.DPLSTM`, :class:`~.dp_layers.DPGRU`,
:class:`~.dp_layers.DPRNN`, :class:`~.dp_layers.DPMultiheadAttention`) that

* computes the same function: same equations, gate order, masks and weights (copied exactly);
* keeps the ``state_dict`` keys of the native layer (``weight_ih_l0``, ``in_proj_weight`` ...),
  so a checkpoint of the native model loads into the swapped one and the other way round;
* keeps each parameter's ``requires_grad``, device, dtype and the module's training mode;
* provides what torch's ``nn.TransformerEncoderLayer``/``nn.TransformerDecoderLayer`` read from
  their attention (``batch_first``, ``in_proj_weight``, ``in_proj_bias``, ``out_proj``,
  ``_qkv_same_embed_dim``, ``num_heads``, ``merge_masks``).

The swap is announced: one ``RuntimeWarning`` naming every swapped module.  Configurations a
drop-in does not implement (``proj_size``, ``add_bias_kv``, ``add_zero_attn``) and subclasses
with their own ``forward`` are left in place, with a warning saying why.

Parameters are new ``nn.Parameter`` objects: build the optimizer after swapping.
"""

from __future__ import annotations

import warnings

from torch import nn

from .dp_layers import DPGRU, DPLSTM, DPRNN, DPMultiheadAttention

__all__ = ["swap_to_dp_layers", "dp_layer_for", "why_not_swappable"]

_DROP_INS: dict[type[nn.Module], type[nn.Module]] = {
    nn.LSTM: DPLSTM,
    nn.GRU: DPGRU,
    nn.RNN: DPRNN,
    nn.MultiheadAttention: DPMultiheadAttention,
}


def why_not_swappable(module: nn.Module) -> str | None:
    if getattr(module, "proj_size", 0):
        return "proj_size is not supported by DPLSTM"
    if isinstance(module, nn.MultiheadAttention):
        if module.bias_k is not None or module.add_zero_attn:
            return "add_bias_kv / add_zero_attn are not supported by DPMultiheadAttention"
    return None


def dp_layer_for(module: nn.Module) -> type[nn.Module] | None:
    """The drop-in class replacing ``module``, or ``None`` (not a swappable layer: another type,
    or a subclass with its own ``forward``)."""
    for klass, drop_in in _DROP_INS.items():
        if isinstance(module, klass) and type(module).forward is klass.forward:
            return drop_in
    return None


def _convert(module: nn.Module, drop_in: type[nn.Module]) -> nn.Module:
    new = drop_in.from_torch(module)  # type: ignore[attr-defined]
    # copy requires_grad (frozen stays frozen) through the native names
    flags = {n: p.requires_grad for n, p in module.named_parameters()}
    own = dict(new.named_parameters())
    for torch_name, names in new._name_map():  # type: ignore[operator]
        for n in names:
            if torch_name in flags:
                own[n].requires_grad_(flags[torch_name])
    for n, p in module.named_parameters():  # out_proj.* share names
        if n in own:
            own[n].requires_grad_(p.requires_grad)
    new.train(module.training)
    new.torch_state_dict_names = True
    return new


def swap_to_dp_layers(model: nn.Module, *, warn: bool = True) -> list[str]:
    """Replace, in place, every ``nn.LSTM``/``nn.GRU``/``nn.RNN``/``nn.MultiheadAttention``
    inside ``model`` by its DP drop-in (see the module docstring).

    Args:
        model: the model; it must not itself be one of those layers (wrap it in a module).
        warn: announce the swap with a ``RuntimeWarning`` naming the swapped modules.

    Returns:
        The qualified names of the swapped modules (each name once; a module shared between
        several places is replaced by one shared drop-in, named at its first place).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if dp_layer_for(model) is not None:
        raise ValueError(
            f"the model itself is an {type(model).__name__}, which cannot be swapped in place; wrap it in a "
            "parent module (or build the drop-in with DPLSTM.from_torch(...) etc.)"
        )
    replaced: dict[int, nn.Module] = {}
    swapped: list[str] = []
    skipped: list[str] = []
    for mname, parent in list(model.named_modules(remove_duplicate=False)):
        for cname, child in list(parent._modules.items()):
            if child is None:
                continue
            full = f"{mname}.{cname}" if mname else cname
            if id(child) in replaced:
                setattr(parent, cname, replaced[id(child)])
                continue
            drop_in = dp_layer_for(child)
            if drop_in is None:
                continue
            why = why_not_swappable(child)
            if why:
                skipped.append(f"{full!r} ({type(child).__name__}): {why}")
                continue
            new = _convert(child, drop_in)
            replaced[id(child)] = new
            setattr(parent, cname, new)
            swapped.append(full)
    if warn and swapped:
        warnings.warn(
            "swapped to DP drop-in layers (same function and weights, torch state_dict keys): "
            + ", ".join(f"{n!r}" for n in swapped),
            RuntimeWarning,
            stacklevel=2,
        )
    if warn and skipped:
        warnings.warn("not swapped: " + "; ".join(skipped), RuntimeWarning, stacklevel=2)
    return swapped
