"""Deprecated alias of :mod:`pytorch_privacy.optimizer.step_accumulator` (kept for one release:
the accumulator serves every step, not only multi-pass ones)."""

import warnings

from .step_accumulator import *  # noqa: F401,F403
from .step_accumulator import __all__  # noqa: F401

warnings.warn(
    "pytorch_privacy.optimizer.multipass is deprecated and will be removed; use "
    "pytorch_privacy.optimizer.step_accumulator",
    DeprecationWarning,
    stacklevel=2,
)
