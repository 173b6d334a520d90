r"""Matrix-factorisation (MF) mechanisms: strategy matrices, workloads and their sensitivity.

A workload ``A`` (``n x n``, lower triangular: prefix sums, or prefix sums with momentum) maps the
per-step clipped gradient sums ``G`` to what training uses.  A factorisation ``A = B C`` gives the
mechanism ``B (C G + Z)`` with i.i.d. Gaussian ``Z``: the Gaussian mechanism on ``C G``, post-processed
by ``B``.  Equivalently step ``t`` adds the correlated noise ``(C^{-1} Z)_t`` to its gradient sum
(Denisov et al. 2022, "Improved Differential Privacy for SGD via Optimal Private Linear Operators
on Adaptive Streams"; Choquette-Choo et al. 2023, "Multi-Epoch Matrix Factorization Mechanisms for
Private Machine Learning").  ``C = I`` is DP-SGD.

The privacy of the mechanism is that of the Gaussian mechanism with L2 sensitivity
``sens(C) = max_u ||C u||`` over the participation patterns ``u`` a record may have (times the
clip norm).  Under *b-min-separation* (a record takes part at most ``k`` times, any two
participations at least ``b`` steps apart), when the columns of ``C`` that are at least ``b``
apart are orthogonal (e.g. ``C`` has at most ``b`` bands), ``sens^2`` is the largest sum of ``k``
``b``-separated squared column norms (Choquette-Choo et al. 2023, "(Amplified) Banded Matrix
Factorization: A unified approach to private training"); otherwise it is found here by
enumeration (small ``n``) or bounded by their two-stage bound on ``|C^T C|``.

Strategies (all lower triangular with a nonzero diagonal, so ``C^{-1} z`` is computed in a
stream):

* :class:`BandedToeplitzStrategy` -- ``C[t, t-j] = c_j`` for ``j < b`` (``b`` bands); streaming
  keeps the last ``b - 1`` noise vectors.  :func:`identity_strategy` is ``c = (1,)`` (DP-SGD).
* :class:`BLTStrategy` -- buffered linear Toeplitz (Dvijotham et al. 2024, "Efficient and
  Near-Optimal Noise Generation for Streaming Differential Privacy"): ``c_0 = 1``,
  ``c_t = sum_i w_i theta_i^(t-1)``; streaming keeps one buffer per decay rate.
* :class:`DenseStrategy` -- any lower-triangular ``n x n`` matrix (keeps the whole history).

:func:`.matrix_factorization_optimizer.optimize_banded_toeplitz` finds banded Toeplitz strategies
for a Toeplitz workload.  This module needs numpy only (no torch): the
analysis package uses it to account a ledger.
"""

from __future__ import annotations

import abc
import json
import math
from typing import Any

import numpy as np

__all__ = [
    "Strategy",
    "BandedToeplitzStrategy",
    "BLTStrategy",
    "DenseStrategy",
    "identity_strategy",
    "strategy_from_spec",
    "prefix_sum_workload",
    "momentum_workload",
    "toeplitz_matrix",
    "max_separated_sum",
    "banded_sensitivity",
    "sensitivity_squared",
    "strategy_sensitivity_squared",
    "max_column_norm",
    "DENSE_ACCOUNTING_STEPS",
    "count_participation_patterns",
    "MAX_DENSE_STEPS",
    "MAX_ENUMERATED_PATTERNS",
]

#: Largest ``n`` of a :class:`DenseStrategy` (its JSON spec and streaming history grow as n^2, n).
MAX_DENSE_STEPS = 1024
#: :func:`sensitivity_squared` enumerates participation patterns (``method="exact"``) up to this many.
MAX_ENUMERATED_PATTERNS = 200_000


def _check_steps(n: Any, name: str = "n") -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"{name} must be a positive integer, got {n!r}")
    return int(n)


