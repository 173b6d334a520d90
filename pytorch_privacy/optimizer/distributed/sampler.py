"""Poisson sampling across ranks: every example of the global dataset joins a step with
probability ``q``, exactly once across the world.

Rank ``r`` of ``W`` owns the indices ``i`` with ``i % W == r`` and draws one Bernoulli(``q``) per
owned index from its own generator; it loads only the examples it drew.  The union of the ranks'
batches is therefore a Poisson sample of the whole dataset (independent Bernoulli(``q``) per
index, since every index is drawn once, by one rank, from generators that are independent of one
another), which is what the ledger (``N`` = global dataset size, global ``q``) assumes.  No example
is drawn by two ranks in the same step (the ownership is a partition).

A rank's local batch may be empty; it must still take part in the step (the optimizer joins the
collectives with a zero sum), otherwise the other ranks would wait for it.  All ranks take the
same number of steps per pass (``round(1/q)``, or ``steps``).

Independent generators: by default each rank's generator is seeded from OS entropy.  A
``generator`` passed by hand must differ across ranks (a common seed would correlate the
inclusion of index ``i`` with that of ``i + 1`` on the next rank, which the Poisson analysis does
not allow): when a process group is initialised, the sampler checks this at construction (one
``all_gather_object``) and refuses identical states.  A generator reseeded alike later is seen by
the optimizer the loader was given to (``data_loader=``, or ``make_private``): every private step
compares the ranks' sampling-generator states before their last draw, in a collective it runs
anyway, and refuses the step on every rank when two are equal
(:meth:`~.fingerprints.RankChecks.refuse_shared_sampling`).
"""

from __future__ import annotations

import hashlib
import weakref
from typing import Any

import torch
from torch.utils.data import Dataset

from ...dp_query.randomness import RandomSource
from ..samplers import DPDataLoader, PoissonSampler, init_poisson_loader, refuse_batching_kwargs

__all__ = ["DistributedPoissonSampler", "DistributedDPDataLoader"]


