"""RDP of the discrete Gaussian, distributed discrete Gaussian and distributed Skellam events;
their JSON round trips and strict loading."""

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytorch_privacy.analysis.distributed import (
    compute_rdp_discrete_gaussian,
    compute_rdp_distributed_discrete_gaussian,
    compute_rdp_skellam,
    ddg_tau,
    discrete_gaussian_zcdp,
)
from pytorch_privacy.analysis.rdp_accountant import RdpAccountant, compute_rdp_from_event
from pytorch_privacy.dp_query.distributed_events import (
    DiscreteGaussianEvent,
    DistributedDiscreteGaussianEvent,
    DistributedSkellamEvent,
)
from pytorch_privacy.dp_query.events import (
    PoissonSampledEvent,
    SampledWithoutReplacementEvent,
    SelfComposedEvent,
    ShuffledEvent,
    event_from_dict,
    event_from_json,
)

ORDERS = np.array([1.5, 2.0, 3.0, 8.0, 32.0])


def _dg_logpmf(sigma: float, center: int, support: np.ndarray) -> np.ndarray:
    logw = -((support - center) ** 2) / (2.0 * sigma**2)
    m = logw.max()
    return logw - (m + math.log(np.sum(np.exp(logw - m))))


def _exact_dg_renyi(sigma: float, delta: int, alpha: float) -> float:
    """D_alpha(N_Z(0, s^2) || N_Z(delta, s^2)) by direct summation of the pmfs (log space)."""
    half = int(40 * sigma + 40 + abs(delta))
    x = np.arange(-half, half + 1, dtype=float)
    t = alpha * _dg_logpmf(sigma, 0, x) + (1.0 - alpha) * _dg_logpmf(sigma, delta, x)
    m = t.max()
    return (m + math.log(np.sum(np.exp(t - m)))) / (alpha - 1.0)


# -- discrete Gaussian ---------------------------------------------------------------------
def test_discrete_gaussian_rdp_is_canonne_bound():
    rdp = compute_rdp_discrete_gaussian(3.0, 6.0, ORDERS)
    np.testing.assert_allclose(rdp, ORDERS * 9.0 / 72.0, rtol=1e-15)
    assert discrete_gaussian_zcdp(3.0, 6.0) == pytest.approx(0.125, rel=1e-15)


@pytest.mark.parametrize("sigma,delta", [(0.6, 1), (1.0, 1), (2.0, 3), (5.0, 2), (20.0, 7)])
@pytest.mark.parametrize("alpha", [2.0, 5.0])
def test_discrete_gaussian_bound_holds_and_is_tight_at_large_sigma(sigma, delta, alpha):
    exact = _exact_dg_renyi(sigma, delta, alpha)
    bound = float(compute_rdp_discrete_gaussian(delta, sigma, [alpha])[0])
    assert exact <= bound * (1 + 1e-9)
    if sigma >= 2.0:  # the discrete Gaussian is then indistinguishable from the continuous one
        assert exact == pytest.approx(bound, rel=1e-6)


def test_discrete_gaussian_integer_orders_exact_fractional_below_at_small_sigma():
    # integer shift, integer order: the tilted sum is a shifted lattice sum, so the divergence
    # equals alpha Delta^2 / (2 sigma^2) exactly; at a fractional order the centre falls between
    # lattice points and, at small sigma, the divergence is below the bound (13.42 vs 13.89)
    bound2 = float(compute_rdp_discrete_gaussian(1, 0.3, [2.0])[0])
    assert _exact_dg_renyi(0.3, 1, 2.0) == pytest.approx(bound2, rel=1e-12)
    assert _exact_dg_renyi(0.3, 1, 2.5) < 0.98 * float(compute_rdp_discrete_gaussian(1, 0.3, [2.5])[0])


