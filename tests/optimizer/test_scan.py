"""``engines/scan.py``: one walk of the module tree gives what ``nn.Module``'s iterators give, and
its signature changes whenever what the engines cache depends on changes; the ghost engine's
cached hooks follow the model."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pytorch_privacy.optimizer.engines import FunctorchEngine, GhostEngine
from pytorch_privacy.optimizer.engines.scan import scan_model


class Tricky(nn.Module):
    """Tied parameters, a shared module, a frozen parameter, a None bias and a None buffer,
    persistent and non-persistent buffers."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 4)
        self.head = nn.Linear(4, 5, bias=False)
        self.head.weight = self.emb.weight  # tied
        self.block = nn.Linear(4, 4)
        self.again = self.block  # shared module
        self.frozen = nn.Linear(4, 4)
        self.frozen.weight.requires_grad_(False)
        self.nobias = nn.Linear(4, 4, bias=False)
        self.register_buffer("scale", torch.ones(4))
        self.register_buffer("tmp", torch.zeros(1), persistent=False)
        self.register_buffer("missing", None)
        self.bn = nn.BatchNorm1d(4)


def test_scan_equals_module_iterators():
    m = Tricky()
    s = scan_model(m)
    assert list(s.trainable) == [n for n, p in m.named_parameters() if p.requires_grad]
    assert list(s.frozen) == [n for n, p in m.named_parameters() if not p.requires_grad] == ["frozen.weight"]
    assert list(s.buffers) == [n for n, _ in m.named_buffers()]
    assert all(s.trainable[n] is p for n, p in m.named_parameters() if p.requires_grad)
    assert [n for n, _ in s.modules] == [n for n, _ in m.named_modules()]
    assert "head.weight" not in s.trainable and "again.weight" not in s.trainable  # once each


def test_signature_changes_with_what_the_caches_depend_on():
    m = Tricky()
    base = scan_model(m).signature
    assert scan_model(m).signature == base
    m.eval()
    assert scan_model(m).signature != base
    m.train()
    m.frozen.weight.requires_grad_(True)
    assert scan_model(m).signature != base
    m.frozen.weight.requires_grad_(False)
    assert scan_model(m).signature == base
    m.block.weight = nn.Parameter(m.block.weight.detach().clone())  # a new parameter object
    assert scan_model(m).signature != base
    m2 = Tricky()
    before = scan_model(m2).signature
    m2.extra = nn.Linear(2, 2)
    assert scan_model(m2).signature != before


def ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


def test_ghost_engine_follows_model_changes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    eng = GhostEngine(model, ce)
    x, y = torch.randn(5, 3), torch.randint(0, 2, (5,))

    def check():
        got, ref = eng.compute(x, y), FunctorchEngine(model, ce).compute(x, y)
        assert got.names == ref.names
        torch.testing.assert_close(got.norms(), ref.norms())

    check()
    model[0].weight.requires_grad_(False)  # frozen after the first step
    check()
    model[0].weight.requires_grad_(True)
    model[2] = nn.Linear(4, 2)  # replaced layer: the cached hooks must not point at the old one
    check()
    model.append(nn.Linear(2, 2))  # a new layer
    check()
