"""Mixed precision: the private part of a step runs in full precision.

Under ``torch.autocast`` (bf16 on CPU or GPU, fp16 on GPU) the forward and the backward of the
per-example gradients run in half precision, but the private arithmetic does not:

* per-record squared norms are accumulated in float32 (``engines.base.accumulation_dtype``; the
  ghost rules and the materialised route both use it), so norms come out float32;
* clip coefficients ``min(1, C / ||g_i||)`` are computed from those float32 norms;
* the clipped sums are contracted in float32 (the ghost engine upcasts its half-precision
  activations and output gradients before the contraction), into a float32 sample state shaped
  like the (float32) parameters;
* the Gaussian noise is drawn and added in float32, and the release is divided by ``D`` in float32.

:func:`full_precision` is the context the optimizer wraps around clipping, summing and noising:
it disables autocast, which would otherwise run the sums' matrix products in half precision.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

__all__ = ["full_precision"]


@contextlib.contextmanager
def full_precision() -> Iterator[None]:
    """Disable ``torch.autocast`` (CPU and, where present, CUDA) inside the block."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.autocast("cpu", enabled=False))
        if torch.cuda.is_available():
            stack.enter_context(torch.autocast("cuda", enabled=False))
        yield