def test_discrete_gaussian_degenerate_and_relations():
    np.testing.assert_array_equal(compute_rdp_discrete_gaussian(0.0, 0.0, ORDERS), 0.0)
    assert np.all(np.isinf(compute_rdp_discrete_gaussian(1.0, 0.0, ORDERS)))
    assert math.isinf(compute_rdp_discrete_gaussian(1.0, 2.0, [math.inf])[0])
    ev = DiscreteGaussianEvent(2.0, 4.0)
    add = compute_rdp_from_event(ev, ORDERS)
    rep = compute_rdp_from_event(ev, ORDERS, neighboring_relation="replace_one")
    np.testing.assert_allclose(add, ORDERS / 8.0)
    np.testing.assert_allclose(rep, 4.0 * add)


def test_sampled_discrete_events_are_refused():
    for inner in (
        DiscreteGaussianEvent(1.0, 2.0),
        DistributedDiscreteGaussianEvent(1.0, 1.0, 2.0, 10, 5),
        DistributedSkellamEvent(1.0, 1.0, 4.0, 10),
    ):
        with pytest.raises(ValueError, match="Gaussian"):
            compute_rdp_from_event(PoissonSampledEvent(0.1, inner), ORDERS)
        with pytest.raises(ValueError, match="Gaussian"):
            compute_rdp_from_event(SampledWithoutReplacementEvent(100, 10, inner), ORDERS)


# -- distributed discrete Gaussian ----------------------------------------------------------
def test_ddg_tau_hand_values():
    assert ddg_tau(3.0, 1) == 0.0
    # n = 3, sigma = 0.5: 10 * (e^{-pi^2/4} + e^{-pi^2/3})
    expected = 10 * (math.exp(-(math.pi**2) / 4) + math.exp(-(math.pi**2) / 3))
    assert ddg_tau(0.5, 3) == pytest.approx(expected, rel=1e-14)
    # beyond the exact terms the sum is bounded from above (never smaller than the true sum)
    assert ddg_tau(0.5, 2_000_001) >= 10 * 2_000_000 * math.exp(-2 * math.pi**2 * 0.25)


def test_ddg_hand_values():
    # n = 4, sigma = 1.1, d = 10, Delta2 = 2, Delta1 = 5, order 3 (integer)
    n, s, d, d2, d1, a = 4, 1.1, 10, 2.0, 5.0, 3.0
    tau = 10 * sum(math.exp(-2 * math.pi**2 * s**2 * k / (k + 1)) for k in range(1, n))
    s2, s1 = d2 / (math.sqrt(n) * s), d1 / (math.sqrt(n) * s)
    kls = min(a / 2 * s2**2 + tau * d, a / 2 * (s2**2 + 2 * s1 * tau + tau**2 * d), a / 2 * (s2 + math.sqrt(d) * tau) ** 2)
    single = a * d2**2 / (2 * s**2)
    got = compute_rdp_distributed_discrete_gaussian(d2, d1, s, n, d, [a, 2.5])
    assert kls < single  # the case exercises the tau bound, not the single-share one
    assert got[0] == pytest.approx(kls, rel=1e-13)
    assert got[1] == got[0]  # order 2.5 is evaluated at 3


def test_ddg_reduces_to_discrete_gaussian_for_one_client_and_approaches_central_at_large_sigma():
    one = compute_rdp_distributed_discrete_gaussian(3.0, 9.0, 2.0, 1, 100, ORDERS)
    np.testing.assert_allclose(one, compute_rdp_discrete_gaussian(3.0, 2.0, ORDERS))
    # many clients with a large local sigma: tau underflows, the bound is the central one
    many = compute_rdp_distributed_discrete_gaussian(3.0, 9.0, 5.0, 100, 1000, [2.0, 3.0])
    np.testing.assert_allclose(many, compute_rdp_discrete_gaussian(3.0, 5.0 * 10.0, [2.0, 3.0]), rtol=1e-12)
    # small local sigma: tau is large and the single-share bound takes over
    small = compute_rdp_distributed_discrete_gaussian(1.0, 1.0, 0.3, 50, 10_000, [2.0])
    np.testing.assert_allclose(small, compute_rdp_discrete_gaussian(1.0, 0.3, [2.0]))


