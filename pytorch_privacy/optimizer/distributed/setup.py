"""Which collective step a :class:`~pytorch_privacy.optimizer.DPOptimizer` takes: DDP
(:mod:`.ddp`), FSDP2 (:mod:`.fsdp`) or none."""

from __future__ import annotations

from typing import Any

from torch import nn

from .ddp import DistributedStep, unwrap_ddp
from .fsdp import setup_fsdp
from .sampler import DistributedDPDataLoader

__all__ = ["setup_distributed"]


def setup_distributed(model: nn.Module, data_loader: Any = None) -> tuple[nn.Module, DistributedStep | None]:
    """What :class:`~pytorch_privacy.optimizer.DPOptimizer` trains on: ``(inner module,
    DistributedStep)`` for a ``DistributedDataParallel`` model, ``(model, FSDPStep)`` for a model
    with ``fully_shard`` units (:mod:`.fsdp`), ``(model, None)`` otherwise.

    A :class:`~pytorch_privacy.optimizer.distributed.DistributedDPDataLoader` over several ranks
    with a plain model is refused: each rank would release its own share as a whole step."""
    inner, wrapped = unwrap_ddp(model)
    fsdp = None if wrapped else setup_fsdp(model)
    if fsdp is not None:  # FSDP2: each rank noises its own shard (see .fsdp)
        return model, fsdp
    if wrapped:
        return inner, DistributedStep(model.process_group if hasattr(model, "process_group") else None)
    if isinstance(data_loader, DistributedDPDataLoader) and data_loader.world_size > 1:
        raise ValueError(
            "the data loader gives each rank a share of a global Poisson sample, but the model is not a "
            "DistributedDataParallel: every rank would noise and release its share as a whole step. Wrap the "
            "model in torch.nn.parallel.DistributedDataParallel (or shard it with fully_shard)"
        )
    return inner, None
