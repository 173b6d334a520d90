"""RDP and zCDP of tree aggregation (DP-FTRL; Kairouz, McMahan, Song, Thakkar, Thakurta, Xu 2021,
"Practical and Private (Deep) Learning without Sampling or Shuffling", Appendix D).

A tree-aggregation query over ``T`` steps keeps one Gaussian noise vector of stddev
``sigma * C`` per node of a binary tree whose leaves are the steps; a node is a dyadic block of
steps ``[k 2^h, (k+1) 2^h)`` inside ``[0, T)`` (only complete blocks are ever used), and every
released prefix sum is a function of the noisy node sums.  If one record takes part in a set of
leaves, the node sums move by at most ``c_node * C`` (``c_node``: its leaves under the node), so the
whole release is a Gaussian mechanism of L2 sensitivity ``C * sqrt(S)`` with
``S = sum_nodes c_node^2``, and

    RDP(alpha) = alpha * S / (2 sigma^2),        zCDP rho = S / (2 sigma^2).

Everything here is ``S``, maximised over the participation patterns a record may have:

* :func:`compute_rdp_tree_restart`: one record at most once in each tree, trees restarted
  (``steps_list`` their sizes): ``S = sum_i (floor(log2 T_i) + 1)`` (TF Privacy's function of the
  same name, and dp-accounting's RDP of one ``SingleEpochTreeAggregationDpEvent`` per tree).
* :func:`compute_rdp_single_epoch_tree_aggregation`: dp-accounting's
  ``SingleEpochTreeAggregationDpEvent``, one record at most once across *all* the trees:
  ``S = floor(log2 max_i T_i) + 1``.
* :func:`compute_rdp_single_tree`, :func:`compute_zcdp_single_tree`: one tree of ``T`` steps, a
  record at most ``max_participation`` times with at least ``min_separation`` steps strictly
  between two participations (Appendix D.2): ``S`` by :func:`max_tree_sensitivity_squared`.

``noise_multiplier`` is the node noise stddev over the clip norm ``C``.  The functions give the
RDP for sensitivity ``C`` per participation: add-or-remove-one with full batches, or the
"zero-out" relation (dp-accounting's ``REPLACE_SPECIAL``).  The registered RDP rules multiply by
four under replace-one (sensitivity ``2C``), and :class:`~pytorch_privacy.dp_query.tree_events.
ReplaceOneEvent` (shuffled or fixed-order batches) is refused under add-or-remove-one.

This module imports numpy only, never torch.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Sequence

import numpy as np

from ..dp_query.events import (
    ADD_OR_REMOVE_ONE,
    REPLACE_ONE,
    ComposedEvent,
    DpEvent,
    GaussianEvent,
    NoOpEvent,
    SelfComposedEvent,
    ShuffledEvent,
)
from ..dp_query.tree_events import (
    ReplaceOneEvent,
    SingleEpochTreeAggregationEvent,
    TreeAggregationEvent,
    TreeAggregationStepEvent,
)
from ._checks import check_orders, check_sigma, check_steps
from .rdp_accountant import compute_rdp_from_event, register_rdp_rule

__all__ = [
    "compute_rdp_tree_restart",
    "compute_rdp_single_epoch_tree_aggregation",
    "compute_rdp_single_tree",
    "compute_zcdp_single_tree",
    "max_tree_sensitivity_squared",
    "tree_depth",
    "gaussian_equivalent",
    "pld_accountant_for",
    "EXACT_COST_LIMIT",
    "EXACT_MEMORY_LIMIT",
]

#: Estimated work of the exact dynamic programme (``1000 + s^2`` per merge of two table slices,
#: ``s = min_separation + 1``) above which :func:`max_tree_sensitivity_squared` returns an upper
#: bound instead: a few seconds of CPU at most (measured 0.1-0.4 s at ``T=2400, K=10, s=240``,
#: 1.5 s at ``T=3000, K=300, s=10``, 1.6-2.0 s at ``T=10000, K=100, s=100``).
EXACT_COST_LIMIT = 60_000_000
#: Table cells (8 bytes each) above which the exact programme is not tried (160 MB).
EXACT_MEMORY_LIMIT = 20_000_000
#: Counts above which the per-node-cap bound itself is replaced by the cruder ``K * cap`` bound.
_CAP_BOUND_LIMIT = 2048
_NEG = -np.inf


# -- small helpers ---------------------------------------------------------------------------
def tree_depth(steps: int) -> int:
    """Most tree nodes above one leaf of a tree of ``steps`` leaves: ``floor(log2 steps) + 1``
    (0 for an empty tree).  This is ``ceil(log2(steps + 1))``, dp-accounting's formula."""
    return check_steps(steps).bit_length()


