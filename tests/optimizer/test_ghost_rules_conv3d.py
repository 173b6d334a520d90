"""Ghost rule for nn.Conv3d against the naive per-example loop."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ._ghost_rule_check import check_ghost_against_naive

D = torch.float64


class Conv3dNet(nn.Module):
    def __init__(self, c, groups, bias, size, **kw):
        super().__init__()
        self.conv = nn.Conv3d(c, 2 * groups, bias=bias, groups=groups, **kw)
        with torch.no_grad():
            n = self.conv(torch.zeros(1, c, *size)).numel()
        self.head = nn.Linear(n, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).flatten(1))


@pytest.mark.parametrize(
    "kw",
    [
        dict(kernel_size=2),
        dict(kernel_size=(2, 3, 1), stride=(2, 1, 2), padding=(1, 0, 1)),
        dict(kernel_size=3, dilation=(1, 2, 1), padding=1),
        dict(kernel_size=3, padding="same", padding_mode="reflect"),
        dict(kernel_size=2, padding=1, padding_mode="circular", stride=2),
    ],
)
@pytest.mark.parametrize("groups, bias, microbatch", [(1, True, None), (2, False, 2)])
def test_conv3d(kw, groups, bias, microbatch):
    torch.manual_seed(0)
    c, size = 2 * groups, (5, 6, 7)
    model = Conv3dNet(c, groups, bias, size, **kw).to(D)
    x = torch.randn(4, c, *size, dtype=D)
    y = torch.randint(0, 3, (4,))
    check_ghost_against_naive(model, x, y, microbatch=microbatch)
