"""Data without sampling: fixed-size batches in one fixed order, the same every epoch.

DP-FTRL (Kairouz et al. 2021, "Practical and Private (Deep) Learning without Sampling or
Shuffling") needs no privacy amplification by sampling.  Its accounting depends only on *how often*
and *how far apart* one record takes part in the stream of steps.  With this loader:

* the dataset's ``N`` records are put in one order, once (a permutation drawn from a seeded
  generator at construction, or the dataset's own order with ``shuffle=False``);
* an epoch is the ``steps_per_epoch = N // batch_size`` consecutive batches of exactly
  ``batch_size`` records of that order (the last ``N % batch_size`` records of the order are never
  used: every batch has the same public size, and every record takes part at most once an epoch);
* every epoch repeats the same batches in the same order, so a record that takes part does so at
  the same position of every epoch: consecutive participations are exactly ``steps_per_epoch``
  steps apart (``min_separation = steps_per_epoch - 1`` in the convention of TF Privacy's
  ``compute_rdp_single_tree``);
* the stream of batches is one cycle through that order, whatever the loops around it: the loader
  keeps its :attr:`~FixedOrderSampler.position` (batches handed out so far), and a new ``for``
  loop continues from it.  A loop left with ``break`` and started again does not go back to the
  first batch, which would bring a record's two participations closer than an epoch.
  :class:`~pytorch_privacy.optimizer.ftrl_optimizer.DPFTRLOptimizer` checks that it trains every
  batch once, in this order.

The loader is the truth about sampling: :meth:`FixedOrderLoader.make_ledger` (or
``DPFTRLOptimizer(data_loader=loader)``) builds the ledger from it (sampling ``"fixed_order"``,
``N``, ``batch_size``), and :meth:`FixedOrderLoader.ledger_settings` is what the optimizer checks
each step against.  Its :meth:`~FixedOrderLoader.state_dict` saves the order itself, so a resumed
run continues with the same batches (a new order after a resume would break the separation the
accounting assumes).
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data._utils.collate import default_collate

from ..dp_query.randomness import RandomSource

__all__ = ["FixedOrderSampler", "FixedOrderLoader", "FIXED_ORDER"]

#: the ledger's sampling scheme of fixed-order batches
FIXED_ORDER = "fixed_order"


def _check_int(name: str, v: Any, lo: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    return v


class FixedOrderSampler(Sampler[list[int]]):
    """Batch sampler of fixed-size batches in one fixed order, repeated every epoch.

    Args:
        num_samples: dataset size ``N``.
        batch_size: ``B`` (1 <= B <= N); each epoch is ``N // B`` batches of exactly ``B`` indices.
        shuffle: draw the order once, at construction, as a uniformly random permutation
            (default); ``False`` keeps ``0, 1, ..., N-1``.  Either way it never changes afterwards.
        generator: a ``torch.Generator`` or an ``int`` seed for the permutation (reproducible
            runs); default: a generator seeded from OS entropy (never torch's global RNG).

    The order needs no secrecy for the privacy guarantee (the accounting holds for every fixed
    order); it is seeded so that runs can be repeated.

    :attr:`position` counts the batches handed out so far; every iteration continues the cycle
    from it (``len(sampler)`` batches, one epoch's worth, per iteration).
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        shuffle: bool = True,
        generator: torch.Generator | int | None = None,
    ):
        self.num_samples = _check_int("num_samples", num_samples)
        self.batch_size = _check_int("batch_size", batch_size)
        if batch_size > num_samples:
            raise ValueError(
                f"batch_size={batch_size} exceeds the dataset size {num_samples}; use a batch size of at most N"
            )
        if not isinstance(shuffle, bool):
            raise TypeError(f"shuffle must be a bool, got {type(shuffle).__name__}")
        if isinstance(generator, int) and not isinstance(generator, bool):
            generator = torch.Generator().manual_seed(generator)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, an int seed or None, got {type(generator).__name__}")
        if shuffle:
            g = generator if generator is not None else RandomSource().torch_generator("cpu")
            order = torch.randperm(num_samples, generator=g, device=g.device).cpu()
        else:
            order = torch.arange(num_samples)
        self.order: torch.Tensor = order
        #: batches handed out so far (the next one is ``batch(position)``)
        self.position = 0

    @property
    def steps_per_epoch(self) -> int:
        """``N // B``: batches per epoch (and steps between two participations of a record)."""
        return self.num_samples // self.batch_size

    @property
    def min_separation(self) -> int:
        """Steps strictly between two participations of one record: ``steps_per_epoch - 1``."""
        return self.steps_per_epoch - 1

    def batch(self, step: int) -> list[int]:
        """The indices of the ``step``-th batch (0-based, counting across epochs)."""
        s = _check_int("step", step, 0) % self.steps_per_epoch
        b = self.batch_size
        return self.order[s * b : (s + 1) * b].tolist()

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps_per_epoch):
            b = self.batch(self.position)
            self.position += 1
            yield b

    def state_dict(self) -> dict[str, Any]:
        """The settings, the order and the position (plain tensors and ints;
        ``torch.load(weights_only=True)`` reads it)."""
        return {
            "num_samples": self.num_samples, "batch_size": self.batch_size, "order": self.order.clone(),
            "position": self.position,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the order and position of a checkpointed run.  ``ValueError`` (nothing changed)
        for another ``N`` or batch size, or an order that is not a permutation of ``range(N)``."""
        if not isinstance(state, dict) or not {"num_samples", "batch_size", "order"} <= set(state):
            raise ValueError("not a FixedOrderSampler state dict (expected num_samples, batch_size, order)")
        for key, ours in (("num_samples", self.num_samples), ("batch_size", self.batch_size)):
            if state[key] != ours:
                raise ValueError(
                    f"the checkpoint's loader has {key}={state[key]!r}, this one {ours!r}; build the loader "
                    "with the checkpointed run's settings"
                )
        order = state["order"]
        if (
            not isinstance(order, torch.Tensor)
            or order.dim() != 1
            or order.numel() != self.num_samples
            or order.dtype not in (torch.int64, torch.int32)
            or not torch.equal(torch.sort(order.cpu()).values, torch.arange(self.num_samples, dtype=order.dtype))
        ):
            raise ValueError("the checkpoint's order is not a permutation of range(N); the checkpoint is corrupt")
        position = state.get("position", 0)
        if isinstance(position, bool) or not isinstance(position, int) or position < 0:
            raise ValueError(f"the checkpoint's loader position must be an integer >= 0, got {position!r}")
        self.order = order.cpu().to(torch.int64).clone()
        self.position = position


class FixedOrderLoader(DataLoader):
    """A ``DataLoader`` whose batches are those of a :class:`FixedOrderSampler`: fixed-size batches
    in one fixed order, the same every epoch (the data regime of DP-FTRL; no sampling).

    Args:
        dataset: a map-style dataset of size ``N``.
        batch_size: ``B``; ``N // B`` batches an epoch, each of exactly ``B`` examples.
        shuffle, generator: how the one order is drawn (see :class:`FixedOrderSampler`).
        collate_fn: as for ``DataLoader`` (default ``default_collate``).
        **kwargs: other ``DataLoader`` arguments (``num_workers``, ``pin_memory``...);
            ``sampler``, ``batch_sampler`` and ``drop_last`` are decided by the fixed order and refused.

    :meth:`make_ledger` builds the matching ledger; :meth:`ledger_settings` gives the sampling
    settings the optimizer checks every step against; :meth:`state_dict` saves the order.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        *,
        shuffle: bool = True,
        generator: torch.Generator | int | None = None,
        collate_fn=None,
        **kwargs,
    ):
        bad = sorted(set(kwargs) & {"sampler", "batch_sampler", "drop_last"})
        if bad:
            raise ValueError(f"FixedOrderLoader decides {bad} by its fixed order of fixed-size batches; do not pass them")
        sampler = FixedOrderSampler(len(dataset), batch_size, shuffle=shuffle, generator=generator)
        super().__init__(dataset, batch_sampler=sampler, collate_fn=collate_fn or default_collate, **kwargs)
        self.fixed_order_sampler = sampler

    @property
    def fixed_batch_size(self) -> int:
        """``B``: the size of every batch."""
        return self.fixed_order_sampler.batch_size

    @property
    def steps_per_epoch(self) -> int:
        """``N // B``."""
        return self.fixed_order_sampler.steps_per_epoch

    @property
    def min_separation(self) -> int:
        """``N // B - 1``: steps strictly between two participations of one record."""
        return self.fixed_order_sampler.min_separation

    @property
    def position(self) -> int:
        """Batches handed out so far (see :class:`FixedOrderSampler`)."""
        return self.fixed_order_sampler.position

    def ledger_settings(self) -> dict[str, Any]:
        """The sampling settings this loader implements, as a ledger records them:
        ``population_size`` ``N``, ``sampling`` ``"fixed_order"``, ``selection_probability`` ``B/N``
        and ``batch_size`` ``B``."""
        n, b = len(self.dataset), self.fixed_batch_size
        return {"population_size": n, "sampling": FIXED_ORDER, "selection_probability": b / n, "batch_size": b}

    def make_ledger(self, **metadata) -> "PrivacyLedger":  # noqa: F821
        """A :class:`~pytorch_privacy.dp_query.PrivacyLedger` with exactly this loader's settings."""
        from ..dp_query.privacy_ledger import PrivacyLedger

        s = self.ledger_settings()
        return PrivacyLedger(s["population_size"], sampling=FIXED_ORDER, batch_size=s["batch_size"], metadata=metadata)

    def state_dict(self) -> dict[str, Any]:
        """The order (see :meth:`FixedOrderSampler.state_dict`)."""
        return self.fixed_order_sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a checkpointed order (refuses another ``N`` or batch size)."""
        self.fixed_order_sampler.load_state_dict(state)
