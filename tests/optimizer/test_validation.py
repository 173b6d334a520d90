"""validate_model / replace_batchnorm: messages name the layer and the fix."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from pytorch_privacy.optimizer.engines import GhostEngine, FunctorchEngine, select_engine
from ..reference_models import MnistCNN, SmallResNet, TinyTransformer
from pytorch_privacy.optimizer.validation import (
    LAYER_CHECKS,
    find_problems,
    register_layer_check,
    replace_batchnorm,
    validate_model,
)


def bn_net(cls=nn.BatchNorm2d):
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.Sequential(cls(4)), nn.ReLU())


@pytest.mark.parametrize("cls", [nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm])
def test_batchnorm_in_training_mode_is_rejected_with_name_and_fix(cls):
    model = bn_net(cls)
    with pytest.raises(ValueError) as err:
        validate_model(model)
    msg = str(err.value)
    assert f"'1.0' ({cls.__name__})" in msg
    assert "mixes examples" in msg
    assert "replace_batchnorm(model)" in msg and "GroupNorm" in msg and "eval mode" in msg


def test_batchnorm_eval_is_fine_frozen_or_trainable_but_not_without_running_stats():
    model = bn_net()
    model[1].eval()
    validate_model(model)  # trainable affine, running statistics: a fixed per-channel map
    model[1].requires_grad_(False)
    validate_model(model)
    model[1].train()
    with pytest.raises(ValueError, match="training mode"):  # frozen does not help: batch statistics
        validate_model(model)
    no_stats = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2, track_running_stats=False)).eval()
    with pytest.raises(ValueError, match="no running statistics"):
        validate_model(no_stats)


def test_instancenorm_only_when_tracking_running_stats_in_training():
    validate_model(nn.Sequential(nn.Conv2d(1, 2, 3), nn.InstanceNorm2d(2, affine=True)))
    tracked = nn.Sequential(nn.Conv2d(1, 2, 3), nn.InstanceNorm2d(2, track_running_stats=True))
    with pytest.raises(ValueError, match=r"'1' \(InstanceNorm2d\).*track_running_stats=False"):
        validate_model(tracked)
    tracked.eval()
    validate_model(tracked)


def test_embedding_max_norm_and_lazy_modules():
    with pytest.raises(ValueError, match=r"'0' \(Embedding\).*max_norm"):
        validate_model(nn.Sequential(nn.Embedding(5, 2, max_norm=1.0), nn.Linear(2, 2)))
    with pytest.raises(ValueError, match=r"'0' \(LazyLinear\).*forward pass"):
        validate_model(nn.Sequential(nn.LazyLinear(2)))


def test_every_problem_is_listed():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Conv2d(2, 2, 3), nn.BatchNorm2d(2))
    problems = find_problems(model)
    assert len(problems) == 2 and "'1'" in problems[0] and "'3'" in problems[1]


def test_no_trainable_parameters():
    with pytest.raises(ValueError, match="no trainable parameters"):
        validate_model(nn.Linear(2, 2).requires_grad_(False))
    with pytest.raises(ValueError, match="no trainable parameters"):
        validate_model(nn.ReLU())


def test_engine_support_is_checked():
    validate_model(MnistCNN(), engine="ghost")
    validate_model(MnistCNN(), engine=GhostEngine)
    validate_model(TinyTransformer(), engine="auto")
    validate_model(TinyTransformer(), engine=FunctorchEngine(TinyTransformer(), lambda o, t: o))
    with pytest.raises(ValueError, match=r"'block.attn' \(MultiheadAttention\)"):
        validate_model(TinyTransformer(), engine="ghost")
    with pytest.raises(ValueError, match=r"'block.attn' \(MultiheadAttention\)"):
        validate_model(TinyTransformer(), engine=GhostEngine)
    with pytest.raises(ValueError, match="unknown gradient engine"):
        validate_model(MnistCNN(), engine="nope")
    with pytest.raises(TypeError):
        validate_model(MnistCNN(), engine=3)


def test_registry_is_extensible():
    class Mixer(nn.Module):
        def forward(self, x):
            return x - x.mean(0, keepdim=True)

    model = nn.Sequential(nn.Linear(2, 2), Mixer())
    validate_model(model)
    register_layer_check(Mixer, lambda m: "subtracts the batch mean" if m.training else None)
    try:
        with pytest.raises(ValueError, match=r"'1' \(Mixer\) subtracts the batch mean"):
            validate_model(model)
    finally:
        del LAYER_CHECKS[Mixer]
    with pytest.raises(TypeError):
        register_layer_check("BatchNorm", lambda m: None)


def _resnet_with_bn():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 12, 3, padding=1)
            self.bn = nn.BatchNorm2d(12)
            self.inner = nn.Sequential(nn.Conv2d(12, 6, 1), nn.BatchNorm2d(6, affine=False))
            self.head = nn.Linear(6, 2)
            self.bn1d = nn.BatchNorm1d(2)

        def forward(self, x):
            h = self.inner(torch.relu(self.bn(self.conv(x))))
            return self.bn1d(self.head(h.mean((2, 3))))

    return Block()


@settings(max_examples=6, deadline=None)
@given(num_groups=st.integers(1, 40))
def test_replace_batchnorm(num_groups):
    model = _resnet_with_bn()
    model.bn.weight.data.fill_(2.0)
    model.bn.bias.requires_grad_(False)
    out = replace_batchnorm(model, num_groups=num_groups)
    assert out is model
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    for m in (model.bn, model.inner[1], model.bn1d):
        assert isinstance(m, nn.GroupNorm) and m.num_channels % m.num_groups == 0
        assert m.num_groups <= num_groups
    assert torch.all(model.bn.weight == 2.0) and not model.bn.bias.requires_grad
    assert not model.inner[1].affine
    validate_model(model)
    x = torch.randn(3, 3, 5, 5)
    model(x)  # runs
    assert select_engine(model).name == "ghost"


def test_replace_batchnorm_on_a_bare_layer_and_bad_groups():
    gn = replace_batchnorm(nn.BatchNorm2d(6), num_groups=4)
    assert isinstance(gn, nn.GroupNorm) and gn.num_groups == 2
    with pytest.raises(ValueError):
        replace_batchnorm(nn.BatchNorm2d(6), num_groups=0)


def test_reference_models_validate():
    for m in (MnistCNN(), SmallResNet(), TinyTransformer()):
        validate_model(m)


# -- the finite-weights check run before every step ---------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", ["w", "b"])
def test_finite_weights_screen_catches_every_non_finite_value(bad, where):
    from pytorch_privacy.optimizer.validation import check_finite_weights, weights_total

    params = {"w": torch.randn(4, 3), "b": torch.randn(3)}
    assert math.isfinite(float(weights_total(params)))
    check_finite_weights(params)
    params[where][-1] = bad
    assert not math.isfinite(float(weights_total(params)))
    with pytest.raises(ValueError, match=rf"\['{where}'\] hold NaN or inf"):
        check_finite_weights(params)


def test_finite_weights_screen_opposite_infinities_and_overflow():
    from pytorch_privacy.optimizer.validation import check_finite_weights, weights_total

    # +inf and -inf in one tensor sum to NaN: still caught
    params = {"w": torch.tensor([1.0, float("inf"), float("-inf")])}
    with pytest.raises(ValueError, match="hold NaN or inf"):
        check_finite_weights(params)
    # finite weights whose sum overflows: the screen says "maybe", the element-wise pass clears them
    big = {"w": torch.full((4,), 3e38), "b": torch.ones(2, dtype=torch.float64)}
    assert not math.isfinite(float(weights_total(big)))
    check_finite_weights(big)
    # no floating-point parameter: nothing to check
    assert math.isfinite(float(weights_total({"steps": torch.zeros(2, dtype=torch.long)})))
