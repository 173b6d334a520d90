"""Functional helpers shared by the engines that differentiate a functional model
(:mod:`.functorch_engine`, :mod:`.loop_engine`) and the loss check every engine applies."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from .scan import ModelScan

__all__ = ["functional_forward", "check_losses", "split_params"]


def functional_forward(model: nn.Module, params: dict, x: Any) -> Any:
    """``model(x)`` with ``params`` (and buffers) substituted, splatting tuples/dicts like
    :func:`~.base.call_model`; tied parameters stay tied."""
    if isinstance(x, dict):
        return functional_call(model, params, (), x, tie_weights=True)
    if isinstance(x, (tuple, list)):
        return functional_call(model, params, tuple(x), tie_weights=True)
    return functional_call(model, params, (x,), tie_weights=True)


def check_losses(losses: torch.Tensor, expected: int | None = None) -> None:
    """``ValueError`` unless ``losses`` is a vector of per-example losses (of length ``expected``)."""
    if not isinstance(losses, torch.Tensor):
        raise TypeError(f"loss_fn must return a tensor of per-example losses, got {type(losses).__name__}")
    if losses.dim() == 0:
        raise ValueError(
            "loss_fn returned a scalar; it must return per-example losses of shape [B] "
            "(e.g. nn.CrossEntropyLoss(reduction='none'))"
        )
    if losses.dim() != 1 or (expected is not None and losses.shape[0] != expected):
        raise ValueError(
            f"loss_fn must return per-example losses of shape [{expected if expected is not None else 'B'}], "
            f"got shape {tuple(losses.shape)} (reduce any other dimensions inside loss_fn)"
        )


def split_params(scan: ModelScan) -> tuple[dict, dict]:
    """``(detached trainable params, frozen params and buffers)`` for ``functional_call``, from
    one :func:`~.scan.scan_model` of the model."""
    params = {n: p.detach() for n, p in scan.trainable.items()}
    consts = {**scan.frozen, **scan.buffers}
    return params, consts
