"""Data for private training: Poisson sampling and physical-batch splitting.

Poisson sampling (each record joins a batch independently with probability ``q``) is what the
add/remove-one amplification bound of DP-SGD assumes (Abadi et al. 2016; Mironov, Talwar, Zhang
2019).  Its batches have a random size with mean ``q*N``; they can be empty.  An empty batch is
still a step: the optimizer adds noise and the ledger counts it (skipping it would reveal that
the batch was empty).

:func:`split_into_physical_batches` cuts one *logical* batch (the unit of sampling, clipping
sums and noise) into *physical* chunks that fit in memory; the optimizer accumulates the clipped
per-example sums of the chunks (``merge_sample_states``) and adds noise once per logical step,
so the privacy analysis is that of the logical batch.

Randomness: a sampler owns a :class:`~pytorch_privacy.dp_query.randomness.RandomSource`: by
default a ``torch.Generator`` seeded from OS entropy (never torch's global RNG), saved by
:meth:`PoissonSampler.state_dict` so a resumed run continues the sequence of batches instead of
repeating it; or, with ``secure_mode=True``, Bernoulli draws from the OS CSPRNG.  See
docs/deployment.md.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data._utils.collate import default_collate

from ..dp_query.randomness import RandomSource, as_random_source
from .engines.base import batch_size_of  # noqa: F401  (re-exported: one definition)

__all__ = ["PoissonSampler", "DPDataLoader", "split_into_physical_batches", "batch_size_of", "EmptySafeCollate", "init_poisson_loader",
           "refuse_batching_kwargs"]


def _check_rate(sample_rate) -> float:
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, float)):
        raise TypeError(f"sample_rate must be a number in (0, 1], got {type(sample_rate).__name__}")
    if math.isnan(sample_rate) or not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r} (expected batch size / dataset size)")
    return float(sample_rate)


class PoissonSampler(Sampler[list[int]]):
    """Batch sampler: every index in ``range(num_samples)`` joins each batch independently with
    probability ``sample_rate`` (``q``).

    The batch size is ``Binomial(N, q)``: mean ``q*N`` (:attr:`expected_batch_size`), and it may
    be 0 (an empty list is yielded, not skipped).  One pass (``len(sampler)``) is ``steps``
    batches, by default ``round(1/q)`` (one "epoch" in expectation).

    Args:
        num_samples: dataset size ``N``.
        sample_rate: ``q`` in (0, 1].
        steps: batches per iteration (default ``max(1, round(1/q))``).
        generator: ``torch.Generator`` (CPU) to draw from (reproducible runs); default: an owned
            one seeded from OS entropy (``torch.manual_seed`` does not affect it).
            :meth:`state_dict` saves it for resumable runs.
        secure_mode: draw the Bernoulli masks from the OS CSPRNG (no ``generator``).
    """

    def __init__(
        self,
        num_samples: int,
        sample_rate: float,
        *,
        steps: int | None = None,
        generator: "torch.Generator | RandomSource | None" = None,
        secure_mode: bool = False,
    ):
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples <= 0:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
        self.num_samples = num_samples
        self.sample_rate = _check_rate(sample_rate)
        if steps is None:
            steps = max(1, round(1 / self.sample_rate))
        if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        self.steps = steps
        self.random = as_random_source(generator, secure_mode=secure_mode)

    @property
    def generator(self) -> torch.Generator | None:
        """The CPU ``torch.Generator`` the masks are drawn from (``None`` in secure mode)."""
        return None if self.random.secure_mode else self.random.torch_generator("cpu")

    @property
    def secure_mode(self) -> bool:
        """Whether the masks come from the OS CSPRNG."""
        return self.random.secure_mode

    @property
    def expected_batch_size(self) -> float:
        """``q * N``: the public denominator of private averages."""
        return self.sample_rate * self.num_samples

    def __len__(self) -> int:
        return self.steps

    def sample(self) -> torch.Tensor:
        """One Poisson batch of indices (an int64 tensor, possibly empty)."""
        mask = self.random.bernoulli_mask(self.num_samples, self.sample_rate)
        return mask.nonzero().flatten()

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            yield self.sample().tolist()

    def state_dict(self) -> dict[str, Any]:
        """The sampling settings and the random-source state (resume the sequence of batches)."""
        return {
            "num_samples": self.num_samples,
            "sample_rate": self.sample_rate,
            "random": self.random.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the state saved by :meth:`state_dict`.  ``ValueError`` (nothing changed) when
        the checkpoint sampled a different population or rate: a checkpoint never rewrites the
        sampling.  (States of older releases, ``{"generator": tensor}``, still load.)"""
        if not isinstance(state, dict):
            raise ValueError("not a PoissonSampler state dict")
        for key, ours in (("num_samples", self.num_samples), ("sample_rate", self.sample_rate)):
            if key in state and state[key] != ours:
                raise ValueError(
                    f"the checkpoint's sampler has {key}={state[key]!r}, this one {ours!r}; build the sampler "
                    "(loader) with the checkpointed run's settings"
                )
        if "random" in state:
            self.random.load_state_dict(state["random"])
        elif "generator" in state:
            self.random.set_legacy_state(state["generator"])
        else:
            raise ValueError("not a PoissonSampler state dict (no 'random' state)")


