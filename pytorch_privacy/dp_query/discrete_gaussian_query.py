r"""Discrete Gaussian sum query: integer records, L2-bounded, summed, plus ``N_Z(0, sigma^2)`` noise.

TF Privacy's ``DiscreteGaussianSumQuery`` semantics: the records are integer vectors (the output
of a randomized rounding), each of global L2 norm at most ``l2_norm_bound``; the query sums them
and adds discrete Gaussian noise of scale ``stddev`` to every coordinate of the sum.  Two
differences from TF Privacy, both documented on the class: a record above the bound is clipped
(scaled down and rounded toward zero, which keeps it integer and within the bound) instead of
failing an assertion, and ``stddev`` is used exactly (TF Privacy rounds it up to an integer,
since its sampler takes integer scales only; :mod:`.discrete_gaussian` samples any rational
``sigma^2`` exactly).

Floating-point records can be rounded by the query itself (``l2_norm_clip=...``) with the
*conditional randomized rounding* of Kairouz, Liu, Steinke 2021 ("The Distributed Discrete
Gaussian Mechanism for Federated Learning with Secure Aggregation", Section 4.1): clip to
``l2_norm_clip``, then round every coordinate up with probability equal to its fractional part
(unbiased), redrawing the rounding until the rounded vector's L2 norm is at most
``l2_norm_bound``.  :func:`rounded_l2_norm_bound` gives the bound that such a rounding meets
with probability ``1 - beta``.  After ``max_round_tries`` failed draws the record is rounded
toward zero instead (norm never above the clipped record's), so the bound always holds.

The helpers here (:func:`randomized_round`, :func:`clip_integer_records`,
:func:`prepare_integer_records`) are shared with the distributed discrete Gaussian and Skellam
queries.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import attrs
import torch

from . import pytree
from .discrete_gaussian import _random_bits, sample_discrete_gaussian
from .dp_query import SumAggregationDPQuery, check_stddev, clip_coefficients
from .distributed_events import DiscreteGaussianEvent
from .events import DpEvent, NoOpEvent
from .randomness import RandomSource, as_random_source

__all__ = [
    "DiscreteGaussianSumQuery",
    "DiscreteGaussianSumGlobalState",
    "randomized_round",
    "clip_integer_records",
    "prepare_integer_records",
    "rounded_l2_norm_bound",
    "rounded_l1_norm_bound",
]

#: Conditional rounding draws per record before it falls back to rounding toward zero.
MAX_ROUND_TRIES = 100
_EXACT = 2.0**53  # integer sums of squares below this are exact in float64
_MARGIN = 1.0 - 2.0**-40  # clip coefficient margin: rounding of x * c never crosses the bound


def rounded_l2_norm_bound(l2_norm_clip: float, dim: int, beta: float = math.exp(-0.5)) -> float:
    """The L2 norm a conditional randomized rounding of a vector of norm ``<= l2_norm_clip`` in
    ``dim`` coordinates meets with probability at least ``1 - beta`` (Kairouz et al. 2021,
    Theorem 1): ``min(c + sqrt(d), sqrt(c^2 + d/4 + sqrt(2 ln(1/beta)) (c + sqrt(d)/2)))``;
    ``beta = 0`` gives the deterministic ``c + sqrt(d)``."""
    c = check_stddev(l2_norm_clip, "l2_norm_clip")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive integer, got {dim!r}")
    if not 0 <= beta < 1:
        raise ValueError(f"beta must be in [0, 1), got {beta!r}")
    b1 = c + math.sqrt(dim)
    if beta == 0:
        return b1
    b2 = c * c + 0.25 * dim + math.sqrt(2.0 * math.log(1.0 / beta)) * (c + 0.5 * math.sqrt(dim))
    return min(b1, math.sqrt(b2))


def rounded_l1_norm_bound(l2_norm_bound: float, dim: int) -> float:
    """An L1 bound for integer vectors of L2 norm ``<= l2_norm_bound`` in ``dim`` coordinates:
    ``min(sqrt(d) c, c^2)`` (Cauchy-Schwarz, and ``|x_i| <= x_i^2`` for integers)."""
    c = check_stddev(l2_norm_bound, "l2_norm_bound")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive integer, got {dim!r}")
    return min(math.sqrt(dim) * c, c * c)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1)


def _sq_norms(leaves: list[torch.Tensor]) -> torch.Tensor:
    """Per-row sum of squares in float64 (exact for integer rows whose sum is below 2^53)."""
    return sum(_rows(l).to(torch.float64).square().sum(dim=1) for l in leaves)


def _l1_norms(leaves: list[torch.Tensor]) -> torch.Tensor:
    return sum(_rows(l).to(torch.float64).abs().sum(dim=1) for l in leaves)


def _sq_threshold(bound: float) -> float:
    """``floor(bound^2)`` exactly: an integer vector has norm <= bound iff its sum of squares is
    at most this."""
    return float(math.floor(Fraction(bound) ** 2))


def clip_integer_records(leaves: list[torch.Tensor], l2_norm_bound: float, l1_norm_bound: float | None = None) -> list[torch.Tensor]:
    """Integer rows (leading batch dimension) within the L2 (and L1) bounds: a row over a bound
    is multiplied by ``c = min(bound / norm) * (1 - 2^-40)`` and rounded toward zero, which keeps
    it integer, shrinks every coordinate and brings both norms within their bounds.  Rows within
    the bounds are returned unchanged; the result is int64."""
    leaves = [l.to(torch.int64) for l in leaves]
    if not leaves or leaves[0].shape[0] == 0:
        return leaves
    sq = _sq_norms(leaves)
    coef = torch.ones_like(sq)
    over2 = sq > _sq_threshold(l2_norm_bound)
    coef = torch.where(over2, l2_norm_bound / sq.sqrt().clamp_min(1.0), coef)
    if l1_norm_bound is not None:
        l1 = _l1_norms(leaves)
        over1 = l1 > math.floor(l1_norm_bound)
        coef = torch.where(over1, torch.minimum(coef, l1_norm_bound / l1.clamp_min(1.0)), coef)
        over2 = over2 | over1
    if not bool(over2.any()):
        return leaves
    coef = torch.where(over2, coef * _MARGIN, coef)
    out = []
    for l in leaves:
        c = coef.to(l.device).reshape((-1,) + (1,) * (l.dim() - 1))
        clipped = torch.trunc(l.to(torch.float64) * c).to(torch.int64)
        out.append(torch.where(over2.to(l.device).reshape(c.shape), clipped, l))
    return out


def _uniform01(src: RandomSource, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    if src.secure_mode:
        n = math.prod(shape)
        return (torch.from_numpy(_random_bits(src, n, 53)).to(torch.float64) * 2.0**-53).reshape(shape).to(device)
    g = src.torch_generator(device)
    return torch.rand(shape, generator=g, device=g.device, dtype=torch.float64).to(device)


def _round_rows(leaves: list[torch.Tensor], l2_norm_bound: float, src: RandomSource, max_tries: int) -> list[torch.Tensor]:
    """Conditional randomized rounding of float rows to integer rows of L2 norm <= the bound."""
    xs = [l.to(torch.float64) for l in leaves]
    floors = [torch.floor(x) for x in xs]
    fracs = [x - f for x, f in zip(xs, floors)]
    out = [f.to(torch.int64) for f in floors]
    thr = _sq_threshold(l2_norm_bound)
    todo = torch.arange(xs[0].shape[0], device=xs[0].device)
    for _ in range(max_tries):
        if not todo.numel():
            return out
        cand = [
            (f[todo] + (_uniform01(src, tuple(fr[todo].shape), fr.device) < fr[todo]).to(torch.float64)).to(torch.int64)
            for f, fr in zip(floors, fracs)
        ]
        ok = _sq_norms(cand) <= thr
        for o, c in zip(out, cand):
            o[todo[ok]] = c[ok]
        todo = todo[~ok]
    if todo.numel():  # fall back: round toward zero (then clip, for rows above the bound itself)
        trunc = clip_integer_records([torch.trunc(x[todo]).to(torch.int64) for x in xs], l2_norm_bound)
        for o, t in zip(out, trunc):
            o[todo] = t
    return out


def randomized_round(
    record: Any,
    l2_norm_bound: float,
    generator: "torch.Generator | RandomSource | None" = None,
    *,
    max_tries: int = MAX_ROUND_TRIES,
    secure_mode: bool = False,
) -> Any:
    """Conditional randomized rounding (Kairouz et al. 2021) of one float record (a tensor or
    pytree) to an int64 record of global L2 norm at most ``l2_norm_bound``: each coordinate is
    rounded up with probability equal to its fractional part, redrawn until the norm bound
    holds; after ``max_tries`` failures, rounded toward zero (and clipped if the record itself
    is above the bound)."""
    leaves, spec = pytree.flatten(record)
    src = as_random_source(generator, secure_mode=secure_mode)
    bound = check_norm_bound(l2_norm_bound, "l2_norm_bound")
    if not all(bool(torch.isfinite(l).all()) for l in leaves):
        raise ValueError("the record has a NaN or infinite entry; it cannot be rounded")
    rows = _round_rows([l.unsqueeze(0) for l in leaves], bound, src, check_round_tries(max_tries))
    return pytree.unflatten([r[0] for r in rows], spec)


def prepare_integer_records(
    leaves: list[torch.Tensor],
    *,
    l2_norm_bound: float,
    l1_norm_bound: float | None = None,
    l2_norm_clip: float | None = None,
    scale: float = 1.0,
    source: RandomSource,
    max_round_tries: int = MAX_ROUND_TRIES,
) -> list[torch.Tensor]:
    """Batched records (leaves with a leading batch dimension) to int64 rows within the bounds.

    Integer records are clipped to the bounds (:func:`clip_integer_records`).  Floating-point
    records need ``l2_norm_clip``: they are clipped to it in L2, multiplied by ``scale`` and
    conditionally rounded to L2 norm ``<= l2_norm_bound`` (then clipped to ``l1_norm_bound``).
    A record with a NaN or infinite entry raises ``ValueError``.
    """
    if not leaves or leaves[0].shape[0] == 0:
        return [l.to(torch.int64) for l in leaves]
    if any(l.is_complex() for l in leaves):
        raise TypeError("records must be real (integer or floating-point) tensors")
    if any(l.is_floating_point() for l in leaves):
        if l2_norm_clip is None:
            raise TypeError(
                "this query sums integer records; got floating-point ones. Round them first "
                "(randomized_round), or pass l2_norm_clip=... so the query clips, scales and rounds them"
            )
        xs = [l.to(torch.float64) for l in leaves]
        norms = pytree.global_norms(xs)
        pytree.check_finite_norms(norms)
        coef = clip_coefficients(norms, l2_norm_clip) * scale
        xs = [pytree.scale_rows(x, coef) for x in xs]
        leaves = _round_rows(xs, l2_norm_bound, source, max_round_tries)
    return clip_integer_records(leaves, l2_norm_bound, l1_norm_bound)


@attrs.frozen
class DiscreteGaussianSumGlobalState:
    """Global state of :class:`DiscreteGaussianSumQuery`: the record norm bound and noise scale."""

    l2_norm_bound: float
    stddev: float


#: Largest integer-domain L2 bound: a record's sum of squares (<= bound^2 <= 2^52) and the
#: squared threshold are then exact in float64, so the bound checks are exact.
MAX_L2_BOUND = 2.0**26
#: Largest integer-domain L1 bound (L1 sums exact in float64).
MAX_L1_BOUND = 2.0**52


def check_norm_bound(value, name: str, cap: float = MAX_L2_BOUND) -> float:
    """An integer-domain norm bound: finite, >= 0 and at most ``cap``."""
    v = check_stddev(value, name)
    if v > cap:
        raise ValueError(f"{name} must be at most {cap:.6g} (sums of squares exact in float64), got {value!r}")
    return v


def check_noise_scale(value, name: str) -> float:
    """A discrete noise scale: 0 (no noise) or in the sampler's range ``[2^-10, 2^40]``."""
    v = check_stddev(value, name)
    if v != 0 and not 2.0**-10 <= v <= 2.0**40:
        raise ValueError(f"{name} must be 0 or between 2^-10 (~0.001) and 2^40 (~1.1e12), got {value!r}")
    return v