@settings(max_examples=25)
@given(
    s=st.floats(0.1, 5.0),
    ds=st.floats(1.0001, 3.0),
    n=st.integers(1, 200),
    d=st.integers(1, 10_000),
    d2=st.floats(0.5, 10.0),
)
def test_ddg_monotone_in_noise_and_never_above_single_share(s, ds, n, d, d2):
    d1 = d2 * min(math.sqrt(d), d2)
    lo = compute_rdp_distributed_discrete_gaussian(d2, d1, s * ds, n, d, ORDERS)
    hi = compute_rdp_distributed_discrete_gaussian(d2, d1, s, n, d, ORDERS)
    assert np.all(lo <= hi * (1 + 1e-12))
    assert np.all(hi <= compute_rdp_discrete_gaussian(d2, s, ORDERS) * (1 + 1e-12))


def test_ddg_event_replace_one_only():
    ev = DistributedDiscreteGaussianEvent(2.0, 4.0, 1.5, 8, 16)
    with pytest.raises(ValueError, match="replace-one"):
        compute_rdp_from_event(ev, ORDERS)
    with pytest.raises(ValueError, match="replace-one"):
        RdpAccountant(ORDERS).compose(ev)
    rep = compute_rdp_from_event(ev, ORDERS, neighboring_relation="replace_one")
    np.testing.assert_allclose(rep, compute_rdp_distributed_discrete_gaussian(4.0, 8.0, 1.5, 8, 16, ORDERS))
    # a shuffled run (replace-one) is accounted: one release per epoch
    run = compute_rdp_from_event(ShuffledEvent(10, 25, ev), ORDERS)
    np.testing.assert_allclose(run, 3 * rep)


# -- Skellam -----------------------------------------------------------------------------------
def test_skellam_hand_values():
    # Delta1 = 4, Delta2 = 2, mu = 10: order 2: 8/20 + min(36/400, 12/20) = 0.49
    # order 3: 12/20 + min(44/400, 0.6) = 0.71; mu = 1, order 2: 4 + min(9, 6) = 10
    np.testing.assert_allclose(compute_rdp_skellam(4.0, 2.0, 10.0, [2.0, 3.0, 2.5]), [0.49, 0.71, 0.71], rtol=1e-14)
    np.testing.assert_allclose(compute_rdp_skellam(4.0, 2.0, 1.0, [2.0]), [10.0], rtol=1e-14)
    assert math.isinf(compute_rdp_skellam(4.0, 2.0, 1.0, [math.inf])[0])
    np.testing.assert_array_equal(compute_rdp_skellam(0.0, 0.0, 0.0, ORDERS), 0.0)
    assert np.all(np.isinf(compute_rdp_skellam(1.0, 1.0, 0.0, ORDERS)))


@settings(max_examples=25)
@given(mu=st.floats(0.5, 1e6), f=st.floats(1.001, 10.0), d2=st.floats(1.0, 50.0))
def test_skellam_monotone_in_noise_and_above_gaussian(mu, f, d2):
    d1 = d2 * d2
    lo, hi = compute_rdp_skellam(d1, d2, mu * f, ORDERS), compute_rdp_skellam(d1, d2, mu, ORDERS)
    assert np.all(lo <= hi)
    # it is the Gaussian bound alpha D^2 / (2 mu) plus a non-negative discretisation term
    gauss = np.ceil(ORDERS) * d2 * d2 / (2 * mu)
    assert np.all(hi >= gauss)


def test_skellam_event_total_variance_and_relation():
    ev = DistributedSkellamEvent(6.0, 3.0, 2.5, 40)
    rep = compute_rdp_from_event(ev, ORDERS, neighboring_relation="replace_one")
    np.testing.assert_allclose(rep, compute_rdp_skellam(12.0, 6.0, 100.0, ORDERS))
    with pytest.raises(ValueError, match="replace-one"):
        compute_rdp_from_event(ev, ORDERS)
    acc = RdpAccountant(ORDERS, neighboring_relation="replace_one").compose(SelfComposedEvent(ev, 7))
    np.testing.assert_allclose(acc.rdp, 7 * rep)


