"""Tree-aggregation events: serialisation, strict loading, the fixed-order scheme, and the run
grouper that turns a step-by-step ledger of tree steps into one accounted event per tree."""

import json

import pytest

from pytorch_privacy.dp_query.events import (
    ComposedEvent,
    GaussianEvent,
    SelfComposedEvent,
    ShuffledEvent,
    event_from_dict,
    event_from_json,
    relation_of,
)
from pytorch_privacy.dp_query.ledger_schema import SAMPLING_SCHEMES, SamplingScheme
from pytorch_privacy.dp_query.privacy_ledger import PrivacyLedger
from pytorch_privacy.dp_query.tree_events import (
    ReplaceOneEvent,
    SingleEpochTreeAggregationEvent,
    TreeAggregationEvent,
    TreeAggregationStepEvent,
    group_tree_steps,
)


def _record_trees(ledger, sigma, tree_sizes):
    """Record trees of the given sizes step by step (starts_tree=1 on each tree's first step)."""
    for size in tree_sizes:
        for t in range(size):
            ledger.record_sample(TreeAggregationStepEvent(sigma, 1 if t == 0 else 0))


def _trees(event):
    """The ledger event as a flat list of (tree event, multiplicity)."""
    parts = event.events if isinstance(event, ComposedEvent) else (event,)
    out = []
    for p in parts:
        if isinstance(p, SelfComposedEvent):
            out.append((p.event, p.count))
        else:
            out.append((p, 1))
    return out


# -- events ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "event",
    [
        SingleEpochTreeAggregationEvent(1.5, (400, 400, 390)),
        SingleEpochTreeAggregationEvent(0.7, 16),
        TreeAggregationEvent(1.1, 100, 3, 9),
        ReplaceOneEvent(TreeAggregationEvent(2.0, 5, 1, 0)),
        ComposedEvent((SelfComposedEvent(TreeAggregationEvent(1.0, 8, 2, 3), 4), GaussianEvent(1.0))),
        TreeAggregationStepEvent(1.0, 1),
    ],
)
def test_json_round_trip(event):
    assert event_from_json(event.to_json()) == event
    assert event_from_dict(json.loads(json.dumps(event.to_dict()))) == event


def test_scalar_step_counts_are_a_one_tree_tuple():
    assert SingleEpochTreeAggregationEvent(1.0, 7).step_counts == (7,)
    assert SingleEpochTreeAggregationEvent(1.0, [3, 4]).to_dict()["step_counts"] == [3, 4]


@pytest.mark.parametrize(
    "d",
    [
        {"kind": "single_epoch_tree_aggregation", "noise_multiplier": 1.0, "step_counts": 4},  # not a list
        {"kind": "single_epoch_tree_aggregation", "noise_multiplier": 1.0, "step_counts": [4.0]},
        {"kind": "single_epoch_tree_aggregation", "noise_multiplier": 1.0, "step_counts": [True]},
        {"kind": "single_epoch_tree_aggregation", "noise_multiplier": 1.0, "step_counts": ["4"]},
        {"kind": "single_epoch_tree_aggregation", "noise_multiplier": 1.0, "step_counts": []},
        {"kind": "single_epoch_tree_aggregation", "noise_multiplier": 1.0, "step_counts": [3, -1]},
        {"kind": "single_epoch_tree_aggregation", "noise_multiplier": -1.0, "step_counts": [3]},
        {"kind": "single_epoch_tree_aggregation", "step_counts": [3]},
        {"kind": "tree_aggregation", "noise_multiplier": 1.0, "total_steps": 8, "max_participation": 2},
        {"kind": "tree_aggregation", "noise_multiplier": 1.0, "total_steps": 8.0, "max_participation": 2, "min_separation": 0},
        {"kind": "tree_aggregation", "noise_multiplier": 1.0, "total_steps": 8, "max_participation": -2, "min_separation": 0},
        {"kind": "tree_aggregation", "noise_multiplier": "1", "total_steps": 8, "max_participation": 2, "min_separation": 0},
        {"kind": "tree_aggregation", "noise_multiplier": 1.0, "total_steps": 8, "max_participation": 2, "min_separation": 0, "x": 1},
        {"kind": "replace_one", "event": {"kind": "gaussian"}},
        {"kind": "replace_one", "event": 3},
        {"kind": "tree_step", "noise_multiplier": 1.0, "starts_tree": 2},
        {"kind": "tree_step", "noise_multiplier": 1.0, "starts_tree": True},
    ],
)
def test_malformed_events_are_refused(d):
    with pytest.raises(ValueError):
        event_from_dict(d)


def test_constructor_checks():
    with pytest.raises(TypeError):
        SingleEpochTreeAggregationEvent(1.0, "12")
    with pytest.raises(ValueError):
        SingleEpochTreeAggregationEvent(1.0, (1, 2.5))
    with pytest.raises(ValueError):
        TreeAggregationEvent(1.0, 3, True, 0)
    with pytest.raises(TypeError):
        ReplaceOneEvent(3)


