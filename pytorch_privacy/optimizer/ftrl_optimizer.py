"""DP-FTRL: private training without sampling, with tree-aggregated noise (:class:`DPFTRLOptimizer`).

DP-FTRL (Kairouz, McMahan, Song, Thakkar, Thakurta, Xu 2021, "Practical and Private (Deep)
Learning without Sampling or Shuffling") releases, after every step ``t``, a noisy *prefix sum*
of the clipped gradient sums of steps ``1..t``, with noise from a binary tree of Gaussians
(Dwork et al. 2010; Chan, Shi, Song 2011), so the noise of each prefix sum grows like
``log t`` instead of ``sqrt t``.  Its privacy needs no amplification by sampling: batches come in
a fixed order (:class:`~pytorch_privacy.optimizer.fixed_order.FixedOrderLoader`) or from a fresh
shuffle every epoch, and the ledger accounts the whole tree
(:mod:`pytorch_privacy.analysis.tree_aggregation`).

The update
----------
With ``g_t = sum_{i in B_t} clip_C(grad l(theta_{t-1}; x_i))`` the clipped gradient sum of step
``t``, ``s_t = g_1 + ... + g_t + N_t`` its noisy prefix sum (``N_t`` the tree noise of prefix
``t``; ``s_0 = 0``), ``D`` the public batch size and ``eta`` the learning rate, DP-FTRL (the
FTRL form with the quadratic regulariser ``||theta - theta_0||^2 / (2 eta)``) is::

    theta_t = theta_0 - eta * s_t / D

DP-FTRL-M (momentum ``gamma``, TF Federated's ``DPFTRLMServerOptimizer``) keeps a buffer of the
prefix sums and anchors at ``theta_0``::

    m_t = gamma * m_{t-1} + s_t,     m_0 = 0
    theta_t = theta_0 - eta * m_t / D

**What this class implements** is the equivalent *residual* form: the tree query releases the
increments ``r_t = s_t - s_{t-1} = g_t + N_t - N_{t-1}`` (``TreeResidualSumQuery``), the optimizer
writes ``r_t / D`` into ``.grad`` and a ``torch.optim.SGD(lr=eta, momentum=gamma)`` steps::

    v_t = gamma * v_{t-1} + r_t / D,    v_0 = 0
    theta_t = theta_{t-1} - eta * v_t

Both are the same sequence: ``sum_{k<=t} v_k = sum_{j<=t} r_j (1 - gamma^(t-j+1)) / (1 - gamma) / D
= m_t / D`` (for ``gamma = 0``, ``sum_k r_k = s_t``).  ``tests/optimizer/test_ftrl_optimizer.py``
checks the residual implementation against the anchored recursion.  (The residual form reuses the
whole :class:`~pytorch_privacy.optimizer.DPOptimizer` step; it differs from the anchored one only
by floating-point rounding, and with an LR schedule, whose rates then apply to increments.)

Restarts
--------
``restart="epoch"`` (default) starts a new tree at every epoch, ``restart=k`` every ``k`` steps,
``restart=None`` never (one tree for the whole run).  At a restart (Kairouz et al. 2021, Sec. 4;
TF Federated's ``restart_dp_tree``) the anchor becomes the current parameters, the prefix sums and
the tree start from zero, and the momentum buffer is reset.  In the residual form that is: the
query's tree restarts (``RestartQuery``) and the SGD momentum buffers are cleared before the first
step of the new tree (the step whose ledger event has ``starts_tree=1``).

Accounting
----------
Every step is recorded as a ``TreeAggregationStepEvent(noise_multiplier, starts_tree)`` under the
loader's scheme (``fixed_order`` or ``shuffle``); the ledger's run grouper turns the run into the
event of the whole plan: trees restarted every epoch (``compute_rdp_tree_restart``) or one tree
over several epochs of a fixed order (``compute_rdp_single_tree`` with ``min_separation =
N // B - 1``).  :func:`ftrl_epsilon` and :func:`ftrl_noise_multiplier` account a plan the same way
(they build the ledger the run will write), so a run calibrated for epsilon takes every planned
step, and ``target_epsilon`` stops a run before its ledger's epsilon would exceed the target.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..dp_query.dp_query import check_clip, check_stddev
from ..dp_query.normalized_query import NormalizedQuery
from ..dp_query.privacy_ledger import PrivacyLedger
from ..dp_query.randomness import RandomSource
from ..dp_query.tree_events import TreeAggregationStepEvent
from .consistency import ledger_for_loader, loader_sampling
from .dp_optimizer import DPOptimizer, LossFn
from .fixed_order import FIXED_ORDER

__all__ = ["DPFTRLOptimizer", "ftrl_epsilon", "ftrl_noise_multiplier", "plan_ledger", "FTRL_SAMPLING"]

#: the ledger sampling schemes DP-FTRL runs under (no amplification by sampling)
FTRL_SAMPLING = (FIXED_ORDER, "shuffle")


def _check_lr(lr: Any) -> float:
    if isinstance(lr, bool) or not isinstance(lr, (int, float)):
        raise TypeError(f"learning_rate must be a number > 0, got {type(lr).__name__}")
    if not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"learning_rate must be finite and > 0, got {lr!r}")
    return float(lr)


def _check_momentum(m: Any) -> float:
    if isinstance(m, bool) or not isinstance(m, (int, float)):
        raise TypeError(f"momentum must be a number in [0, 1), got {type(m).__name__}")
    if not (math.isfinite(m) and 0 <= m < 1):
        raise ValueError(f"momentum must be in [0, 1), got {m!r} (DP-FTRL-M uses e.g. 0.9; 0 disables it)")
    return float(m)


def _settings_of(data_loader: Any, ledger: PrivacyLedger | None) -> dict[str, Any] | None:
    """The sampling the run will be accounted under; refuses schemes with sampling."""
    if data_loader is not None:
        from .samplers import PoissonSampler

        if hasattr(data_loader, "poisson_sampler") or isinstance(data_loader, PoissonSampler):
            raise ValueError(
                "DP-FTRL does not use sampling: its accounting assumes every record in at most one batch an "
                "epoch, in a fixed order or a fresh shuffle each epoch. Use FixedOrderLoader(dataset, batch_size) "
                "or DataLoader(dataset, batch_size=B, shuffle=True, drop_last=True) instead of a Poisson loader"
            )
        s = loader_sampling(data_loader)
        if s["sampling"] == "shuffle" and getattr(data_loader, "drop_last", True) is False:
            if s["population_size"] % s["batch_size"]:
                raise ValueError(
                    "a shuffling DataLoader for DP-FTRL must give batches of one size: pass drop_last=True "
                    f"(N={s['population_size']} is not a multiple of batch_size={s['batch_size']})"
                )
    elif ledger is not None:
        s = {"population_size": ledger.population_size, "sampling": ledger.sampling, "batch_size": ledger.batch_size}
    else:
        return None
    if s["sampling"] not in FTRL_SAMPLING:
        raise ValueError(
            f"DP-FTRL is accounted for {FTRL_SAMPLING} batches (no sampling), got sampling={s['sampling']!r}; "
            "use a FixedOrderLoader or a shuffling DataLoader with drop_last=True"
        )
    return s


def _checks_position(data_loader: Any) -> bool:
    """Whether the optimizer checks the loader's position each step (single-process fixed order)."""
    from .fixed_order import FixedOrderLoader

    return isinstance(data_loader, FixedOrderLoader) and data_loader.num_workers == 0