def _slice_tree(x: Any, start: int, stop: int) -> Any:
    return torch.utils._pytree.tree_map(lambda t: t[start:stop] if isinstance(t, torch.Tensor) else t, x)


class EmptySafeCollate:
    """``collate_fn`` wrapper: an empty batch collates to the structure of one example with a
    leading dimension of 0 (``default_collate([])`` would fail)."""

    def __init__(self, dataset: Dataset, collate_fn):
        self.dataset = dataset
        self.collate_fn = collate_fn
        self._empty = None

    def __call__(self, batch):
        if len(batch) > 0:
            return self.collate_fn(batch)
        if self._empty is None:
            one = self.collate_fn([self.dataset[0]])
            self._empty = _slice_tree(one, 0, 0)
        return self._empty


def refuse_batching_kwargs(name: str, kwargs: dict) -> None:
    """``ValueError`` for ``DataLoader`` keywords that Poisson sampling decides itself."""
    bad = sorted(set(kwargs) & {"batch_size", "shuffle", "sampler", "batch_sampler", "drop_last"})
    if bad:
        raise ValueError(f"{name} decides {bad} by Poisson sampling; do not pass them")


def init_poisson_loader(loader: DataLoader, dataset: Dataset, sampler, collate_fn, kwargs: dict) -> None:
    """``DataLoader.__init__`` of a Poisson loader: ``sampler`` as the batch sampler, a collate
    that survives empty batches, and ``loader.poisson_sampler``."""
    DataLoader.__init__(
        loader, dataset, batch_sampler=sampler, collate_fn=EmptySafeCollate(dataset, collate_fn or default_collate),
        **kwargs,
    )
    loader.poisson_sampler = sampler


