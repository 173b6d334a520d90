"""The :class:`PLDAccountant` and the DP-SGD conveniences ``pld_epsilon`` / ``pld_delta`` /
``compute_pld_from_ledger``.

Part of :mod:`pytorch_privacy.analysis.pld` (see the package docstring for the method).
"""

from __future__ import annotations

import math

from ...dp_query.events import (
    ADD_OR_REMOVE_ONE,
    DpEvent,
    GaussianEvent,
    PoissonSampledEvent,
    relation_of,
)
from .._checks import check_count, check_real
from ..accountant_base import PrivacyAccountant
from .composition import _Direction
from .constants import (
    MAX_STEPS,
    _DEFAULT_TOL,
    _MAX_FFT,
    _MAX_STEP_POINTS,
    _RELATIONS,
    _RELAXED_TOL,
    _TAIL,
    _WORK,
    _WORK_GRID_MAX,
    _WORK_GRID_MIN,
)
from .curves import _Spec
from .discretisation import _GridTooFine, _PMF, _discretise
from .parsing import _Parsed, _check_relation, _parse


class PLDAccountant(PrivacyAccountant):
    """Tight (epsilon, delta) by privacy loss distributions (see the module docstring).

    Args:
        neighboring_relation: ``"add_or_remove_one"`` (default) or ``"replace_one"``.
            ``SampledWithoutReplacementEvent`` and ``ShuffledEvent`` are stated under
            replace-one and need ``"replace_one"``; ``PoissonSampledEvent`` is accounted under
            either.  ``noise_multiplier`` is always relative to the clip norm (the add/remove
            sensitivity), so under replace-one an un-sampled mechanism has sensitivity 2.
        value_discretization_interval: grid spacing ``h`` of the privacy loss.  ``None``
            (default) picks it from the per-step loss variance ``v`` averaged over the steps,
            ``h = sqrt(12 * tol * v)`` rounded down to a power of ``2**(1/4)`` (so a slightly
            different count reuses the cached per-step PLDs).
        discretization_tolerance: ``tol`` above, the target relative pessimism of the
            discretisation.  ``None`` (default): ``1e-4``, relaxed towards ``1e-3`` only for
            very long heterogeneous compositions, to bound the FFT work.
        max_grid_size: largest FFT grid.  In auto mode a larger need coarsens ``h`` (the result
            stays an upper bound, slightly less tight); with a fixed ``h`` it raises ``ValueError``.

    ``compose`` only records ``(event, count)`` grouped by event (constant work, usable online
    during training); the PLD is built on the first ``get_epsilon`` / ``get_delta`` after a
    change and cached, together with the last composition, so repeated queries are cheap.
    Every answer is an upper bound: the true epsilon (delta) is never above the reported one.

    Limits: at most :data:`MAX_STEPS` (1e10) composed steps (``ValueError`` beyond); a vanishing
    noise multiplier (privacy loss variance beyond the float range) raises ``ValueError``.  Known
    slow corner (not yet fixed): with ``noise_multiplier`` below ~0.1 a single query can take 5-10 s
    of CPU (e.g. ``q = 0.5, sigma = 0.05`` over 1e8 steps, or ``q = 1e-6, sigma = 0.05``); the fuzz
    tests cover ``noise_multiplier >= 0.3``.

    Example::

        acc = PLDAccountant()
        acc.compose(PoissonSampledEvent(256 / 60000, GaussianEvent(1.1)), 14062)
        acc.get_epsilon(1e-5)   # ~2.3818 (RDP: 2.60)
    """

    def __init__(
        self,
        neighboring_relation: str = ADD_OR_REMOVE_ONE,
        value_discretization_interval: float | None = None,
        *,
        discretization_tolerance: float | None = None,
        max_grid_size: int = _MAX_FFT,
    ):
        if neighboring_relation not in _RELATIONS:
            raise ValueError(f"neighboring_relation must be one of {_RELATIONS}, got {neighboring_relation!r}")
        if value_discretization_interval is not None:
            h = check_real("value_discretization_interval", value_discretization_interval)
            if not (0 < h <= 1.0) or math.isinf(h):
                raise ValueError(f"value_discretization_interval must be in (0, 1], got {value_discretization_interval!r}")
        tol = None
        if discretization_tolerance is not None:
            tol = check_real("discretization_tolerance", discretization_tolerance)
            if not 0 < tol < 0.1:
                raise ValueError(f"discretization_tolerance must be in (0, 0.1), got {discretization_tolerance!r}")
        self.neighboring_relation = neighboring_relation
        self.value_discretization_interval = value_discretization_interval
        self.discretization_tolerance = tol
        self.max_grid_size = int(max_grid_size)
        self._parsed = _Parsed()
        self._pmf_cache: dict[tuple, _PMF] = {}
        self._dirs: dict[str, _Direction] | None = None
        self._h: float | None = None
        self._coarsen = 0  # grid coarsenings forced by an over-large window (auto mode)

    # -- PrivacyAccountant ----------------------------------------------------------------
    def supports(self, event: DpEvent) -> bool:
        try:
            _check_relation(event, self.neighboring_relation)
            _parse(event, 1, self.neighboring_relation, _Parsed())
        except (ValueError, TypeError):
            return False
        return True

    def compose(self, event: DpEvent, count: int = 1) -> "PLDAccountant":
        count = check_count(count)
        if not isinstance(event, DpEvent):
            raise TypeError(f"event must be a DpEvent, got {type(event).__name__}")
        _check_relation(event, self.neighboring_relation)
        staged = _Parsed()
        _parse(event, count, self.neighboring_relation, staged)  # validates before changing state
        total = sum(self._parsed.specs.values()) + sum(staged.specs.values())
        if total > MAX_STEPS:
            raise ValueError(
                f"PLDAccountant accepts at most {MAX_STEPS:.0e} composed steps; this composition would "
                f"hold {total}. Use RdpAccountant (no limit, slightly looser) for such long runs"
            )
        for spec, c in staged.specs.items():
            self._parsed.add(spec, c)
        self._parsed.non_private |= staged.non_private
        if staged.specs:
            self._dirs = None
            self._coarsen = 0
        return self

    def _with_coarsening(self, fun):
        """Run ``fun(dirs)``; in auto mode, coarsen the grid when a window would be too large."""
        for _ in range(60):
            dirs = self._build()
            try:
                return fun(dirs)
            except _GridTooFine as exc:
                if self.value_discretization_interval is not None:
                    raise ValueError(
                        f"the composed privacy loss needs a grid of {exc.n} points (more than "
                        f"max_grid_size={self.max_grid_size}); pass a larger "
                        "value_discretization_interval (or leave it None to choose one automatically)"
                    ) from None
                self._coarsen += max(1, math.ceil(math.log2(max(exc.n, 1) / self._max_fft())))
                self._dirs = None
        raise FloatingPointError("could not find a workable discretisation interval")  # pragma: no cover

    def get_epsilon(self, target_delta: float) -> float:
        delta = check_real("target_delta", target_delta)
        if not 0.0 <= delta <= 1.0:
            raise ValueError(f"target_delta must be in [0, 1], got {target_delta!r}")
        if self._parsed.non_private:
            return 0.0 if delta >= 1.0 else math.inf
        if delta >= 1.0 or not self._parsed.specs:
            return 0.0
        return self._with_coarsening(lambda dirs: self._epsilon(dirs, delta))

    def _epsilon(self, dirs, delta: float) -> float:
        if delta == 0.0:  # pure DP: the largest finite loss, unless there is mass at +inf
            return max(d.s_max if d.p_inf == 0.0 else math.inf for d in dirs.values())
        floor = max(d.p_inf for d in dirs.values())
        if delta <= 1e3 * floor:
            raise ValueError(
                f"target_delta={delta:g} is below the resolution of this accountant (1000 x {floor:.3g}: "
                f"the per-step privacy loss is truncated where its curve drops below {_TAIL:g} and "
                "that mass is counted in delta); use a larger target_delta"
            )
        # a direction whose Chernoff bound is below an exact answer cannot be the maximum
        bounds = {name: d.chernoff_eps(delta) for name, d in dirs.items()}
        eps = 0.0
        for name in sorted(dirs, key=lambda n: -bounds[n][1]):
            theta, ub = bounds[name]
            if ub <= eps:
                continue
            eps = max(eps, dirs[name].epsilon(delta, theta, ub))
        return float(eps)

    def get_delta(self, target_epsilon: float) -> float:
        eps = check_real("target_epsilon", target_epsilon)
        if eps < 0:
            raise ValueError(f"target_epsilon must be >= 0, got {target_epsilon!r}")
        if self._parsed.non_private:
            return 1.0
        if not self._parsed.specs:
            return 0.0
        return self._with_coarsening(lambda dirs: self._delta(dirs, eps))

    def _delta(self, dirs, eps: float) -> float:
        if math.isinf(eps):
            return max(d.p_inf for d in dirs.values())
        bounds = {name: d.chernoff_delta(eps) for name, d in dirs.items()}
        out = 0.0
        for name in sorted(dirs, key=lambda n: -bounds[n][1]):
            theta, ub = bounds[name]
            d = dirs[name]
            if ub <= out:
                continue
            if eps >= d.s_max:
                out = max(out, d.p_inf)
            elif ub <= 2.0 * d.p_inf or ub < 1e-190:
                out = max(out, ub)  # already at the resolution floor: the Chernoff bound is it
            else:
                out = max(out, d.delta(eps, theta, ub))
        return float(min(out, 1.0))

    # -- internals ------------------------------------------------------------------------
    def _directions(self) -> list[str]:
        if all(s.symmetric for s in self._parsed.specs):
            return ["remove"]
        return ["remove", "add"]

    def _auto_h(self) -> float:
        if self.value_discretization_interval is not None:
            return float(self.value_discretization_interval)
        tot_v = 0.0
        tot_n = 0
        for spec, c in self._parsed.specs.items():
            dirs = ["remove"] if spec.symmetric else ["remove", "add"]
            tot_v += c * min(spec.variance(d) for d in dirs)
            tot_n += c
        if not math.isfinite(tot_v):
            raise ValueError(
                "the privacy loss of these events is too large for a PLD grid (a vanishingly small "
                "noise_multiplier): the mechanism is practically non-private. Use RdpAccountant, "
                "which reports inf, or more noise"
            )
        vbar = max(tot_v / tot_n, 1e-300)
        tol = self.discretization_tolerance
        h = math.sqrt(12.0 * (tol or _DEFAULT_TOL) * vbar)
        if tol is None:
            # very long compositions: relax towards _RELAXED_TOL to bound the FFT work
            h_budget = 30.0 * math.sqrt(tot_v) / self._work_grid()
            h = max(h, min(h_budget, math.sqrt(12.0 * _RELAXED_TOL * vbar)))
        h = min(h, 0.05)
        # an un-sampled Laplace loss has heavy atoms at the ends of its support, which the grid
        # can only round up: keep that rounding below 0.1% (sub-sampled ones are light, and
        # their spread already makes h small against the support)
        ends = [
            s.curve("remove").hi_support for s in self._parsed.specs if s.kind == "laplace" and s.sampling == "none"
        ]
        ends = [e for e in ends if 0 < e < math.inf]
        if ends:
            h = min(h, 1e-3 * min(ends))
        # quantise to a power of 2^(1/4) (rounding down: finer) so the cache survives small changes
        h = 2.0 ** (math.floor(4.0 * math.log2(h)) / 4.0)
        return max(h, 1e-9)

    def _max_fft(self) -> int:
        """Largest window: ``max_grid_size``, or twice the work budget in fully automatic mode."""
        if self.value_discretization_interval is None and self.discretization_tolerance is None:
            return min(self.max_grid_size, 2 * self._work_grid())
        return self.max_grid_size

    def _work_grid(self) -> int:
        """FFT size the automatic spacing aims at: ``_WORK`` points over all transforms."""
        n_ffts = sum(1 if s.symmetric else 2 for s in self._parsed.specs)
        return min(max(_WORK // max(n_ffts, 1), _WORK_GRID_MIN), _WORK_GRID_MAX)

    def _pmf(self, spec: _Spec, direction: str, h: float) -> _PMF:
        key = (spec, direction if not spec.symmetric else "sym", h)
        p = self._pmf_cache.get(key)
        if p is None:
            p = _discretise(spec.curve(direction), h)
            if len(self._pmf_cache) > 4096:
                self._pmf_cache.clear()
            self._pmf_cache[key] = p
        return p

    def _build(self) -> dict[str, "_Direction"]:
        if self._dirs is not None:
            return self._dirs
        h = self._auto_h() * 2.0**self._coarsen
        # in auto mode a window far beyond the work budget means the tilted loss is much wider
        # than the per-step variance suggested (rare large losses): coarsen instead
        max_fft = self._max_fft()
        for _ in range(40):
            try:
                dirs = {}
                for direction in self._directions():
                    groups = [(self._pmf(s, direction, h), c) for s, c in self._parsed.specs.items()]
                    dirs[direction] = _Direction(groups, h, max_fft)
                break
            except _GridTooFine:
                if self.value_discretization_interval is not None:
                    raise ValueError(
                        f"value_discretization_interval={h:g} needs more than {_MAX_STEP_POINTS} grid "
                        "points for one step; use a larger interval"
                    ) from None
                h *= 2.0
        self._h = h
        self._dirs = dirs
        return dirs

    @property
    def discretization_interval(self) -> float | None:
        """The grid spacing used by the last computation (``None`` before any)."""
        return self._h

    def __repr__(self) -> str:
        n = sum(self._parsed.specs.values())
        return (
            f"PLDAccountant(neighboring_relation={self.neighboring_relation!r}, "
            f"groups={len(self._parsed.specs)}, steps={n}, non_private={self._parsed.non_private})"
        )


# ----------------------------------------------------------------------------------------
# conveniences
# ----------------------------------------------------------------------------------------
def _dpsgd_accountant(q, noise_multiplier, steps, **kwargs) -> PLDAccountant:
    steps = check_count(steps)
    acc = PLDAccountant(**kwargs)
    acc.compose(PoissonSampledEvent(q, GaussianEvent(noise_multiplier)), steps)
    return acc


def pld_epsilon(q: float, noise_multiplier: float, steps: int, delta: float, **kwargs) -> float:
    """Tight epsilon of ``steps`` steps of the Poisson-subsampled Gaussian (DP-SGD), add/remove.

    ``kwargs`` go to :class:`PLDAccountant`.  Example: ``pld_epsilon(256/60000, 1.1, 14062, 1e-5)``
    is about 2.38 (RDP gives 2.60).
    """
    return _dpsgd_accountant(q, noise_multiplier, steps, **kwargs).get_epsilon(delta)


def pld_delta(q: float, noise_multiplier: float, steps: int, epsilon: float, **kwargs) -> float:
    """Tight delta of ``steps`` steps of the Poisson-subsampled Gaussian at ``epsilon``."""
    return _dpsgd_accountant(q, noise_multiplier, steps, **kwargs).get_delta(epsilon)


def compute_pld_from_ledger(ledger, **kwargs) -> PLDAccountant:
    """A :class:`PLDAccountant` holding every sample of ``ledger`` (grouped, not replayed).

    The neighbouring relation defaults to the one the ledger's sampling events are stated under
    (replace-one for shuffled or without-replacement sampling, else add/remove).
    """
    event = ledger.to_event()
    if "neighboring_relation" not in kwargs:
        kwargs["neighboring_relation"] = relation_of(event) or ADD_OR_REMOVE_ONE
    acc = PLDAccountant(**kwargs)
    acc.compose(event)
    return acc
