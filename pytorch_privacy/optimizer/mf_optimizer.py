r"""Training with matrix-factorisation noise: :class:`DPMatrixFactorizationOptimizer` and banded
Poisson sampling (:class:`BandedPoissonLoader`).

``DPMatrixFactorizationOptimizer`` is :class:`~.dp_optimizer.DPOptimizer` around
``NormalizedQuery(MatrixFactorizationQuery(C_clip, sigma, strategy), D)``: each step releases
``(sum_i clip(g_i) + sigma C_clip (C^{-1} z)_t) / D`` with the public denominator ``D`` (the batch
size of a fixed-order loader, ``q * N`` of a Poisson one).  The ledger comes from the loader and the
run is accounted by the matrix-factorisation run grouper
(:mod:`pytorch_privacy.dp_query.matrix_factorization_events`):

* :class:`~.fixed_order.FixedOrderLoader` (no sampling; the same order every epoch): ``k`` epochs,
  participations exactly ``N // B`` steps apart.  Keep ``bands <= N // B`` for the exact banded
  sensitivity (more bands are accounted with an upper bound).
* :class:`BandedPoissonLoader` with ``partitions >= bands``: amplification by banded sampling
  (Choquette-Choo et al. 2023): DP-SGD's accounting over ``ceil(T / partitions)`` rounds.
* any other loader: the conservative bounds listed in that module (no amplification claimed).
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from ..dp_query.dp_query import check_clip, check_stddev
from ..dp_query.matrix_factorization import Strategy
from ..dp_query.matrix_factorization_query import MatrixFactorizationQuery
from ..dp_query.normalized_query import NormalizedQuery
from ..dp_query.privacy_ledger import PrivacyLedger
from ..dp_query.randomness import RandomSource, as_random_source
from .consistency import ledger_for_loader
from .dp_optimizer import DPOptimizer, LossFn
from .wiring import public_denominator
from .samplers import init_poisson_loader, refuse_batching_kwargs

__all__ = ["DPMatrixFactorizationOptimizer", "BandedPoissonSampler", "BandedPoissonLoader"]


class BandedPoissonSampler(Sampler[list[int]]):
    """Banded sampling (Choquette-Choo et al. 2023): record ``i`` belongs to group ``i mod partitions``;
    step ``t`` (counted across epochs) Poisson-samples group ``t mod partitions`` with rate ``q``.

    A record can only take part in steps of its group's residue class: at most ``ceil(T / p)`` times,
    at least ``p`` steps apart.  One pass is ``steps`` batches (default ``p * round(1/q)``: each group
    about once in expectation).  :meth:`state_dict` saves the step counter and the generator.
    """

    def __init__(
        self,
        num_samples: int,
        sample_rate: float,
        partitions: int,
        *,
        steps: int | None = None,
        generator: "torch.Generator | RandomSource | None" = None,
        secure_mode: bool = False,
    ):
        for name, v in (("num_samples", num_samples), ("partitions", partitions)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if partitions > num_samples:
            raise ValueError(f"partitions ({partitions}) exceeds the dataset size ({num_samples})")
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, float)) or not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
        self.num_samples = num_samples
        self.sample_rate = float(sample_rate)
        self.partitions = partitions
        self.steps = partitions * max(1, round(1 / self.sample_rate)) if steps is None else steps
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        self.random = as_random_source(generator, secure_mode=secure_mode)
        self.step = 0

    @property
    def group_size(self) -> int:
        """The largest group, ``ceil(N / partitions)`` (the ledger's population of one step)."""
        return -(-self.num_samples // self.partitions)

    @property
    def expected_batch_size(self) -> float:
        """``q * ceil(N / partitions)``: the public denominator."""
        return self.sample_rate * self.group_size

    def __len__(self) -> int:
        return self.steps

    def sample(self) -> torch.Tensor:
        """The next step's batch of indices (possibly empty)."""
        group = torch.arange(self.step % self.partitions, self.num_samples, self.partitions)
        mask = self.random.bernoulli_mask(group.numel(), self.sample_rate)
        self.step += 1
        return group[mask]

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            yield self.sample().tolist()

    def state_dict(self) -> dict[str, Any]:
        """The settings, the step counter and the generator state (for checkpoints)."""
        return {"num_samples": self.num_samples, "sample_rate": self.sample_rate, "partitions": self.partitions,
                "step": self.step, "random": self.random.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; a checkpoint of other settings is refused (nothing changes)."""
        if not isinstance(state, dict) or "random" not in state or "step" not in state:
            raise ValueError("not a BandedPoissonSampler state dict")
        for key in ("num_samples", "sample_rate", "partitions"):
            if state.get(key) != getattr(self, key):
                raise ValueError(f"the checkpoint's sampler has {key}={state.get(key)!r}, this one {getattr(self, key)!r}")
        self.random.load_state_dict(state["random"])
        self.step = int(state["step"])


class BandedPoissonLoader(DataLoader):
    """A ``DataLoader`` over :class:`BandedPoissonSampler` batches (empty batches included).

    Its ledger (:meth:`make_ledger`) is Poisson with ``q`` and the population of one group
    (``ceil(N / partitions)``); :class:`DPMatrixFactorizationOptimizer` passes ``partitions`` to the
    query, so a ``b``-banded strategy with ``b <= partitions`` is accounted with amplification.
    """

    def __init__(self, dataset: Dataset, sample_rate: float, partitions: int, *, steps: int | None = None,
                 generator: torch.Generator | None = None, secure_mode: bool = False, collate_fn=None, **kwargs):
        refuse_batching_kwargs("BandedPoissonLoader", kwargs)
        sampler = BandedPoissonSampler(len(dataset), sample_rate, partitions, steps=steps, generator=generator,
                                       secure_mode=secure_mode)
        init_poisson_loader(self, dataset, sampler, collate_fn, kwargs)
        self.partitions = partitions

    @property
    def expected_batch_size(self) -> float:
        return self.poisson_sampler.expected_batch_size

    def ledger_settings(self) -> dict[str, Any]:
        """The ledger settings of one step: Poisson sampling at ``q`` within one group."""
        s = self.poisson_sampler
        return {"population_size": s.group_size, "sampling": "poisson", "selection_probability": s.sample_rate,
                "batch_size": None}

    def make_ledger(self, **metadata) -> PrivacyLedger:
        """A new ledger with this loader's settings (``metadata`` saved with it)."""
        s = self.poisson_sampler
        return PrivacyLedger(s.group_size, s.sample_rate, sampling="poisson", metadata=metadata)

    def state_dict(self) -> dict[str, Any]:
        """The sampler's :meth:`BandedPoissonSampler.state_dict`."""
        return self.poisson_sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (settings must match)."""
        self.poisson_sampler.load_state_dict(state)


class DPMatrixFactorizationOptimizer(DPOptimizer):
    """:class:`DPOptimizer` with matrix-factorisation noise (see the module docstring).

    Args:
        optimizer, model, loss_fn: as for :class:`DPOptimizer` (use plain SGD, or momentum with a
            strategy optimised for the momentum workload).
        l2_norm_clip: ``C_clip > 0``.
        noise_multiplier: ``sigma`` (stddev of ``z`` over ``C_clip``).
        strategy: a :class:`~pytorch_privacy.dp_query.matrix_factorization.Strategy`, e.g.
            ``optimize_banded_toeplitz(total_steps, bands)``.
        data_loader: a :class:`~.fixed_order.FixedOrderLoader`, a :class:`BandedPoissonLoader`, or
            any loader :class:`DPOptimizer` accepts; builds the ledger when ``ledger`` is not given.
        expected_batch_size: the public denominator (default: the ledger's ``q * N``).
        generator, secure_mode: the noise's randomness (as for ``DPGaussianOptimizer``).
        **kwargs: other :class:`DPOptimizer` options (``target_epsilon``, ``target_delta``, ...).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module,
        loss_fn: LossFn,
        l2_norm_clip: float,
        noise_multiplier: float,
        strategy: Strategy,
        *,
        data_loader: Any = None,
        ledger: PrivacyLedger | None = None,
        expected_batch_size: float | None = None,
        generator: torch.Generator | None = None,
        secure_mode: bool = False,
        **kwargs,
    ):
        if data_loader is not None and ledger is None:
            ledger = ledger_for_loader(data_loader)
        denominator = public_denominator(expected_batch_size, ledger, "DPMatrixFactorizationOptimizer")
        partitions = int(getattr(data_loader, "partitions", 1) or 1)
        clip = check_clip(l2_norm_clip)
        sigma = check_stddev(noise_multiplier, "noise_multiplier")
        source = RandomSource(generator, secure_mode=secure_mode)
        mf = MatrixFactorizationQuery(clip, sigma, strategy, partitions=partitions, generator=source)
        self.l2_norm_clip, self.noise_multiplier, self.strategy = clip, sigma, mf.strategy
        self.denominator = denominator
        super().__init__(optimizer, model, loss_fn, NormalizedQuery(mf, self.denominator), ledger=ledger,
                         data_loader=data_loader, secure_mode=secure_mode, **kwargs)
