"""The ledger matches reality: checks that tie the batches an optimizer really sees to the sampling
its ledger records.

The privacy analysis trusts the ledger's population size ``N``, sampling scheme and rate ``q``.
Nothing in a step's arithmetic depends on them, so a wrong ledger would silently under-report
epsilon.  :class:`SamplingMonitor` checks every step against them:

* **refused** (``ValueError``, before anything is released): a batch with more examples than the
  population (``n > N``); under fixed-size sampling (``without_replacement``, ``shuffle``) a batch
  larger than the recorded batch size; an attached data loader whose sampling (scheme, ``N``,
  ``q``, batch size) differs from the ledger's.
* **warned** (``RuntimeWarning``): realised batch sizes that are implausible under Poisson sampling
  at the recorded ``q``.  Over a window of the last ``window`` steps (default 100) the total
  ``S = sum n_t`` is ``Binomial(W N, q)``; the warning fires when the two-sided tail probability
  ``2 min(P[X <= S], P[X >= S])`` is below ``alpha`` (default ``1e-6``), and names the realised
  sizes and the expected ``q N``.  With ``alpha = 1e-6`` a correctly configured run sees a false
  alarm with probability at most ``1e-6`` per tested window; a batch of all 1,600 records under
  ``q = 0.01`` (expected 16) is flagged at the first step (``p < 1e-300``).  After a warning the
  window restarts, so a persistent mismatch is reported once per ``window`` steps.

:func:`loader_sampling` reads a loader's sampling: a :class:`~pytorch_privacy.optimizer.DPDataLoader`
or :class:`~pytorch_privacy.optimizer.PoissonSampler` (Poisson, ``q``), or a plain ``DataLoader``
with a fixed ``batch_size`` (``shuffle`` when its sampler is a ``RandomSampler``); the optimizer
builds its ledger from it (``DPOptimizer(..., data_loader=loader)``), so ``q`` is typed once.
"""

from __future__ import annotations

import math
import warnings
from collections import deque
from typing import Any

from ..dp_query.events import NeighboringRelation
from ..dp_query.ledger_schema import SamplingScheme
from ..dp_query.privacy_ledger import PrivacyLedger

__all__ = ["SamplingMonitor", "loader_sampling", "ledger_for_loader", "binomial_two_sided_p"]

#: default significance of the batch-size plausibility test (two-sided)
DEFAULT_ALPHA = 1e-6
#: default number of recent steps the test pools
DEFAULT_WINDOW = 100
#: totals within this many standard deviations of the mean skip the exact test: over a grid of
#: N in [1, 1e8] and q in [1e-12, 1 - 1e-9] the smallest two-sided p inside the band is 6.4e-4
#: (tests/optimizer/test_consistency.py), far above the alphas the prefilter is used for
_BAND_SD = 3.0
_BAND_MAX_ALPHA = 1e-5


def binomial_two_sided_p(total: int, trials: int, q: float) -> float:
    """``min(1, 2 min(P[X <= total], P[X >= total]))`` for ``X ~ Binomial(trials, q)``."""
    from scipy.stats import binom

    if q >= 1:
        return 1.0 if total == trials else 0.0
    lo = float(binom.cdf(total, trials, q))
    hi = float(binom.sf(total - 1, trials, q))
    return min(1.0, 2.0 * min(lo, hi))


def loader_sampling(loader: Any) -> dict[str, Any]:
    """The sampling settings a loader implements: ``population_size``, ``sampling``,
    ``selection_probability``, ``batch_size`` (the fields of a ledger's settings)."""
    from torch.utils.data import DataLoader, RandomSampler

    from .samplers import DPDataLoader, PoissonSampler

    own = getattr(loader, "ledger_settings", None)
    if callable(own):  # a loader that states its own settings (fixed_order.FixedOrderLoader)
        return dict(own())
    if isinstance(loader, DPDataLoader):
        loader = loader.poisson_sampler
    if isinstance(loader, PoissonSampler):
        return {
            "population_size": loader.num_samples,
            "sampling": "poisson",
            "selection_probability": loader.sample_rate,
            "batch_size": None,
        }
    if isinstance(loader, DataLoader):
        if loader.batch_size is None or not isinstance(loader.sampler, RandomSampler) or loader.sampler.replacement:
            raise TypeError(
                "this DataLoader's sampling cannot be accounted: use a DPDataLoader (Poisson sampling), or a "
                "DataLoader(dataset, batch_size=B, shuffle=True) (shuffled fixed-size batches)"
            )
        n = len(loader.dataset)
        return {
            "population_size": n,
            "sampling": "shuffle",
            "selection_probability": loader.batch_size / n,
            "batch_size": loader.batch_size,
        }
    raise TypeError(
        f"data_loader must be a DPDataLoader, PoissonSampler or shuffling DataLoader, got {type(loader).__name__}"
    )


def ledger_for_loader(loader: Any, **metadata) -> PrivacyLedger:
    """A new ledger whose sampling settings are the loader's."""
    s = loader_sampling(loader)
    if s["sampling"] == "poisson":
        return PrivacyLedger(s["population_size"], s["selection_probability"], sampling="poisson", metadata=metadata)
    return PrivacyLedger(s["population_size"], sampling=s["sampling"], batch_size=s["batch_size"], metadata=metadata)


