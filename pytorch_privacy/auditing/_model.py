"""Running a trained model for an audit: eval mode, no autograd, its training flag restored."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

__all__ = ["evaluating"]


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[torch.device]:
    """``model.eval()`` and ``torch.no_grad()`` inside the block, which receives the model's
    device (CPU for a model without parameters); the training flag is restored on exit, also
    after an error."""
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield device
    finally:
        model.train(was_training)
