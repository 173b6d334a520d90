"""Privacy events: JSON round trips, validation, neighbouring relations, torch-free import."""

import json
import math
import subprocess
import sys

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pytorch_privacy.dp_query import events as ev
from pytorch_privacy.dp_query.events import (
    ADD_OR_REMOVE_ONE,
    REPLACE_ONE,
    ComposedEvent,
    GaussianEvent,
    LaplaceEvent,
    NoOpEvent,
    NonPrivateEvent,
    PoissonSampledEvent,
    SampledWithoutReplacementEvent,
    SelfComposedEvent,
    ShuffledEvent,
    UnsupportedEvent,
    event_from_dict,
    event_from_json,
    relation_of,
)

# -- strategies --------------------------------------------------------------------------

finite_nonneg = st.floats(min_value=0.0, max_value=1e12, allow_nan=False, allow_infinity=False)
probs = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)

leaf_events = st.one_of(
    st.just(NoOpEvent()),
    st.just(NonPrivateEvent()),
    st.builds(UnsupportedEvent, st.text(max_size=20)),
    st.builds(GaussianEvent, finite_nonneg),
    st.builds(LaplaceEvent, finite_nonneg),
)


def _swr(child):
    return st.integers(0, 10**9).flatmap(
        lambda n: st.builds(SampledWithoutReplacementEvent, st.just(n), st.integers(0, n), child)
    )


def _extend(child):
    return st.one_of(
        st.builds(PoissonSampledEvent, probs, child),
        _swr(child),
        st.builds(ShuffledEvent, st.integers(1, 10**6), st.integers(0, 10**9), child),
        st.builds(SelfComposedEvent, child, st.integers(0, 10**9)),
        st.builds(ComposedEvent, st.lists(child, max_size=4)),
    )


events = st.recursive(leaf_events, _extend, max_leaves=12)


def _relations_in(d) -> set:
    """Neighbouring relations named inside a serialised event, found without the code under test."""
    found = set()
    if d["kind"] == "poisson_sampled":
        found.add("add_or_remove_one")
    if d["kind"] in ("sampled_without_replacement", "shuffled"):
        found.add("replace_one")
    if "event" in d:
        found |= _relations_in(d["event"])
    for sub in d.get("events", []):
        found |= _relations_in(sub)
    return found


# -- round trips -------------------------------------------------------------------------


@given(events)
def test_json_round_trip(e):
    s = e.to_json()
    back = event_from_json(s)
    assert back == e
    assert type(back) is type(e)
    assert back.to_json() == s
    assert hash(back) == hash(e)
    # the JSON is standard (no NaN/Infinity) and canonical
    assert json.loads(s, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}")) is not None
    assert event_from_dict(json.loads(s)) == e


@given(events)
def test_neighbouring_relation_matches_independent_walk(e):
    rels = _relations_in(json.loads(e.to_json()))
    if len(rels) > 1:
        with pytest.raises(ValueError, match="mixes neighbouring relations"):
            relation_of(e)
    else:
        assert relation_of(e) == (rels.pop() if rels else None)


def test_round_trip_exact_floats():
    for x in (0.1, 1 / 3, 1e-300, 5e-324, 1.7976931348623157e308, 0.0):
        e = PoissonSampledEvent(min(x, 1.0), GaussianEvent(x))
        back = event_from_json(e.to_json())
        assert back.event.noise_multiplier == x
        assert back.sampling_probability == min(x, 1.0)


def test_known_serialisation():
    e = PoissonSampledEvent(0.01, ComposedEvent([GaussianEvent(1.5), NoOpEvent()]))
    assert json.loads(e.to_json()) == {
        "kind": "poisson_sampled",
        "sampling_probability": 0.01,
        "event": {"kind": "composed", "events": [{"kind": "gaussian", "noise_multiplier": 1.5}, {"kind": "noop"}]},
    }


def test_events_are_frozen():
    g = GaussianEvent(1.0)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        g.noise_multiplier = 2.0
    c = ComposedEvent([g])
    assert isinstance(c.events, tuple)


# -- validation --------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [GaussianEvent, LaplaceEvent])
@pytest.mark.parametrize("bad", [-1.0, -1e-300, float("nan"), float("inf"), -float("inf")])
def test_bad_noise_value(cls, bad):
    with pytest.raises(ValueError):
        cls(bad)


@pytest.mark.parametrize("cls", [GaussianEvent, LaplaceEvent])
@pytest.mark.parametrize("bad", ["1.0", True, None, [1.0], b"1"])
def test_bad_noise_type(cls, bad):
    with pytest.raises(TypeError):
        cls(bad)


@pytest.mark.parametrize("q", [-0.1, 1.0000001, float("nan"), float("inf"), 2])
def test_bad_sampling_probability(q):
    with pytest.raises(ValueError):
        PoissonSampledEvent(q, GaussianEvent(1.0))


@pytest.mark.parametrize("q", [True, "0.5", None])
def test_bad_sampling_probability_type(q):
    with pytest.raises((TypeError, ValueError)):
        PoissonSampledEvent(q, GaussianEvent(1.0))


def test_sample_size_exceeding_dataset():
    with pytest.raises(ValueError, match="exceeds"):
        SampledWithoutReplacementEvent(10, 11, GaussianEvent(1.0))
    SampledWithoutReplacementEvent(10, 10, GaussianEvent(1.0))  # boundary is fine


