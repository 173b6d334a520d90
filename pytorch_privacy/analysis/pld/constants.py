"""Constants of the PLD accountant: tails, grid limits, tolerances, FFT sizes.

Part of :mod:`pytorch_privacy.analysis.pld` (see the package docstring for the method).
"""

from __future__ import annotations

import math
import os

from ...dp_query.events import (
    ADD_OR_REMOVE_ONE,
    REPLACE_ONE,
)


_RELATIONS = (ADD_OR_REMOVE_ONE, REPLACE_ONE)

#: per-step curve value below which the loss grid stops (the rest goes to the +inf mass)
_TAIL = 1e-200
_LOG_TAIL = math.log(_TAIL)
#: ... or, if that lies beyond _MAX_LOSS, at _MAX_LOSS provided the curve is below this there
_LOG_TAIL_MAX = math.log(1e-20)
#: the per-step loss grid never extends beyond +-this (exp overflows near 709)
_MAX_LOSS = 600.0
#: tilted mass allowed to escape the composition window on either side (Chernoff-verified)
_ESCAPE = 1e-15
#: default relative discretisation pessimism, relaxed up to _RELAXED_TOL for long compositions
_DEFAULT_TOL = 1e-4
_RELAXED_TOL = 1e-3
_WORK = 1 << 24  # FFT points summed over groups and directions the auto spacing aims at ...
_WORK_GRID_MIN, _WORK_GRID_MAX = 1 << 18, 1 << 20  # ... keeping one FFT between these sizes
#: threads for batched FFTs (groups are transformed several at a time)
_FFT_WORKERS = max(1, min(2, os.cpu_count() or 1))
#: largest FFT length (about 128 MiB per real array)
_MAX_FFT = 1 << 24
#: largest uniform part of a per-step grid; beyond it the spacing is coarsened
_MAX_STEP_POINTS = 1 << 21
#: the per-step grid is uniform where the curve (or its reverse) is above this ...
_CORE = 1e-16
_LOG_CORE = math.log(_CORE)
#: ... and beyond, each cell changes the curve by at most a factor e^_KAPPA
_KAPPA = 0.25
#: Most steps (summed over every composed event) a :class:`PLDAccountant` accepts.  Beyond, the
#: composed loss needs grids too fine or too wide for a few seconds of FFT work (1e12 steps took
#: ~20 s and 1e15 overflowed); :class:`~pytorch_privacy.analysis.RdpAccountant` has no such limit.
MAX_STEPS = 10**10