def check_scale(scale, l2_norm_clip) -> float:
    """The scaling factor of floating-point records: > 0, and only with ``l2_norm_clip``."""
    v = check_stddev(scale, "scale")
    if v == 0:
        raise ValueError("scale must be > 0")
    if l2_norm_clip is None and v != 1.0:
        raise ValueError("scale applies to floating-point records: give l2_norm_clip too (integer records are taken as they are)")
    return v


def check_round_tries(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"max_round_tries must be a positive integer, got {value!r}")
    return value


def decode(t: torch.Tensor, scale: float, floating: bool) -> torch.Tensor:
    """An integer-domain sum back in the records' domain: ``t / scale`` in float64 for
    floating-point records, the int64 tensor itself (a copy) for integer records."""
    return t.to(torch.float64) / scale if floating else t.clone()


def _check_clip_vs_bound(l2_norm_clip, scale: float, l2_norm_bound: float) -> float | None:
    if l2_norm_clip is None:
        return None
    c = check_stddev(l2_norm_clip, "l2_norm_clip")
    if c * scale > l2_norm_bound:
        raise ValueError(
            f"l2_norm_clip * scale ({c * scale!r}) exceeds l2_norm_bound ({l2_norm_bound!r}): rounding a "
            "clipped record could never meet the bound. Use rounded_l2_norm_bound(l2_norm_clip * scale, dim) "
            "for l2_norm_bound"
        )
    return c


