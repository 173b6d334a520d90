"""Gaussian sum query: clip each record to an L2 bound, sum, add isotropic Gaussian noise."""

from __future__ import annotations

from typing import Any, Callable

import attrs
import torch

from . import pytree
from .dp_query import SumAggregationDPQuery, check_stddev, clip_coefficients
from .events import DpEvent, GaussianEvent, NoOpEvent
from .randomness import RandomSource, as_random_source

__all__ = ["GaussianSumQuery", "GaussianSumGlobalState", "add_gaussian_noise", "add_gaussian_noise_", "clip_record"]


@attrs.frozen
class GaussianSumGlobalState:
    """Global state of :class:`GaussianSumQuery`: the clip bound and the noise stddev."""

    l2_norm_clip: Any
    stddev: Any


def clip_record(record: Any, l2_norm_clip) -> Any:
    """Scale ``record`` (a tensor or pytree) so its global L2 norm is at most ``l2_norm_clip``.

    Records already within the bound are returned unchanged (bit for bit).  The norm and the
    scaling are computed exactly as in the batched path (:func:`~.tree.global_norms`, overflow-safe,
    then :func:`~.tree.scale_rows`), so a record is clipped identically either way.  A record with a NaN or infinite entry raises ``ValueError``.  ``l2_norm_clip`` 0 gives
    zeros.
    """
    leaves, spec = pytree.flatten(record)
    if not leaves:
        return record
    norms = pytree.global_norms([l.unsqueeze(0) for l in leaves])
    pytree.check_finite_norms(norms, single=True)
    if bool(norms[0] <= l2_norm_clip):
        return record
    coef = clip_coefficients(norms, l2_norm_clip)[0]
    return pytree.unflatten([pytree.scale_rows(l, coef) for l in leaves], spec)


def clip_records(batch: Any, l2_norm_clip) -> tuple[Any, torch.Tensor]:
    """``(batch with each record scaled to global L2 norm <= l2_norm_clip, the records' norms)``.

    ``batch`` is a tensor or pytree with a leading batch dimension on every leaf; norms are the
    overflow-safe :func:`~.pytree.global_norms`, and a record with a NaN or infinite entry raises
    ``ValueError``.  The batched twin of :func:`clip_record` (same arithmetic, same result)."""
    leaves, spec = pytree.flatten(batch)
    if not leaves:
        raise ValueError("record has no tensors")
    norms = pytree.global_norms(batch)
    pytree.check_finite_norms(norms)
    coef = clip_coefficients(norms, l2_norm_clip)
    return pytree.unflatten([pytree.scale_rows(l, coef) for l in leaves], spec), norms


def add_gaussian_noise(
    record: Any, stddev, generator: "torch.Generator | RandomSource | None" = None, *, in_place: bool = False
) -> Any:
    """``record + N(0, stddev^2 I)`` leaf-wise.

    ``generator``: a :class:`~pytorch_privacy.dp_query.randomness.RandomSource` (what queries
    own), a ``torch.Generator`` (drawn on its device, then moved: a CPU generator seeds
    reproducible noise for CUDA tensors too), or ``None`` for a fresh OS-seeded source (never
    torch's global RNG).  The noise of each leaf is drawn and added in float32 or wider
    (:func:`~pytorch_privacy.dp_query.randomness.noise_dtype`), then cast to the leaf's dtype;
    leaves are drawn one after the other, in leaf order.  ``stddev`` may be a 0-dim tensor (no
    host sync).

    ``in_place=True``: the caller owns ``record``'s tensors and gives them up; leaves already in
    the noise dtype are noised where they lie (``torch._foreach_add_``), the others as above.  The
    same draws in the same order and the same arithmetic, so the same values bit for bit; it saves
    one allocation and one written copy per leaf.
    """
    if isinstance(stddev, (int, float)) and stddev == 0:
        return pytree.tree_map(lambda leaf: leaf, record)
    src = as_random_source(generator)
    if isinstance(record, dict) and record and all(isinstance(v, torch.Tensor) for v in record.values()):
        keys, leaves, spec = list(record), list(record.values()), None
    else:
        leaves, spec = pytree.flatten(record)
    zs = [src.normal(leaf.shape, device=leaf.device, dtype=leaf.dtype) for leaf in leaves]
    if isinstance(stddev, (int, float)):
        torch._foreach_mul_(zs, stddev)
    else:
        zs = [(z * stddev).to(z.dtype) for z in zs]
    out_dtypes = [leaf.dtype if leaf.is_floating_point() else torch.get_default_dtype() for leaf in leaves]
    if in_place and all(leaf.dtype == z.dtype for leaf, z in zip(leaves, zs)):  # floating, nothing to cast
        torch._foreach_add_(leaves, zs)
        return dict(zip(keys, leaves)) if spec is None else pytree.unflatten(leaves, spec)
    wide = [leaf if leaf.dtype == z.dtype else leaf.to(z.dtype) for leaf, z in zip(leaves, zs)]
    summed = torch._foreach_add(wide, zs)
    out = [s if s.dtype == d else s.to(d) for s, d in zip(summed, out_dtypes)]
    if spec is None:
        return dict(zip(keys, out))
    return pytree.unflatten(out, spec)