# -- events ----------------------------------------------------------------------------------
EVENTS = [
    DiscreteGaussianEvent(2.5, 7.0),
    DistributedDiscreteGaussianEvent(3.0, 9.0, 1.25, 100, 4096),
    DistributedSkellamEvent(9.0, 3.0, 16.0, 50),
]


@pytest.mark.parametrize("ev", EVENTS)
def test_event_json_round_trip(ev):
    assert event_from_json(ev.to_json()) == ev
    nested = PoissonSampledEvent(0.5, SelfComposedEvent(ev, 3))
    assert event_from_json(nested.to_json()) == nested


@pytest.mark.parametrize("ev", EVENTS)
def test_event_strict_loading(ev):
    d = json.loads(ev.to_json())
    with pytest.raises(ValueError, match="unknown field"):
        event_from_dict({**d, "extra": 1})
    key = next(k for k in d if k != "kind")
    missing = {k: v for k, v in d.items() if k != key}
    with pytest.raises(ValueError, match="lacks"):
        event_from_dict(missing)
    with pytest.raises(ValueError):
        event_from_dict({**d, key: "1.0"})
    with pytest.raises(ValueError):
        event_from_dict({**d, key: -1})


def test_event_int_fields_refuse_floats_and_zero():
    d = json.loads(EVENTS[1].to_json())
    for bad in (100.0, 0, True):
        with pytest.raises(ValueError):
            event_from_dict({**d, "num_clients": bad})
    with pytest.raises(ValueError):
        DistributedSkellamEvent(1.0, 1.0, 1.0, 0)
    with pytest.raises(TypeError):
        DiscreteGaussianEvent("1", 2.0)


@pytest.mark.peer
@pytest.mark.parametrize("sigma,sens,steps", [(0.8, 1, 1), (2.0, 1, 10), (5.0, 3, 50)])
def test_discrete_gaussian_epsilon_never_below_dp_accounting_pld(sigma, sens, steps):
    """Our RDP route is an upper bound: its epsilon must not undercut the (near-exact) PLD of the
    discrete Gaussian that dp-accounting computes, and should be within a small factor of it."""
    pld_mod = pytest.importorskip("dp_accounting.pld.privacy_loss_distribution")
    from pytorch_privacy.analysis.conversion import get_privacy_spent

    pld = pld_mod.from_discrete_gaussian_mechanism(sigma, sensitivity=sens).self_compose(steps)
    pld_eps = pld.get_epsilon_for_delta(1e-5)
    orders = np.concatenate([np.linspace(1.1, 10.9, 99), np.arange(11, 512)])
    rdp = steps * compute_rdp_discrete_gaussian(sens, sigma, orders)
    eps = get_privacy_spent(orders, rdp, target_delta=1e-5)[0]
    assert pld_eps <= eps <= 1.2 * pld_eps  # measured ratios 1.12, 1.08, 1.06


def _renyi_shift(logp: np.ndarray, shift: int, alpha: float) -> float:
    """D_alpha(P || P shifted by ``shift``) for a pmf on consecutive integers (log space)."""
    lp, lq = logp[shift:], logp[:-shift]  # P(x) against Q(x) = P(x - shift)
    keep = np.isfinite(lp) & np.isfinite(lq)  # both underflowed far in the tails: no mass
    t = alpha * lp[keep] + (1 - alpha) * lq[keep]
    m = t.max()
    return (m + math.log(np.exp(t - m).sum())) / (alpha - 1)


