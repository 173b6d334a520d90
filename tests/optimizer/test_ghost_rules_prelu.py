"""Ghost rule for nn.PReLU against the naive per-example loop."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ._ghost_rule_check import check_ghost_against_naive

D = torch.float64


class PNet(nn.Module):
    def __init__(self, num_parameters, seq):
        super().__init__()
        self.seq = seq
        self.lin = nn.Linear(3, 4)
        self.act = nn.PReLU(num_parameters, init=0.3)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = self.lin(x)  # [B, L, 4] or [B, 4]
        if self.seq:
            h = self.act(h.transpose(1, 2)).transpose(1, 2).mean(1)  # channels at dim 1
        else:
            h = self.act(h)
        return self.head(h)


@pytest.mark.parametrize("num_parameters", [1, 4])
@pytest.mark.parametrize("seq", [False, True])
@pytest.mark.parametrize("microbatch", [None, 3])
def test_prelu(num_parameters, seq, microbatch):
    torch.manual_seed(num_parameters)
    model = PNet(num_parameters, seq).to(D)
    with torch.no_grad():
        model.act.weight.uniform_(-0.5, 0.5)
    x = torch.randn(6, 5, 3, dtype=D) if seq else torch.randn(6, 3, dtype=D)
    check_ghost_against_naive(model, x, torch.randint(0, 2, (6,)), microbatch=microbatch)


class SeqFirstPReLU(nn.Module):
    """A single-slope PReLU applied to a sequence-first ``[T, B, F]`` tensor."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.act = nn.PReLU(1, init=-0.4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = self.act(self.lin(x).transpose(0, 1)).transpose(0, 1)
        return self.head(h.mean(1))


def test_prelu_single_slope_sequence_first():
    torch.manual_seed(7)
    model = SeqFirstPReLU().to(D)
    x = torch.randn(6, 5, 3, dtype=D)
    check_ghost_against_naive(model, x, torch.randint(0, 2, (6,)), microbatch=2)
