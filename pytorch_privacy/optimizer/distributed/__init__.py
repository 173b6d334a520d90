"""Private training on ``torch.distributed``: data-parallel DP-SGD and distributed Poisson sampling.

* :class:`DistributedStep` (:mod:`.ddp`): the collective part of a step: clipped sums all-reduced
  once, noise drawn once (rank 0) and broadcast, budget decided on rank 0.  Used by
  :class:`~pytorch_privacy.optimizer.DPOptimizer` when its model is a
  ``torch.nn.parallel.DistributedDataParallel``.
* :class:`DistributedPoissonSampler`, :class:`DistributedDPDataLoader` (:mod:`.sampler`): each rank
  loads its share of a global Poisson sample.

See docs/distributed.md for launching with ``torchrun`` and the numerics of mixed precision.
"""

from __future__ import annotations

from ..._lazy import lazy_attributes

_LAZY = {
    "DistributedStep": ".ddp",
    "unwrap_ddp": ".ddp",
    "DistributedPoissonSampler": ".sampler",
    "DistributedDPDataLoader": ".sampler",
}

__getattr__, __dir__, __all__ = lazy_attributes(__name__, globals(), _LAZY)
