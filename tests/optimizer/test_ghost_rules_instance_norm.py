"""Ghost rule for nn.InstanceNorm1d/2d/3d (affine) against the naive per-example loop."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ._ghost_rule_check import check_ghost_against_naive

D = torch.float64
CLS = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}


class INet(nn.Module):
    def __init__(self, dim, c, size, track):
        super().__init__()
        self.norm = CLS[dim](c, affine=True, track_running_stats=track)
        self.head = nn.Linear(c * int(torch.tensor(size).prod()), 3)

    def forward(self, x):
        return self.head(torch.tanh(self.norm(x)).flatten(1))


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("track, train", [(False, True), (True, True), (True, False)])
@pytest.mark.parametrize("microbatch", [None, 2])
def test_instance_norm(dim, track, train, microbatch):
    torch.manual_seed(dim)
    c, size = 3, (5, 6, 7)[:dim]
    model = INet(dim, c, size, track).to(D)
    with torch.no_grad():
        model.norm.weight.normal_()
        model.norm.bias.normal_()
        if track:
            model.norm.running_mean.normal_()
            model.norm.running_var.uniform_(0.5, 2)
    model.train(train)
    x = 2 * torch.randn(4, c, *size, dtype=D) + 1
    check_ghost_against_naive(model, x, torch.randint(0, 3, (4,)), microbatch=microbatch)
