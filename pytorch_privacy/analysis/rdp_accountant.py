"""An online RDP accountant: compose privacy events as they happen, ask for epsilon any time.

:class:`RdpAccountant` keeps the running RDP curve at a fixed set of orders.  Composing an event
costs a dictionary lookup and one vector addition: the RDP vector of every distinct event is
computed once and cached (events are hashable frozen ``attrs`` classes), so a training loop that
composes the same ``PoissonSampledEvent`` at every step does constant work per step.

Supported events and conventions
--------------------------------
``noise_multiplier`` is always the noise stddev divided by the clip norm ``C``, which is the
L2 sensitivity of a sum under **add-or-remove-one**.

=====================================  ==================================  ==================================
event                                  add_or_remove_one (default)         replace_one
=====================================  ==================================  ==================================
``GaussianEvent(s)``                   ``alpha / (2 s^2)``                 ``2 alpha / s^2`` (sensitivity 2C)
``LaplaceEvent(b)``                    Mironov 2017, Prop. 6, scale ``b``  the same with scale ``b / 2``
``PoissonSampledEvent(q, gauss)``      exact (:func:`.rdp.compute_rdp`)    ``ValueError``
``SampledWithoutReplacementEvent``     ``ValueError``                      WBK19 bound (sensitivity 2C)
``ShuffledEvent(spe, steps, ev)``      ``ValueError``                      ``ceil(steps/spe)`` x RDP(``ev``)
``SelfComposedEvent`` / ``Composed``   count x / sum                       count x / sum
``NoOpEvent``                          0                                   0
``NonPrivateEvent``                    ``inf`` (with a warning)            ``inf`` (with a warning)
``UnsupportedEvent``, others           ``ValueError``                      ``ValueError``
=====================================  ==================================  ==================================

The inner event of a sampled event must be Gaussian: a ``GaussianEvent`` or a ``ComposedEvent``
/ ``SelfComposedEvent`` of them (several Gaussian queries on the same sample), which is one
Gaussian with noise multiplier ``(sum_i s_i^-2)^(-1/2)``.  dp-accounting's ``RdpAccountant`` reads
the noise multiplier relative to the sensitivity *under the relation in use*; under replace-one
our values therefore equal dp-accounting's evaluated at ``noise_multiplier / 2``.

**Shuffling is not Poisson sampling.**  ``ShuffledEvent`` (fixed-size batches of a fresh random
permutation each epoch) claims no amplification: within one epoch every record is in exactly one
batch, so by parallel composition an epoch costs at most one un-amplified ``event`` under
replace-one neighbours (the permutation is coupled between the two datasets), and a partial epoch
is counted as a whole one.  This is a valid but conservative bound (amplification by shuffling
exists but is not claimed).  Under add-or-remove-one the batches of the two datasets are not
aligned and the argument fails, hence the ``ValueError``.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from ..dp_query.events import (
    equivalent_gaussian_noise_multiplier,
    ADD_OR_REMOVE_ONE,
    REPLACE_ONE,
    ComposedEvent,
    DpEvent,
    GaussianEvent,
    LaplaceEvent,
    NonPrivateEvent,
    NoOpEvent,
    PoissonSampledEvent,
    SampledWithoutReplacementEvent,
    SelfComposedEvent,
    ShuffledEvent,
    UnsupportedEvent,
)
from ..dp_query.event_registry import EventTypeRegistry
from ..dp_query.events import relation_of
from ._checks import check_delta, check_orders
from ._extensions import RULE_MODULES
from .accountant_base import PrivacyAccountant
from .conversion import get_privacy_spent, refine_epsilon
from .rdp import poisson_rdp_one_step
from .rdp_without_replacement import wor_rdp_one_step

__all__ = ["RdpAccountant", "compute_rdp_from_event", "compute_rdp_from_ledger", "register_rdp_rule"]

#: RDP of event types defined outside this module (tree aggregation, discrete and distributed
#: mechanisms, matrix factorisation): ``event class -> fn(event, orders, neighboring_relation)``
#: returning the RDP vector of one occurrence.  Filled by :func:`register_rdp_rule`.
_RDP_RULES = EventTypeRegistry("register_rdp_rule", RULE_MODULES)


def register_rdp_rule(event_cls: type):
    """Decorator: ``fn(event, orders, neighboring_relation) -> ndarray`` is the RDP at ``orders``
    (a float array) of one ``event_cls`` event under the relation (``"add_or_remove_one"`` or
    ``"replace_one"``).  It must raise ``ValueError`` for a relation it cannot account.

    This is how a new mechanism becomes accountable without editing :class:`RdpAccountant`::

        @register_rdp_rule(MyEvent)
        def _my_rdp(event, orders, relation):
            return orders * event.rho
    """
    return _RDP_RULES.register(event_cls)


_RELATIONS = (ADD_OR_REMOVE_ONE, REPLACE_ONE)
_CACHE_SIZE = 4096
_HISTORY_SIZE = 256


def _gaussian_rdp(sigma: float, orders: np.ndarray, relation: str) -> np.ndarray:
    if sigma == 0.0:
        return np.full(orders.shape, np.inf)
    if math.isinf(sigma):
        return np.zeros(orders.shape)
    sens = 2.0 if relation == REPLACE_ONE else 1.0
    mu = sens / sigma  # never forms sigma^2 (it underflows for sigma < 1e-154)
    with np.errstate(over="ignore"):
        return orders * (0.5 * mu * mu)


def _laplace_rdp(b: float, orders: np.ndarray, relation: str) -> np.ndarray:
    """Mironov 2017 (Prop. 6): the Laplace mechanism with L1 sensitivity 1 and scale b is
    (alpha, log(alpha/(2alpha-1) e^{(alpha-1)/b} + (alpha-1)/(2alpha-1) e^{-alpha/b})/(alpha-1))-RDP;
    at order ``inf`` it is ``1/b`` (pure DP)."""
    if b == 0.0:
        return np.full(orders.shape, np.inf)
    if math.isinf(b):
        return np.zeros(orders.shape)
    inv_b = (2.0 if relation == REPLACE_ONE else 1.0) / b  # sensitivity / scale
    if math.isinf(inv_b):  # b below ~1e-308: beyond the float range, like zero noise
        return np.full(orders.shape, np.inf)
    fin = np.isfinite(orders)
    a = np.where(fin, orders, 2.0)
    with np.errstate(over="ignore", invalid="ignore"):
        log_val = np.logaddexp(
            np.log(a) - np.log(2.0 * a - 1.0) + (a - 1.0) * inv_b,
            np.log(a - 1.0) - np.log(2.0 * a - 1.0) - a * inv_b,
        )
        r = np.maximum(log_val / (a - 1.0), 0.0)
    # the divergence never exceeds the pure-DP epsilon 1/b (and overflow of e^{a/b} gives inf)
    return np.where(fin, np.minimum(np.nan_to_num(r, nan=inv_b), inv_b), inv_b)


def _effective_noise_multiplier(event: DpEvent, outer: DpEvent) -> float:
    """Noise multiplier of the single Gaussian equivalent to ``event`` (run on one sample)."""
    z = equivalent_gaussian_noise_multiplier(event)
    if z is None:
        raise ValueError(
            f"{type(outer).__name__} is supported only around Gaussian events (GaussianEvent, or "
            f"Composed/SelfComposed events of them); found {event!r} inside {outer!r}"
        )
    return z


class RdpAccountant(PrivacyAccountant):
    """Online Rényi-DP accountant (Mironov 2017; Mironov, Talwar, Zhang 2019).

    Args:
        orders: RDP orders (each > 1; ``inf`` allowed, where every noisy sampled mechanism has
            infinite RDP); default :data:`.rdp.DEFAULT_ORDERS`.
        neighboring_relation: ``"add_or_remove_one"`` (default) or ``"replace_one"``; see the
            module docstring for which events each relation accepts and the sensitivity
            convention.
        refine: if true, :meth:`get_epsilon` optimises the order continuously around the best
            grid order (:func:`.conversion.refine_epsilon`), re-evaluating the distinct events
            composed so far; never larger than the grid answer.  Off by default so that
            ``get_epsilon`` equals ``get_privacy_spent(acc.orders, acc.rdp, ...)``.

    Composing costs O(number of orders) once an event has been seen (its RDP vector is
    cached), whatever the event's ``count``.
    """

    def __init__(
        self,
        orders: Sequence[float] | None = None,
        neighboring_relation: str = ADD_OR_REMOVE_ONE,
        *,
        refine: bool = False,
    ):
        if neighboring_relation not in _RELATIONS:
            raise ValueError(f"neighboring_relation must be one of {_RELATIONS}, got {neighboring_relation!r}")
        self._orders = np.atleast_1d(check_orders(orders)).copy()
        self._orders.setflags(write=False)
        self._relation = neighboring_relation
        self._rdp = np.zeros(self._orders.shape)
        self._cache: OrderedDict[DpEvent, np.ndarray] = OrderedDict()
        # distinct composed events -> total count (for refine); None once it grows too large
        self._history: dict[DpEvent, int] | None = {}
        self._refine = bool(refine)

    # -- properties ----------------------------------------------------------------------
    @property
    def orders(self) -> np.ndarray:
        """The RDP orders (a copy)."""
        return np.array(self._orders)

    @property
    def rdp(self) -> np.ndarray:
        """The RDP of everything composed so far at :attr:`orders` (a copy)."""
        return np.array(self._rdp)

    @property
    def neighboring_relation(self) -> str:
        return self._relation

    # -- RDP of one event ----------------------------------------------------------------
    def _event_rdp(self, event: DpEvent, orders: np.ndarray | None = None) -> np.ndarray:
        """RDP of one occurrence of ``event``; cached when evaluated at the accountant's orders."""
        if not isinstance(event, DpEvent):
            raise TypeError(f"expected a DpEvent, got {type(event).__name__}")
        if orders is None:
            hit = self._cache.get(event)
            if hit is not None:
                self._cache.move_to_end(event)
                return hit
            vec = self._compute(event, self._orders, cached=True)
            vec.setflags(write=False)
            self._cache[event] = vec
            if len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
            return vec
        return self._compute(event, orders, cached=False)

    def _sub(self, event: DpEvent, orders: np.ndarray, cached: bool) -> np.ndarray:
        return self._event_rdp(event) if cached else self._compute(event, orders, cached=False)

    def _compute(self, event: DpEvent, orders: np.ndarray, cached: bool) -> np.ndarray:
        rel = self._relation
        if isinstance(event, NoOpEvent):
            return np.zeros(orders.shape)
        if isinstance(event, NonPrivateEvent):
            return np.full(orders.shape, np.inf)
        if isinstance(event, UnsupportedEvent):
            why = f": {event.reason}" if event.reason else ""
            raise ValueError(f"UnsupportedEvent cannot be accounted{why}")
        if isinstance(event, GaussianEvent):
            return _gaussian_rdp(event.noise_multiplier, orders, rel)
        if isinstance(event, LaplaceEvent):
            return _laplace_rdp(event.noise_multiplier, orders, rel)
        if isinstance(event, SelfComposedEvent):
            if event.count == 0:
                return np.zeros(orders.shape)
            return event.count * self._sub(event.event, orders, cached)
        if isinstance(event, ComposedEvent):
            total = np.zeros(orders.shape)
            for e in event.events:
                total = total + self._sub(e, orders, cached)
            return total
        if isinstance(event, PoissonSampledEvent):
            if rel != ADD_OR_REMOVE_ONE:
                raise ValueError(
                    "PoissonSampledEvent is accounted under add-or-remove-one neighbours (Mironov, "
                    f"Talwar, Zhang 2019); this accountant uses {rel!r}. Use "
                    "RdpAccountant(neighboring_relation='add_or_remove_one') for Poisson-sampled steps"
                )
            sigma = _effective_noise_multiplier(event.event, event)
            return poisson_rdp_one_step(event.sampling_probability, sigma, orders)
        if isinstance(event, SampledWithoutReplacementEvent):
            if rel != REPLACE_ONE:
                raise ValueError(
                    "SampledWithoutReplacementEvent is accounted under replace-one neighbours (Wang, "
                    f"Balle, Kasiviswanathan 2019); this accountant uses {rel!r}. Use "
                    "RdpAccountant(neighboring_relation='replace_one'), or Poisson sampling for add/remove"
                )
            sigma = _effective_noise_multiplier(event.event, event)
            if event.source_dataset_size == 0:
                return np.zeros(orders.shape)
            q = event.sample_size / event.source_dataset_size
            return wor_rdp_one_step(q, sigma, orders)
        if isinstance(event, ShuffledEvent):
            if rel != REPLACE_ONE:
                raise ValueError(
                    "ShuffledEvent (fixed-size batches of a random permutation) is only accounted under "
                    f"replace-one neighbours (one un-amplified step per epoch); this accountant uses {rel!r}. "
                    "Use RdpAccountant(neighboring_relation='replace_one'), or Poisson sampling for add/remove"
                )
            if event.steps == 0:
                return np.zeros(orders.shape)
            if event.steps_per_epoch == 0:
                raise ValueError(f"ShuffledEvent with steps_per_epoch=0 and steps={event.steps} is malformed")
            epochs = -(-event.steps // event.steps_per_epoch)
            return epochs * self._sub(event.event, orders, cached)
        rule = _RDP_RULES.lookup(event)
        if rule is not None:
            return np.asarray(rule(event, orders, rel), dtype=float)
        raise ValueError(f"RdpAccountant does not support {type(event).__name__} events ({event!r})")

    # -- PrivacyAccountant interface -----------------------------------------------------
    def supports(self, event: DpEvent) -> bool:
        """Whether ``event`` can be composed under this accountant's neighbouring relation."""
        try:
            self._event_rdp(event)
        except (ValueError, TypeError):
            return False
        return True

    def compose(self, event: DpEvent, count: int = 1) -> "RdpAccountant":
        """Add ``count`` occurrences of ``event``; ``ValueError`` for unsupported events."""
        if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 0:
            raise ValueError(f"count must be a non-negative integer, got {count!r}")
        vec = self._event_rdp(event)
        if count == 0:
            return self
        fin = np.isfinite(self._orders)
        if np.any(np.isinf(vec[fin] if np.any(fin) else vec)):  # order inf is infinite for any Gaussian
            warnings.warn(
                f"infinite privacy loss: composing {event!r} makes the RDP infinite (it contains a "
                "NonPrivateEvent or a mechanism with zero noise)",
                RuntimeWarning,
                stacklevel=2,
            )
        if count == 1:
            np.add(self._rdp, vec, out=self._rdp)
        else:
            self._rdp += int(count) * vec
        hist = self._history
        if hist is not None:
            hist[event] = hist.get(event, 0) + int(count)
            if len(hist) > _HISTORY_SIZE:
                self._history = None  # too many distinct events to re-evaluate cheaply
        return self

    def _rdp_at(self, orders: np.ndarray) -> np.ndarray:
        total = np.zeros(orders.shape)
        for ev, c in (self._history or {}).items():
            total = total + c * self._event_rdp(ev, orders)
        return total

    def get_epsilon_and_order(self, target_delta: float) -> tuple[float, float]:
        """``(epsilon, optimal order)`` for everything composed so far at ``target_delta``."""
        check_delta(target_delta)
        if self._refine and self._history is not None and self._history:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                grid_eps = get_privacy_spent(self._orders, self._rdp, target_delta=target_delta)[0]
                eps, order = refine_epsilon(self._rdp_at, self._orders, target_delta)
            if not math.isinf(grid_eps):
                return min(eps, grid_eps), order
        eps, _, order = get_privacy_spent(self._orders, self._rdp, target_delta=target_delta)
        return eps, order

    def get_epsilon(self, target_delta: float) -> float:
        """Smallest epsilon (over the orders) such that everything so far is (eps, target_delta)-DP."""
        return self.get_epsilon_and_order(target_delta)[0]

    def get_delta_and_order(self, target_epsilon: float) -> tuple[float, float]:
        """``(delta, optimal order)`` for everything composed so far at ``target_epsilon``."""
        _, delta, order = get_privacy_spent(self._orders, self._rdp, target_eps=target_epsilon)
        return delta, order

    def get_delta(self, target_epsilon: float) -> float:
        """Smallest delta (over the orders) such that everything so far is (target_epsilon, delta)-DP."""
        return self.get_delta_and_order(target_epsilon)[0]

    def __repr__(self) -> str:
        return (
            f"RdpAccountant(orders={self._orders.size} orders, neighboring_relation={self._relation!r}, "
            f"distinct events={len(self._cache)})"
        )


# --------------------------------------------------------------------------------------------
# events and ledgers
# --------------------------------------------------------------------------------------------
def compute_rdp_from_event(event, orders: Sequence[float] | None = None, neighboring_relation: str | None = None) -> np.ndarray:
    """RDP at ``orders`` of a (composed) privacy event.

    ``neighboring_relation`` defaults to the relation the event's sampling events are stated
    under (:func:`~pytorch_privacy.dp_query.events.relation_of`), or add-or-remove-one
    when it contains none.  Supported events and conventions: see
    :class:`~pytorch_privacy.analysis.rdp_accountant.RdpAccountant`.  Zero noise or a
    ``NonPrivateEvent`` gives ``inf`` (with a warning); ``NoOpEvent`` gives zeros.
    """
    rel = neighboring_relation or relation_of(event) or ADD_OR_REMOVE_ONE
    acc = RdpAccountant(orders=orders, neighboring_relation=rel)
    acc.compose(event)
    return acc.rdp


def compute_rdp_from_ledger(ledger, orders: Sequence[float] | None = None) -> np.ndarray:
    """RDP at ``orders`` of every sample recorded in a :class:`PrivacyLedger`.

    Runs of identical samples are grouped (``ledger.to_event()``), so the cost does not grow with
    the number of steps.  An empty ledger gives zero privacy loss at every order.  Shuffled
    ledgers are analysed under replace-one neighbours, Poisson ones under add-or-remove-one.
    """
    return compute_rdp_from_event(ledger.to_event(), orders)