@pytest.mark.parametrize(
    "make",
    [
        lambda: SampledWithoutReplacementEvent(-1, 0, GaussianEvent(1.0)),
        lambda: SampledWithoutReplacementEvent(10, -1, GaussianEvent(1.0)),
        lambda: SampledWithoutReplacementEvent(10.0, 5, GaussianEvent(1.0)),
        lambda: SampledWithoutReplacementEvent(True, 1, GaussianEvent(1.0)),
        lambda: SelfComposedEvent(GaussianEvent(1.0), -1),
        lambda: SelfComposedEvent(GaussianEvent(1.0), 2.5),
        lambda: ShuffledEvent(0, 10, GaussianEvent(1.0)),
        lambda: ShuffledEvent(10, -1, GaussianEvent(1.0)),
    ],
)
def test_bad_integers(make):
    with pytest.raises(ValueError):
        make()


@pytest.mark.parametrize(
    "make",
    [
        lambda: PoissonSampledEvent(0.5, "gaussian"),
        lambda: PoissonSampledEvent(0.5, None),
        lambda: SelfComposedEvent(1.0, 3),
        lambda: ComposedEvent([GaussianEvent(1.0), 1.0]),
        lambda: ShuffledEvent(1, 1, {"kind": "gaussian"}),
    ],
)
def test_non_event_children(make):
    with pytest.raises(TypeError):
        make()


@pytest.mark.parametrize(
    "d",
    [
        {"kind": "no_such_event"},
        {"noise_multiplier": 1.0},
        "gaussian",
        None,
        {"kind": "gaussian"},  # missing field
        {"kind": "gaussian", "noise_multiplier": -1},
        {"kind": "poisson_sampled", "sampling_probability": 0.1, "event": {"kind": "nope"}},
        {"kind": "poisson_sampled", "sampling_probability": 0.1, "event": "x"},
        {"kind": "composed", "events": [{"kind": "gaussian", "noise_multiplier": "x"}]},
        {"kind": "self_composed", "event": {"kind": "noop"}},
    ],
)
def test_event_from_dict_rejects(d):
    with pytest.raises(ValueError):
        event_from_dict(d)


def test_event_from_json_rejects_bad_json():
    with pytest.raises(ValueError):
        event_from_json("{not json")


# -- neighbouring relations --------------------------------------------------------------


def test_neighbouring_relation_examples():
    g = GaussianEvent(1.0)
    assert relation_of(g) is None
    assert relation_of(ComposedEvent([g, NoOpEvent()])) is None
    assert relation_of(PoissonSampledEvent(0.1, g)) == ADD_OR_REMOVE_ONE
    assert relation_of(SampledWithoutReplacementEvent(100, 10, g)) == REPLACE_ONE
    assert relation_of(ShuffledEvent(10, 30, g)) == REPLACE_ONE
    nested = SelfComposedEvent(ComposedEvent([PoissonSampledEvent(0.1, g), PoissonSampledEvent(0.2, g)]), 5)
    assert relation_of(nested) == ADD_OR_REMOVE_ONE
    mixed = ComposedEvent([PoissonSampledEvent(0.1, g), SelfComposedEvent(SampledWithoutReplacementEvent(100, 10, g), 3)])
    with pytest.raises(ValueError, match="mixes"):
        relation_of(mixed)
    deep_mix = PoissonSampledEvent(0.5, ShuffledEvent(2, 2, g))
    with pytest.raises(ValueError):
        relation_of(deep_mix)


def test_registry_covers_all_kinds():
    kinds = {cls.kind for cls in ev._REGISTRY.values()}
    assert {"noop", "non_private", "unsupported", "gaussian", "laplace", "poisson_sampled",
            "sampled_without_replacement", "shuffled", "self_composed", "composed"} <= kinds


def test_events_and_ledger_import_without_torch():
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"  # any 'import torch' now raises ImportError
        "from pytorch_privacy.dp_query import PrivacyLedger, GaussianEvent, PoissonSampledEvent\n"
        "l = PrivacyLedger(100, 0.1)\n"
        "l.record_sample(GaussianEvent(1.0))\n"
        "assert PrivacyLedger.from_json(l.to_json()) == l\n"
        "try:\n"
        "    from pytorch_privacy.dp_query import GaussianSumQuery\n"
        "except ImportError:\n"
        "    print('lazy-ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "lazy-ok" in out.stdout


def test_gaussian_event_accepts_numpy_like_numbers():
    np = pytest.importorskip("numpy")
    assert GaussianEvent(np.float32(1.5)).noise_multiplier == 1.5
    assert GaussianEvent(np.int64(2)).noise_multiplier == 2.0
    assert isinstance(GaussianEvent(np.float64(0.5)).noise_multiplier, float)
    assert math.isclose(PoissonSampledEvent(np.float32(0.25), GaussianEvent(1)).sampling_probability, 0.25)


def test_relation_enum_and_deprecated_name():
    import warnings

    from pytorch_privacy.dp_query import NeighboringRelation, SamplingScheme
    from pytorch_privacy.dp_query.events import neighbouring_relation

    g = GaussianEvent(1.0)
    rel = relation_of(PoissonSampledEvent(0.1, g))
    assert rel is NeighboringRelation.ADD_OR_REMOVE_ONE and rel == "add_or_remove_one" and str(rel) == rel.value
    assert SamplingScheme("shuffle").neighboring_relation is NeighboringRelation.REPLACE_ONE
    assert SamplingScheme.POISSON.neighboring_relation is NeighboringRelation.ADD_OR_REMOVE_ONE
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert neighbouring_relation(ShuffledEvent(10, 30, g)) is NeighboringRelation.REPLACE_ONE
    assert any(issubclass(w.category, DeprecationWarning) for w in caught)
