"""Private online estimate of a quantile of per-record values (e.g. gradient norms).

Implements the quantile tracker of Andrew, Thakkar, McMahan, Ramaswamy, "Differentially
Private Learning with Adaptive Clipping", NeurIPS 2021 (arXiv:1905.03871), Algorithm 1.

Per sample (step) ``t`` with current estimate ``C_t`` and target quantile ``gamma``:

* each record with value ``x_i`` contributes the *centred* indicator
  ``u_i = 1[x_i <= C_t] - 1/2``;
* the released statistic is ``S = sum_i u_i + N(0, sigma_b^2)``;
* the fraction of records at or below the estimate is estimated as
  ``b = clip(S / m + 1/2, 0, 1)`` where ``m`` is the public ``expected_num_records`` (never the
  realised count, which is private);
* geometric update ``C_{t+1} = C_t * exp(-eta (b - gamma))``, or arithmetic update
  ``C_{t+1} = max(0, C_t - eta (b - gamma))``.

Sensitivity and event.  Each record moves ``sum_i u_i`` by exactly ``1/2`` when added or
removed (centring halves the sensitivity of the plain count ``sum_i 1[x_i <= C_t]``; this is
where the factor 2 in ``2 sigma_b`` comes from), so the release is a Gaussian mechanism with L2 sensitivity ``1/2`` and noise stddev
``sigma_b``: ``GaussianEvent(noise_multiplier = sigma_b / (1/2) = 2 sigma_b)``.  Under Poisson
sampling with expected size ``m``, ``E[sum_i u_i] / m + 1/2`` is the true fraction below, so
the estimate is unbiased before clipping to ``[0, 1]``.

Choosing ``sigma_b``: it is measured in records, so it should scale with ``m``; the paper
finds ``sigma_b = m / 20`` costs little privacy and leaves the estimate accurate.
"""

from __future__ import annotations

import math
from typing import Any

import attrs
import torch

from .dp_query import DPQuery, check_stddev
from .events import DpEvent, GaussianEvent
from .normalized_query import check_denominator
from .randomness import as_random_source

__all__ = ["QuantileEstimatorQuery", "QuantileEstimatorGlobalState", "INDICATOR_SENSITIVITY"]

#: L2 (= L1) sensitivity of the sum of centred indicators ``1[x <= C] - 1/2`` (add/remove one).
INDICATOR_SENSITIVITY = 0.5

_STATE_DTYPE = torch.float64


def _on(device: torch.device, t: torch.Tensor) -> torch.Tensor:
    """``t`` usable with tensors on ``device``.  A CPU 0-dim tensor already is (torch reads it as
    a scalar), and leaving it there avoids a blocking host-to-device copy."""
    if t.device == device or (t.device.type == "cpu" and t.dim() == 0):
        return t
    return t.to(device)


def _check_real(name: str, value, lo: float | None = None, hi: float | None = None, *, lo_open=False) -> float:
    if isinstance(value, torch.Tensor) or isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a Python number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {value!r}")
    if hi is not None and v > hi:
        raise ValueError(f"{name} must be <= {hi}, got {value!r}")
    return v


@attrs.frozen
class QuantileEstimatorGlobalState:
    """Global state: the current estimate (a 0-dim float64 tensor) and the fixed settings."""

    current_estimate: torch.Tensor
    target_quantile: float
    learning_rate: float
    below_estimate_stddev: float
    expected_num_records: float
    geometric_update: bool