def _ledger_settings(ledger: PrivacyLedger) -> dict[str, Any]:
    return {
        "population_size": ledger.population_size,
        "sampling": ledger.sampling,
        "selection_probability": ledger.selection_probability,
        "batch_size": ledger.batch_size,
    }


class SamplingMonitor:
    """Checks each step's batch against the ledger (and an attached loader); see the module doc.

    Args:
        ledger: the ledger the steps are recorded in.
        data_loader: the loader feeding the steps (optional); its sampling must equal the ledger's.
        window: steps pooled by the binomial plausibility test.
        alpha: two-sided significance of that test.
    """

    def __init__(self, ledger: PrivacyLedger, data_loader: Any = None, *, window: int = DEFAULT_WINDOW,
                 alpha: float = DEFAULT_ALPHA):
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be a positive integer, got {window!r}")
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
        self.ledger = ledger
        self.data_loader = data_loader
        self.window = window
        self.alpha = alpha
        if data_loader is not None:
            self.check_loader()
        self.reset()

    def reset(self) -> None:
        """Forget the recent batch sizes (after a checkpoint load or a change of sampling)."""
        self._sizes: deque[int] = deque(maxlen=self.window)
        self._settings = _ledger_settings(self.ledger)

    def check_loader(self) -> None:
        """``ValueError`` when the attached loader samples differently from the ledger."""
        if self.data_loader is None:
            return
        ours, theirs = _ledger_settings(self.ledger), loader_sampling(self.data_loader)
        if ours != theirs:
            raise ValueError(
                f"the data loader samples with {theirs} but the ledger records {ours}; the ledger would "
                "misstate epsilon. Build the ledger from the loader (DPDataLoader.make_ledger(), or pass "
                "data_loader= without ledger=)"
            )

    def check_batch(self, n: int) -> None:
        """Refuse (``ValueError``) a batch of ``n`` examples the ledger's sampling cannot produce."""
        self.check_loader()
        led = self.ledger
        if n > led.population_size:
            raise ValueError(
                f"a batch of {n} examples exceeds the ledger's population_size={led.population_size}; the ledger "
                "would under-report epsilon. Set population_size to the number of records in the private dataset "
                "(build the ledger from the loader: DPDataLoader.make_ledger())"
            )
        if SamplingScheme(led.sampling).neighboring_relation == NeighboringRelation.REPLACE_ONE and n > led.batch_size:
            raise ValueError(
                f"a batch of {n} examples exceeds the ledger's batch_size={led.batch_size} ({led.sampling} "
                "sampling); record the batch size the loader really uses"
            )

    def observe(self, n: int) -> float | None:
        """Record a released step of ``n`` examples; warn if the recent sizes are implausible under
        Poisson sampling at the ledger's ``q``.  Returns the test's p-value (``None`` if untested)."""
        settings = _ledger_settings(self.ledger)
        if settings != self._settings:
            self._sizes.clear()
            self._settings = settings
        if settings["sampling"] != "poisson":
            return None
        self._sizes.append(int(n))
        big_n, q = settings["population_size"], settings["selection_probability"]
        k = len(self._sizes)
        total = sum(self._sizes)
        mean, sd = k * big_n * q, math.sqrt(k * big_n * q * (1 - q))
        if self.alpha <= _BAND_MAX_ALPHA and abs(total - mean) <= _BAND_SD * sd:
            return None  # within 3 sd: p > 6e-4 > alpha, no need for the exact tail (0.5 ms)
        p = binomial_two_sided_p(total, k * big_n, q)
        if p < self.alpha:
            sizes = list(self._sizes)
            shown = sizes if len(sizes) <= 8 else sizes[:4] + ["..."] + sizes[-3:]
            warnings.warn(
                f"realised batch sizes {shown} (mean {total / k:.4g} over the last {k} step(s)) are implausible "
                f"under the ledger's Poisson sampling q={q:.6g} of N={big_n}: expected q*N = {q * big_n:.4g} per "
                f"step (two-sided binomial p = {p:.3g} < {self.alpha:g}). The ledger misstates epsilon unless "
                "the batches come from a loader with this q; build the ledger from the loader "
                "(DPDataLoader.make_ledger(), or DPOptimizer(data_loader=...))",
                RuntimeWarning,
                stacklevel=4,
            )
            self._sizes.clear()
        return p


def check_target_delta(target_delta: float, population_size: int, *, stacklevel: int = 3) -> None:
    """Warn when ``target_delta >= 1/N``: such a delta allows mechanisms that publish a whole
    record with probability delta (e.g. ``delta = 1/N`` allows releasing one random record)."""
    if target_delta is not None and population_size and target_delta >= 1.0 / population_size:
        warnings.warn(
            f"target_delta={target_delta:g} is not below 1/N = {1.0 / population_size:.3g} (N={population_size}); "
            "a delta this large allows releasing some records outright. Use target_delta well below 1/N "
            f"(e.g. {10 ** math.floor(math.log10(0.1 / population_size)):g})",
            UserWarning,
            stacklevel=stacklevel,
        )
