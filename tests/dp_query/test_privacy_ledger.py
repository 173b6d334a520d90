"""PrivacyLedger: recording, run compression, persistence, summaries and events."""

import json
import os
import tempfile

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pytorch_privacy.dp_query import (
    ComposedEvent,
    GaussianEvent,
    LaplaceEvent,
    NoOpEvent,
    PoissonSampledEvent,
    PrivacyLedger,
    SampledWithoutReplacementEvent,
    SelfComposedEvent,
    ShuffledEvent,
)
from pytorch_privacy.dp_query.privacy_ledger import LEDGER_FORMAT, LEDGER_VERSION

G = GaussianEvent(1.1)

# -- a random program of ledger calls ----------------------------------------------------

small_events = st.one_of(
    st.sampled_from([1.0, 1.1, 2.0]).map(GaussianEvent),
    st.sampled_from([0.5, 1.0]).map(LaplaceEvent),
    st.just(ComposedEvent([GaussianEvent(1.0), GaussianEvent(4.0)])),
)


@st.composite
def set_calls(draw):
    n = draw(st.sampled_from([50, 100, 60000]))
    sampling = draw(st.sampled_from(["poisson", "without_replacement", "shuffle", "full"]))
    if sampling == "poisson":
        q = draw(st.sampled_from([0.01, 0.1, 1.0, 1 / 3]))
        return ("set", n, sampling, q, None)
    if sampling == "full":
        return ("set", n, sampling, None, None)
    b = draw(st.integers(1, n))
    return ("set", n, sampling, None, b)


record_calls = st.tuples(st.just("record"), small_events, st.integers(1, 1000))
programs = st.lists(st.one_of(set_calls(), record_calls, record_calls), max_size=25)


def run_program(program):
    ledger = PrivacyLedger(100, 0.1, metadata={"model": "mlp", "seed": 3})
    # independent model of the runs: consecutive records with the same settings and event merge
    settings = ("poisson", 100, 0.1, None)
    model_runs: list[list] = []
    for call in program:
        if call[0] == "set":
            _, n, sampling, q, b = call
            ledger.set_sampling(n, q, sampling=sampling, batch_size=b)
            settings = (sampling, n, q if sampling == "poisson" else None, b if sampling in ("without_replacement", "shuffle") else None)
        else:
            _, event, count = call
            ledger.record_sample(event, count)
            if model_runs and model_runs[-1][0] == settings and model_runs[-1][1] == event:
                model_runs[-1][2] += count
            else:
                model_runs.append([settings, event, count])
    return ledger, model_runs


@given(programs)
def test_save_load_round_trip(program):
    ledger, model_runs = run_program(program)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "ledger.json")
        ledger.save(path)
        back = PrivacyLedger.load(path)
    assert back == ledger
    assert back.runs == ledger.runs
    assert len(back) == len(ledger) == sum(r[2] for r in model_runs)
    assert back.metadata == {"model": "mlp", "seed": 3}
    assert back.to_event() == ledger.to_event()
    assert back.groups() == ledger.groups()
    assert (back.population_size, back.sampling, back.selection_probability, back.batch_size) == (
        ledger.population_size, ledger.sampling, ledger.selection_probability, ledger.batch_size)
    # the runs are what the independent model says
    assert len(ledger.runs) == len(model_runs)
    for run, (settings, event, count) in zip(ledger.runs, model_runs):
        assert (run.sampling, run.population_size, run.selection_probability, run.batch_size) == settings
        assert run.event == event and run.count == count
    # entries replay every sample
    assert sum(1 for _ in back.entries()) == len(ledger)
    # recording continues identically after a reload
    ledger.record_sample(G)
    back.record_sample(G)
    assert back == ledger


@given(programs)
def test_groups_count_every_sample(program):
    ledger, model_runs = run_program(program)
    groups = ledger.groups()
    assert sum(groups.values()) == len(ledger)
    expected: dict = {}
    for settings, event, count in model_runs:
        key = settings + (event,)
        expected[key] = expected.get(key, 0) + count
    assert groups == expected
    summary = ledger.summary()
    assert f"{len(ledger)} samples in {len(model_runs)} runs, {len(expected)} distinct settings" in summary