def add_gaussian_noise_(tensor: torch.Tensor, stddev, generator: "torch.Generator | RandomSource | None" = None) -> torch.Tensor:
    """``tensor += N(0, stddev^2 I)`` in place; returns ``tensor``.

    :func:`add_gaussian_noise` for one floating-point tensor without its temporaries: the
    normals are drawn by ``generator`` in :func:`~pytorch_privacy.dp_query.randomness.noise_dtype`
    of the tensor (float32 or wider; float64 in secure mode), and ``tensor + stddev * z`` is
    computed in that width (one fused multiply-add pass) and cast back into ``tensor``.  The same
    distribution as :func:`add_gaussian_noise`, drawn from the generator in the same order; the
    values agree to rounding (the product is not rounded separately).  ``stddev`` may be a 0-dim
    tensor."""
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        raise TypeError(f"add_gaussian_noise_ needs a floating-point tensor, got {type(tensor).__name__}")
    if isinstance(stddev, (int, float)) and stddev == 0:
        return tensor
    z = as_random_source(generator).normal(tensor.shape, device=tensor.device, dtype=tensor.dtype)
    if isinstance(stddev, (int, float)):
        return tensor.add_(z, alpha=stddev)
    return tensor.add_(z.mul_(stddev.to(z.device, z.dtype)))


