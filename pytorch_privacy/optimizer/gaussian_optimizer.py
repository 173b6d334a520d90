"""DP-SGD with the Gaussian mechanism in one line: :class:`DPGaussianOptimizer`."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..dp_query.dp_query import check_clip, check_stddev
from ..dp_query.privacy_ledger import PrivacyLedger
from ..dp_query.randomness import RandomSource
from .consistency import ledger_for_loader
from .dp_optimizer import DPOptimizer, LossFn, check_pos_int
from .wiring import public_denominator

__all__ = ["DPGaussianOptimizer"]


class DPGaussianOptimizer(DPOptimizer):
    """DP-SGD with the Gaussian mechanism in one line: :class:`DPOptimizer` around
    ``GaussianAverageQuery(l2_norm_clip, noise_multiplier * l2_norm_clip, denominator)``.

    Each step releases ``(sum_i clip_C(g_i) + N(0, (sigma C)^2 I)) / D`` with

    * ``D = expected_batch_size`` (default ``ledger.expected_batch_size``, i.e. ``q*N``),
    * ``D = num_microbatches`` with ``num_microbatches``, or
    * ``D = expected_batch_size / microbatch_size`` with ``microbatch_size``,

    a public constant in every case.  The ledger (if given) records ``GaussianEvent(sigma)``
    per step under its sampling settings.

    Args:
        optimizer, model, loss_fn: as for :class:`DPOptimizer`.
        l2_norm_clip: ``C`` > 0.
        noise_multiplier: ``sigma`` >= 0 (noise stddev over ``C``).
        expected_batch_size: the public denominator (required without a ledger and without
            ``num_microbatches``).
        ledger: records every step (and provides ``q*N``).
        generator: ``torch.Generator`` for the noise (reproducible runs).  Default: the query
            owns generators seeded from OS entropy (never torch's global RNG); either way their
            state is checkpointed and a resume continues the stream.
        secure_mode: draw the noise from the OS CSPRNG with the floating-point mitigation of
            :mod:`pytorch_privacy.dp_query.randomness` (no ``generator``).
        data_loader: the loader of the batches: builds the ledger (when ``ledger`` is not given)
            and gives ``q*N``; see :class:`DPOptimizer`.
        **kwargs: the other :class:`DPOptimizer` options.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module,
        loss_fn: LossFn,
        l2_norm_clip: float,
        noise_multiplier: float,
        *,
        expected_batch_size: float | None = None,
        ledger: PrivacyLedger | None = None,
        num_microbatches: int | None = None,
        microbatch_size: int | None = None,
        generator: torch.Generator | None = None,
        secure_mode: bool = False,
        data_loader: Any = None,
        **kwargs,
    ):
        from ..dp_query.normalized_query import GaussianAverageQuery

        if data_loader is not None and ledger is None:
            ledger = ledger_for_loader(data_loader)

        clip = check_clip(l2_norm_clip)
        sigma = check_stddev(noise_multiplier, "noise_multiplier")
        if num_microbatches is not None:
            denominator = float(check_pos_int("num_microbatches", num_microbatches))
        else:
            denominator = public_denominator(
                expected_batch_size, ledger, "DPGaussianOptimizer", alternatives=", or num_microbatches"
            )
            if microbatch_size is not None:
                denominator /= check_pos_int("microbatch_size", microbatch_size)
        self.l2_norm_clip = clip
        self.noise_multiplier = sigma
        self.denominator = denominator
        source = RandomSource(generator, secure_mode=secure_mode)
        query = GaussianAverageQuery(clip, sigma * clip, denominator, generator=source)
        super().__init__(
            optimizer,
            model,
            loss_fn,
            query,
            ledger=ledger,
            num_microbatches=num_microbatches,
            microbatch_size=microbatch_size,
            data_loader=data_loader,
            secure_mode=secure_mode,
            **kwargs,
        )