@pytest.mark.parametrize("sigma,n", [(1.0, 2), (1.0, 5), (1.5, 3), (0.6, 4)])
@pytest.mark.parametrize("delta", [1, 2])
def test_ddg_bound_holds_for_exact_sums_of_discrete_gaussians(sigma, n, delta):
    half = int(40 * sigma * math.sqrt(n)) + 40
    x = np.arange(-half, half + 1)
    one = np.exp(-(x.astype(float) ** 2) / (2 * sigma**2))
    one /= one.sum()
    pmf = one
    for _ in range(n - 1):
        pmf = np.convolve(pmf, one)[half : 3 * half + 1]  # stay on [-half, half]
    logp = np.log(np.maximum(pmf, 1e-300))
    for alpha in (2.0, 3.0, 6.0):
        exact = _renyi_shift(logp, delta, alpha)
        bound = compute_rdp_distributed_discrete_gaussian(delta, delta, sigma, n, 1, [alpha])[0]
        assert exact <= bound * (1 + 1e-9), (exact, bound)
    if sigma < 1 and delta == 1:
        # why the correction matters: at sigma = 0.6 the sum of 4 shares leaks more than the
        # central N_Z(0, n sigma^2) bound alpha Delta^2 / (2 n sigma^2) allows
        assert _renyi_shift(logp, delta, 2.0) > 2.0 * delta**2 / (2 * n * sigma**2)


@pytest.mark.parametrize("mu", [0.5, 2.0, 10.0, 100.0])
@pytest.mark.parametrize("delta", [1, 3])
def test_skellam_bound_holds_for_exact_skellam(mu, delta):
    from scipy import stats

    half = int(40 * math.sqrt(mu)) + 60
    x = np.arange(-half, half + 1)
    logp = stats.skellam.logpmf(x, mu / 2, mu / 2)
    for alpha in (2.0, 3.0, 8.0):
        exact = _renyi_shift(logp, delta, alpha)
        bound = compute_rdp_skellam(delta, delta, mu, [alpha])[0]
        assert exact <= bound, (exact, bound)


_any_float = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.integers(-(10**30), 10**30), st.just(True), st.just("1")
)


@settings(max_examples=60)
@given(a=_any_float, b=_any_float, c=_any_float, n=st.one_of(st.integers(-5, 10**12), st.floats()), order=_any_float)
def test_fuzz_public_functions_finite_inf_or_clear_error(a, b, c, n, order):
    calls = [
        lambda: compute_rdp_discrete_gaussian(a, b, [order]),
        lambda: discrete_gaussian_zcdp(a, b),
        lambda: ddg_tau(a, n),
        lambda: compute_rdp_distributed_discrete_gaussian(a, b, c, n, 7, [order]),
        lambda: compute_rdp_skellam(a, b, c, [order]),
    ]
    for call in calls:
        try:
            out = np.atleast_1d(np.asarray(call(), dtype=float))
        except (ValueError, TypeError) as exc:
            assert str(exc)
            continue
        assert not np.any(np.isnan(out)) and np.all(out >= 0)


def test_events_load_and_account_without_torch():
    """An auditor without torch reads these events (lazy event module) and accounts them (lazy
    rule module): a fresh interpreter in which importing torch fails."""
    import subprocess
    import sys

    code = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == 'torch' or name.startswith('torch.'):
            raise ImportError('torch blocked')
sys.meta_path.insert(0, Block())
from pytorch_privacy.analysis.rdp_accountant import compute_rdp_from_event
from pytorch_privacy.dp_query.events import event_from_json
ev = event_from_json('{"kind":"distributed_skellam","l1_sensitivity":3,"l2_sensitivity":2,"local_variance":4.0,"num_clients":5}')
print(float(compute_rdp_from_event(ev, [2.0], neighboring_relation='replace_one')[0]))
assert 'torch' not in sys.modules
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    # variance 20, Delta1 = 6, Delta2 = 4 (replace-one), order 2: 2*16/40 + min((3*16+36)/1600, 18/40)
    assert float(out.stdout) == pytest.approx(0.8 + 84 / 1600, rel=1e-12)
