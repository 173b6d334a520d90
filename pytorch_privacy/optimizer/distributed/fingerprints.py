"""The checks that the ranks of a data-parallel step make of each other, at every step, inside a
collective the step runs anyway.

Each rank runs its own query (its clip, its noise, its generator) and its own sampler, while rank 0's
ledger accounts for one release at rank 0's settings with independent noise and independent
sampling.  Three fingerprints per rank travel with the step's collective, each 63 bits as three
21-bit integers in ``3 W`` slots that are zero but for the rank's own (exact in a float32 sum, and
under MAX in int64), so the reduced buffer holds every rank's:

* **noise** (:meth:`RankChecks.noise_fingerprint`): where the rank's noise generators stand before
  its draw.  Two equal: two blocks (DDP) or shards (FSDP2) got the same noise, a correlated
  Gaussian whose privacy loss is unbounded along their difference (one checkpoint restored on every
  rank, or one seed given by hand).  Refused.
* **settings** (:meth:`RankChecks.settings_fingerprint`): the query's type, its global state
  (clip, stddev, denominator, and evolving state such as adaptive clipping's) and the per-pass
  noise factor.  One unlike rank 0's: that rank clips or noises other than the ledger says.  Refused.
* **sampling** (:meth:`RankChecks.sampling_fingerprint`): where the rank's sampling generator stood
  before its last draw (with the optimizer's ``data_loader``).  Two equal: the ranks drew their
  parts of the Poisson sample with one inclusion pattern (correlated inclusions).  Refused.

A refusal is raised on every rank (they all see the same sums), before anything is applied or
recorded.  Without a generator state to hash (secure mode, no loader, no draw) a rank sends random
bits, which match no other rank's.
"""

from __future__ import annotations

import hashlib
import os
import struct
from typing import Any

import torch

__all__ = ["RankChecks"]

#: values per rank, and bits per value, of a fingerprint (:meth:`RankChecks._slots`)
_FP_PARTS, _FP_BITS = 3, 21


