r"""Distributed Skellam sum query (Agarwal, Kairouz, Liu 2021, "The Skellam Mechanism for
Differentially Private Federated Learning"), with the modular arithmetic of secure aggregation.

Each record (client) goes through the pipeline of the paper's Algorithm 1:

1. **bound**: a floating-point record is clipped to ``l2_norm_clip`` in L2, multiplied by
   ``scale`` (the granularity is ``1/scale``) and conditionally randomized-rounded to an integer
   vector of L2 norm at most ``l2_norm_bound`` (Kairouz et al. 2021); an integer record is taken
   as it is.  Either is then clipped to ``l2_norm_bound`` and ``l1_norm_bound`` (scaled down and
   rounded toward zero), the integer-domain sensitivities of the mechanism.
2. **local noise**: symmetric Skellam noise ``Poisson(v/2) - Poisson(v/2)`` per coordinate,
   ``v = local_stddev^2`` (integer domain), drawn from the query's own
   :class:`~.randomness.RandomSource` (:func:`sample_skellam`).
3. **modular wrap-around**: with ``modulus`` (or ``bits``: ``modulus = 2^bits``) every client
   message is reduced to ``[0, modulus)`` and sums are kept modulo ``modulus``, as secure
   aggregation computes them.

:meth:`~DistributedSkellamSumQuery.get_noised_result` maps the modular sum back to the centred
range ``[-floor(m/2), ceil(m/2))``: this is the *modular clipping* secure aggregation implies, an
aggregate outside that range wraps around (choose ``bits`` and ``scale`` so that the noisy sum
fits; the paper's Section 4 gives the trade-off).  In floating-point mode (``l2_norm_clip``
given) the result is decoded, ``centred_sum / scale`` in float64; in integer mode it is the int64
centred sum (TF Privacy's ``DistributedSkellamSumQuery``, which checks integer records against
both bounds and has no modulus).  Wrapping and decoding are post-processing of the noisy sum:
they do not change the privacy event,
:class:`~.distributed_events.DistributedSkellamEvent` ``(l1, l2, v, num_records)``.

Poisson draws: Knuth's product of uniforms for ``lambda < 10`` and Hörmann's transformed
rejection with squeeze (PTRS; Hörmann 1993, "The transformed rejection method for generating
Poisson random variables") above, on 53-bit uniforms from the source (the OS CSPRNG in secure
mode).  Floating-point samplers, not exact ones like the discrete Gaussian's.
"""

from __future__ import annotations

import math
from typing import Any

import attrs
import numpy as np
import torch
from scipy.special import gammaln

from . import pytree
from .discrete_gaussian import _random_bits
from .discrete_gaussian_query import (
    MAX_L1_BOUND,
    MAX_ROUND_TRIES,
    _check_clip_vs_bound,
    check_norm_bound,
    check_noise_scale,
    check_round_tries,
    check_scale,
    decode,
    prepare_integer_records,
    rounded_l1_norm_bound,
)
from .distributed_discrete_gaussian_query import DistributedSumState, _DistributedIntegerSumQuery, record_dimension
from .dp_query import check_stddev
from .distributed_events import DistributedSkellamEvent
from .events import DpEvent, NoOpEvent
from .randomness import RandomSource, as_random_source

__all__ = ["DistributedSkellamSumQuery", "DistributedSkellamGlobalState", "sample_skellam", "sample_poisson"]

#: Largest local Skellam stddev: each Poisson rate ``stddev^2 / 2`` stays below 2^52.
MAX_LOCAL_STDDEV = 2.0**26

#: Largest modulus: partial sums of a batch of up to 2^22 client messages stay below 2^63.
MAX_BITS = 40


def _uniform_open(src: RandomSource, n: int) -> np.ndarray:
    """``n`` uniforms on the open interval (0, 1): ``(k + 1/2) 2^-53`` for 53 random bits ``k``."""
    return (_random_bits(src, n, 53).astype(np.float64) + 0.5) * 2.0**-53


def _poisson_small(src: RandomSource, lam: float, n: int) -> np.ndarray:
    limit = math.exp(-lam)
    k = np.zeros(n, dtype=np.int64)
    prod = _uniform_open(src, n)
    live = np.flatnonzero(prod > limit)
    while live.size:
        prod[live] *= _uniform_open(src, live.size)
        k[live] += 1
        live = live[prod[live] > limit]
    return k