class GaussianSumQuery(SumAggregationDPQuery):
    """Sum of records clipped to L2 norm ``l2_norm_clip``, plus ``N(0, stddev^2)`` per coordinate.

    The clip is over all tensors of a record together (global L2 norm), so one record's
    contribution to the sum has L2 sensitivity ``l2_norm_clip`` under add/remove-one.  The
    released event is ``GaussianEvent(stddev / l2_norm_clip)``.

    Args:
        l2_norm_clip: clip bound C >= 0.  With C = 0 (also when a global state's clip is set to 0,
            as TF Privacy allows) every record clips to zero, the result is pure noise and the event
            is :class:`~.events.NoOpEvent` (nothing about the data is released).
        stddev: noise standard deviation (``noise_multiplier * C``), >= 0.
        generator: optional ``torch.Generator`` for reproducible noise (tests), or a shared
            :class:`~pytorch_privacy.dp_query.randomness.RandomSource`.  Default: the query owns
            generators seeded from OS entropy (never torch's global RNG).
        secure_mode: draw the noise from the OS CSPRNG (see :mod:`~pytorch_privacy.dp_query.randomness`).

    ``self.generator`` is the query's :class:`~pytorch_privacy.dp_query.randomness.RandomSource`
    (its ``state_dict`` is what a checkpoint saves).
    """

    def __init__(
        self,
        l2_norm_clip: float,
        stddev: float,
        *,
        generator: "torch.Generator | RandomSource | None" = None,
        secure_mode: bool = False,
    ):
        self._l2_norm_clip = check_stddev(l2_norm_clip, "l2_norm_clip")  # finite, >= 0 (TF allows 0)
        self._stddev = check_stddev(stddev)
        self.generator = as_random_source(generator, secure_mode=secure_mode)

    def initial_global_state(self) -> GaussianSumGlobalState:
        return GaussianSumGlobalState(self._l2_norm_clip, self._stddev)

    def random_sources(self) -> list[RandomSource]:
        """The randomness this query owns (what a checkpoint saves)."""
        return [self.generator]

    def derive_sample_params(self, global_state: GaussianSumGlobalState):
        return global_state.l2_norm_clip

    def derive_metrics(self, global_state: GaussianSumGlobalState) -> dict[str, float]:
        return {"l2_norm_clip": float(global_state.l2_norm_clip), "stddev": float(global_state.stddev)}

    def preprocess_record(self, params, record):
        return clip_record(record, params)

    def preprocess_records(self, params, batch):
        leaves, _ = pytree.flatten(batch)
        if not leaves or leaves[0].shape[0] == 0:
            return batch
        return clip_records(batch, params)[0]

    def sum_records_by_norm(self, params, norms: torch.Tensor, weighted_sum: Callable):
        """The clipped sum of a batch known through its norms, ``sum_i min(1, C / ||g_i||) g_i``
        (``weighted_sum`` of the clip coefficients): what :meth:`accumulate_records_by_norm` adds
        to its sample state.  A caller that would add it to a fresh (zero) sample state may take
        it as the state itself (:class:`~pytorch_privacy.optimizer.StepAccumulator` does)."""
        return weighted_sum(clip_coefficients(norms, params))

    def accumulate_records_by_norm(self, params, sample_state, norms: torch.Tensor, weighted_sum: Callable):
        return self.accumulate_preprocessed_record(sample_state, self.sum_records_by_norm(params, norms, weighted_sum))

    def accumulate_preprocessed_record(self, sample_state, preprocessed_record):
        if pytree.is_flat_dict(sample_state) and pytree.is_flat_dict(preprocessed_record):
            # hot path: one foreach add (same values as the leaf-wise torch.add)
            pytree.check_same_structure(sample_state, preprocessed_record)
            return dict(zip(sample_state, torch._foreach_add(list(sample_state.values()), list(preprocessed_record.values()))))
        return super().accumulate_preprocessed_record(sample_state, preprocessed_record)

    def merge_sample_states(self, sample_state_1, sample_state_2):
        return self.accumulate_preprocessed_record(sample_state_1, sample_state_2)

    def get_noised_result(self, sample_state, global_state: GaussianSumGlobalState):
        result = add_gaussian_noise(sample_state, global_state.stddev, self.generator)
        return result, global_state, self.event(global_state)

    def get_noised_result_in_place(self, sample_state, global_state: GaussianSumGlobalState):
        """:meth:`get_noised_result` for a caller that owns ``sample_state``'s tensors and gives them
        up (:func:`add_gaussian_noise` with ``in_place=True``): the same draws and values, with the
        noise added where the sums lie.  The result's tensors are then the caller's."""
        result = add_gaussian_noise(sample_state, global_state.stddev, self.generator, in_place=True)
        return result, global_state, self.event(global_state)

    def noise_in_place(self, flat: torch.Tensor, global_state: GaussianSumGlobalState) -> tuple[GaussianSumGlobalState, DpEvent]:
        """:meth:`get_noised_result` of a sample state held as one flat tensor, noised where it
        lies (:func:`add_gaussian_noise_`): returns ``(new_global_state, event)``.  Data-parallel
        steps noise their block of the flat all-reduce buffer with it."""
        add_gaussian_noise_(flat, global_state.stddev, self.generator)
        return global_state, self.event(global_state)

    def event(self, global_state: GaussianSumGlobalState) -> DpEvent:
        """The privacy event of one sample under ``global_state``: ``GaussianEvent(stddev / clip)``,
        or :class:`~.events.NoOpEvent` for clip 0 (every record is clipped to zero, so the result
        does not depend on the data; TF Privacy's sum is zero there too)."""
        clip = float(global_state.l2_norm_clip)
        if clip == 0:
            return NoOpEvent()
        if not clip > 0:
            raise ValueError(f"the global state's l2_norm_clip must be >= 0, got {clip!r}")
        return GaussianEvent(float(global_state.stddev) / clip)
