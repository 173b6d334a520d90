"""MatrixFactorizationQuery: DP-SGD equality for C = I, streaming noise = dense C^{-1} z, noise variance,
checkpoint/resume, events, and the ledger's run grouper."""

import math

import numpy as np
import pytest
import torch

from pytorch_privacy.analysis.rdp import compute_rdp
from pytorch_privacy.analysis.rdp_accountant import RdpAccountant
from pytorch_privacy.dp_query.events import ComposedEvent, SelfComposedEvent, event_from_json
from pytorch_privacy.dp_query.gaussian_query import GaussianSumQuery
from pytorch_privacy.dp_query.matrix_factorization import (
    BandedToeplitzStrategy,
    BLTStrategy,
    DenseStrategy,
    identity_strategy,
)
from pytorch_privacy.dp_query.matrix_factorization_events import (
    AmplifiedBandedMatrixFactorizationEvent,
    MatrixFactorizationEvent,
    MatrixFactorizationReplaceOneEvent,
    MatrixFactorizationStepEvent,
)
from pytorch_privacy.dp_query.matrix_factorization_query import MatrixFactorizationQuery
from pytorch_privacy.dp_query.privacy_ledger import PrivacyLedger
from pytorch_privacy.optimizer.checkpoint import from_plain, to_plain

STRATEGIES = {
    "banded": BandedToeplitzStrategy([1.0, -0.4, 0.25, 0.1]),
    "blt": BLTStrategy([0.9, 0.3], [0.2, -0.5]),
    "dense": DenseStrategy(np.tril(np.random.default_rng(0).normal(size=(8, 8))) + 3 * np.eye(8)),
}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _run(q, record, steps, state=None):
    state = q.initial_global_state() if state is None else state
    outs, events = [], []
    for _ in range(steps):
        r, state, ev = q.get_noised_result(record, state)
        outs.append(r)
        events.append(ev)
    return outs, state, events


def test_identity_strategy_is_dp_sgd_draw_for_draw():
    rec = {"w": torch.randn(4, 3, generator=_gen(1)), "b": torch.randn(5, generator=_gen(2))}
    mf = MatrixFactorizationQuery(1.5, 1.3, identity_strategy(), generator=_gen(7))
    gs = GaussianSumQuery(1.5, 1.3 * 1.5, generator=_gen(7))
    a, _, _ = _run(mf, rec, 4)
    b, _, _ = _run(gs, rec, 4)
    for x, y in zip(a, b):
        assert set(x) == set(y)
        for k in x:
            assert torch.equal(x[k], y[k])


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_streaming_noise_equals_dense_inverse(name):
    strategy = STRATEGIES[name]
    n, d, sigma = 8, 6, 0.7
    q = MatrixFactorizationQuery(2.0, sigma, strategy, generator=_gen(5))
    outs, _, _ = _run(q, {"x": torch.zeros(d, dtype=torch.float64)}, n)
    noise = np.stack([o["x"].numpy() for o in outs])
    g = _gen(5)
    z = np.stack([torch.randn(d, generator=g, dtype=torch.float64).numpy() for _ in range(n)])
    expected = np.linalg.solve(strategy.matrix(n), z) * sigma * 2.0
    np.testing.assert_allclose(noise, expected, rtol=1e-10, atol=1e-12)


def test_noise_of_each_step_has_the_variance_predicted_by_c():
    strategy = BandedToeplitzStrategy([1.0, 0.6, 0.3])
    n, d, sigma, clip = 6, 40_000, 0.8, 1.5
    q = MatrixFactorizationQuery(clip, sigma, strategy, generator=_gen(11))
    outs, _, _ = _run(q, {"x": torch.zeros(d, dtype=torch.float64)}, n)
    cinv = np.linalg.inv(strategy.matrix(n))
    predicted = (sigma * clip) ** 2 * np.sum(cinv**2, axis=1)
    for t, o in enumerate(outs):
        var = float(o["x"].var())
        # relative sd of a variance estimate from d normals is sqrt(2/d) = 0.7%; allow 5 sd
        assert abs(var / predicted[t] - 1) < 5 * math.sqrt(2 / d), (t, var, predicted[t])
    # consecutive steps are correlated as C^{-1} C^{-T} says
    cov = (sigma * clip) ** 2 * cinv @ cinv.T
    emp = float((outs[1]["x"] * outs[2]["x"]).mean())
    assert abs(emp - cov[1, 2]) < 5 * math.sqrt((cov[1, 1] * cov[2, 2] + cov[1, 2] ** 2) / d)


