"""Optimizer-side misuse stopped with a clear error: parameters added after wrapping, batches on
another device or dtype, NaN weights, and model validation that cannot be switched off by an
ImportError."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from pytorch_privacy.optimizer import DPGaussianOptimizer


def ce(out, y):
    return nn.functional.cross_entropy(out, y, reduction="none")


def _opt(model, **kw):
    return DPGaussianOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, ce, 1.0, 1.0,
                               expected_batch_size=4.0, **kw)


def _batch(n=4, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 4, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def test_a_layer_added_after_wrapping_is_refused_at_the_next_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    opt = _opt(model)
    opt.fit_batch(*_batch())
    model.append(nn.Linear(3, 3))
    with pytest.raises(ValueError, match=r"\['1.weight', '1.bias'\] were added to the model after"):
        opt.fit_batch(*_batch())
    opt.add_param_group({"params": list(model[1].parameters())})
    w = model[1].weight.detach().clone()
    opt.fit_batch(*_batch())
    assert not torch.equal(model[1].weight, w)  # now it is trained


def test_parameters_left_out_knowingly_only_warn_once():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 3))
    with pytest.warns(UserWarning, match="not in the optimizer"):
        opt = DPGaussianOptimizer(torch.optim.SGD(model[0].parameters(), lr=0.1), model, ce, 1.0, 1.0,
                                  expected_batch_size=4.0)
    opt.fit_batch(*_batch())


def test_dtype_mismatch_names_both():
    torch.manual_seed(0)
    opt = _opt(nn.Linear(4, 3))
    with pytest.raises(TypeError, match=r"inputs have dtype torch.float64 but the model's parameters are torch.float32"):
        opt.fit_batch(*_batch(dtype=torch.float64))


def test_device_mismatch_names_both():
    torch.manual_seed(0)
    opt = _opt(nn.Linear(4, 3))
    x, y = _batch()
    with pytest.raises(ValueError, match=r"inputs are on device meta but the model's parameters are on cpu"):
        opt.fit_batch(x.to("meta"), y)


def test_integer_inputs_are_not_dtype_checked():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(8, 3))
    opt = _opt(model)
    opt.fit_batch(torch.randint(0, 10, (4, 2)), torch.randint(0, 3, (4,)))


def test_nan_in_a_weight_stops_training():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = _opt(model)
    opt.fit_batch(*_batch())
    with torch.no_grad():
        model.bias[1] = float("nan")
    with pytest.raises(ValueError, match=r"parameters \['bias'\] hold NaN or inf"):
        opt.fit_batch(*_batch())
    with torch.no_grad():
        model.bias[1] = 0.0
        model.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"\['weight'\]"):
        opt.fit_batch(*_batch())


def test_model_validation_is_not_switched_off_by_an_import_error(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    # a broken/missing validation module must not silently disable the check
    monkeypatch.setitem(sys.modules, "pytorch_privacy.optimizer.validation", None)
    with pytest.raises((ValueError, ImportError)):
        _opt(model)


def test_autocast_skips_the_dtype_check():
    torch.manual_seed(0)
    opt = _opt(nn.Linear(4, 3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        opt.fit_batch(*_batch(dtype=torch.bfloat16))