def _poisson_ptrs(src: RandomSource, lam: float, n: int) -> np.ndarray:
    slam, loglam = math.sqrt(lam), math.log(lam)
    b = 0.931 + 2.53 * slam
    a = -0.059 + 0.02483 * b
    log_inv_alpha = math.log(1.1239 + 1.1328 / (b - 3.4))
    vr = 0.9277 - 3.6224 / (b - 2.0)
    out = np.empty(n, dtype=np.int64)
    pending = np.arange(n)
    while pending.size:
        m = pending.size
        u = _uniform_open(src, m) - 0.5
        v = _uniform_open(src, m)
        us = 0.5 - np.abs(u)
        k = np.floor((2.0 * a / us + b) * u + lam + 0.43)
        quick = (us >= 0.07) & (v <= vr)
        reject = (k < 0) | ((us < 0.013) & (v > us))
        kk = np.where(reject, 0.0, k)
        with np.errstate(divide="ignore"):
            lhs = np.log(v) + log_inv_alpha - np.log(a / (us * us) + b)
        slow = ~quick & ~reject & (lhs <= -lam + kk * loglam - gammaln(kk + 1.0))
        ok = quick | slow
        out[pending[ok]] = k[ok].astype(np.int64)
        pending = pending[~ok]
    return out


def sample_poisson(lam: float, shape, generator: "torch.Generator | RandomSource | None" = None, *, secure_mode: bool = False) -> torch.Tensor:
    """Poisson(``lam``) draws (int64 tensor of ``shape``, CPU) from the caller's source."""
    lam = check_stddev(lam, "lam")
    if lam > 2.0**52:
        raise ValueError(f"lam must be at most 2^52, got {lam!r}")
    src = as_random_source(generator, secure_mode=secure_mode)
    shape = (shape,) if isinstance(shape, int) else tuple(int(d) for d in shape)
    n = math.prod(shape)
    if lam == 0 or n == 0:
        return torch.zeros(shape, dtype=torch.int64)
    draw = _poisson_small if lam < 10 else _poisson_ptrs
    return torch.from_numpy(draw(src, lam, n)).reshape(shape)


def sample_skellam(variance: float, shape, generator: "torch.Generator | RandomSource | None" = None, *, secure_mode: bool = False, device="cpu") -> torch.Tensor:
    """Symmetric Skellam draws ``Poisson(variance/2) - Poisson(variance/2)`` (int64, mean 0,
    variance ``variance``) of ``shape`` on ``device``."""
    variance = check_stddev(variance, "variance")
    src = as_random_source(generator, secure_mode=secure_mode)
    if variance == 0:
        return torch.zeros(shape, dtype=torch.int64, device=device)
    return (sample_poisson(variance / 2, shape, src) - sample_poisson(variance / 2, shape, src)).to(device)


@attrs.frozen
class DistributedSkellamGlobalState:
    """Global state of :class:`DistributedSkellamSumQuery` (integer-domain bounds and noise)."""

    l1_norm_bound: float
    l2_norm_bound: float
    local_stddev: float


def _modulus(bits, modulus) -> int | None:
    if bits is not None and modulus is not None:
        raise ValueError("give bits or modulus, not both (modulus = 2**bits)")
    if bits is not None:
        if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
            raise ValueError(f"bits must be an integer in [1, {MAX_BITS}], got {bits!r}")
        return 2**bits
    if modulus is not None:
        if isinstance(modulus, bool) or not isinstance(modulus, int) or not 2 <= modulus <= 2**MAX_BITS:
            raise ValueError(f"modulus must be an integer in [2, 2^{MAX_BITS}], got {modulus!r}")
    return modulus