class DiscreteGaussianSumQuery(SumAggregationDPQuery):
    """Sum of integer records of L2 norm ``<= l2_norm_bound``, plus ``N_Z(0, stddev^2)`` noise on
    every coordinate (TF Privacy's ``DiscreteGaussianSumQuery``; Canonne, Kamath, Steinke 2020).

    Args:
        l2_norm_bound: bound on one integer record's global L2 norm (its L2 sensitivity under
            add/remove-one).  An integer record above it is clipped: scaled down and rounded
            toward zero (TF Privacy asserts instead); records within it are used as they are.
        stddev: the discrete Gaussian's scale ``sigma`` (exact, not rounded up as in TF Privacy).
        l2_norm_clip: optional; lets the query take floating-point records: each is clipped to
            this L2 norm, multiplied by ``scale`` and conditionally rounded
            (:func:`randomized_round`) to the bound; the result is then decoded (divided by
            ``scale``, float64).  ``l2_norm_clip * scale`` must not exceed ``l2_norm_bound``.
        scale: the scaling factor of floating-point records (the rounding granularity is
            ``1/scale``; ``stddev`` and the bound are in the scaled, integer domain).
        max_round_tries: conditional rounding draws before rounding toward zero.
        generator: a ``torch.Generator`` or a :class:`~.randomness.RandomSource` (default: owned,
            OS-seeded; never torch's global RNG).
        secure_mode: draw from the OS CSPRNG.

    The sum is int64, and so is the result for integer records.  The event is
    :class:`~.distributed_events.DiscreteGaussianEvent` ``(l2_norm_bound, stddev)``
    (:class:`~.events.NoOpEvent` when the bound is 0).
    """

    def __init__(
        self,
        l2_norm_bound: float,
        stddev: float,
        *,
        l2_norm_clip: float | None = None,
        scale: float = 1.0,
        max_round_tries: int = MAX_ROUND_TRIES,
        generator: "torch.Generator | RandomSource | None" = None,
        secure_mode: bool = False,
    ):
        self._l2_norm_bound = check_norm_bound(l2_norm_bound, "l2_norm_bound")
        self._stddev = check_noise_scale(stddev, "stddev")
        self._scale = check_scale(scale, l2_norm_clip)
        self._l2_norm_clip = _check_clip_vs_bound(l2_norm_clip, self._scale, self._l2_norm_bound)
        self._max_tries = check_round_tries(max_round_tries)
        self.generator = as_random_source(generator, secure_mode=secure_mode)

    def initial_global_state(self) -> DiscreteGaussianSumGlobalState:
        return DiscreteGaussianSumGlobalState(self._l2_norm_bound, self._stddev)

    def derive_sample_params(self, global_state: DiscreteGaussianSumGlobalState):
        return global_state

    def derive_metrics(self, global_state: DiscreteGaussianSumGlobalState) -> dict[str, float]:
        return {"l2_norm_bound": float(global_state.l2_norm_bound), "stddev": float(global_state.stddev)}

    def random_sources(self) -> list[RandomSource]:
        """The randomness this query owns (what a checkpoint saves)."""
        return [self.generator]

    def initial_sample_state(self, template: Any) -> Any:
        pytree.flatten(template)
        return pytree.tree_map(lambda t: torch.zeros(t.shape, dtype=torch.int64, device=t.device), template)

    def preprocess_records(self, params: DiscreteGaussianSumGlobalState, batch: Any) -> Any:
        leaves, spec = pytree.flatten(batch)
        out = prepare_integer_records(
            leaves,
            l2_norm_bound=float(params.l2_norm_bound),
            l2_norm_clip=self._l2_norm_clip,
            scale=self._scale,
            source=self.generator,
            max_round_tries=self._max_tries,
        )
        return pytree.unflatten(out, spec)

    def preprocess_record(self, params: DiscreteGaussianSumGlobalState, record: Any) -> Any:
        batched = pytree.tree_map(lambda t: t.unsqueeze(0), record)
        return pytree.tree_map(lambda t: t[0], self.preprocess_records(params, batched))

    def get_noised_result(self, sample_state: Any, global_state: DiscreteGaussianSumGlobalState):
        sigma = float(global_state.stddev)

        def noise(v: torch.Tensor) -> torch.Tensor:
            noised = v + sample_discrete_gaussian(sigma, tuple(v.shape), self.generator, device=v.device)
            return decode(noised, self._scale, self._l2_norm_clip is not None)

        return pytree.tree_map(noise, sample_state), global_state, self.event(global_state)

    def event(self, global_state: DiscreteGaussianSumGlobalState) -> DpEvent:
        """``DiscreteGaussianEvent(l2_norm_bound, stddev)``; ``NoOpEvent`` for bound 0 (every
        record clips to zero)."""
        bound = float(global_state.l2_norm_bound)
        if bound == 0:
            return NoOpEvent()
        return DiscreteGaussianEvent(bound, float(global_state.stddev))
