"""The ledger matches reality: batches, loaders and checkpoints that contradict the ledger's
sampling are refused or flagged instead of silently under-reporting epsilon."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pytorch_privacy.dp_query import PrivacyLedger
from pytorch_privacy.optimizer import DPDataLoader, DPGaussianOptimizer
from pytorch_privacy.optimizer.consistency import SamplingMonitor, binomial_two_sided_p, loader_sampling


def ce(out, y):
    return nn.functional.cross_entropy(out, y, reduction="none")


def _model():
    torch.manual_seed(0)
    return nn.Linear(4, 3)


def _opt(model, sigma=1.0, clip=1.0, **kw):
    return DPGaussianOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, ce, clip, sigma, **kw)


def _data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_full_batch_under_a_small_q_warns_naming_both_numbers():
    model = _model()
    opt = _opt(model, ledger=PrivacyLedger(1600, 0.01))
    x, y = _data(1600)
    with pytest.warns(RuntimeWarning, match=r"realised batch sizes \[1600\].*expected q\*N = 16 per step"):
        opt.fit_batch(x, y)


def test_batch_larger_than_the_population_is_refused_before_release():
    model = _model()
    ledger = PrivacyLedger(10, 0.5)
    opt = _opt(model, ledger=ledger)
    w = model.weight.detach().clone()
    with pytest.raises(ValueError, match="500 examples exceeds the ledger's population_size=10"):
        opt.fit_batch(*_data(500))
    assert len(ledger) == 0 and torch.equal(model.weight, w)
    # also through the multi-pass API, and with physical batches smaller than the population
    opt2 = _opt(_model(), ledger=PrivacyLedger(10, 0.5), max_physical_batch_size=4)
    with pytest.raises(ValueError, match="exceeds"):
        opt2.fit_batch(*_data(12))
    with pytest.raises(ValueError, match="exceeds"):
        opt.backward_pass(*_data(11))


def test_a_loader_beside_a_ledger_with_another_q_is_refused_and_the_loader_builds_the_ledger():
    ds = TensorDataset(*_data(100))
    loader = DPDataLoader(ds, 0.5, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="the data loader samples with .*0.5.* but the ledger records .*0.1"):
        _opt(_model(), ledger=PrivacyLedger(100, 0.1), data_loader=loader)
    opt = _opt(_model(), data_loader=loader)  # q typed once
    assert opt.ledger.selection_probability == 0.5 and opt.ledger.population_size == 100
    assert opt.denominator == 50.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for x, y in loader:
            opt.fit_batch(x, y)
    assert len(opt.ledger) == len(loader)
    # the loader's rate changed behind the ledger's back: the next step is refused
    loader.poisson_sampler.sample_rate = 0.25
    with pytest.raises(ValueError, match="samples with"):
        opt.fit_batch(*_data(5))


def test_an_unattached_loader_with_another_q_is_flagged_by_the_batch_size_test():
    ds = TensorDataset(*_data(100))
    loader = DPDataLoader(ds, 0.5, generator=torch.Generator().manual_seed(1))
    opt = _opt(_model(), ledger=PrivacyLedger(100, 0.1))
    with pytest.warns(RuntimeWarning, match=r"expected q\*N = 10 per step"):
        for x, y in loader:
            opt.fit_batch(x, y)


def test_plausible_poisson_batches_never_warn():
    mon = SamplingMonitor(PrivacyLedger(1000, 0.02))
    g = torch.Generator().manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(300):
            mon.observe(int((torch.rand(1000, generator=g) < 0.02).sum()))


def test_binomial_p_value():
    from scipy.stats import binomtest

    for k, n, q in [(16, 1600, 0.01), (0, 100, 0.05), (30, 200, 0.1), (200, 200, 0.1)]:
        assert binomial_two_sided_p(k, n, q) == pytest.approx(min(1.0, 2 * min(
            binomtest(k, n, q, alternative="less").pvalue, binomtest(k, n, q, alternative="greater").pvalue)))
    assert binomial_two_sided_p(1600, 1600, 0.01) < 1e-300


def test_shuffling_dataloader_gives_a_shuffle_ledger_and_fixed_size_limits():
    ds = TensorDataset(*_data(40))
    dl = DataLoader(ds, batch_size=8, shuffle=True)
    assert loader_sampling(dl) == {"population_size": 40, "sampling": "shuffle", "selection_probability": 0.2,
                                   "batch_size": 8}
    opt = _opt(_model(), data_loader=dl, expected_batch_size=8.0)
    assert opt.ledger.sampling == "shuffle"
    with pytest.raises(ValueError, match="batch_size=8"):
        opt.fit_batch(*_data(9))
    with pytest.raises(TypeError, match="cannot be accounted"):
        loader_sampling(DataLoader(ds, batch_size=8))


def _ckpt(sigma=1.0, clip=1.0, ledger=None):
    model = _model()
    opt = _opt(model, sigma=sigma, clip=clip, ledger=ledger or PrivacyLedger(100, 0.1))
    opt.fit_batch(*_data(10))
    return opt.state_dict()


def test_load_refuses_a_ledger_with_other_sampling_settings_and_keeps_the_fresh_one():
    sd = _ckpt()
    fresh = PrivacyLedger(100, 0.2)
    opt = _opt(_model(), ledger=fresh)
    with pytest.raises(ValueError, match="never rewrites the sampling"):
        opt.load_state_dict(sd)
    assert fresh.selection_probability == 0.2 and len(fresh) == 0
    with pytest.raises(ValueError, match="never rewrites"):
        _opt(_model(), ledger=PrivacyLedger(200, 0.1)).load_state_dict(sd)
    ok = PrivacyLedger(100, 0.1)
    _opt(_model(), ledger=ok).load_state_dict(sd)
    assert len(ok) == 1


def test_load_refuses_another_sigma_or_clip_so_attributes_and_releases_agree():
    sd = _ckpt(sigma=1.0)
    opt = _opt(_model(), sigma=3.0, ledger=PrivacyLedger(100, 0.1))
    with pytest.raises(ValueError, match="differently configured query.*stddev"):
        opt.load_state_dict(sd)
    assert opt.noise_multiplier == 3.0 and float(opt.global_state.numerator_state.stddev) == 3.0
    with pytest.raises(ValueError, match="l2_norm_clip"):
        _opt(_model(), clip=2.0, ledger=PrivacyLedger(100, 0.1)).load_state_dict(_ckpt(clip=1.0))
    same = _opt(_model(), sigma=1.0, ledger=PrivacyLedger(100, 0.1))
    same.load_state_dict(sd)
    assert float(same.global_state.numerator_state.stddev) == 1.0 == same.noise_multiplier


def test_target_delta_not_below_one_over_n_warns():
    with pytest.warns(UserWarning, match=r"target_delta=0.5 is not below 1/N"):
        _opt(_model(), ledger=PrivacyLedger(100, 0.1), target_epsilon=5.0, target_delta=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _opt(_model(), ledger=PrivacyLedger(100, 0.1), target_epsilon=5.0, target_delta=1e-3)


def test_the_three_sd_prefilter_never_hides_a_flagged_total():
    import math

    from pytorch_privacy.optimizer import consistency as c

    worst = 1.0
    for n in [1, 2, 3, 5, 10, 50, 100, 300, 1000, 10**5, 10**8]:
        for q in [1e-12, 1e-7, 1e-3, 0.01, 0.05, 0.3, 0.5, 0.9, 0.999, 1 - 1e-9]:
            mu, sd = n * q, math.sqrt(n * q * (1 - q))
            lo, hi = max(0, math.ceil(mu - c._BAND_SD * sd)), min(n, math.floor(mu + c._BAND_SD * sd))
            for s in (range(lo, hi + 1) if hi - lo <= 300 else (lo, hi)):
                worst = min(worst, binomial_two_sided_p(s, n, q))
    assert worst > 10 * c._BAND_MAX_ALPHA