def _finite_vector(values: Any, name: str, *, min_len: int = 1) -> tuple[float, ...]:
    if isinstance(values, (str, bytes)):
        raise TypeError(f"{name} must be a sequence of numbers, got a string")
    try:
        arr = np.asarray(values, dtype=float).ravel()
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a sequence of real numbers, got {values!r:.80}") from None
    if arr.size < min_len:
        raise ValueError(f"{name} needs at least {min_len} value(s), got {arr.size}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite, got {arr.tolist()!r:.120}")
    return tuple(float(v) for v in arr)


def toeplitz_matrix(coefficients: Any, n: int) -> np.ndarray:
    """The ``n x n`` lower-triangular Toeplitz matrix with ``M[t, t-j] = coefficients[j]``
    (coefficients past ``n`` are ignored, missing ones are 0)."""
    n = _check_steps(n)
    c = np.zeros(n)
    given = np.asarray(coefficients, dtype=float).ravel()[:n]
    c[: given.size] = given
    idx = np.arange(n)
    diff = idx[:, None] - idx[None, :]
    return np.where(diff >= 0, c[np.clip(diff, 0, n - 1)], 0.0)


def prefix_sum_workload(n: int) -> np.ndarray:
    """The prefix-sum workload: ``n x n`` lower-triangular ones (SGD's iterates are prefix sums of
    the gradients)."""
    return np.tril(np.ones((_check_steps(n), _check_steps(n))))


def momentum_workload(n: int, momentum: float) -> np.ndarray:
    """Prefix sums of heavy-ball momentum with coefficient ``momentum`` in ``[0, 1)``: Toeplitz with
    ``a_t = sum_{j<=t} momentum^j`` (the model after step ``t`` is minus the learning rate times
    row ``t`` applied to the gradients)."""
    beta = _check_momentum(momentum)
    t = np.arange(_check_steps(n))
    a = (1.0 - beta ** (t + 1)) / (1.0 - beta) if beta > 0 else np.ones(t.size)
    return toeplitz_matrix(a, t.size)


def _check_momentum(momentum: Any) -> float:
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
        raise ValueError(f"momentum must be a number in [0, 1), got {momentum!r}")
    return float(momentum)


class Strategy(abc.ABC):
    """A lower-triangular strategy matrix ``C`` with a nonzero diagonal (see the module docstring).

    ``bands`` is the number of nonzero diagonals (``None``: not banded); ``num_steps`` the number of
    steps it is defined for (``None``: any, the Toeplitz families).
    """

    kind: str = ""
    bands: int | None = None
    num_steps: int | None = None

    @abc.abstractmethod
    def matrix(self, n: int) -> np.ndarray:
        """``C`` restricted to the first ``n`` steps (``n x n``)."""

    def coefficients(self, n: int) -> np.ndarray | None:
        """The first ``n`` Toeplitz coefficients ``c_0..c_{n-1}``, or ``None`` if not Toeplitz."""
        return None

    @abc.abstractmethod
    def spec(self) -> dict[str, Any]:
        """A JSON-ready description (what the privacy events carry)."""

    def to_json(self) -> str:
        """Canonical JSON of :meth:`spec` (sorted keys, no spaces): the step events' ``strategy``."""
        return json.dumps(self.spec(), sort_keys=True, separators=(",", ":"))

    def check_steps(self, n: int) -> int:
        """``n`` as a step count, ``ValueError`` when it is not positive or exceeds the strategy's length."""
        n = _check_steps(n, "steps")
        if self.num_steps is not None and n > self.num_steps:
            raise ValueError(f"this {self.kind} strategy is defined for {self.num_steps} steps, not {n}")
        return n

    def column_norms(self, n: int) -> np.ndarray:
        """L2 norms of the ``n`` columns of ``C`` (``n`` steps)."""
        c = self.coefficients(self.check_steps(n))
        if c is not None:  # column j of a lower Toeplitz matrix holds c_0..c_{n-1-j}
            return np.sqrt(np.cumsum(c**2))[::-1].copy()
        return np.linalg.norm(self.matrix(n), axis=0)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.spec() == self.spec()

    def __hash__(self) -> int:
        return hash(self.to_json())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.to_json()[:120]})"