def test_clipped_sum_without_noise():
    q = MatrixFactorizationQuery(1.0, 0.0, BandedToeplitzStrategy([1.0, 0.5]))
    params = q.derive_sample_params(q.initial_global_state())
    batch = {"x": torch.tensor([[3.0, 4.0], [0.3, 0.4]])}
    state = q.accumulate_records(params, q.initial_sample_state({"x": torch.zeros(2)}), batch)
    r, _, ev = q.get_noised_result(state, q.initial_global_state())
    torch.testing.assert_close(r["x"], torch.tensor([0.6 + 0.3, 0.8 + 0.4]))
    assert ev == MatrixFactorizationStepEvent(0.0, BandedToeplitzStrategy([1.0, 0.5]).to_json(), 1, 1)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_resume_from_a_checkpoint_continues_the_same_noise(name):
    strategy = STRATEGIES[name]
    rec = {"x": torch.zeros(5)}
    q = MatrixFactorizationQuery(1.0, 1.0, strategy, generator=_gen(3))
    first, state, _ = _run(q, rec, 3)
    saved_state, saved_gen = to_plain(state), q.generator.state_dict()
    rest, _, _ = _run(q, rec, 4, state)
    q2 = MatrixFactorizationQuery(1.0, 1.0, strategy, generator=_gen(99))
    q2.generator.load_state_dict(saved_gen)
    resumed, _, events = _run(q2, rec, 4, from_plain(q2.initial_global_state(), saved_state))
    for a, b in zip(rest, resumed):
        assert torch.equal(a["x"], b["x"])
    assert all(e.starts == 0 for e in events)
    # no draw is reused: the resumed steps' noise differs from the first steps'
    assert not any(torch.allclose(a["x"], b["x"]) for a in first for b in resumed)


def test_strategy_mismatch_and_bad_arguments_are_refused():
    q = MatrixFactorizationQuery(1.0, 1.0, BandedToeplitzStrategy([1.0, 0.5]))
    other = MatrixFactorizationQuery(1.0, 1.0, identity_strategy())
    with pytest.raises(ValueError, match="another strategy"):
        q.get_noised_result({"x": torch.zeros(2)}, other.initial_global_state())
    with pytest.raises(ValueError, match="partitions"):
        MatrixFactorizationQuery(1.0, 1.0, identity_strategy(), partitions=0)
    with pytest.raises(ValueError):
        MatrixFactorizationQuery(1.0, -1.0, identity_strategy())
    dense = MatrixFactorizationQuery(1.0, 1.0, DenseStrategy(np.eye(2)))
    _, state, _ = _run(dense, {"x": torch.zeros(1)}, 2)
    with pytest.raises(ValueError, match="2 steps"):
        dense.get_noised_result({"x": torch.zeros(1)}, state)


def test_unstable_inverse_warns():
    assert BandedToeplitzStrategy([1.0, -0.9]).inverse_is_stable  # root 1/0.9 outside the disk
    assert BandedToeplitzStrategy([1.0, -1.0]).inverse_is_stable  # prefix-sum inverse: grows linearly only
    assert not BandedToeplitzStrategy([1.0, 3.0]).inverse_is_stable  # w_t = z_t - 3 w_{t-1}
    with pytest.warns(RuntimeWarning, match="grows exponentially"):
        MatrixFactorizationQuery(1.0, 1.0, BandedToeplitzStrategy([1.0, 3.0]))