def test_million_identical_steps_is_one_small_run():
    ledger = PrivacyLedger(60000, 256 / 60000)
    for _ in range(10**6):
        ledger.record_sample(G)
    # equal (not identical) events merge too
    for _ in range(1000):
        ledger.record_sample(GaussianEvent(1.1))
    assert len(ledger) == 10**6 + 1000
    assert len(ledger.runs) == 1
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "l.json")
        ledger.save(path)
        assert os.path.getsize(path) < 1024
        back = PrivacyLedger.load(path)
    assert len(back) == 10**6 + 1000 and len(back.runs) == 1


# -- bad files ---------------------------------------------------------------------------


def _good_dict():
    ledger = PrivacyLedger(100, 0.1)
    ledger.record_sample(G, 5)
    return ledger.to_dict()


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.update(version=LEDGER_VERSION + 1),
        lambda d: d.update(version="1"),
        lambda d: d.pop("version"),
        lambda d: d.update(format="something.else"),
        lambda d: d.pop("format"),
        lambda d: d.pop("runs"),
        lambda d: d.pop("current"),
        lambda d: d["runs"][0].update(count=0),
        lambda d: d["runs"][0].pop("event"),
        lambda d: d["runs"][0].update(event={"kind": "mystery"}),
        lambda d: d["runs"][0].update(count="many"),
        lambda d: d.update(runs=[1, 2]),
        lambda d: d["current"].update(selection_probability=1.5),
        lambda d: d["current"].update(population_size=0),
        lambda d: d["current"].update(sampling="bogus"),
        # runs whose settings set_sampling would refuse
        lambda d: d["runs"][0].update(sampling="bogus"),
        lambda d: d["runs"][0].update(selection_probability=5.0),
        lambda d: d["runs"][0].pop("selection_probability"),
        lambda d: d["runs"][0].update(population_size=0),
        lambda d: d["runs"][0].update(sampling="shuffle"),  # no batch_size
        lambda d: d["runs"][0].update(sampling="without_replacement", batch_size=1000),  # > N
    ],
)
def test_from_dict_rejects_corrupt(mutate):
    d = _good_dict()
    mutate(d)
    with pytest.raises(ValueError):
        PrivacyLedger.from_dict(d)


@pytest.mark.parametrize("text", ["", "{", "[1, 2]", "null", '{"format": "pytorch_privacy.ledger"', "garbage"])
def test_from_json_rejects_garbage(text):
    with pytest.raises(ValueError):
        PrivacyLedger.from_json(text)


def test_load_rejects_truncated_file():
    ledger = PrivacyLedger(100, 0.1)
    ledger.record_sample(G, 3)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "l.json")
        ledger.save(path)
        with open(path) as f:
            text = f.read()
        with open(path, "w") as f:
            f.write(text[: len(text) // 2])
        with pytest.raises(ValueError):
            PrivacyLedger.load(path)


def test_file_format_fields():
    ledger = PrivacyLedger(1000, 0.05, metadata={"a": 1})
    ledger.record_sample(G, 7)
    d = json.loads(ledger.to_json())
    assert d["format"] == LEDGER_FORMAT and d["version"] == LEDGER_VERSION
    assert d["runs"] == [
        {"count": 7, "population_size": 1000, "sampling": "poisson", "selection_probability": 0.05,
         "event": {"kind": "gaussian", "noise_multiplier": 1.1}}
    ]
    assert d["metadata"] == {"a": 1}


def test_save_overwrites(tmp_path):
    path = tmp_path / "l.json"
    a = PrivacyLedger(10, 0.5)
    a.record_sample(G)
    a.save(path)
    b = PrivacyLedger(20, 0.25)
    b.save(path)
    assert PrivacyLedger.load(path) == b
    assert [p.name for p in tmp_path.iterdir()] == ["l.json"]  # no temporary files left behind


# -- settings validation -----------------------------------------------------------------


@pytest.mark.parametrize("q", [0, 0.0, -0.1, 1.01, float("nan"), float("inf"), None, True, "0.1"])
def test_selection_probability_outside_unit_interval(q):
    with pytest.raises(ValueError):
        PrivacyLedger(100, q)
    ledger = PrivacyLedger(100, 0.5)
    with pytest.raises(ValueError):
        ledger.set_sampling(100, q)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(population_size=0, selection_probability=0.1),
        dict(population_size=-5, selection_probability=0.1),
        dict(population_size=10.0, selection_probability=0.1),
        dict(population_size=True, selection_probability=0.1),
        dict(population_size=100, sampling="bernoulli", selection_probability=0.1),
        dict(population_size=100, sampling="without_replacement"),
        dict(population_size=100, sampling="shuffle", batch_size=0),
        dict(population_size=100, sampling="shuffle", batch_size=101),
        dict(population_size=100, sampling="without_replacement", batch_size=2.0),
    ],
)
def test_bad_settings(kwargs):
    with pytest.raises(ValueError):
        PrivacyLedger(**kwargs)