class BandedToeplitzStrategy(Strategy):
    """``C[t, t-j] = c_j`` for ``0 <= j < b``: a ``b``-banded lower-triangular Toeplitz strategy.

    Args:
        coefficients: ``c_0, ..., c_{b-1}`` (finite; ``c_0 != 0``).  ``(1.0,)`` is DP-SGD.
    """

    kind = "banded_toeplitz"

    def __init__(self, coefficients: Any):
        c = _finite_vector(coefficients, "coefficients")
        if c[0] == 0.0:
            raise ValueError("coefficients[0] (the diagonal of C) must be nonzero, or C is not invertible")
        self.coefficients_ = c
        self.bands = len(c)

    def matrix(self, n: int) -> np.ndarray:
        return toeplitz_matrix(self.coefficients_, self.check_steps(n))

    def coefficients(self, n: int) -> np.ndarray:
        out = np.zeros(self.check_steps(n))
        k = min(n, self.bands)
        out[:k] = self.coefficients_[:k]
        return out

    def spec(self) -> dict[str, Any]:
        return {"type": self.kind, "coefficients": list(self.coefficients_)}

    @property
    def inverse_is_stable(self) -> bool:
        """Whether the coefficients of ``C^{-1}`` stay bounded (no root of ``c(x) = sum_j c_j x^j``
        strictly inside the unit disk); otherwise the streamed noise ``(C^{-1} z)_t`` grows
        exponentially with ``t`` (still private, useless for training)."""
        c = np.trim_zeros(np.asarray(self.coefficients_), "b")
        if c.size < 2:
            return True
        return bool(np.all(np.abs(np.roots(c[::-1])) >= 1.0 - 1e-9))


def identity_strategy() -> BandedToeplitzStrategy:
    """``C = I``: independent noise each step (DP-SGD)."""
    return BandedToeplitzStrategy((1.0,))


class BLTStrategy(Strategy):
    r"""Buffered linear Toeplitz strategy (Dvijotham et al. 2024): lower-triangular Toeplitz with
    ``c_0 = 1`` and ``c_t = sum_i output_scale[i] * buffer_decay[i]^(t-1)`` for ``t >= 1``.

    ``C^{-1} z`` is computed in a stream with one buffer per decay rate:
    ``w_t = z_t - sum_i w_i s_{i,t}``, ``s_{i,t+1} = theta_i s_{i,t} + w_t`` (O(buffers) memory).

    Args:
        buffer_decay: the rates ``theta_i``, each in ``[0, 1)``.
        output_scale: the weights ``w_i`` (finite), as many as ``buffer_decay``.
    """

    kind = "blt"

    def __init__(self, buffer_decay: Any, output_scale: Any):
        theta = _finite_vector(buffer_decay, "buffer_decay")
        omega = _finite_vector(output_scale, "output_scale")
        if len(theta) != len(omega):
            raise ValueError(f"buffer_decay and output_scale need the same length, got {len(theta)} and {len(omega)}")
        if not all(0.0 <= t < 1.0 for t in theta):
            raise ValueError(f"each buffer_decay must be in [0, 1), got {theta!r}")
        self.buffer_decay = theta
        self.output_scale = omega

    def matrix(self, n: int) -> np.ndarray:
        return toeplitz_matrix(self.coefficients(n), n)

    def coefficients(self, n: int) -> np.ndarray:
        n = self.check_steps(n)
        c = np.zeros(n)
        c[0] = 1.0
        t = np.arange(n - 1, dtype=float)
        for theta, omega in zip(self.buffer_decay, self.output_scale):
            with np.errstate(under="ignore"):
                c[1:] += omega * np.power(theta, t)
        return c

    def spec(self) -> dict[str, Any]:
        return {"type": self.kind, "buffer_decay": list(self.buffer_decay), "output_scale": list(self.output_scale)}