def _hash_plain(h: Any, x: Any) -> None:
    """Feed ``h`` a canonical encoding of a plain query state (what
    :func:`~pytorch_privacy.optimizer.checkpoint.to_plain` gives: tensors, numbers, strings, lists
    and dicts)."""
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu().contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(x.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    elif isinstance(x, float):
        h.update(b"f" + struct.pack("<d", x))
    elif isinstance(x, (list, tuple)):
        h.update(b"[")
        for v in x:
            _hash_plain(h, v)
        h.update(b"]")
    elif isinstance(x, dict):
        h.update(b"{")
        for k, v in x.items():
            _hash_plain(h, k)
            _hash_plain(h, v)
        h.update(b"}")
    else:  # None, bool, int, str
        h.update(f"{type(x).__name__}:{x!r};".encode())


def _sources(query) -> list:
    from ..checkpoint import find_random_sources

    return find_random_sources(query)


class RankChecks:
    """The fingerprints and refusals of the module docstring, for a step with ``rank``,
    ``world_size`` and (optionally) ``sampler`` attributes (:class:`~.ddp.DistributedStep`)."""

    rank: int
    world_size: int
    sampler: Any = None

    def _slots(self, h: "hashlib._Hash") -> list[float]:
        """``3 W`` values, zero but for this rank's three, holding 63 bits of ``h`` (21 per value:
        exact in a float32 sum, and under MAX in int64)."""
        fp = int.from_bytes(h.digest(), "little") >> 1
        out = [0.0] * (_FP_PARTS * self.world_size)
        for i in range(_FP_PARTS):
            out[_FP_PARTS * self.rank + i] = float((fp >> (_FP_BITS * i)) & ((1 << _FP_BITS) - 1))
        return out

    def _per_rank(self, summed: list[float]) -> list[tuple[int, ...]]:
        return [tuple(round(v) for v in summed[_FP_PARTS * r : _FP_PARTS * (r + 1)]) for r in range(self.world_size)]

    def noise_fingerprint(self, query, device: Any, draws: bool = True) -> list[float]:
        """This rank's part of the check that no two ranks draw the same noise, to be summed over
        the ranks in the step's collective (:meth:`refuse_shared_noise`): a hash of where its
        noise generators stand (:meth:`~pytorch_privacy.dp_query.randomness.RandomSource.stream_state`),
        in the layout of :meth:`_slots`.  Random bits when this rank draws nothing
        (``draws=False``) or draws from the OS CSPRNG."""
        return self._state_slots([src.stream_state(device) for src in _sources(query)] if draws else [None])

    def _state_slots(self, states: list) -> list[float]:
        """:meth:`_slots` of a hash of generator ``states`` (16 random bytes for each ``None``)."""
        h = hashlib.blake2b(digest_size=8)
        for state in states:
            h.update(os.urandom(16) if state is None else state.numpy().tobytes())
        return self._slots(h)

    def refuse_shared_noise(self, summed: list[float]) -> None:
        """Raise ``ValueError`` (on every rank: they all see the same sums) when two ranks'
        fingerprints (:meth:`noise_fingerprint`, summed over the ranks) are equal: their noise
        generators stood in the same state, so their blocks (shards) got the same noise."""
        self._refuse_two_equal(
            summed,
            "every rank noises its own block (DDP) or shard (FSDP2) of the sums, but two ranks' noise generators "
            "were in the same state: their blocks got the same (correlated) noise, whose privacy loss is unbounded "
            "along the difference of the two blocks. Nothing was applied or recorded; the step's noise is spent. "
            "Causes: every rank restored one checkpoint (load each rank's own opt.state_dict(), or load with "
            "fresh_randomness=True), or a generator given by hand with one seed on every rank (seed each rank "
            "differently: torch.Generator().manual_seed(seed * world_size + rank), or pass no generator)",
        )

    def settings_fingerprint(self, query, global_state: Any, noise_scale: float) -> list[float]:
        """This rank's part of the check that every rank releases with the same privacy settings
        (:meth:`refuse_unlike_settings`): a hash of the query's type, its global state (clip,
        noise stddev, denominator, ...) and the per-pass noise factor, in the layout of
        :meth:`_slots`."""
        from ..checkpoint import to_plain

        try:
            plain = to_plain(global_state)
        except TypeError:  # a state no checkpoint can hold either: its type alone (a repr may hold addresses)
            plain = type(global_state).__qualname__
        h = hashlib.blake2b(digest_size=8)
        h.update(type(query).__qualname__.encode())
        _hash_plain(h, [plain, float(noise_scale)])
        return self._slots(h)

    def refuse_unlike_settings(self, summed: list[float]) -> None:
        """Raise ``ValueError`` on every rank when the ranks' :meth:`settings_fingerprint` differ:
        each rank clips (and noises) with its own query, while rank 0's ledger accounts for rank
        0's settings, so a rank with a larger clip or less noise would release more than the ledger
        says."""
        parts = self._per_rank(summed)
        unlike = [r for r in range(1, self.world_size) if parts[r] != parts[0]]
        if unlike:
            raise ValueError(
                f"the privacy settings of rank(s) {unlike} differ from rank 0's (the query, its clip, noise stddev or "
                "denominator, or the passes' clipping mode): each rank clips and noises with its own query while the "
                "ledger on rank 0 accounts for rank 0's, so a rank with a larger clip or less noise would release more "
                "than the ledger says. Nothing was applied or recorded. Build the same optimizer on every rank"
            )

    def sampling_fingerprint(self) -> list[float]:
        """This rank's part of the check that no two ranks sample alike (:meth:`refuse_shared_sampling`):
        a hash of its loader's sampling-generator state before the last draw
        (:attr:`~.sampler.DistributedPoissonSampler.last_draw_state`), in the layout of :meth:`_slots`.
        An optimizer not given its loader checks the distributed sampler of this process that drew
        last (:func:`~.sampler.last_drawn_sampler`).  Random bits without any such sampler, before its
        first draw, or in secure mode."""
        from .sampler import last_drawn_sampler

        sampler = self.sampler if self.sampler is not None else last_drawn_sampler(self.rank, self.world_size)
        state = None if sampler is None else sampler.last_draw_state
        return self._state_slots([state])

    def refuse_shared_sampling(self, summed: list[float]) -> None:
        """Raise ``ValueError`` (on every rank) when two ranks' :meth:`sampling_fingerprint` are
        equal: their sampling generators stood in the same state before drawing, so example ``i``
        of one rank's part joined the batch exactly when example ``i`` of the other's did."""
        self._refuse_two_equal(
            summed,
            "two ranks' data loaders drew this step's batch from sampling generators in the same state: the "
            "inclusions of their examples are correlated, which the Poisson sampling the ledger accounts for does "
            "not allow. Nothing was applied or recorded. Cause: a sampling generator seeded alike on every rank "
            "(e.g. manual_seed on loader.generator after construction, or one sampler state loaded everywhere); seed "
            "each rank differently (seed * world_size + rank), or leave the loader's generator OS-seeded",
        )

    def _refuse_two_equal(self, summed: list[float], message: str) -> None:
        """``ValueError(message)`` when two ranks' fingerprints in ``summed`` are equal."""
        if len(set(self._per_rank(summed))) < self.world_size:
            raise ValueError(message)

    @property
    def step_fingerprint_size(self) -> int:
        """The number of values of :meth:`step_fingerprint`: ``9 W``."""
        return 3 * _FP_PARTS * self.world_size

    def step_fingerprint(self, query, device: Any, draws: bool, global_state: Any, noise_scale: float) -> list[float]:
        """:meth:`noise_fingerprint` then :meth:`agreement_fingerprint` (``9 W`` values): what a step
        whose ranks each draw their own noise carries in its collective (:meth:`refuse_step`)."""
        return self.noise_fingerprint(query, device, draws) + self.agreement_fingerprint(query, global_state, noise_scale)

    def refuse_step(self, summed: list[float]) -> None:
        """:meth:`refuse_disagreement` then :meth:`refuse_shared_noise` on the summed
        :meth:`step_fingerprint` s."""
        g = _FP_PARTS * self.world_size
        self.refuse_disagreement(summed[g : 3 * g])
        self.refuse_shared_noise(summed[:g])

    def agreement_fingerprint(self, query, global_state: Any, noise_scale: float) -> list[float]:
        """:meth:`settings_fingerprint` then :meth:`sampling_fingerprint`: what every step's
        collective carries besides the noise fingerprint (:meth:`refuse_disagreement`)."""
        return self.settings_fingerprint(query, global_state, noise_scale) + self.sampling_fingerprint()

    def refuse_disagreement(self, summed: list[float]) -> None:
        """:meth:`refuse_unlike_settings` and :meth:`refuse_shared_sampling` on the summed
        :meth:`agreement_fingerprint` s."""
        g = _FP_PARTS * self.world_size
        self.refuse_unlike_settings(summed[:g])
        self.refuse_shared_sampling(summed[g : 2 * g])
