"""Ghost rule for nn.ConvTranspose1d/2d/3d against the naive per-example loop."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pytorch_privacy.optimizer.engines import GhostEngine

from ._ghost_rule_check import check_ghost_against_naive

D = torch.float64
CLS = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


class TNet(nn.Module):
    def __init__(self, dim, c_in, c_out, groups, bias, size, output_size=None, **kw):
        super().__init__()
        self.conv = CLS[dim](c_in, c_out, groups=groups, bias=bias, **kw)
        self.output_size = output_size
        with torch.no_grad():
            n = self._conv(torch.zeros(1, c_in, *size)).numel()
        self.head = nn.Linear(n, 3)

    def _conv(self, x):
        if self.output_size is None:
            return self.conv(x)
        return self.conv(x, output_size=self.output_size)

    def forward(self, x):
        return self.head(torch.tanh(self._conv(x)).flatten(1))


CASES = [
    dict(kernel_size=3),
    dict(kernel_size=3, stride=2, padding=1, output_padding=1),
    dict(kernel_size=2, stride=3, dilation=2, padding=2, output_padding=2),
    dict(kernel_size=3, stride=2, dilation=2, output_padding=1),
]


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("kw", CASES)
@pytest.mark.parametrize("groups, bias", [(1, True), (2, False)])
def test_conv_transpose(dim, kw, groups, bias):
    torch.manual_seed(dim)
    size = (5, 6, 7)[:dim]
    c_in, c_out = 2 * groups, 3 * groups
    model = TNet(dim, c_in, c_out, groups, bias, size, **kw).to(D)
    x = torch.randn(4, c_in, *size, dtype=D)
    y = torch.randint(0, 3, (4,))
    check_ghost_against_naive(model, x, y, modes=("auto", "ghost", "materialize") if dim < 3 else ("auto",))
    check_ghost_against_naive(model, x, y, microbatch=2, modes=("ghost",))


def test_conv_transpose_called_with_output_size():
    torch.manual_seed(5)
    size = (5, 6)
    model = TNet(2, 2, 3, 1, True, size, output_size=(10, 12), kernel_size=3, stride=2, padding=1).to(D)
    x = torch.randn(4, 2, *size, dtype=D)
    assert model._conv(x).shape[2:] == (10, 12)  # output_padding (1, 1) chosen by torch
    check_ghost_against_naive(model, x, torch.randint(0, 3, (4,)))


def test_unsupported_padding_mode_is_named():
    m = nn.Sequential(nn.ConvTranspose1d(2, 2, 3))
    m[0].padding_mode = "reflect"  # torch refuses it at construction; a modified module
    assert "padding_mode" in GhostEngine.unsupported_reason(m)