class DenseStrategy(Strategy):
    """Any lower-triangular ``n x n`` strategy with a nonzero diagonal (``n <= MAX_DENSE_STEPS``).

    Streaming keeps every past noise vector (memory grows with the step)."""

    kind = "dense"

    def __init__(self, matrix: Any):
        m = np.asarray(matrix, dtype=float)
        if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] < 1:
            raise ValueError(f"a dense strategy must be a square matrix, got shape {m.shape}")
        if m.shape[0] > MAX_DENSE_STEPS:
            raise ValueError(f"a dense strategy has at most {MAX_DENSE_STEPS} steps, got {m.shape[0]}; use a banded or BLT one")
        if not np.all(np.isfinite(m)):
            raise ValueError("a dense strategy must be finite")
        if np.any(np.triu(m, 1) != 0):
            raise ValueError("a dense strategy must be lower triangular (causal: step t's noise uses steps <= t)")
        if np.any(np.diag(m) == 0):
            raise ValueError("a dense strategy needs a nonzero diagonal (else C is not invertible)")
        self._m = m.copy()
        self._m.setflags(write=False)
        self.num_steps = m.shape[0]
        bands = 1 + max((int(d) for d in range(m.shape[0]) if np.any(np.diag(m, -d) != 0)), default=0)
        self.bands = bands

    def matrix(self, n: int) -> np.ndarray:
        n = self.check_steps(n)
        return self._m[:n, :n].copy()

    def spec(self) -> dict[str, Any]:
        return {"type": self.kind, "rows": [self._m[i, : i + 1].tolist() for i in range(self.num_steps)]}


def strategy_from_spec(spec: str | dict[str, Any]) -> Strategy:
    """Inverse of :meth:`Strategy.spec` / :meth:`Strategy.to_json` (strict: exact keys)."""
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except (ValueError, RecursionError):
            raise ValueError(f"not a strategy spec (invalid JSON): {spec[:80]!r}") from None
    if not isinstance(spec, dict):
        raise ValueError(f"a strategy spec must be a JSON object, got {type(spec).__name__}")
    keys = {
        "banded_toeplitz": {"type", "coefficients"},
        "blt": {"type", "buffer_decay", "output_scale"},
        "dense": {"type", "rows"},
    }
    kind = spec.get("type")
    if kind not in keys:
        raise ValueError(f"unknown strategy type {kind!r:.40}; known: {sorted(keys)}")
    if set(spec) != keys[kind]:
        raise ValueError(f"a {kind} strategy spec has exactly the keys {sorted(keys[kind])}, got {sorted(map(str, spec))[:6]}")
    for k, v in spec.items():
        if k != "type" and (not isinstance(v, list) or any(isinstance(x, (bool, str)) for x in v)):
            raise ValueError(f"strategy spec field {k!r} must be a list of numbers")
    if kind == "banded_toeplitz":
        return BandedToeplitzStrategy(spec["coefficients"])
    if kind == "blt":
        return BLTStrategy(spec["buffer_decay"], spec["output_scale"])
    rows = spec["rows"]
    if len(rows) > MAX_DENSE_STEPS or any(not isinstance(r, list) or len(r) != i + 1 for i, r in enumerate(rows)):
        raise ValueError("a dense strategy spec's rows must be the lower triangle: row i has i + 1 entries")
    n = len(rows)
    m = np.zeros((n, n))
    for i, r in enumerate(rows):
        m[i, : i + 1] = _finite_vector(r, f"rows[{i}]")
    return DenseStrategy(m)


# -- sensitivity ---------------------------------------------------------------------------
def _check_participation(max_participation: Any, min_separation: Any) -> tuple[int, int]:
    k = _check_steps(max_participation, "max_participation")
    s = _check_steps(min_separation, "min_separation")
    return k, s