def _restart_period(restart: Any, settings: dict[str, Any] | None) -> int | None:
    if restart is None:
        return None
    if restart == "epoch":
        if settings is None:
            raise ValueError("restart='epoch' needs the epoch length: pass data_loader= (or a ledger), or restart=k")
        return max(1, settings["population_size"] // settings["batch_size"])
    if isinstance(restart, bool) or not isinstance(restart, int) or restart < 1:
        raise ValueError(f"restart must be 'epoch', a positive number of steps, or None (one tree), got {restart!r}")
    return restart


def _tree_query(clip: float, sigma: float, period: int | None, efficient: bool, source: RandomSource):
    """``RestartQuery(TreeResidualSumQuery)`` restarting every ``period`` steps (no restarts: the
    residual query alone)."""
    from ..dp_query.restart_query import PeriodicRoundRestartIndicator, RestartQuery
    from ..dp_query.tree_aggregation_query import TreeResidualSumQuery

    query = TreeResidualSumQuery.build_l2_gaussian_query(clip, sigma, generator=source, use_efficient=efficient)
    return query if period is None else RestartQuery(query, PeriodicRoundRestartIndicator(period))


class DPFTRLOptimizer(DPOptimizer):
    """DP-FTRL / DP-FTRL-M (Kairouz et al. 2021) on the per-example engines of :class:`DPOptimizer`.

    Each step clips every per-example gradient to ``C``, sums, and releases the increment of the
    tree-noised prefix sum divided by the public batch size ``D``; a ``torch.optim.SGD`` with
    ``lr=learning_rate, momentum=momentum`` applies it (the residual form of the update in the
    module docstring, equal to ``theta_t = theta_0 - eta * m_t / D``).

    Args:
        model: the ``nn.Module``; its parameters with ``requires_grad=True`` are trained.
        loss_fn: per-example losses ``loss_fn(output, target) -> Tensor[B]``.
        l2_norm_clip: ``C`` > 0.
        noise_multiplier: ``sigma`` >= 0; every tree node holds ``N(0, (sigma C)^2 I)``.
        learning_rate: ``eta`` > 0.
        momentum: ``gamma`` in [0, 1) (DP-FTRL-M); reset at every restart.
        data_loader: a :class:`~pytorch_privacy.optimizer.fixed_order.FixedOrderLoader` (fixed
            order, the regime of the paper) or a ``DataLoader(dataset, batch_size=B, shuffle=True,
            drop_last=True)``.  It is the truth about the data regime: the ledger is built from it
            and each step is checked against it.  Poisson loaders are refused.
        ledger: a ledger with ``fixed_order`` or ``shuffle`` sampling (default: built from
            ``data_loader``).
        batch_size: the public denominator ``D`` (default: the loader's / ledger's batch size).
        restart: ``"epoch"`` (default), a period in steps, or ``None`` (one tree).
        efficient_tree: Honaker's (2015) efficient estimator for the prefix sums (default ``True``;
            lower variance, same privacy).
        generator: ``torch.Generator`` for the tree noise (reproducible runs; default: owned,
            OS-seeded).  ``secure_mode``: draw the noise from the OS CSPRNG.
        target_epsilon, target_delta, accountant, engine, metrics, ...: as for
            :class:`DPOptimizer` (the budget accounts the ledger's trees as a whole).

    Microbatches are not supported (a record is one example).  ``state_dict()`` saves the tree
    state, the momentum buffers, the noise generators, the step count, the ledger and the loader's
    order and position: a resumed run continues the same tree with the next batch, and never draws
    the same noise twice.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        l2_norm_clip: float,
        noise_multiplier: float,
        *,
        learning_rate: float,
        momentum: float = 0.0,
        data_loader: Any = None,
        ledger: PrivacyLedger | None = None,
        batch_size: int | None = None,
        restart: int | str | None = "epoch",
        efficient_tree: bool = True,
        generator: torch.Generator | None = None,
        secure_mode: bool = False,
        **kwargs,
    ):
        for bad in ("num_microbatches", "microbatch_size"):
            if kwargs.get(bad) is not None:
                raise ValueError(f"DPFTRLOptimizer does not support {bad} (one record is one example)")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        lr = _check_lr(learning_rate)
        gamma = _check_momentum(momentum)
        clip = check_clip(l2_norm_clip)
        sigma = check_stddev(noise_multiplier, "noise_multiplier")
        settings = _settings_of(data_loader, ledger)
        if data_loader is not None and ledger is None:
            ledger = ledger_for_loader(data_loader)
        if batch_size is None:
            if settings is None:
                raise ValueError("DPFTRLOptimizer needs the public batch size D: pass data_loader=, a ledger, or batch_size=")
            batch_size = settings["batch_size"]
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer (the public denominator), got {batch_size!r}")
        self.restart_period = _restart_period(restart, settings)
        self.l2_norm_clip, self.noise_multiplier, self.denominator = clip, sigma, float(batch_size)
        self.learning_rate, self.momentum = lr, gamma
        #: every batch must have exactly this many examples (fixed-size batches are the plan)
        self._fixed_batch = settings["batch_size"] if settings is not None else None
        #: a single-process FixedOrderLoader, whose position must follow the steps (see :meth:`step`)
        self._order_loader = data_loader if _checks_position(data_loader) else None
        source = RandomSource(generator, secure_mode=secure_mode)
        query = NormalizedQuery(_tree_query(clip, sigma, self.restart_period, efficient_tree, source), float(batch_size))
        sgd = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=gamma)
        super().__init__(sgd, model, loss_fn, query, ledger=ledger, data_loader=data_loader, secure_mode=secure_mode, **kwargs)
        #: the event of the previous step (an SGD step without a new release starts no tree)
        self._event_before = None
        sgd.register_step_pre_hook(self._reset_momentum_at_restart)

    def step(self, closure: None = None) -> None:
        """Release the step (see :meth:`DPOptimizer.step`); the SGD momentum is cleared first when
        the release is the first of a tree.

        With a single-process :class:`~pytorch_privacy.optimizer.fixed_order.FixedOrderLoader`,
        the step is refused (``ValueError``, nothing released) unless its batch is the one the
        loader handed out last, right after the batch of the previous step: the accounting assumes
        every batch of the fixed order trained once, in order (a skipped batch brings two
        participations of a record closer than an epoch).  With ``num_workers > 0`` the loader
        prefetches and its position is not checked."""
        loader = self._order_loader
        if loader is not None and loader.position != self._steps + 1:
            raise ValueError(
                f"the FixedOrderLoader has handed out {loader.position} batches but this is step {self._steps + 1}: "
                "DP-FTRL's accounting assumes every batch of the fixed order is trained once, in order (a skipped "
                "or repeated batch changes how far apart a record's participations are). Train one step on every "
                "batch the loader yields, from a fresh loader (or one restored with the optimizer's state_dict)"
            )
        self._event_before = self._last_event
        super().step(closure)

    def _reset_momentum_at_restart(self, optimizer, args, kwargs) -> None:  # noqa: ARG002
        """Before the SGD step of the first step of a tree: clear the momentum buffers."""
        ev = self._last_event
        fresh = ev is not None and ev is not self._event_before
        starts = fresh and isinstance(ev, TreeAggregationStepEvent) and ev.starts_tree == 1
        if starts and self.momentum:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    optimizer.state[p].pop("momentum_buffer", None)

    def fit_batch(self, inputs: Any, targets: Any) -> torch.Tensor:
        """One DP-FTRL step on a batch of exactly ``batch_size`` examples (see :class:`DPOptimizer`)."""
        from .engines.base import batch_size_of

        n = batch_size_of(inputs, targets)
        expected, where = self._fixed_batch, ""
        world = getattr(self._dist, "world_size", 1)
        if expected is not None and world > 1:  # data parallel: each rank its equal share
            if expected % world:
                raise ValueError(
                    f"DP-FTRL's batch of {expected} examples cannot be shared equally by {world} ranks; "
                    "use a batch size divisible by the world size"
                )
            expected, where = expected // world, f" on each of {world} ranks (global batch {self._fixed_batch})"
        if expected is not None and n != expected:
            raise ValueError(
                f"a batch of {n} examples; DP-FTRL's plan (and its accounting) is batches of exactly "
                f"{expected}{where}. Use the FixedOrderLoader (or a shuffling DataLoader with drop_last=True)"
            )
        return super().fit_batch(inputs, targets)


# -- accounting a plan ---------------------------------------------------------------------
def plan_ledger(
    noise_multiplier: float,
    *,
    population_size: int,
    batch_size: int,
    epochs: int | None = None,
    steps: int | None = None,
    restart: int | str | None = "epoch",
    sampling: str = FIXED_ORDER,
) -> PrivacyLedger:
    """The ledger a :class:`DPFTRLOptimizer` run of this plan writes (``steps`` or whole ``epochs``
    of ``population_size // batch_size`` steps; the tree restarts as ``restart`` says)."""
    if sampling not in FTRL_SAMPLING:
        raise ValueError(f"sampling must be one of {FTRL_SAMPLING}, got {sampling!r}")
    ledger = PrivacyLedger(population_size, sampling=sampling, batch_size=batch_size)
    spe = max(1, population_size // batch_size)
    if (epochs is None) == (steps is None):
        raise ValueError("give exactly one of epochs= and steps=")
    if steps is None:
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
        steps = epochs * spe
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    period = _restart_period(restart, {"population_size": population_size, "batch_size": batch_size})
    sigma = check_stddev(noise_multiplier, "noise_multiplier")
    first = TreeAggregationStepEvent(sigma, starts_tree=1)
    rest = TreeAggregationStepEvent(sigma, starts_tree=0)
    period = period or steps
    done = 0
    while done < steps:
        k = min(period, steps - done)
        ledger.record_sample(first)
        if k > 1:
            ledger.record_sample(rest, k - 1)
        done += k
    return ledger


def ftrl_epsilon(noise_multiplier: float, target_delta: float, **plan) -> float:
    """Epsilon at ``target_delta`` of a DP-FTRL plan (keywords of :func:`plan_ledger`), with the
    accountant and conversion of the optimizer's budget (``RdpAccountant(refine=True)`` under the
    scheme's neighbouring relation)."""
    from ..analysis import RdpAccountant
    from ..dp_query.ledger_schema import SamplingScheme

    ledger = plan_ledger(noise_multiplier, **plan)
    relation = SamplingScheme(ledger.sampling).neighboring_relation
    acc = RdpAccountant(neighboring_relation=relation, refine=True)
    acc.compose(ledger.to_event())
    return float(acc.get_epsilon(target_delta))


def ftrl_noise_multiplier(target_epsilon: float, target_delta: float, *, rtol: float = 1e-4, **plan) -> float:
    """The smallest noise multiplier (to relative ``rtol``) whose plan meets ``(target_epsilon,
    target_delta)`` (bisection, :func:`pytorch_privacy.analysis.calibration.smallest_noise`)."""
    from ..analysis.calibration import smallest_noise

    if isinstance(target_epsilon, bool) or not isinstance(target_epsilon, (int, float)) or not (
        math.isfinite(target_epsilon) and target_epsilon > 0
    ):
        raise ValueError(f"target_epsilon must be a finite number > 0, got {target_epsilon!r}")
    plan_ledger(1.0, **plan)  # validate the plan once, before the search
    return smallest_noise(
        lambda s: ftrl_epsilon(s, target_delta, **plan), float(target_epsilon), rtol=rtol, plan=f"DP-FTRL {plan}"
    )
