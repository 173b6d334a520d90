"""Run groupers: whole-run accounting of step events whose noise is correlated across steps."""

from typing import ClassVar

import attrs
import numpy as np
import pytest

from pytorch_privacy.analysis.rdp_accountant import RdpAccountant, register_rdp_rule
from pytorch_privacy.dp_query.events import ComposedEvent, DpEvent, GaussianEvent, PoissonSampledEvent, event_from_json
from pytorch_privacy.dp_query.ledger_groupers import register_run_grouper, run_grouper_for
from pytorch_privacy.dp_query.privacy_ledger import PrivacyLedger


@attrs.frozen
class _StepEvent(DpEvent):
    kind: ClassVar[str] = "test_grouped_step"
    noise_multiplier: float = 1.0


@attrs.frozen
class _WholeRunEvent(DpEvent):
    kind: ClassVar[str] = "test_whole_run"
    noise_multiplier: float = 1.0
    steps: int = 1


seen_runs = []


@register_run_grouper(_StepEvent)
def _group(runs, positions):
    seen_runs.append((runs, positions))
    steps = sum(r.count for r in runs)
    return _WholeRunEvent(runs[0].event.noise_multiplier, steps)


@register_rdp_rule(_WholeRunEvent)
def _rdp(event, orders, relation):
    # a made-up rule that is not additive in steps: sqrt(steps) times one Gaussian
    return np.sqrt(event.steps) * orders / (2 * event.noise_multiplier**2)


def test_grouper_receives_every_matching_run_in_order_with_settings():
    seen_runs.clear()
    led = PrivacyLedger(100, 0.1)
    led.record_sample(_StepEvent(2.0), 3)
    led.record_gaussian_sample(1.5, 2)  # an ordinary step in between
    led.record_sample(_StepEvent(2.0), 4)
    ev = led.to_event()
    ((runs, positions),) = seen_runs
    assert [r.count for r in runs] == [3, 4]
    assert positions == (0, 5)  # the Gaussian steps in between came from the same loader
    assert all(r.population_size == 100 and r.sampling == "poisson" for r in runs)
    assert isinstance(ev, ComposedEvent)
    assert _WholeRunEvent(2.0, 7) in ev.events
    assert PoissonSampledEvent(0.1, GaussianEvent(1.5)) in {getattr(e, "event", e) for e in ev.events} | set(ev.events)


def test_accountant_uses_the_registered_rule_not_per_step_composition():
    led = PrivacyLedger(100, 0.1)
    led.record_sample(_StepEvent(2.0), 9)
    acc = RdpAccountant(orders=[2.0, 8.0])
    acc.compose(led.to_event())
    np.testing.assert_allclose(acc.rdp, 3.0 * np.array([2.0, 8.0]) / 8.0)


def test_grouper_lookup_and_registration_errors():
    assert run_grouper_for(_StepEvent()) is _group
    assert run_grouper_for(GaussianEvent(1.0)) is None
    with pytest.raises(TypeError):
        register_run_grouper(int)
    with pytest.raises(TypeError):
        register_rdp_rule("GaussianEvent")


def test_unregistered_event_is_still_refused_by_the_accountant():
    @attrs.frozen
    class _Orphan(DpEvent):
        kind: ClassVar[str] = "test_orphan"

    with pytest.raises(ValueError, match="does not support"):
        RdpAccountant().compose(_Orphan())


def test_ledger_with_grouped_steps_round_trips_through_json():
    led = PrivacyLedger(50, 0.2)
    led.record_sample(_StepEvent(1.25), 5)
    back = PrivacyLedger.from_json(led.to_json())
    assert back == led
    assert event_from_json(_StepEvent(1.25).to_json()) == _StepEvent(1.25)


def test_loader_positions_and_epochs_touched():
    from pytorch_privacy.dp_query.ledger_groupers import epochs_touched, loader_positions

    led = PrivacyLedger(100, sampling="shuffle", batch_size=10)
    led.record_gaussian_sample(1.0, 3)
    led.set_sampling(100, 0.1)  # another loader in between does not move the first one
    led.record_gaussian_sample(1.0, 4)
    led.set_sampling(100, sampling="shuffle", batch_size=10)
    led.record_gaussian_sample(2.0, 5)
    assert loader_positions(led.runs) == [0, 0, 3]
    assert epochs_touched(100, 10, 0, 10) == 1
    assert epochs_touched(100, 10, 5, 10) == 2
    assert epochs_touched(100, 10, 9, 1) == 1
    assert epochs_touched(10, 3, 6, 3) == 2  # keep-last epochs of 4 steps: [4, 8) and [8, 12)
    assert epochs_touched(10, 3, 0, 0) == 0
