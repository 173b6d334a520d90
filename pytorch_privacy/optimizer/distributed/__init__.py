"""Private training on ``torch.distributed``: DDP, FSDP2, distributed Poisson sampling, mixed precision.

* :class:`DistributedStep` (:mod:`.ddp`): the collective part of a DDP step.  Clipped sums are
  reduced once per step and noise of total stddev ``sigma*C`` is added exactly once across the
  world: with a Gaussian sum/average query each rank noises its own ``1/W`` block of the flat sums
  before the one all-reduce (independent generators per rank are required: identical seeds are
  refused); other queries draw their noise on rank 0 and broadcast it.  The budget is decided and
  the ledger recorded on rank 0, with the global ``q``.  Used by
  :class:`~pytorch_privacy.optimizer.DPOptimizer` when its model is a
  ``torch.nn.parallel.DistributedDataParallel``.
* :class:`FSDPStep` (:mod:`.fsdp`): the same for a model sharded with
  ``torch.distributed.fsdp.fully_shard`` (FSDP2).  Each example is processed whole on one rank,
  so its norm is the global norm over all shards (flat clipping, never per shard); each rank noises
  its own shard and one reduce-scatter sums the clipped sums.
* :class:`DistributedPoissonSampler`, :class:`DistributedDPDataLoader` (:mod:`.sampler`): each rank
  loads its share of a global Poisson sample.
* :mod:`.fingerprints`: the checks every step makes across the ranks, in a collective it runs
  anyway: no two ranks' noise (or sampling) generators in one state, every rank's privacy settings
  equal to rank 0's.
* :class:`DPLossScaler`, :class:`UnscaledGradients`, :func:`full_precision` (:mod:`.precision`):
  fp16 with a fixed public loss scale (unscaled before clipping), and the fp32 private arithmetic
  under autocast; :class:`DynamicDPLossScaler`: a scale driven by a noised overflow count.

See docs/distributed.md for launching with ``torchrun`` and the numerics of mixed precision.
"""

from __future__ import annotations

from ..._lazy import lazy_attributes

_LAZY = {
    "DistributedStep": ".ddp",
    "unwrap_ddp": ".ddp",
    "linear_release_divisor": ".ddp",
    "FSDPStep": ".fsdp",
    "is_fsdp_model": ".fsdp",
    "DistributedPoissonSampler": ".sampler",
    "DistributedDPDataLoader": ".sampler",
    "DPLossScaler": ".precision",
    "DynamicDPLossScaler": ".precision",
    "UnscaledGradients": ".precision",
    "full_precision": ".precision",
    "setup_distributed": ".setup",
}

__getattr__, __dir__, __all__ = lazy_attributes(__name__, globals(), _LAZY)
