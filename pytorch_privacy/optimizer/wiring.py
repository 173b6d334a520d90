"""How :class:`~pytorch_privacy.optimizer.DPOptimizer` is wired at construction: argument checks,
the wrapped optimizer's coverage of the model, the ledger around the query, the budget.

Each is a plain function so the optimizer's ``__init__`` stays a short list of steps.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Iterator

import torch
from torch import nn

from ..dp_query.dp_query import DPQuery
from ..dp_query.ledger_schema import SamplingScheme
from ..dp_query.privacy_ledger import PrivacyLedger
from ..dp_query.query_with_ledger import QueryWithLedger
from .budget import PrivacyBudget
from .consistency import ledger_for_loader

__all__ = ["public_denominator", "query_chain", "check_wrapped_objects", "check_partition_claims", "check_optimizer_covers", "attach_ledger", "make_budget"]


def query_chain(query: DPQuery) -> Iterator[DPQuery]:
    """The query and the queries it delegates to (``inner_query``), outermost first."""
    seen = set()
    q = query
    while q is not None and id(q) not in seen:
        seen.add(id(q))
        yield q
        q = getattr(q, "inner_query", None)


def check_wrapped_objects(optimizer: Any, model: Any, loss_fn: Any, query: Any, dp_cls: type) -> None:
    """``TypeError`` naming the first argument of the wrong kind."""
    if isinstance(optimizer, dp_cls):
        raise TypeError("optimizer is already a DPOptimizer; wrap the plain torch optimizer once")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError("loss_fn must be callable: loss_fn(output, target) -> per-example losses [B]")
    if not isinstance(query, DPQuery):
        raise TypeError(f"query must be a DPQuery, got {type(query).__name__}")


def check_optimizer_covers(optimizer: torch.optim.Optimizer, model: nn.Module, trainable: dict[str, nn.Parameter]) -> set[int]:
    """Refuse a trainable optimizer parameter that is not the model's (it would never get a
    private gradient); warn once about trainable model parameters missing from the optimizer and
    return their ids (known, so the per-step check does not refuse them)."""
    if not trainable:
        raise ValueError(
            "the model has no trainable parameters (all have requires_grad=False); there is nothing "
            "to train privately"
        )
    model_params = {id(p) for p in model.parameters()}
    for gi, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            if p.requires_grad and id(p) not in model_params:
                raise ValueError(
                    f"optimizer param_groups[{gi}] holds a trainable parameter of shape {tuple(p.shape)} that "
                    "is not a parameter of `model`; it would never receive a private gradient. Build the "
                    "optimizer from model.parameters()"
                )
    opt_params = {id(p) for g in optimizer.param_groups for p in g["params"]}
    missing = [n for n, p in trainable.items() if id(p) not in opt_params]
    if missing:
        warnings.warn(
            f"trainable parameters {missing} are not in the optimizer: their private gradients are computed "
            "(and cost time) but never applied. Freeze them (requires_grad_(False)) or add them.",
            stacklevel=3,
        )
    return {id(trainable[n]) for n in missing}


def public_denominator(expected_batch_size: Any, ledger: PrivacyLedger | None, who: str, *, alternatives: str = "") -> float:
    """The average's public denominator: ``expected_batch_size`` (a positive number fixed in
    advance), else the ledger's ``q*N``; ``ValueError`` when neither is given or the value is not
    a positive finite number (a tensor, a realised batch size, is refused: dividing by it leaks)."""
    if expected_batch_size is None:
        if ledger is None:
            raise ValueError(
                f"{who} needs the public denominator of the average: pass expected_batch_size=q*N, or a "
                f"ledger or data_loader (they know q*N){alternatives}"
            )
        expected_batch_size = ledger.expected_batch_size
    if (
        isinstance(expected_batch_size, (bool, torch.Tensor))
        or not isinstance(expected_batch_size, (int, float))
        or not math.isfinite(expected_batch_size)
        or expected_batch_size <= 0
    ):
        raise ValueError(
            f"expected_batch_size must be a positive number fixed in advance (q*N), got {expected_batch_size!r}"
        )
    return float(expected_batch_size)


def check_partition_claims(chain: list, data_loader: Any) -> None:
    """A query that claims banded sampling (``partitions > 1``: record ``i`` may only be drawn at
    steps ``t`` with ``t mod partitions == i mod partitions``, which the accounting amplifies) must
    be fed by a loader that implements it (a ``BandedPoissonLoader`` with the same ``partitions``);
    otherwise the ledger would under-report epsilon.  ``ValueError`` when the claim is unbacked."""
    for q in chain:
        claimed = getattr(q, "partitions", 1)
        if not isinstance(claimed, int) or claimed <= 1:
            continue
        source = getattr(data_loader, "poisson_sampler", data_loader)
        actual = getattr(source, "partitions", None)
        if actual != claimed:
            where = "no data_loader" if data_loader is None else f"a {type(data_loader).__name__} with partitions={actual}"
            raise ValueError(
                f"{type(q).__name__}(partitions={claimed}) claims banded sampling, but the optimizer gets {where}; "
                "the amplified accounting would under-report epsilon. Pass data_loader=BandedPoissonLoader(dataset, "
                f"sample_rate, partitions={claimed}), or build the query with partitions=1"
            )


def attach_ledger(
    query: DPQuery, ledger: PrivacyLedger | None, data_loader: Any
) -> tuple[DPQuery, DPQuery, PrivacyLedger | None, bool]:
    """``(query, release query, ledger, the optimizer records it)``.

    The outermost :class:`QueryWithLedger` is unwrapped and recorded by the optimizer itself, so
    a step refused by the budget is never recorded; without ``ledger`` one is built from
    ``data_loader`` (the loader is the truth about sampling)."""
    chain = list(query_chain(query))
    check_partition_claims(chain, data_loader)
    if data_loader is not None and ledger is None and not any(isinstance(q, QueryWithLedger) for q in chain):
        ledger = ledger_for_loader(data_loader)
    if ledger is not None:
        if not isinstance(ledger, PrivacyLedger):
            raise TypeError(f"ledger must be a PrivacyLedger, got {type(ledger).__name__}")
        if any(isinstance(q, QueryWithLedger) for q in chain):
            raise ValueError("query already records into a ledger (QueryWithLedger); do not pass ledger= too")
        query = QueryWithLedger(query, ledger)
    if isinstance(query, QueryWithLedger):
        return query, query.inner_query, query.ledger, True
    inner = [q for q in query_chain(query) if isinstance(q, QueryWithLedger)]
    return query, query, (inner[0].ledger if inner else None), False


def make_budget(
    target_epsilon: float | None,
    target_delta: float | None,
    accountant: Any,
    ledger: PrivacyLedger | None,
    records_ledger: bool,
) -> PrivacyBudget | None:
    """The budget enforced before each step, or ``None`` when none is asked for.  Its default
    accountant follows the ledger's neighbouring relation (from the sampling scheme)."""
    if target_epsilon is None and accountant is None and target_delta is None:
        return None
    if target_delta is None:
        raise ValueError("target_delta is required with target_epsilon or accountant (epsilon is computed at it)")
    if not records_ledger or ledger is None:
        raise ValueError(
            "budget enforcement needs a ledger as the outermost query wrapper (it gives the sampling "
            "of each step and must record only steps the budget allowed): pass ledger=..."
        )
    relation = SamplingScheme(ledger.sampling).neighboring_relation
    budget = PrivacyBudget(target_epsilon, target_delta, accountant, neighboring_relation=relation)
    budget.check_delta(ledger.population_size)
    return budget