def test_relations():
    assert relation_of(TreeAggregationEvent(1.0, 3, 1, 0)) is None
    assert relation_of(ReplaceOneEvent(TreeAggregationEvent(1.0, 3, 1, 0))) == "replace_one"


# -- the fixed-order scheme ------------------------------------------------------------------
def test_fixed_order_scheme_saves_and_loads_strictly(tmp_path):
    assert "fixed_order" in SAMPLING_SCHEMES
    assert SamplingScheme("fixed_order").neighboring_relation == "replace_one"
    led = PrivacyLedger(1000, sampling="fixed_order", batch_size=100, metadata={"run": "ftrl"})
    _record_trees(led, 1.2, [10, 10, 3])
    path = tmp_path / "ftrl.json"
    led.save(path)
    back = PrivacyLedger.load(path)
    assert back == led and back.sampling == "fixed_order" and back.batch_size == 100
    d = json.loads(path.read_text())
    del d["runs"][0]["batch_size"]  # a fixed-order run without its batch size
    d["version"] = 1  # no digest: the schema check itself must refuse it
    del d["digest"]
    with pytest.raises(ValueError, match="expected exactly"):
        PrivacyLedger.from_dict(d)
    with pytest.raises(ValueError, match="batch_size"):
        PrivacyLedger(1000, sampling="fixed_order")


def test_fixed_order_non_tree_steps_count_every_step():
    led = PrivacyLedger(100, sampling="fixed_order", batch_size=10)
    led.record_gaussian_sample(1.0, 25)
    # one un-amplified release per step, no parallel composition claimed
    assert led.to_event() == ShuffledEvent(steps_per_epoch=1, steps=25, event=GaussianEvent(1.0))


def test_step_counts_above_the_step_limit_are_refused():
    led = PrivacyLedger(100, sampling="full")
    led.record_sample(SingleEpochTreeAggregationEvent(1.0, (3, 10**9 + 1)))
    with pytest.raises(ValueError, match="limit"):
        PrivacyLedger.from_json(led.to_json())


# -- the run grouper ---------------------------------------------------------------------------
def test_full_batch_trees_with_restarts():
    led = PrivacyLedger(50, sampling="full")
    _record_trees(led, 2.0, [8, 8, 5])
    assert _trees(led.to_event()) == [(TreeAggregationEvent(2.0, 8, 8, 0), 2), (TreeAggregationEvent(2.0, 5, 5, 0), 1)]
    assert relation_of(led.to_event()) is None  # add/remove: every record in every leaf


def test_fixed_order_trees_restarted_every_epoch_and_every_two_epochs():
    led = PrivacyLedger(1000, sampling="fixed_order", batch_size=100)  # 10 steps per epoch
    _record_trees(led, 1.0, [10, 10, 20, 7])
    assert _trees(led.to_event()) == [
        (ReplaceOneEvent(TreeAggregationEvent(1.0, 10, 1, 9)), 2),
        (ReplaceOneEvent(TreeAggregationEvent(1.0, 20, 2, 9)), 1),
        (ReplaceOneEvent(TreeAggregationEvent(1.0, 7, 1, 9)), 1),
    ]


def test_fixed_order_participation_does_not_depend_on_alignment():
    # a tree of 11 steps covers one slot of a 10-step epoch twice wherever it starts
    led = PrivacyLedger(1000, sampling="fixed_order", batch_size=100)
    _record_trees(led, 1.0, [3, 11])
    assert _trees(led.to_event())[1] == (ReplaceOneEvent(TreeAggregationEvent(1.0, 11, 2, 9)), 1)


def test_shuffled_trees_count_the_epochs_they_touch():
    led = PrivacyLedger(1000, sampling="shuffle", batch_size=100)  # 10 steps per epoch
    _record_trees(led, 1.0, [10, 5, 10, 5, 1])
    # steps 0-9 (epoch 0), 10-14 (epoch 1), 15-24 (epochs 1, 2), 25-29 (epoch 2), 30 (epoch 3)
    assert _trees(led.to_event()) == [
        (ReplaceOneEvent(TreeAggregationEvent(1.0, 10, 1, 0)), 1),
        (ReplaceOneEvent(TreeAggregationEvent(1.0, 5, 1, 0)), 2),
        (ReplaceOneEvent(TreeAggregationEvent(1.0, 10, 2, 0)), 1),
        (ReplaceOneEvent(TreeAggregationEvent(1.0, 1, 1, 0)), 1),
    ]