def _orders_and_shape(orders):
    arr = check_orders(orders)
    return np.atleast_1d(arr), np.ndim(arr) == 0


def _rdp_from_sens2(sigma: float, sens2: float, orders, scalar: bool):
    """``alpha * sens2 / (2 sigma^2)`` at every order (``inf`` order: ``inf`` unless nothing is
    released); zero noise with a non-zero sensitivity is ``inf``."""
    if sens2 == 0 or math.isinf(sigma):
        out = np.zeros(orders.shape)
    elif sigma == 0.0:
        out = np.full(orders.shape, np.inf)
    else:
        with np.errstate(over="ignore"):
            mu = np.float64(math.sqrt(sens2)) / sigma  # never forms sigma^2 (it underflows)
            out = orders * (0.5 * mu * mu)
    return float(out[0]) if scalar else out


def _check_int(name: str, value) -> int:
    try:
        return check_steps(value)
    except ValueError:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}") from None


def _step_list(steps_list, name: str) -> list[int]:
    if isinstance(steps_list, numbers.Real) and not isinstance(steps_list, bool):
        steps_list = [steps_list]
    if isinstance(steps_list, (str, bytes)) or not isinstance(steps_list, (Sequence, np.ndarray)):
        raise ValueError(f"{name} must be an integer or a sequence of integers, got {steps_list!r:.80}")
    out = [_check_int(f"{name} entries", s) for s in steps_list]
    if not out:
        raise ValueError(f"{name} must hold at least one tree's number of steps (got an empty sequence)")
    return out


# -- restarts --------------------------------------------------------------------------------
def compute_rdp_tree_restart(noise_multiplier: float, steps_list, orders=None):
    """RDP of tree aggregation restarted ``len(steps_list)`` times, ``steps_list[i]`` steps in the
    ``i``-th tree, one record taking part at most once in each tree (e.g. one tree per epoch).

    ``RDP(alpha) = alpha * sum_i (floor(log2 T_i) + 1) / (2 sigma^2)`` (Kairouz et al. 2021,
    Appendix D.1): a leaf has ``floor(log2 T) + 1`` complete nodes above it, and the trees'
    independent noises compose.  Equals dp-accounting's RDP of the composition of one
    ``SingleEpochTreeAggregationDpEvent(sigma, T_i)`` per tree (``REPLACE_SPECIAL``) and TF
    Privacy's ``compute_rdp_tree_restart``.  Trees of 0 steps count 0.

    Args:
        noise_multiplier: node noise stddev over the clip norm (>= 0; 0 gives ``inf``).
        steps_list: an integer or a non-empty sequence of non-negative integers.
        orders: RDP orders (> 1, ``inf`` allowed); default :data:`.orders.DEFAULT_ORDERS`.

    Returns:
        The RDP at ``orders`` (a float for a scalar order, else an array).
    """
    sigma = check_sigma(noise_multiplier)
    steps = _step_list(steps_list, "steps_list")
    arr, scalar = _orders_and_shape(orders)
    return _rdp_from_sens2(sigma, float(sum(s.bit_length() for s in steps)), arr, scalar)