def test_poisson_from_batch_size():
    ledger = PrivacyLedger(1000, sampling="poisson", batch_size=50)
    assert ledger.selection_probability == 50 / 1000
    assert ledger.expected_batch_size == pytest.approx(50)


def test_record_sample_validation():
    ledger = PrivacyLedger(100, 0.1)
    with pytest.raises(TypeError):
        ledger.record_sample(1.1)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError):
            ledger.record_sample(G, bad)
    assert len(ledger) == 0


def test_runs_are_copies():
    ledger = PrivacyLedger(100, 0.1)
    ledger.record_sample(G, 3)
    run = ledger.runs[0]
    run.count = 1000
    assert len(ledger) == 3


# -- summaries and events ----------------------------------------------------------------


def test_groups_merge_non_adjacent_runs():
    ledger = PrivacyLedger(100, 0.1)
    ledger.record_sample(G, 3)
    ledger.set_sampling(100, 0.2)
    ledger.record_sample(G, 4)
    ledger.set_sampling(100, 0.1)
    ledger.record_sample(G, 5)
    assert len(ledger.runs) == 3 and len(ledger) == 12
    assert ledger.groups() == {("poisson", 100, 0.1, None, G): 8, ("poisson", 100, 0.2, None, G): 4}
    s = ledger.summary()
    assert "12 samples in 3 runs, 2 distinct settings" in s
    assert "q=0.1 " in s and "q=0.2 " in s and "sigma=1.1" in s


def test_to_event_structure():
    empty = PrivacyLedger(100, 0.1)
    assert empty.to_event() == NoOpEvent()

    one = PrivacyLedger(100, 0.1)
    one.record_sample(G)
    assert one.to_event() == PoissonSampledEvent(0.1, G)

    ledger = PrivacyLedger(100, 0.1)
    ledger.record_sample(G, 10)
    assert ledger.to_event() == SelfComposedEvent(PoissonSampledEvent(0.1, G), 10)

    ledger.set_sampling(100, sampling="without_replacement", batch_size=20)
    ledger.record_sample(GaussianEvent(2.0), 5)
    ledger.set_sampling(100, sampling="full")
    ledger.record_sample(LaplaceEvent(1.0), 2)
    ledger.set_sampling(100, 0.1)
    ledger.record_sample(G, 6)  # same group as the first run
    assert ledger.to_event() == ComposedEvent(
        [
            SelfComposedEvent(PoissonSampledEvent(0.1, G), 16),
            SelfComposedEvent(SampledWithoutReplacementEvent(100, 20, GaussianEvent(2.0)), 5),
            SelfComposedEvent(LaplaceEvent(1.0), 2),
        ]
    )