def test_a_run_of_restarts_is_one_step_trees():
    led = PrivacyLedger(1000, sampling="fixed_order", batch_size=100)
    for _ in range(4):
        led.record_sample(TreeAggregationStepEvent(1.0, 1))
    led.record_sample(TreeAggregationStepEvent(1.0, 0), 2)
    assert len(led.runs) == 2
    assert _trees(led.to_event()) == [
        (ReplaceOneEvent(TreeAggregationEvent(1.0, 1, 1, 9)), 3),
        (ReplaceOneEvent(TreeAggregationEvent(1.0, 3, 1, 9)), 1),
    ]


def test_first_steps_without_a_start_flag_form_a_tree():
    led = PrivacyLedger(10, sampling="full")
    led.record_sample(TreeAggregationStepEvent(1.0, 0), 4)
    assert led.to_event() == TreeAggregationEvent(1.0, 4, 4, 0)


def test_smallest_noise_of_a_tree_is_used():
    led = PrivacyLedger(10, sampling="full")
    led.record_sample(TreeAggregationStepEvent(3.0, 1))
    led.record_sample(TreeAggregationStepEvent(0.5, 0), 2)
    led.record_sample(TreeAggregationStepEvent(4.0, 1))
    led.record_sample(TreeAggregationStepEvent(4.0, 0))
    assert _trees(led.to_event()) == [(TreeAggregationEvent(0.5, 3, 3, 0), 1), (TreeAggregationEvent(4.0, 2, 2, 0), 1)]


def test_other_steps_are_accounted_beside_the_trees():
    led = PrivacyLedger(10, sampling="full")
    _record_trees(led, 1.0, [4])
    led.record_gaussian_sample(2.0, 3)
    ev = led.to_event()
    assert set(ev.events) == {SelfComposedEvent(GaussianEvent(2.0), 3), TreeAggregationEvent(1.0, 4, 4, 0)}


@pytest.mark.parametrize("kwargs", [dict(selection_probability=0.1), dict(sampling="without_replacement", batch_size=10)])
def test_sampled_tree_steps_are_refused(kwargs):
    led = PrivacyLedger(100, **kwargs)
    _record_trees(led, 1.0, [3])
    with pytest.raises(ValueError, match="no amplification"):
        led.to_event()


def test_a_tree_across_a_loader_change_is_refused_and_a_restart_fixes_it():
    led = PrivacyLedger(1000, sampling="fixed_order", batch_size=100)
    _record_trees(led, 1.0, [5])
    led.set_sampling(1000, sampling="fixed_order", batch_size=50)
    led.record_sample(TreeAggregationStepEvent(1.0, 0), 3)
    with pytest.raises(ValueError, match="restart the tree"):
        led.to_event()
    led2 = PrivacyLedger(1000, sampling="fixed_order", batch_size=100)
    _record_trees(led2, 1.0, [5])
    led2.set_sampling(1000, sampling="fixed_order", batch_size=50)
    _record_trees(led2, 1.0, [30])
    assert _trees(led2.to_event()) == [
        (ReplaceOneEvent(TreeAggregationEvent(1.0, 5, 1, 9)), 1),
        (ReplaceOneEvent(TreeAggregationEvent(1.0, 30, 2, 19)), 1),
    ]


def test_grouper_takes_runs_directly():
    led = PrivacyLedger(10, sampling="full")
    _record_trees(led, 1.0, [2, 2])
    assert group_tree_steps(led.runs) == SelfComposedEvent(TreeAggregationEvent(1.0, 2, 2, 0), 2)


def test_tree_interleaved_with_other_steps_of_its_loader_is_accounted_over_its_span():
    """Fixed order, 10 steps an epoch: tree steps at loader positions 0-4 and 15-19 with 10
    Gaussian steps of the same loader between them.  The tree's 10 leaves span 20 loader steps, so
    a record can take part twice, and its two leaves may be adjacent (separation 0)."""
    from pytorch_privacy.dp_query.events import GaussianEvent
    from pytorch_privacy.dp_query.privacy_ledger import PrivacyLedger
    from pytorch_privacy.dp_query.tree_events import ReplaceOneEvent, TreeAggregationEvent, TreeAggregationStepEvent

    led = PrivacyLedger(100, sampling="fixed_order", batch_size=10)
    led.record_sample(TreeAggregationStepEvent(2.0, 1))
    led.record_sample(TreeAggregationStepEvent(2.0, 0), 4)
    led.record_sample(GaussianEvent(3.0), 10)
    led.record_sample(TreeAggregationStepEvent(2.0, 0), 5)
    tree = [e for e in led.to_event().events if isinstance(e, ReplaceOneEvent)][0].event
    assert tree == TreeAggregationEvent(2.0, 10, 2, 0)
    # without the interleaved steps: one participation
    led2 = PrivacyLedger(100, sampling="fixed_order", batch_size=10)
    led2.record_sample(TreeAggregationStepEvent(2.0, 1))
    led2.record_sample(TreeAggregationStepEvent(2.0, 0), 9)
    assert led2.to_event() == ReplaceOneEvent(TreeAggregationEvent(2.0, 10, 1, 9))
