"""The refusal of a step whose noise repeats a released step's noise (one process).

A step's Gaussian noise is fixed by where the query's generators stand when it draws.  If they
stand where they stood before an earlier *released* step, the new step gets that step's noise
again, on other gradients, and the difference of the two releases is the difference of their
clipped sums with no noise at all.  That happens without any warning when a generator given by
hand is reseeded with the same seed during the run (``generator.manual_seed(seed)`` at every
epoch, a habit from data augmentation), or set back with ``set_state``.

:class:`NoiseReuseGuard` keeps a 128-bit digest of the generators' position before each
released step that drew noise, and refuses a step that starts from one of them, after its draw
and before anything is applied or recorded.  A step that draws nothing (no noise, or public
passes only) changes no position and is neither checked nor kept; a step refused for its budget
rewinds its draws and is not kept either.  Secure sources (the OS CSPRNG) have no position.
Cost: two digests of the generator states per step (a CPU generator's state is 5 KB) and 16
bytes per released step.

Distributed steps are not checked here: their ranks compare noise fingerprints in the step's own
collective (:mod:`~pytorch_privacy.optimizer.distributed.fingerprints`), which sees two ranks
drawing alike, not one rank repeating itself.
"""

from __future__ import annotations

import hashlib
from typing import Callable

from ..dp_query.randomness import RandomSource

__all__ = ["NoiseReuseGuard", "noise_position"]


def noise_position(sources: list[RandomSource]) -> bytes | None:
    """A digest of where the generators of ``sources`` stand (a held prefetch counts as not yet
    drawn, as in their state dicts); ``None`` when none has a generator (secure mode)."""
    h = hashlib.blake2b(digest_size=16)
    found = False
    for i, src in enumerate(sources):
        for device, state in sorted(src.state_dict()["states"].items()):
            h.update(f"{i}:{device}:".encode())
            h.update(state.numpy().tobytes())
            found = True
    return h.digest() if found else None


class NoiseReuseGuard:
    """See the module docstring.  Use: :meth:`start` before the release, :meth:`check` after its
    draws (raises ``ValueError``), :meth:`commit` once the step is released."""

    def __init__(self) -> None:
        self._released: set[bytes] = set()
        self._before: bytes | None = None
        self._pending: bytes | None = None

    def start(self, sources: list[RandomSource]) -> None:
        """Note where the generators stand before this step's draws."""
        self._before, self._pending = noise_position(sources), None

    def check(self, sources: list[RandomSource], abandon: Callable[[], None] | None = None) -> None:
        """``ValueError`` when this step drew its noise from where a released step drew, after
        calling ``abandon`` (the step accumulator's :meth:`~.step_accumulator.StepAccumulator.abandon`),
        so nothing of the step is applied or recorded."""
        before, self._before = self._before, None
        if before is None or noise_position(sources) == before:  # nothing drawn
            return
        if before in self._released:
            if abandon is not None:
                abandon()
            raise ValueError(
                "this step drew its noise from where the noise generators stood before an earlier released step, so "
                "it got that step's noise again: the difference of the two releases would be the difference of their "
                "clipped sums, noise-free. Nothing was applied or recorded. Cause: a generator given to the query or "
                "optimizer was reseeded with the same seed during the run (manual_seed at every epoch, say) or set "
                "back with set_state. Seed it once, keep it for the noise alone, or pass no generator (an OS-seeded "
                "one is owned by the query); to roll back to a checkpoint use load_state_dict(sd, rollback=True)"
            )
        self._pending = before

    def commit(self) -> None:
        """Keep the position the released step drew from."""
        if self._pending is not None:
            self._released.add(self._pending)
            self._pending = None