def test_spec_strategy_and_events_round_trip_json():
    q = MatrixFactorizationQuery(1.0, 1.0, STRATEGIES["blt"].to_json())
    assert q.strategy == STRATEGIES["blt"]
    _, _, events = _run(q, {"x": torch.zeros(1)}, 2)
    assert [e.starts for e in events] == [1, 0]
    for ev in events + [
        MatrixFactorizationReplaceOneEvent(1.2, 3.5, 100, 4, 25),
        MatrixFactorizationEvent(1.2, 3.5, 100, 4, 25),
        AmplifiedBandedMatrixFactorizationEvent(1.1, 1.0, 0.01, 30),
    ]:
        assert event_from_json(ev.to_json()) == ev
    with pytest.raises(ValueError):
        MatrixFactorizationStepEvent(1.0, "not json")
    with pytest.raises(ValueError):
        MatrixFactorizationEvent(1.0, 0.0, 1, 1, 1)


# -- the run grouper --------------------------------------------------------------------------
def _ledger_run(strategy, steps, sigma=2.0, partitions=1, **ledger_kwargs):
    led = PrivacyLedger(**ledger_kwargs)
    q = MatrixFactorizationQuery(1.0, sigma, strategy, partitions=partitions)
    state = q.initial_global_state()
    for _ in range(steps):
        _, state, ev = q.get_noised_result({"x": torch.zeros(1)}, state)
        led.record_sample(ev)
    return led


def test_grouper_fixed_order_uses_epochs_and_steps_per_epoch():
    strategy = BandedToeplitzStrategy([1.0, 0.5, 0.25])
    led = _ledger_run(strategy, 25, population_size=100, sampling="fixed_order", batch_size=10)
    ev = PrivacyLedger.from_json(led.to_json()).to_event()
    # 10 steps per epoch, 25 steps: 3 participations 10 apart; 3 bands <= 10: 3 full columns
    assert ev == MatrixFactorizationReplaceOneEvent(2.0, math.sqrt(3 * 1.3125), 25, 3, 10)
    acc = RdpAccountant(orders=[2.0, 10.0], neighboring_relation="replace_one").compose(ev)
    np.testing.assert_allclose(acc.rdp, np.array([2.0, 10.0]) * 2 * 3 * 1.3125 / 4.0)
    with pytest.raises(ValueError, match="replace_one"):
        RdpAccountant(orders=[2.0]).compose(ev)


def test_grouper_identity_with_poisson_is_dp_sgd():
    led = _ledger_run(identity_strategy(), 40, sigma=1.1, population_size=1000, selection_probability=0.02)
    ev = led.to_event()
    assert ev == AmplifiedBandedMatrixFactorizationEvent(1.1, 1.0, 0.02, 40)
    orders = [1.5, 2.0, 8.0, 32.0]
    acc = RdpAccountant(orders=orders).compose(ev)
    np.testing.assert_allclose(acc.rdp, compute_rdp(0.02, 1.1, 40, orders), rtol=1e-12)


def test_grouper_banded_poisson_amplified_only_with_enough_partitions():
    strategy = BandedToeplitzStrategy([4.0, 3.0])  # column norm 5
    led = _ledger_run(strategy, 9, partitions=2, population_size=1000, selection_probability=0.05)
    assert led.to_event() == AmplifiedBandedMatrixFactorizationEvent(2.0, 5.0, 0.05, 5)
    # ordinary Poisson loader: no amplification, every step may hold the record
    plain = _ledger_run(strategy, 9, population_size=1000, selection_probability=0.05).to_event()
    assert type(plain) is MatrixFactorizationEvent  # Poisson: add-or-remove-one
    assert (plain.max_participation, plain.min_separation) == (9, 1)
    # all coefficients positive: the worst case is every step, ||C 1||
    assert plain.sensitivity == pytest.approx(np.linalg.norm(strategy.matrix(9).sum(axis=1)))