class QuantileEstimatorQuery(DPQuery):
    """Tracks the ``target_quantile`` of scalar per-record values, privately.

    A record is a scalar tensor (e.g. a per-example gradient norm); a batch is a 1-D tensor of
    them.  :meth:`get_noised_result` returns ``(new_estimate, new_global_state, event)``.
    The estimate stays a 0-dim tensor (it moves to the records' device at the first update), so a
    CUDA training loop never waits on the host for it, provided the noise is drawn on the GPU
    (``generator=None`` or a CUDA generator; a CPU generator means a copy per step).
    :meth:`derive_metrics` converts it to a float for logging (that one synchronises).

    Args:
        initial_estimate: starting estimate (> 0; 0 is allowed with the arithmetic update,
            ``geometric_update=False``, as in TF Privacy).
        target_quantile: the quantile ``gamma`` in [0, 1] to track.
        learning_rate: ``eta`` >= 0.
        below_estimate_stddev: ``sigma_b`` >= 0, stddev of the noise on the sum of centred
            indicators (in records; ``expected_num_records / 20`` is a good default).  The event
            is ``GaussianEvent(2 * sigma_b)`` (sensitivity 1/2, see the module docstring).
        expected_num_records: public expected number of records per sample (``q*N``), > 0.
        geometric_update: multiplicative (default) or additive update.
        generator: optional ``torch.Generator`` for reproducible noise.
    """

    def __init__(
        self,
        initial_estimate: float,
        target_quantile: float,
        learning_rate: float,
        below_estimate_stddev: float,
        expected_num_records: float,
        geometric_update: bool = True,
        generator: torch.Generator | None = None,
    ):
        if not isinstance(geometric_update, bool):
            raise TypeError(f"geometric_update must be a bool, got {type(geometric_update).__name__}")
        self._initial_estimate = _check_real("initial_estimate", initial_estimate, 0.0)
        if geometric_update and self._initial_estimate == 0:
            raise ValueError(
                "initial_estimate must be > 0 with the geometric update (a multiplicative update never "
                "moves an estimate of 0); use geometric_update=False for an initial estimate of 0"
            )
        self._target_quantile = _check_real("target_quantile", target_quantile, 0.0, 1.0)
        self._learning_rate = _check_real("learning_rate", learning_rate, 0.0)
        self._below_estimate_stddev = check_stddev(below_estimate_stddev, "below_estimate_stddev")
        self._expected_num_records = check_denominator(expected_num_records)
        if not isinstance(geometric_update, bool):
            raise TypeError(f"geometric_update must be a bool, got {type(geometric_update).__name__}")
        self._geometric_update = geometric_update
        # owned randomness (OS-seeded by default, never torch's global RNG): dp_query/randomness.py
        self.generator = as_random_source(generator)

    # -- global state --------------------------------------------------------------------
    def initial_global_state(self) -> QuantileEstimatorGlobalState:
        return QuantileEstimatorGlobalState(
            current_estimate=torch.tensor(self._initial_estimate, dtype=_STATE_DTYPE),
            target_quantile=self._target_quantile,
            learning_rate=self._learning_rate,
            below_estimate_stddev=self._below_estimate_stddev,
            expected_num_records=self._expected_num_records,
            geometric_update=self._geometric_update,
        )

    def derive_sample_params(self, global_state: QuantileEstimatorGlobalState) -> torch.Tensor:
        return global_state.current_estimate

    def derive_metrics(self, global_state: QuantileEstimatorGlobalState) -> dict[str, float]:
        return {"estimate": float(global_state.current_estimate)}

    def event(self, global_state: QuantileEstimatorGlobalState | None = None) -> DpEvent:
        """``GaussianEvent(below_estimate_stddev / INDICATOR_SENSITIVITY)``."""
        stddev = self._below_estimate_stddev if global_state is None else global_state.below_estimate_stddev
        return GaussianEvent(stddev / INDICATOR_SENSITIVITY)

    # -- accumulation --------------------------------------------------------------------
    def initial_sample_state(self, template: Any = None) -> torch.Tensor:
        """A 0-dim float64 zero on the device of ``template`` (any tensor, or ``None``: CPU)."""
        device = template.device if isinstance(template, torch.Tensor) else None
        return torch.zeros((), dtype=_STATE_DTYPE, device=device)

    @staticmethod
    def _values(record: torch.Tensor, batched: bool) -> torch.Tensor:
        if not isinstance(record, torch.Tensor):
            raise TypeError(
                f"QuantileEstimatorQuery records are scalar tensors (e.g. norms), got {type(record).__name__}"
            )
        if batched:
            if record.dim() == 0:
                raise ValueError("a batch of values must be a 1-D tensor, got a 0-dim tensor")
            flat = record.reshape(record.shape[0], -1) if record.numel() else record.reshape(-1, 1)
            if flat.shape[1] != 1:
                raise ValueError(f"a batch of values must have one scalar per record, got shape {tuple(record.shape)}")
            return flat[:, 0]
        if record.numel() != 1:
            raise ValueError(f"a record must be a scalar tensor, got shape {tuple(record.shape)}")
        return record.reshape(())

    @staticmethod
    def _centred_indicator(values: torch.Tensor, estimate: torch.Tensor) -> torch.Tensor:
        below = values.to(_STATE_DTYPE) <= _on(values.device, estimate)
        return below.to(_STATE_DTYPE) - INDICATOR_SENSITIVITY

    def preprocess_record(self, params: torch.Tensor, record: torch.Tensor) -> torch.Tensor:
        """``1[record <= estimate] - 1/2`` as a 0-dim float64 tensor."""
        return self._centred_indicator(self._values(record, False), params)

    def preprocess_records(self, params: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        return self._centred_indicator(self._values(batch, True), params)

    def accumulate_preprocessed_record(self, sample_state: torch.Tensor, preprocessed_record: torch.Tensor):
        return sample_state + _on(sample_state.device, preprocessed_record)

    def accumulate_preprocessed_records(self, sample_state: torch.Tensor, preprocessed_batch: torch.Tensor):
        return sample_state + _on(sample_state.device, preprocessed_batch.sum())

    def merge_sample_states(self, sample_state_1: torch.Tensor, sample_state_2: torch.Tensor):
        return sample_state_1 + _on(sample_state_1.device, sample_state_2)

    # -- release -------------------------------------------------------------------------
    def noised_fraction_below(self, sample_state: torch.Tensor, global_state: QuantileEstimatorGlobalState):
        """``clip((sum_i u_i + N(0, sigma_b^2)) / m + 1/2, 0, 1)`` as a 0-dim tensor."""
        s = sample_state
        stddev = global_state.below_estimate_stddev
        if stddev > 0:
            z = self.generator.normal((), device=s.device, dtype=_STATE_DTYPE)
            s = s + z * stddev
        return torch.clamp(s / global_state.expected_num_records + INDICATOR_SENSITIVITY, 0.0, 1.0)

    def updated_estimate(self, estimate: torch.Tensor, fraction_below: torch.Tensor, global_state):
        """Apply the geometric (or arithmetic) update to ``estimate``."""
        loss_grad = fraction_below - global_state.target_quantile
        est = _on(fraction_below.device, estimate.to(_STATE_DTYPE))
        if global_state.geometric_update:
            return est * torch.exp(-global_state.learning_rate * loss_grad)
        return torch.clamp(est - global_state.learning_rate * loss_grad, min=0.0)

    def get_noised_result(self, sample_state: torch.Tensor, global_state: QuantileEstimatorGlobalState):
        frac = self.noised_fraction_below(sample_state, global_state)
        new_estimate = self.updated_estimate(global_state.current_estimate, frac, global_state)
        new_state = attrs.evolve(global_state, current_estimate=new_estimate)
        return new_estimate, new_state, self.event(global_state)