def max_separated_sum(x: Any, min_separation: int, max_participation: int) -> np.ndarray | float:
    """``max_S sum_{i in S} x[i]`` over index sets ``S`` of at most ``max_participation`` indices,
    any two at least ``min_separation`` apart (the empty set included, so the result is >= 0).

    Dynamic programme over suffixes, ``F_k[i] = max(F_k[i+1], x[i] + F_{k-1}[i + sep])``, in
    ``O(n k)``; ``x`` may be 2-d (one problem per row, vectorised), then an array is returned.
    """
    k, s = _check_participation(max_participation, min_separation)
    arr = np.asarray(x, dtype=float)
    if arr.ndim not in (1, 2):
        raise ValueError(f"x must be a vector or a matrix of rows, got shape {arr.shape}")
    x2 = np.atleast_2d(arr)
    rows, n = x2.shape
    f = np.zeros((rows, n + s))
    for _ in range(min(k, -(-n // s))):
        g = np.zeros((rows, n + 1))
        g[:, :n] = x2 + f[:, s : s + n]
        new = np.maximum.accumulate(g[:, ::-1], axis=1)[:, ::-1]
        f = np.zeros((rows, n + s))
        f[:, : n + 1] = new
    out = f[:, 0]
    return float(out[0]) if arr.ndim == 1 else out


def count_participation_patterns(n: int, max_participation: int, min_separation: int, *, limit: int | None = None) -> int:
    """Number of nonempty participation patterns: index sets in ``range(n)`` of at most
    ``max_participation`` indices any two at least ``min_separation`` apart (with ``limit``: stops
    early and returns a number above ``limit`` once the count exceeds it)."""
    n = _check_steps(n)
    k, s = _check_participation(max_participation, min_separation)
    if limit is not None and k > 1 and n > s and (n - s) * (n - s + 1) // 2 > limit:
        return limit + 1  # already the patterns of exactly two participations exceed the limit
    k = min(k, -(-n // s))
    # ways[j][i]: sets of size j within indices >= i
    prev = [1] * (n + s + 1)  # size 0
    total = 0
    for _ in range(k):
        cur = [0] * (n + s + 1)
        for i in range(n - 1, -1, -1):
            cur[i] = cur[i + 1] + prev[i + s]
        total += cur[0]
        prev = cur
        if cur[0] == 0 or (limit is not None and total > limit):
            break
    return total


def _columns_orthogonal_beyond(x: np.ndarray, s: int) -> bool:
    n = x.shape[0]
    idx = np.arange(n)
    far = np.abs(idx[:, None] - idx[None, :]) >= s
    return bool(np.all(x[far] == 0.0))  # banded C gives exact zeros; anything else is not banded


def _enumerate_max(x: np.ndarray, k: int, s: int) -> float:
    n = x.shape[0]
    best = 0.0
    # depth-first over patterns in increasing index order; value(S + j) = value(S) + 2 sum_{i in S} X_ij + X_jj
    stack: list[tuple[int, int, float, tuple[int, ...]]] = [(0, 0, 0.0, ())]
    while stack:
        start, size, val, members = stack.pop()
        if size == k:
            continue
        for j in range(start, n):
            v = val + x[j, j] + 2.0 * float(sum(x[i, j] for i in members))
            best = max(best, v)
            stack.append((j + s, size + 1, v, members + (j,)))
    return best


def sensitivity_squared(C: Any, max_participation: int, min_separation: int, *, method: str = "auto") -> float:
    r"""``max_u ||C u||^2`` over participation vectors ``u`` in ``{0,1}^n`` with at most
    ``max_participation`` ones, any two at least ``min_separation`` apart (``n`` = columns of ``C``).

    Methods:

    * ``"banded"``: exact when the columns of ``C`` at least ``min_separation`` apart are orthogonal
      (``C^T C`` has at most ``2 min_separation - 1`` bands, e.g. ``C`` has ``<= min_separation``
      bands): the largest separated sum of squared column norms (Choquette-Choo et al. 2023).
      ``ValueError`` otherwise.
    * ``"exact"``: enumeration of every pattern (at most :data:`MAX_ENUMERATED_PATTERNS`).
    * ``"bound"``: an upper bound for any ``C``: for each row of ``|C^T C|`` its largest separated sum,
      then the largest separated sum of those (Choquette-Choo et al. 2023, Sec. 4); exact in the
      banded case.
    * ``"auto"`` (default): ``"banded"`` if it applies, else ``"exact"`` if the patterns are few
      enough, else ``"bound"`` (never an underestimate).
    """
    c = np.asarray(C, dtype=float)
    if c.ndim != 2 or c.shape[0] < 1 or c.shape[1] < 1:
        raise ValueError(f"C must be a nonempty matrix, got shape {c.shape}")
    if not np.all(np.isfinite(c)):
        raise ValueError("C must be finite")
    k, s = _check_participation(max_participation, min_separation)
    if method not in ("auto", "banded", "exact", "bound"):
        raise ValueError(f"method must be 'auto', 'banded', 'exact' or 'bound', got {method!r}")
    return _sens2(c.T @ c, k, s, method)[0]


def _sens2(x: np.ndarray, k: int, s: int, method: str) -> tuple[float, str]:
    n = x.shape[0]
    if method in ("auto", "banded"):
        if _columns_orthogonal_beyond(x, s):
            return max_separated_sum(np.diag(x), s, k), "exact"
        if method == "banded":
            raise ValueError(
                f"columns of C at least min_separation={s} apart are not orthogonal "
                "(more bands than the separation); use method='exact' or 'bound'"
            )
    count = count_participation_patterns(n, k, s, limit=MAX_ENUMERATED_PATTERNS)
    if method == "exact" or (method == "auto" and count <= MAX_ENUMERATED_PATTERNS):
        if count > MAX_ENUMERATED_PATTERNS:
            raise ValueError(f"more than {MAX_ENUMERATED_PATTERNS} participation patterns (MAX_ENUMERATED_PATTERNS); use method='bound'")
        return _enumerate_max(x, k, s), "exact"
    row_best = max_separated_sum(np.abs(x), s, k)
    return max_separated_sum(row_best, s, k), "bound"


def _banded_toeplitz_sens2(c: np.ndarray, n: int, k: int, s: int) -> float:
    """Exact ``sens^2`` of a ``b``-banded Toeplitz strategy with ``b <= s`` in ``O(b)``: the squared
    column norms ``cum[min(b, n - j) - 1]`` do not increase with ``j``, so the earliest packing
    ``0, s, 2s, ...`` is a maximiser; every column of it at ``j <= n - b`` is complete."""
    b = c.size
    cum = np.cumsum(c**2)
    k = min(k, -(-n // s))
    full = 0 if n < b else min(k, (n - b) // s + 1)
    return full * float(cum[-1]) + sum(float(cum[n - e * s - 1]) for e in range(full, k))


def banded_sensitivity(strategy: Any, n: int, max_participation: int, min_separation: int) -> float:
    """Exact L2 sensitivity (in units of the clip norm) of a banded strategy over ``n`` steps when
    ``min_separation >= bands``: ``sqrt`` of the largest sum of at most ``max_participation``
    ``min_separation``-separated squared column norms.  ``O(bands)`` for a banded Toeplitz strategy
    (any ``n``), ``O(n k)`` otherwise.

    ``strategy``: a :class:`Strategy` with ``bands`` set, or a banded matrix ``C``.
    """
    n = _check_steps(n)
    k, s = _check_participation(max_participation, min_separation)
    if isinstance(strategy, Strategy):
        if strategy.bands is None or strategy.bands > s:
            raise ValueError(
                f"banded_sensitivity needs bands <= min_separation, got bands={strategy.bands}, "
                f"min_separation={s}; use sensitivity_squared(strategy.matrix(n), ...)"
            )
        if isinstance(strategy, BandedToeplitzStrategy):
            return math.sqrt(_banded_toeplitz_sens2(np.asarray(strategy.coefficients_), n, k, s))
        return math.sqrt(max_separated_sum(strategy.column_norms(n) ** 2, s, k))
    return math.sqrt(sensitivity_squared(strategy, k, s, method="banded"))


#: Runs up to this many steps are accounted with the dense matrix ``C`` (exact or two-stage bound).
DENSE_ACCOUNTING_STEPS = 256
_TOEPLITZ_WINDOW = 1 << 16
_WORK = 2 * 10**7


def _toeplitz_window(strategy: Strategy, n: int) -> tuple[np.ndarray, float]:
    """``(|c_0..c_{L-1}|, tail)`` with ``tail >= sum_{L <= t < n} |c_t|``: the first ``L`` coefficients
    (``L = min(n, bands)`` for a banded strategy, else ``min(n, 2**16)``) and a bound on the rest."""
    if isinstance(strategy, BandedToeplitzStrategy):
        return np.abs(strategy.coefficients(min(n, strategy.bands))), 0.0
    if isinstance(strategy, BLTStrategy):
        L = min(n, _TOEPLITZ_WINDOW)
        tail = 0.0
        if L < n:  # |c_t| <= sum_i |w_i| theta_i^(t-1), summed over t >= L
            tail = sum(abs(w) * th ** (L - 1) / (1.0 - th) for th, w in zip(strategy.buffer_decay, strategy.output_scale))
        return np.abs(strategy.coefficients(L)), tail
    raise TypeError(f"{type(strategy).__name__} is not a Toeplitz strategy")


def strategy_sensitivity_squared(strategy: Strategy, n: int, max_participation: int, min_separation: int) -> tuple[float, str]:
    """``sens^2`` of ``strategy`` over ``n`` steps under min-separation participation, and how it was
    found: ``"exact"`` or ``"bound"`` (never below the exact value).  Bounded time and memory for any
    ``n`` (a ledger may hold 10**9 steps):

    * ``bands <= min_separation``: exact (:func:`banded_sensitivity`);
    * ``n <= DENSE_ACCOUNTING_STEPS``: :func:`sensitivity_squared` on the matrix (exact by enumeration
      when the patterns are few, else the two-stage bound);
    * larger Toeplitz strategies, with coefficients ``c``: ``||Cu||^2 <= ||Cu||_inf ||Cu||_1 <= M k ||c||_1``
      (``M`` the largest separated sum of ``|c|``) and the triangle bound ``(k ||c||_2)^2``, the
      smaller; BLT coefficients past ``2**16`` enter through their geometric tail bound;
    * larger dense strategies: the triangle bound ``(largest separated sum of column norms)^2``.
    """
    n = strategy.check_steps(n)
    k, s = _check_participation(max_participation, min_separation)
    k = min(k, -(-n // s))
    if strategy.bands is not None and strategy.bands <= s:
        return banded_sensitivity(strategy, n, k, s) ** 2, "exact"
    if n <= DENSE_ACCOUNTING_STEPS:
        c = strategy.matrix(n)
        return _sens2(c.T @ c, k, s, "auto")
    if isinstance(strategy, DenseStrategy):
        return max_separated_sum(strategy.column_norms(n), s, k) ** 2, "bound"
    coef, tail = _toeplitz_window(strategy, n)
    l1 = float(np.sum(coef)) + tail
    l2 = float(np.linalg.norm(coef)) + tail
    if coef.size * min(k, -(-coef.size // s)) <= _WORK:
        m = max_separated_sum(coef, s, k) + tail
    else:
        m = l1
    return min(m * k * l1, (k * l2) ** 2), "bound"


def max_column_norm(strategy: Strategy, n: int) -> float:
    """``max_j ||C e_j||`` over ``n`` steps (an upper bound for a BLT strategy past ``2**16`` steps);
    for a Toeplitz strategy it is column 0's, the longest."""
    n = strategy.check_steps(n)
    if isinstance(strategy, DenseStrategy):
        return float(np.max(strategy.column_norms(n)))
    coef, tail = _toeplitz_window(strategy, n)
    return float(np.linalg.norm(coef)) + tail