def compute_rdp_single_epoch_tree_aggregation(noise_multiplier: float, step_counts, orders=None):
    """RDP of dp-accounting's ``SingleEpochTreeAggregationDpEvent(noise_multiplier, step_counts)``:
    trees of ``step_counts[i]`` steps, one record at most once across *all* the trees, so
    ``RDP(alpha) = alpha * (floor(log2 max_i T_i) + 1) / (2 sigma^2)``.  For one tree it equals
    :func:`compute_rdp_tree_restart`."""
    sigma = check_sigma(noise_multiplier)
    steps = _step_list(step_counts, "step_counts")
    arr, scalar = _orders_and_shape(orders)
    return _rdp_from_sens2(sigma, float(max(steps).bit_length()), arr, scalar)


# -- one tree, several participations ---------------------------------------------------------
def _segments(total: int) -> tuple[int, bool]:
    """The whole tree as a segment ``(length, complete)``.  A complete segment (a power of two) is a
    node and splits into two halves; an incomplete one is no node and splits into its largest
    complete block and the rest (:func:`_children`)."""
    return total, total & (total - 1) == 0


def _children(length: int, complete: bool) -> tuple[tuple[int, bool], tuple[int, bool], int, int]:
    if complete:
        half = length // 2
        return (half, True), (half, True), half, half
    top = 1 << (length.bit_length() - 1)
    rest = length - top
    return (top, True), (rest, rest & (rest - 1) == 0), top, rest