def test_grouper_shuffle_allows_back_to_back_participation():
    strategy = BandedToeplitzStrategy([1.0, 0.5])
    ev = _ledger_run(strategy, 20, population_size=100, sampling="shuffle", batch_size=10).to_event()
    assert isinstance(ev, MatrixFactorizationReplaceOneEvent)
    assert (ev.max_participation, ev.min_separation) == (2, 1)
    # two adjacent participations: ||c0 e0 + (c1 + c0) e1 + c1 e2|| is the worst case
    assert ev.sensitivity == pytest.approx(math.sqrt(1 + 1.5**2 + 0.25))


def test_grouper_restarts_compose_and_changes_mid_run_are_refused():
    strategy = BandedToeplitzStrategy([1.0, 0.5])
    led = _ledger_run(strategy, 20, population_size=100, sampling="fixed_order", batch_size=10)
    second = _ledger_run(strategy, 20, population_size=100, sampling="fixed_order", batch_size=10)
    for r in second.runs:
        led.record_sample(r.event, r.count)
    ev = led.to_event()
    one = MatrixFactorizationReplaceOneEvent(2.0, math.sqrt(2 * 1.25), 20, 2, 10)
    assert ev == ComposedEvent((one, one))
    # every step a fresh sequence: count - 1 one-step mechanisms, then one open
    led2 = PrivacyLedger(100, sampling="fixed_order", batch_size=10)
    led2.record_sample(MatrixFactorizationStepEvent(2.0, strategy.to_json(), 1, 1), 3)
    single = MatrixFactorizationReplaceOneEvent(2.0, 1.0, 1, 1, 10)  # one step: only c_0 is used
    assert led2.to_event() == ComposedEvent((SelfComposedEvent(single, 2), single))
    bad = PrivacyLedger(100, sampling="fixed_order", batch_size=10)
    bad.record_sample(MatrixFactorizationStepEvent(2.0, strategy.to_json(), 1, 1))
    bad.record_sample(MatrixFactorizationStepEvent(1.0, strategy.to_json(), 1, 0), 4)
    with pytest.raises(ValueError, match="mid-run"):
        bad.to_event()


def test_step_event_alone_is_refused_by_the_accountant():
    with pytest.raises(ValueError, match="ledger"):
        RdpAccountant().compose(MatrixFactorizationStepEvent(1.0, identity_strategy().to_json()))


@pytest.mark.parametrize("strategy", [BandedToeplitzStrategy([1.0, 0.5]), BLTStrategy([0.9], [0.3])])
@pytest.mark.parametrize("ledger_kwargs", [dict(sampling="fixed_order", batch_size=10), dict(selection_probability=0.1)])
def test_grouper_accounts_a_billion_steps_quickly(strategy, ledger_kwargs):
    import time

    led = PrivacyLedger(1000, **ledger_kwargs)
    led.record_sample(MatrixFactorizationStepEvent(5.0, strategy.to_json(), 1, 1))
    led.record_sample(MatrixFactorizationStepEvent(5.0, strategy.to_json(), 1, 0), 10**9 - 1)
    t0 = time.perf_counter()
    ev = led.to_event()
    assert time.perf_counter() - t0 < 2.0
    assert ev.steps == 10**9 and math.isfinite(ev.sensitivity)


def test_grouper_shuffle_sequence_starting_mid_epoch_counts_both_epochs_it_touches():
    """A noise sequence restarted mid-epoch on shuffled batches: 10 steps from step 5 of a 10-step
    epoch touch two epochs, so a record may take part twice (end of one epoch, start of the next)."""
    strategy = BandedToeplitzStrategy([1.0, 0.5])
    led = _ledger_run(strategy, 5, population_size=100, sampling="shuffle", batch_size=10)
    second = _ledger_run(strategy, 10, population_size=100, sampling="shuffle", batch_size=10)
    for r in second.runs:
        led.record_sample(r.event, r.count)
    ev = led.to_event()
    first_seq, second_seq = ev.events
    assert first_seq.max_participation == 1
    assert second_seq.max_participation == 2  # was 1: ceil(10 / 10) ignored the offset
