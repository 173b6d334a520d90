"""RDP of matrix-factorisation runs: the Gaussian mechanism with the strategy's sensitivity, amplified
banded runs as DP-SGD, limits, monotonicity, ledgers (also without torch)."""

import json
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytorch_privacy.analysis.matrix_factorization import (
    amplified_banded_rdp,
    matrix_factorization_rdp,
    mf_epsilon,
    mf_noise_multiplier,
    mf_plan_event,
)
from pytorch_privacy.analysis.rdp import compute_rdp
from pytorch_privacy.analysis.rdp_accountant import RdpAccountant, compute_rdp_from_ledger
from pytorch_privacy.dp_query.events import GaussianEvent
from pytorch_privacy.dp_query.matrix_factorization import BandedToeplitzStrategy, identity_strategy
from pytorch_privacy.dp_query.matrix_factorization_events import (
    AmplifiedBandedMatrixFactorizationEvent,
    MatrixFactorizationEvent,
    MatrixFactorizationReplaceOneEvent,
    MatrixFactorizationStepEvent,
)
from pytorch_privacy.dp_query.privacy_ledger import PrivacyLedger

ORDERS = np.array([1.5, 2.0, 4.0, 16.0, 64.0])


def _ledger(strategy, steps, sigma, **kwargs):
    """A ledger as MatrixFactorizationQuery records it (starts=1 on the first step)."""
    led = PrivacyLedger(**kwargs)
    led.record_sample(MatrixFactorizationStepEvent(sigma, strategy.to_json(), 1, 1))
    if steps > 1:
        led.record_sample(MatrixFactorizationStepEvent(sigma, strategy.to_json(), 1, 0), steps - 1)
    return led


def test_gaussian_with_sensitivity_and_relations():
    ev = MatrixFactorizationEvent(2.0, 3.0, 10, 9, 1)
    np.testing.assert_allclose(matrix_factorization_rdp(ev, ORDERS, "add_or_remove_one"), ORDERS * 9 / 8)
    np.testing.assert_allclose(matrix_factorization_rdp(ev, ORDERS, "replace_one"), ORDERS * 36 / 8)
    fixed = MatrixFactorizationReplaceOneEvent(2.0, 3.0, 10, 2, 5)
    np.testing.assert_allclose(matrix_factorization_rdp(fixed, ORDERS, "replace_one"), ORDERS * 36 / 8)
    with pytest.raises(ValueError, match="replace_one"):
        matrix_factorization_rdp(fixed, ORDERS, "add_or_remove_one")
    assert np.all(np.isinf(matrix_factorization_rdp(MatrixFactorizationEvent(0.0, 1.0, 1, 1, 1), ORDERS, "replace_one")))


def test_identity_strategy_on_fixed_order_is_k_fold_gaussian_composition():
    # DP-SGD without sampling, 3 epochs of 10 steps: 3 Gaussian releases of each record
    led = _ledger(identity_strategy(), 30, 1.7, population_size=100, sampling="fixed_order", batch_size=10)
    rdp = compute_rdp_from_ledger(led, ORDERS)  # relation taken from the event (replace-one)
    ref = RdpAccountant(orders=ORDERS, neighboring_relation="replace_one").compose(GaussianEvent(1.7), 3).rdp
    np.testing.assert_allclose(rdp, ref, rtol=1e-12)


def test_one_step_reduces_to_the_gaussian_mechanism():
    strategy = BandedToeplitzStrategy([1.0, 0.7, 0.3])
    led = _ledger(strategy, 1, 1.3, population_size=50, sampling="full")
    rdp = compute_rdp_from_ledger(led, ORDERS)
    np.testing.assert_allclose(rdp, ORDERS / (2 * 1.3**2), rtol=1e-12)


def test_amplified_banded_is_dp_sgd_over_rounds():
    ev = AmplifiedBandedMatrixFactorizationEvent(3.0, 2.0, 0.05, 17)
    np.testing.assert_allclose(amplified_banded_rdp(ev, ORDERS, "add_or_remove_one"), compute_rdp(0.05, 1.5, 17, ORDERS), rtol=1e-12)
    with pytest.raises(ValueError, match="add_or_remove_one"):
        amplified_banded_rdp(ev, ORDERS, "replace_one")
    zero_q = AmplifiedBandedMatrixFactorizationEvent(3.0, 2.0, 0.0, 17)
    np.testing.assert_array_equal(amplified_banded_rdp(zero_q, ORDERS, "add_or_remove_one"), 0.0)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(st.floats(0.3, 5.0), st.floats(1.05, 2.0), st.integers(1, 60), st.integers(1, 30), st.integers(1, 4))