def _cap(length: int, k: int, sep1: int) -> int:
    """Most participations that fit ``length`` steps with gaps of at least ``sep1``."""
    return min(k, (length - 1) // sep1 + 1)


def _exact_fits(total: int, k: int, sep1: int) -> bool:
    """Whether :func:`_exact_sens2` fits :data:`EXACT_COST_LIMIT` (work: each merge of two table
    slices costs a fixed overhead plus a few ``s x s`` passes) and :data:`EXACT_MEMORY_LIMIT`
    (its tables: ``cap + 1`` slices of ``s x s`` floats each)."""
    seen: set = set()
    s2 = float(sep1) ** 2
    work = cells = 0.0
    stack = [_segments(total)]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        cap = _cap(node[0], k, sep1)
        cells += (cap + 1) * s2
        if cells > EXACT_MEMORY_LIMIT:
            return False
        if node[0] == 1:
            continue
        (lc, rc, l, r) = _children(*node)
        cl, cr = _cap(l, k, sep1), _cap(r, k, sep1)
        for n in range(2, cap + 1):
            work += max(0, min(n - 1, cl) - max(1, n - cr) + 1) * (1000.0 + s2)
            if work > EXACT_COST_LIMIT:
                return False
        stack.extend((lc, rc))
    return True


def _maxplus(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``out[x, y] = max_j a[x, j] + b[j, y]`` for ``a`` non-increasing in ``j`` and ``b``
    non-decreasing in ``j`` (the "at least" tables are monotone).  On each stretch of ``j`` where
    ``a[x, .]`` is constant the maximum is at the stretch's last ``j``, so only those break points
    are tried (a few per row in practice, instead of all ``j``); rows are taken in chunks of
    bounded memory."""
    nrows, ncols = a.shape[0], b.shape[1]
    out = np.full((nrows, ncols), _NEG)
    nxt = np.concatenate([a[:, 1:], np.full((nrows, 1), _NEG)], axis=1)
    xs, js = np.nonzero(np.isfinite(a) & (nxt < a))
    if xs.size == 0:
        return out
    chunk = max(1, 4_000_000 // max(1, ncols))
    for lo in range(0, xs.size, chunk):
        x, j = xs[lo : lo + chunk], js[lo : lo + chunk]
        vals = a[x, j][:, None] + b[j, :]
        starts = np.flatnonzero(np.r_[True, x[1:] != x[:-1]])
        red = np.maximum.reduceat(vals, starts, axis=0)
        rows = x[starts]
        out[rows] = np.maximum(out[rows], red)  # a row split across chunks keeps its best
    return out


def _exact_sens2(total: int, k: int, sep: int) -> float:
    """Exact worst-case ``sum_nodes c_node^2`` by dynamic programming over the tree.

    For a segment, ``F[n][x][y]`` is the largest ``sum c^2`` over its nodes with ``n``
    participations, at least ``x`` empty steps before the first and ``y`` after the last
    (``x, y`` in ``[0, sep]``: more never matters).  Two neighbouring segments combine when the
    empty steps around their boundary add up to ``sep`` or more."""
    sep1 = sep + 1
    idx = np.arange(sep1)

    @functools.lru_cache(maxsize=None)
    def table(length: int, complete: bool) -> np.ndarray:
        if length == 1:
            f = np.full((2, sep1, sep1), _NEG)
            f[1, 0, 0] = 1.0
            return f
        lc, rc, l, r = _children(length, complete)
        fl, fr = table(*lc), table(*rc)
        cl, cr = fl.shape[0] - 1, fr.shape[0] - 1
        cap = _cap(length, k, sep1)
        f = np.full((cap + 1, sep1, sep1), _NEG)
        for n in range(1, cap + 1):
            best = np.full((sep1, sep1), _NEG)
            if n <= cr:  # all in the right segment, after the left one's l empty steps
                best = np.maximum(best, fr[n][np.maximum(idx - min(l, sep1), 0), :])
            if n <= cl:  # all in the left segment
                best = np.maximum(best, fl[n][:, np.maximum(idx - min(r, sep1), 0)])
            for nl in range(max(1, n - cr), min(n - 1, cl) + 1):
                # left ends with >= j empty steps, right starts with >= sep - j
                best = np.maximum(best, _maxplus(fl[nl], fr[n - nl][::-1, :]))
            f[n] = best + (n * n if complete else 0)
        return f

    f = table(*_segments(total))
    return float(max(0.0, f[1:, 0, 0].max())) if f.shape[0] > 1 else 0.0


def _cap_bound_sens2(total: int, k: int, sep1: int) -> float:
    """Upper bound on ``sum_nodes c_node^2``: each node holds at most as many participations as
    fit its length (the separation across node boundaries is relaxed).  Never below the exact
    value; measured within about 1 % of it on grids."""

    @functools.lru_cache(maxsize=None)
    def table(length: int, complete: bool) -> np.ndarray:
        if length == 1:
            return np.array([0.0, 1.0])
        lc, rc, _, _ = _children(length, complete)
        fl, fr = table(*lc), table(*rc)
        cap = _cap(length, k, sep1)
        f = np.full(cap + 1, _NEG)
        f[0] = 0.0
        for n in range(1, cap + 1):
            nl = np.arange(max(0, n - (fr.size - 1)), min(n, fl.size - 1) + 1)
            f[n] = (fl[nl] + fr[n - nl]).max() + (n * n if complete else 0)
        return f

    return float(table(*_segments(total)).max())


def _crude_bound_sens2(total: int, k: int, sep1: int) -> float:
    """``sum_levels K_eff * (most participations in one block of the level)`` >= ``sum c^2``
    (``sum_blocks c^2 <= max c * sum c``), for counts too large for the other methods."""
    k_eff = _cap(total, k, sep1)
    return float(sum(k_eff * _cap(1 << h, k, sep1) for h in range(total.bit_length())))


def max_tree_sensitivity_squared(total_steps: int, max_participation: int, min_separation: int) -> float:
    """Worst case of ``S = sum_nodes c_node^2`` over the ways one record can take part in a tree of
    ``total_steps`` leaves: at most ``max_participation`` times, with at least ``min_separation``
    steps strictly between two participations (consecutive steps: 0).  Nodes are the complete
    dyadic blocks of ``[0, total_steps)``; ``sqrt(S)`` is the L2 sensitivity of the released node
    sums in units of the clip norm (Kairouz et al. 2021, Appendix D.2).

    Exact (a dynamic programme over the tree) whenever its estimated work is below
    :data:`EXACT_COST_LIMIT` and its tables fit :data:`EXACT_MEMORY_LIMIT`: roughly
    ``log2(T/s) * K^2 * (1000 + s^2) <= 6e7`` with ``s = min_separation + 1`` (``T = 2400, K = 10,
    s = 240``, ``T = 3000, K = 300, s = 10`` and ``T = 10000, K = 100, s = 100`` are exact).  Every
    record in every step (``min_separation = 0``, ``max_participation >= T``) has the closed form
    ``sum_h floor(T / 2^h) 4^h``.  Beyond the limits it returns an upper bound (each node holds at most the participations that fit its
    length, separation across node boundaries relaxed; measured within about 1 % of the exact
    value), so the privacy bound stays valid.
    """
    t = _check_int("total_steps", total_steps)
    k = _check_int("max_participation", max_participation)
    sep = _check_int("min_separation", min_separation)
    return _sens2(t, k, sep)


@functools.lru_cache(maxsize=256)
def _sens2(t: int, k: int, sep: int) -> float:
    """:func:`max_tree_sensitivity_squared` of checked arguments, cached: calibration evaluates
    the same tree at many noise multipliers, and the sensitivity does not depend on the noise."""
    if t == 0 or k == 0:
        return 0.0
    sep = min(sep, t)  # a separation of t or more allows one participation, like t
    sep1 = sep + 1
    k = _cap(t, k, sep1)
    if sep == 0 and k == t:  # every record in every step: all nodes full
        return float(sum((t >> h) * 4**h for h in range(t.bit_length())))
    if _exact_fits(t, k, sep1):
        return _exact_sens2(t, k, sep)
    if k <= _CAP_BOUND_LIMIT:
        return _cap_bound_sens2(t, k, sep1)
    return _crude_bound_sens2(t, k, sep1)


def compute_rdp_single_tree(
    noise_multiplier: float, total_steps: int, max_participation: int, min_separation: int, orders=None
):
    """RDP of one tree of ``total_steps`` steps (no restart) in which one record takes part at
    most ``max_participation`` times, at least ``min_separation`` steps apart (steps strictly
    between; TF Privacy's convention): ``alpha * S / (2 sigma^2)`` with ``S`` from
    :func:`max_tree_sensitivity_squared` (Kairouz et al. 2021, Appendix D.2, "DP-FTRL-NoTreeRestart").

    Fixed-order data (the same ``N // B`` batches every epoch) has ``min_separation = N // B - 1``
    and ``max_participation = ceil(T / (N // B))``.

    Returns:
        The RDP at ``orders`` (a float for a scalar order, else an array); ``inf`` for zero noise.
    """
    sigma = check_sigma(noise_multiplier)
    arr, scalar = _orders_and_shape(orders)
    sens2 = max_tree_sensitivity_squared(total_steps, max_participation, min_separation)
    return _rdp_from_sens2(sigma, sens2, arr, scalar)


def compute_zcdp_single_tree(
    noise_multiplier: float, total_steps: int, max_participation: int, min_separation: int
) -> float:
    """zCDP ``rho = S / (2 sigma^2)`` of the tree of :func:`compute_rdp_single_tree` (a Gaussian
    mechanism of sensitivity ``sqrt(S)`` is ``rho``-zCDP; Bun and Steinke 2016).  ``inf`` for zero
    noise; 0 when nothing is released."""
    sigma = check_sigma(noise_multiplier)
    sens2 = max_tree_sensitivity_squared(total_steps, max_participation, min_separation)
    return _rdp_from_sens2(sigma, sens2, np.array([1.0]), True)


# -- events ------------------------------------------------------------------------------------
def _sens2_of(event: DpEvent) -> float:
    if isinstance(event, TreeAggregationEvent):
        return max_tree_sensitivity_squared(event.total_steps, event.max_participation, event.min_separation)
    return float(max(event.step_counts).bit_length())


def _relation_factor(relation: str) -> float:
    if relation == REPLACE_ONE:
        return 4.0  # sensitivity 2C per participation
    if relation == ADD_OR_REMOVE_ONE:
        return 1.0
    raise ValueError(f"unknown neighbouring relation {relation!r}")


@register_rdp_rule(TreeAggregationEvent)
@register_rdp_rule(SingleEpochTreeAggregationEvent)
def _tree_rdp(event, orders: np.ndarray, relation: str) -> np.ndarray:
    sens2 = _sens2_of(event) * _relation_factor(relation)
    return _rdp_from_sens2(event.noise_multiplier, sens2, np.atleast_1d(np.asarray(orders, dtype=float)), False)


@register_rdp_rule(ReplaceOneEvent)
def _replace_one_rdp(event, orders: np.ndarray, relation: str) -> np.ndarray:
    if relation != REPLACE_ONE:
        raise ValueError(
            "ReplaceOneEvent (a tree over shuffled or fixed-order batches) is accounted under replace-one "
            f"neighbours only; this accountant uses {relation!r}. Use RdpAccountant(neighboring_relation="
            "'replace_one') (compute_rdp_from_ledger picks it from the ledger)"
        )
    return compute_rdp_from_event(event.event, orders, REPLACE_ONE)


@register_rdp_rule(TreeAggregationStepEvent)
def _step_rdp(event, orders, relation):  # noqa: ARG001
    raise ValueError(
        "a TreeAggregationStepEvent is not accountable step by step (the tree's noise is correlated "
        "across steps): record it alone as each step's event in a PrivacyLedger, whose run grouper "
        "accounts whole trees, or account the tree with TreeAggregationEvent"
    )


def gaussian_equivalent(event: DpEvent) -> DpEvent:
    """``event`` with every tree event replaced by its equivalent Gaussian mechanism (exact: a tree
    with worst-case ``S`` *is* a Gaussian mechanism of sensitivity ``sqrt(S)``), so that accountants
    that know only Gaussian mechanisms (the PLD accountant) can account it.

    ``TreeAggregationEvent`` / ``SingleEpochTreeAggregationEvent`` become
    ``GaussianEvent(sigma / sqrt(S))`` (``NoOpEvent`` when ``S = 0``), ``ReplaceOneEvent(e)``
    becomes ``ShuffledEvent(1, 1, e')`` (one release stated under replace-one), and compositions
    are mapped element by element.  Other events are returned unchanged."""
    if isinstance(event, (TreeAggregationEvent, SingleEpochTreeAggregationEvent)):
        sens2 = _sens2_of(event)
        if sens2 == 0 or math.isinf(event.noise_multiplier):
            return NoOpEvent()
        return GaussianEvent(event.noise_multiplier / math.sqrt(sens2))
    if isinstance(event, ReplaceOneEvent):
        return ShuffledEvent(steps_per_epoch=1, steps=1, event=gaussian_equivalent(event.event))
    if isinstance(event, SelfComposedEvent):
        return SelfComposedEvent(gaussian_equivalent(event.event), event.count)
    if isinstance(event, ComposedEvent):
        return ComposedEvent(tuple(gaussian_equivalent(e) for e in event.events))
    return event


def pld_accountant_for(event: DpEvent, **kwargs):
    """A :class:`~pytorch_privacy.analysis.pld.PLDAccountant` holding ``event`` with its tree events
    replaced by their equivalent Gaussian mechanisms (:func:`gaussian_equivalent`), under the
    relation the event is stated under (``relation_of``; add-or-remove-one when it states none)
    unless ``neighboring_relation`` is given.  ``kwargs`` go to the accountant; ``ValueError`` for
    events the PLD accountant cannot account."""
    from ..dp_query.events import relation_of
    from .pld import PLDAccountant

    eq = gaussian_equivalent(event)
    kwargs.setdefault("neighboring_relation", relation_of(eq) or ADD_OR_REMOVE_ONE)
    return PLDAccountant(**kwargs).compose(eq)


def _register_pld_equivalents() -> None:
    from .pld.parsing import register_pld_equivalent

    for cls in (TreeAggregationEvent, SingleEpochTreeAggregationEvent, ReplaceOneEvent):
        register_pld_equivalent(cls)(gaussian_equivalent)


_register_pld_equivalents()