def _world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    import torch.distributed as dist

    initialised = dist.is_available() and dist.is_initialized()
    if world_size is None:
        world_size = dist.get_world_size() if initialised else 1
    if rank is None:
        rank = dist.get_rank() if initialised else 0
    for name, v in (("rank", rank), ("world_size", world_size)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return rank, world_size


#: the sampler of this process that drew last (a weak reference), for the steps of optimizers not
#: given their loader (:func:`last_drawn_sampler`)
_last_drawn: "weakref.ref[DistributedPoissonSampler] | None" = None


def last_drawn_sampler(rank: int, world_size: int) -> "DistributedPoissonSampler | None":
    """The :class:`DistributedPoissonSampler` of this process that drew last, if it is still alive
    and was built for ``rank`` of ``world_size``: the sampler whose batch a step most likely holds
    when its optimizer was not given the loader, so the step's sampling check still sees it
    (:meth:`~.fingerprints.RankChecks.sampling_fingerprint`)."""
    sampler = None if _last_drawn is None else _last_drawn()
    if sampler is None or (sampler.rank, sampler.world_size) != (rank, world_size):
        return None
    return sampler


class DistributedPoissonSampler(PoissonSampler):
    """Batch sampler of rank ``rank``'s share of a Poisson sample of ``range(num_samples)``.

    Args:
        num_samples: the *global* dataset size ``N``.
        sample_rate: the *global* ``q``; the world's batch has mean ``q N``
            (:attr:`expected_batch_size`), this rank's ``q * |owned|``.
        rank, world_size: default: from the initialised process group (else 0 and 1).
        steps, generator, secure_mode: as for :class:`~pytorch_privacy.optimizer.PoissonSampler`;
            ``generator`` must differ across ranks (checked when a process group exists).
    """

    def __init__(
        self,
        num_samples: int,
        sample_rate: float,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        steps: int | None = None,
        generator: "torch.Generator | RandomSource | None" = None,
        secure_mode: bool = False,
    ):
        super().__init__(num_samples, sample_rate, steps=steps, generator=generator, secure_mode=secure_mode)
        self.rank, self.world_size = _world(rank, world_size)
        #: the global indices this rank owns (``i % W == rank``)
        self.owned = torch.arange(self.rank, num_samples, self.world_size, dtype=torch.long)
        #: the state of this rank's sampling generator before its last draw (``None`` before the first,
        #: and in secure mode): every private step of an optimizer given this loader compares it across
        #: the ranks (:meth:`~.fingerprints.RankChecks.sampling_fingerprint`)
        self.last_draw_state: torch.Tensor | None = None
        if generator is not None:
            self._check_distinct_generators()

    def _check_distinct_generators(self) -> None:
        import torch.distributed as dist

        if self.world_size == 1 or self.secure_mode or not (dist.is_available() and dist.is_initialized()):
            return
        digest = hashlib.sha256(self.generator.get_state().numpy().tobytes()).hexdigest()
        digests: list[Any] = [None] * self.world_size
        dist.all_gather_object(digests, digest)
        if len(set(digests)) < len(digests):
            raise ValueError(
                "the ranks' sampling generators are in the same state: inclusions would be correlated across "
                "ranks, which Poisson sampling does not allow. Seed each rank differently "
                "(e.g. torch.Generator().manual_seed(seed * world_size + rank)) or pass no generator"
            )

    @property
    def local_expected_batch_size(self) -> float:
        """``q * |owned|``: this rank's mean batch size."""
        return self.sample_rate * self.owned.numel()

    def sample(self) -> torch.Tensor:
        """This rank's part of one Poisson batch: global indices (int64, possibly empty)."""
        global _last_drawn
        self.last_draw_state = self.random.stream_state("cpu")
        _last_drawn = weakref.ref(self)
        mask = self.random.bernoulli_mask(self.owned.numel(), self.sample_rate)
        return self.owned[mask.to(torch.bool)]

    def state_dict(self) -> dict[str, Any]:
        """As :meth:`PoissonSampler.state_dict`, plus ``rank`` and ``world_size``."""
        state = super().state_dict()
        state.update(rank=self.rank, world_size=self.world_size)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore this rank's sampler; refuses a checkpoint of another rank or world size, and,
        with ``W > 1``, a single-process sampler state: restored on every rank, it would give every
        rank the same generator state, so the same inclusion pattern over their parts (inclusions
        correlated across ranks, which Poisson sampling does not allow)."""
        if isinstance(state, dict):
            if self.world_size > 1 and not {"rank", "world_size"} <= state.keys():
                raise ValueError(
                    "this sampler state was saved by a single-process sampler; restored on every rank it would give "
                    "them all the same generator state (correlated inclusions). Each rank must load the state its own "
                    "DistributedPoissonSampler saved"
                )
            for key, ours in (("rank", self.rank), ("world_size", self.world_size)):
                if key in state and state[key] != ours:
                    raise ValueError(
                        f"the checkpoint's sampler has {key}={state[key]!r}, this one {ours!r}; each rank must load "
                        "its own sampler state with the same world size"
                    )
        super().load_state_dict(state)


class DistributedDPDataLoader(DPDataLoader):
    """A :class:`~pytorch_privacy.optimizer.DPDataLoader` that loads rank ``rank``'s share of
    each Poisson batch of ``dataset`` (see :class:`DistributedPoissonSampler`).

    ``dataset`` is the *global* dataset (every rank holds the same one; only the drawn examples
    are loaded).  :meth:`make_ledger` and ``DPOptimizer(data_loader=...)`` therefore account the
    global ``N`` and ``q``, and :attr:`expected_batch_size` is the global ``q N`` (the
    denominator).  Empty local batches come out with a leading dimension of 0.

    Args: ``dataset``, ``sample_rate``, ``rank``, ``world_size``, ``steps``, ``generator``,
    ``secure_mode``, ``collate_fn`` and other ``DataLoader`` keywords, as for
    :class:`DistributedPoissonSampler` and :class:`~pytorch_privacy.optimizer.DPDataLoader`.
    """

    def __init__(
        self,
        dataset: Dataset,
        sample_rate: float,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        steps: int | None = None,
        generator: torch.Generator | None = None,
        secure_mode: bool = False,
        collate_fn=None,
        **kwargs,
    ):
        refuse_batching_kwargs("DistributedDPDataLoader", kwargs)
        sampler = DistributedPoissonSampler(
            len(dataset), sample_rate, rank=rank, world_size=world_size, steps=steps, generator=generator,
            secure_mode=secure_mode,
        )
        init_poisson_loader(self, dataset, sampler, collate_fn, kwargs)

    @property
    def rank(self) -> int:
        """This process's rank."""
        return self.poisson_sampler.rank

    @property
    def world_size(self) -> int:
        """The number of ranks sharing the sample."""
        return self.poisson_sampler.world_size