def test_monotone_in_sigma_and_steps(sigma, factor, steps, extra, bands):
    strategy = BandedToeplitzStrategy(np.linspace(1.0, 0.2, bands))
    kw = dict(population_size=40, sampling="fixed_order", batch_size=10)  # 4 steps per epoch
    base = compute_rdp_from_ledger(_ledger(strategy, steps, sigma, **kw), ORDERS)
    assert np.all(compute_rdp_from_ledger(_ledger(strategy, steps, sigma * factor, **kw), ORDERS) < base)
    assert np.all(compute_rdp_from_ledger(_ledger(strategy, steps + extra, sigma, **kw), ORDERS) >= base * (1 - 1e-12))


def test_step_event_alone_is_refused():
    with pytest.raises(ValueError, match="run grouper"):
        RdpAccountant().compose(MatrixFactorizationStepEvent(1.0, identity_strategy().to_json()))


@pytest.mark.slow  # a fresh interpreter (~2 s)
def test_mf_ledger_file_is_accounted_without_torch(tmp_path):
    led = _ledger(BandedToeplitzStrategy([0.8, 0.6]), 25, 1.1, population_size=100, sampling="fixed_order", batch_size=10)
    path = tmp_path / "ledger.json"
    led.save(path)
    expected = float(RdpAccountant(neighboring_relation="replace_one").compose(led.to_event()).get_epsilon(1e-5))
    code = (
        "import sys\n"
        "class _NoTorch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ImportError('torch is blocked')\n"
        "sys.meta_path.insert(0, _NoTorch())\n"
        "from pytorch_privacy.dp_query.privacy_ledger import PrivacyLedger\n"
        "from pytorch_privacy.analysis.rdp_accountant import RdpAccountant\n"
        f"led = PrivacyLedger.load({str(path)!r})\n"
        "print(RdpAccountant(neighboring_relation='replace_one').compose(led.to_event()).get_epsilon(1e-5))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.strip()) == pytest.approx(expected, rel=1e-12)
    assert json.loads(path.read_text())["runs"][0]["event"]["kind"] == "mf_step"


def test_plan_and_calibration():
    strategy = BandedToeplitzStrategy([0.8, 0.6])
    plan = dict(population_size=1000, steps=200, sampling="fixed_order", batch_size=50)  # 20 per epoch, 10 epochs
    ev = mf_plan_event(1.0, strategy, **plan)
    assert ev == MatrixFactorizationReplaceOneEvent(1.0, np.sqrt(10.0), 200, 10, 20)
    sigma = mf_noise_multiplier(4.0, 1e-5, strategy, **plan)
    assert mf_epsilon(sigma, 1e-5, strategy, **plan) <= 4.0 < mf_epsilon(sigma * (1 - 3e-4), 1e-5, strategy, **plan)
    # with banded sampling the same target needs less noise (amplification)
    banded = dict(population_size=500, steps=200, sampling="poisson", selection_probability=0.1, partitions=2)
    assert isinstance(mf_plan_event(1.0, strategy, **banded), AmplifiedBandedMatrixFactorizationEvent)
    assert mf_noise_multiplier(4.0, 1e-5, strategy, **banded) < sigma
    with pytest.raises(ValueError):
        mf_noise_multiplier(0.0, 1e-5, strategy, **plan)
    with pytest.raises(ValueError):
        mf_plan_event(1.0, strategy, population_size=10, steps=0, sampling="full")


def _gaussian_delta(eps, mu):
    """Exact delta(eps) of the Gaussian mechanism with sensitivity/sigma = mu (Balle & Wang 2018)."""
    from scipy.stats import norm

    return norm.cdf(-eps / mu + mu / 2) - np.exp(eps) * norm.cdf(-eps / mu - mu / 2)


def test_pld_accounts_a_whole_mf_run_as_the_gaussian_mechanism_it_is():
    """Fixed-order MF run: the PLD accountant's epsilon is the exact Gaussian epsilon at
    mu = 2 sens / sigma (replace-one), checked with the Balle-Wang closed form, and below RDP's."""
    from scipy.optimize import brentq

    from pytorch_privacy.analysis.pld import PLDAccountant
    from pytorch_privacy.dp_query.events import relation_of

    ev = mf_plan_event(5.0, BandedToeplitzStrategy([1.0, -0.5, 0.2]), population_size=1000, steps=50, batch_size=100)
    rel = relation_of(ev)
    assert rel == "replace_one"
    eps_pld = PLDAccountant(neighboring_relation=rel).compose(ev).get_epsilon(1e-5)
    mu = 2 * ev.sensitivity / ev.noise_multiplier
    exact = brentq(lambda e: _gaussian_delta(e, mu) - 1e-5, 0.0, 100.0)
    assert abs(eps_pld - exact) <= 2e-3 * exact
    assert eps_pld <= RdpAccountant(neighboring_relation=rel).compose(ev).get_epsilon(1e-5)