def test_shuffled_sampling_gives_shuffled_event():
    ledger = PrivacyLedger(1000, sampling="shuffle", batch_size=300)
    ledger.record_sample(G, 9)
    assert ledger.to_event() == ShuffledEvent(steps_per_epoch=1000 // 300, steps=9, event=G)
    assert ledger.runs[0].selection_probability is None and ledger.runs[0].batch_size == 300
    # a poisson run alongside composes with it
    ledger.set_sampling(1000, 0.3)
    ledger.record_sample(G, 2)
    e = ledger.to_event()
    assert isinstance(e, ComposedEvent)
    assert ShuffledEvent(3, 9, G) in e.events
    assert SelfComposedEvent(PoissonSampledEvent(0.3, G), 2) in e.events


def test_record_gaussian_sample_shortcut():
    ledger = PrivacyLedger(10, 0.5)
    ledger.record_gaussian_sample(0.7, 3)
    assert ledger.runs[0].event == GaussianEvent(0.7) and len(ledger) == 3


def test_repr_and_eq():
    a = PrivacyLedger(10, 0.5)
    b = PrivacyLedger(10, 0.5)
    assert a == b and "steps=0" in repr(a)
    a.record_sample(G)
    assert a != b
    assert (a == 3) is False


def test_shuffled_epochs_are_not_undercounted_with_fixed_size_batches_accounting():
    """(moved from the former tests/test_review_findings.py)"""
    from pytorch_privacy.analysis import RdpAccountant
    from pytorch_privacy.dp_query.events import GaussianEvent, ShuffledEvent

    # N=10, batch 3: fixed-size batches (drop_last) give 3 steps per epoch.  After 12 steps every
    # record has been used in 4 epochs, so the ledger must account at least 4 un-amplified events.
    ledger = PrivacyLedger(10, sampling="shuffle", batch_size=3)
    ledger.record_sample(GaussianEvent(1.0), 12)
    ev = ledger.to_event()
    assert isinstance(ev, ShuffledEvent)
    epochs = -(-ev.steps // ev.steps_per_epoch)
    assert epochs >= 4
    acc = RdpAccountant(neighboring_relation="replace_one").compose(ev)
    four = RdpAccountant(neighboring_relation="replace_one").compose(GaussianEvent(1.0), 4)
    assert (acc.rdp >= four.rdp * (1 - 1e-12)).all()


@pytest.mark.parametrize(
    "n, b, first, second, epochs_of_second",
    [
        (100, 10, 5, 10, 2),  # the second run starts mid-epoch and crosses into the next epoch
        (10, 3, 6, 3, 2),  # N % B != 0: a loader keeping the short last batch has epochs of 4 steps
        (100, 10, 10, 10, 1),  # starts on an epoch boundary: one epoch
    ],
)
def test_a_shuffled_run_counts_every_epoch_it_touches(n, b, first, second, epochs_of_second):
    """A record takes part once per epoch, so a run crossing an epoch boundary may hold it twice.

    Before the offset was tracked, a run starting mid-epoch was accounted by its own length
    alone (one epoch for 10 steps of a 10-step epoch), under-counting the noisier run."""
    from pytorch_privacy.analysis import RdpAccountant

    ledger = PrivacyLedger(n, sampling="shuffle", batch_size=b)
    ledger.record_sample(GaussianEvent(10.0), first)  # quiet run
    ledger.record_sample(GaussianEvent(1.0), second)  # the run that matters
    acc = RdpAccountant(neighboring_relation="replace_one").compose(ledger.to_event())
    worst = RdpAccountant(neighboring_relation="replace_one").compose(GaussianEvent(1.0), epochs_of_second)
    assert (acc.rdp >= worst.rdp * (1 - 1e-12)).all()
    if epochs_of_second == 1:  # and no more than needed when nothing crosses a boundary
        exact = RdpAccountant(neighboring_relation="replace_one").compose(GaussianEvent(10.0)).compose(GaussianEvent(1.0))
        np.testing.assert_allclose(acc.rdp, exact.rdp, rtol=1e-12)
