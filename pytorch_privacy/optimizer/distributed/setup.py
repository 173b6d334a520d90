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
    with a plain model is refused: each rank would release its own share as a whole step; so is
    ``torch.nn.DataParallel``, anywhere in the model."""
    _refuse_data_parallel(model)
    inner, wrapped = unwrap_ddp(model)
    fsdp = None if wrapped else setup_fsdp(model)
    if fsdp is not None:  # FSDP2: each rank noises its own shard (see .fsdp)
        return model, _check_loader(fsdp, data_loader)
    if wrapped:
        step = DistributedStep(model.process_group if hasattr(model, "process_group") else None)
        return inner, _check_loader(step, data_loader)
    if isinstance(data_loader, DistributedDPDataLoader) and data_loader.world_size > 1:
        raise ValueError(
            "the data loader gives each rank a share of a global Poisson sample, but the model is not a "
            "DistributedDataParallel: every rank would noise and release its share as a whole step. Wrap the "
            "model in torch.nn.parallel.DistributedDataParallel (or shard it with fully_shard)"
        )
    return inner, None


def _refuse_data_parallel(model: nn.Module) -> None:
    """``ValueError`` for a ``torch.nn.DataParallel`` in ``model``: on several devices it runs
    replicas of its module in threads, each on a slice of the batch, which the per-example engines
    (their hooks, traced batch layouts and functional calls) do not follow; on a CPU-only machine it
    is a pass-through, so a run tested there would change under it on a multi-GPU one."""
    for name, m in model.named_modules():
        if isinstance(m, nn.DataParallel):
            where = "the model" if not name else f"layer {name!r}"
            raise ValueError(
                f"{where} is a torch.nn.DataParallel, which runs replicas of its module in threads on slices of the "
                "batch: the per-example gradient engines cannot follow them. Use DistributedDataParallel (one process "
                "per device, see docs/distributed.md), or pass the module inside (model.module) to train on one device"
            )


def _check_loader(step: DistributedStep, data_loader: Any) -> DistributedStep:
    """Refuse, with ``W > 1`` ranks, a ``data_loader`` that is not a
    :class:`~pytorch_privacy.optimizer.distributed.DistributedDPDataLoader` over the same ranks.
    Any other loader (a ``DPDataLoader``, a shuffling ``DataLoader``, a fixed order, or a
    distributed loader built for another rank or world size) samples from the whole dataset on
    every rank: one example can then join a step on several ranks (its clipped gradient counted
    up to ``W`` times, at a rate near ``W q``), while the ledger built from the loader accounts for
    one draw at ``q``."""
    if data_loader is None or step.world_size == 1:
        return step
    if not isinstance(data_loader, DistributedDPDataLoader):
        raise ValueError(
            f"with {step.world_size} ranks the data loader must be a DistributedDPDataLoader (each rank loads its own "
            f"part of one global Poisson sample); a {type(data_loader).__name__} on every rank samples the whole "
            "dataset, so one example could join a step on several ranks (its gradient counted up to "
            f"{step.world_size} times) while the ledger accounts for one draw at q"
        )
    if (data_loader.rank, data_loader.world_size) != (step.rank, step.world_size):
        raise ValueError(
            f"the DistributedDPDataLoader was built for rank {data_loader.rank} of {data_loader.world_size}, the "
            f"model's process group is rank {step.rank} of {step.world_size}: ranks would sample overlapping parts "
            f"of the dataset (build it with rank={step.rank}, world_size={step.world_size}: the defaults when the "
            "model uses the default process group)"
        )
    step.sampler = data_loader.poisson_sampler  # its last draw's generator state is compared every step
    return step