class DistributedSkellamSumQuery(_DistributedIntegerSumQuery):
    """Sum of records each carrying its own Skellam noise, in the modular arithmetic of secure
    aggregation (see the module docstring for the pipeline).

    Args:
        l1_norm_bound, l2_norm_bound: bounds on one record's L1 and L2 norms in the integer
            domain (after scaling and rounding); records above them are clipped.
        local_stddev: each record's Skellam noise stddev in the integer domain (variance
            ``local_stddev^2``); 0 for no noise.
        l2_norm_clip: take floating-point records: clip each to this L2 norm, multiply by
            ``scale``, round conditionally to ``l2_norm_bound``; the result is decoded (divided by
            ``scale``, float64).  ``l2_norm_clip * scale`` must not exceed ``l2_norm_bound``
            (:func:`~.discrete_gaussian_query.rounded_l2_norm_bound` gives a suitable bound).
        scale: the scaling factor of floating-point records (1/granularity), > 0.
        bits / modulus: secure aggregation works modulo ``modulus = 2**bits`` (at most
            ``2**40``); ``None`` for plain integer sums.
        max_round_tries, generator, secure_mode: as for the discrete Gaussian queries.
    """

    def __init__(
        self,
        l1_norm_bound: float,
        l2_norm_bound: float,
        local_stddev: float,
        *,
        l2_norm_clip: float | None = None,
        scale: float = 1.0,
        bits: int | None = None,
        modulus: int | None = None,
        max_round_tries: int = MAX_ROUND_TRIES,
        generator: "torch.Generator | RandomSource | None" = None,
        secure_mode: bool = False,
    ):
        self._l1 = check_norm_bound(l1_norm_bound, "l1_norm_bound", MAX_L1_BOUND)
        self._l2 = check_norm_bound(l2_norm_bound, "l2_norm_bound")
        self._local = check_noise_scale(local_stddev, "local_stddev")
        if self._local > MAX_LOCAL_STDDEV:
            raise ValueError(f"local_stddev must be at most 2^26 (its Poisson rates at most 2^52), got {local_stddev!r}")
        self._scale = check_scale(scale, l2_norm_clip)
        self._clip = _check_clip_vs_bound(l2_norm_clip, self._scale, self._l2)
        self._modulus = _modulus(bits, modulus)
        self._max_tries = check_round_tries(max_round_tries)
        self.generator = as_random_source(generator, secure_mode=secure_mode)

    @property
    def modulus(self) -> int | None:
        """The modulus of the secure aggregation arithmetic (``None``: plain integer sums)."""
        return self._modulus

    @property
    def scale(self) -> float:
        return self._scale

    def initial_global_state(self) -> DistributedSkellamGlobalState:
        return DistributedSkellamGlobalState(self._l1, self._l2, self._local)

    def derive_metrics(self, global_state: DistributedSkellamGlobalState) -> dict[str, float]:
        return {
            "l1_norm_bound": float(global_state.l1_norm_bound),
            "l2_norm_bound": float(global_state.l2_norm_bound),
            "local_stddev": float(global_state.local_stddev),
        }

    def _reduce(self, total: torch.Tensor) -> torch.Tensor:
        return total if self._modulus is None else torch.remainder(total, self._modulus)

    def preprocess_records(self, params: DistributedSkellamGlobalState, batch: Any) -> Any:
        """Bound, scale and round each record, add its Skellam share, reduce modulo the modulus."""
        leaves, spec = pytree.flatten(batch)
        ints = prepare_integer_records(
            leaves,
            l2_norm_bound=float(params.l2_norm_bound),
            l1_norm_bound=float(params.l1_norm_bound),
            l2_norm_clip=self._clip,
            scale=self._scale,
            source=self.generator,
            max_round_tries=self._max_tries,
        )
        var = float(params.local_stddev) ** 2
        noised = [self._reduce(x + sample_skellam(var, tuple(x.shape), self.generator, device=x.device)) for x in ints]
        return pytree.unflatten(noised, spec)

    def decode(self, total: Any) -> Any:
        """The centred representative of a (modular) sum, divided by ``scale`` in
        floating-point mode."""

        def one(t: torch.Tensor) -> torch.Tensor:
            if self._modulus is not None:
                m = self._modulus
                t = torch.remainder(t, m)
                t = torch.where(t >= (m + 1) // 2, t - m, t)
            return decode(t, self._scale, self._clip is not None)

        return pytree.tree_map(one, total)

    def get_noised_result(self, sample_state: DistributedSumState, global_state: DistributedSkellamGlobalState):
        """The decoded sum of the noised records (secure aggregation's output)."""
        return self.decode(sample_state.total), global_state, self.event(global_state, sample_state)

    def event(self, global_state: DistributedSkellamGlobalState, sample_state: DistributedSumState) -> DpEvent:
        """``DistributedSkellamEvent(l1, l2, local_stddev^2, num_records)``, with the L1 bound
        tightened to ``min(l1_norm_bound, sqrt(d) l2, l2^2)``; ``NoOpEvent`` for an empty sample
        or zero bounds."""
        l1, l2 = float(global_state.l1_norm_bound), float(global_state.l2_norm_bound)
        n = int(sample_state.num_records)
        if n == 0 or min(l1, l2) < 1:  # an integer vector with L1 or L2 norm below 1 is zero
            return NoOpEvent()
        l1 = min(l1, rounded_l1_norm_bound(l2, record_dimension(sample_state.total)))
        return DistributedSkellamEvent(l1, min(l2, l1), float(global_state.local_stddev) ** 2, n)
