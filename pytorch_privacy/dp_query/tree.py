"""Deprecated alias of :mod:`pytorch_privacy.dp_query.pytree` (kept for one release: the word
"tree" now belongs to tree aggregation)."""

import warnings

from .pytree import *  # noqa: F401,F403
from .pytree import __all__  # noqa: F401

warnings.warn(
    "pytorch_privacy.dp_query.tree is deprecated and will be removed; use pytorch_privacy.dp_query.pytree",
    DeprecationWarning,
    stacklevel=2,
)