class DPDataLoader(DataLoader):
    """A ``DataLoader`` whose batches are Poisson samples of ``dataset`` (see :class:`PoissonSampler`).

    :meth:`make_ledger` builds the matching :class:`PrivacyLedger`.

    Empty batches come out as tensors with a leading dimension of 0 (same structure as a
    normal batch), which :meth:`DPOptimizer.fit_batch` turns into a noise-only step.

    Args:
        dataset: a map-style dataset of size ``N``.
        sample_rate: ``q``; expected batch size ``q*N``.
        steps: batches per iteration (default ``round(1/q)``).
        generator: ``torch.Generator`` for the sampling (default: owned, OS-seeded).
        secure_mode: sample from the OS CSPRNG.
        collate_fn: as for ``DataLoader`` (default ``default_collate``).
        **kwargs: other ``DataLoader`` arguments (``num_workers``, ``pin_memory``...);
            ``batch_size``, ``shuffle``, ``sampler``, ``batch_sampler`` and ``drop_last`` are
            decided by Poisson sampling and refused.

    The loader is the truth about sampling: build the ledger with :meth:`make_ledger` (or pass
    ``data_loader=`` to the optimizer), never by typing ``q`` again.  :meth:`state_dict` /
    :meth:`load_state_dict` checkpoint the sampler.
    """

    def __init__(
        self,
        dataset: Dataset,
        sample_rate: float,
        *,
        steps: int | None = None,
        generator: torch.Generator | None = None,
        secure_mode: bool = False,
        collate_fn=None,
        **kwargs,
    ):
        refuse_batching_kwargs("DPDataLoader", kwargs)
        sampler = PoissonSampler(len(dataset), sample_rate, steps=steps, generator=generator, secure_mode=secure_mode)
        init_poisson_loader(self, dataset, sampler, collate_fn, kwargs)

    @property
    def sample_rate(self) -> float:
        """``q``: the probability that a record joins a batch."""
        return self.poisson_sampler.sample_rate

    @property
    def expected_batch_size(self) -> float:
        """``q * N``."""
        return self.poisson_sampler.expected_batch_size

    def state_dict(self) -> dict[str, Any]:
        """The sampler's state (see :meth:`PoissonSampler.state_dict`)."""
        return self.poisson_sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (refuses another population or rate)."""
        self.poisson_sampler.load_state_dict(state)

    def make_ledger(self, **metadata) -> "PrivacyLedger":
        """A :class:`~pytorch_privacy.dp_query.PrivacyLedger` whose sampling settings are exactly
        this loader's (``poisson``, ``N = len(dataset)``, ``q = sample_rate``), so the two can
        never disagree."""
        from ..dp_query.privacy_ledger import PrivacyLedger

        return PrivacyLedger(len(self.dataset), self.sample_rate, sampling="poisson", metadata=metadata)

    @classmethod
    def from_data_loader(
        cls,
        data_loader: DataLoader,
        *,
        generator: torch.Generator | None = None,
        steps: int | None = None,
        secure_mode: bool = False,
    ) -> "DPDataLoader":
        """The Poisson-sampled counterpart of an ordinary loader: ``q = 1 / len(data_loader)``
        (same expected batch size, same number of steps per epoch), same dataset, collate
        function and worker settings."""
        kwargs = {
            "num_workers": data_loader.num_workers,
            "pin_memory": data_loader.pin_memory,
            "timeout": data_loader.timeout,
            "worker_init_fn": data_loader.worker_init_fn,
            "multiprocessing_context": data_loader.multiprocessing_context,
            "persistent_workers": data_loader.persistent_workers,
        }
        collate = data_loader.collate_fn
        if isinstance(collate, EmptySafeCollate):
            collate = collate.collate_fn
        return cls(
            data_loader.dataset,
            1.0 / len(data_loader),
            steps=steps if steps is not None else len(data_loader),
            generator=generator,
            secure_mode=secure_mode,
            collate_fn=collate,
            **kwargs,
        )


def split_into_physical_batches(
    inputs: Any, targets: Any, max_physical_batch_size: int | None, *, multiple_of: int = 1
) -> Iterator[tuple[Any, Any]]:
    """Yield consecutive ``(inputs, targets)`` slices of at most ``max_physical_batch_size``
    examples (rounded down to a multiple of ``multiple_of``, e.g. the microbatch size).

    The chunks partition the logical batch in order; an empty batch yields itself once.
    ``None`` yields the whole batch.  Privacy is unaffected: the chunks of one logical batch are
    clipped per example, summed, and noised once (see :class:`DPOptimizer`).
    """
    n = batch_size_of(inputs, targets)
    if max_physical_batch_size is None or n == 0:
        yield inputs, targets
        return
    if isinstance(max_physical_batch_size, bool) or not isinstance(max_physical_batch_size, int) or max_physical_batch_size < 1:
        raise ValueError(f"max_physical_batch_size must be a positive integer or None, got {max_physical_batch_size!r}")
    size = (max_physical_batch_size // multiple_of) * multiple_of
    if size == 0:
        raise ValueError(
            f"max_physical_batch_size={max_physical_batch_size} is smaller than one microbatch "
            f"({multiple_of} examples); raise it to at least {multiple_of}"
        )
    for start in range(0, n, size):
        yield _slice_tree(inputs, start, start + size), _slice_tree(targets, start, start + size)
