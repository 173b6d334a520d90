"""A step whose noise repeats a released step's noise is refused (``optimizer/noise_reuse.py``):
a generator reseeded with the same seed every epoch, or set back by hand.  Steps that draw no
noise, and steps refused for their budget, are never held against later ones."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pytorch_privacy.dp_query import PrivacyLedger, QuantileAdaptiveClipSumQuery
from pytorch_privacy.dp_query.randomness import RandomSource
from pytorch_privacy.optimizer import DPGaussianOptimizer, DPOptimizer, PrivacyBudgetExceeded
from pytorch_privacy.optimizer.noise_reuse import NoiseReuseGuard


def ce(out, y):
    return nn.functional.cross_entropy(out, y, reduction="none")


def batch(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 4, generator=g), torch.randint(0, 2, (8,), generator=g)


def setup(noise=1.0, **kw):
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    gen = torch.Generator().manual_seed(0)
    ledger = PrivacyLedger(100, 0.08)
    opt = DPGaussianOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, ce, 1.0, noise,
                              expected_batch_size=8, generator=gen, ledger=ledger, **kw)
    return model, opt, gen, ledger


def _params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_a_generator_reseeded_every_epoch_is_refused_before_anything_is_applied():
    model, opt, gen, ledger = setup()
    for i in range(3):  # epoch 0
        opt.fit_batch(*batch(i))
    gen.manual_seed(0)  # epoch 1, "for reproducibility"
    before = _params(model)
    with pytest.raises(ValueError, match="got that step's noise again"):
        opt.fit_batch(*batch(10))
    assert torch.equal(_params(model), before) and len(ledger) == 3
    gen.manual_seed(12345)  # a fresh seed: the run goes on
    opt.fit_batch(*batch(11))
    assert len(ledger) == 4 and not torch.equal(_params(model), before)


def test_a_generator_set_back_by_hand_is_refused_for_every_source():
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    gen = torch.Generator().manual_seed(3)
    q = QuantileAdaptiveClipSumQuery(1.0, 1.0, 0.5, 0.2, 1.0, expected_num_records=8, generator=gen)
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, ce, q)
    opt.fit_batch(*batch(0))
    state = gen.get_state()
    opt.fit_batch(*batch(1))
    gen.set_state(state)
    with pytest.raises(ValueError, match="set\\s+back with set_state"):
        opt.fit_batch(*batch(2))


def test_steps_without_noise_and_budget_refusals_are_not_held_against_later_steps():
    model, opt, gen, ledger = setup(noise=0.0)
    for i in range(3):  # sigma 0 draws nothing: the generator never moves
        opt.fit_batch(*batch(i))
    assert len(ledger) == 3

    model, opt, gen, ledger = setup(target_epsilon=3.0, target_delta=1e-5)
    taken = 0
    with pytest.raises(PrivacyBudgetExceeded):
        for i in range(1000):
            opt.fit_batch(*batch(i))
            taken += 1
    # the refused step rewound its draws and was not kept: the same position draws again, refused
    # only for its budget, never as a reuse
    with pytest.raises(PrivacyBudgetExceeded):
        opt.fit_batch(*batch(0))
    assert len(ledger) == taken > 0


def test_the_guard_on_its_own():
    gen = torch.Generator().manual_seed(0)
    src = RandomSource(gen)
    guard = NoiseReuseGuard()
    guard.start([src])
    src.normal((3,))
    guard.check([src])  # not yet released: not kept
    gen.manual_seed(0)
    guard.start([src])
    src.normal((3,))
    guard.check([src])
    guard.commit()  # released
    gen.manual_seed(0)
    guard.start([src])
    src.normal((3,))
    with pytest.raises(ValueError, match="noise again"):
        guard.check([src])
    secure = RandomSource(secure_mode=True)  # no position: nothing to compare
    for _ in range(2):
        guard.start([secure])
        secure.normal((3,))
        guard.check([secure])
        guard.commit()
