"""The graphed engine (``engines/graphed_engine.py``): the same results as the eager functorch
engine at every batch size, padded and dropped records adding exactly zero, passes held at once
kept apart, graphs captured again when the parameters move.  On the CPU the engine runs its
static-buffer code eagerly; the ``gpu`` tests replay real CUDA graphs.  The engine matrix
(``test_engines.py``) also covers it on every model case."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pytorch_privacy.dp_query import PrivacyLedger
from pytorch_privacy.optimizer import DPGaussianOptimizer
from pytorch_privacy.optimizer.engines import FunctorchEngine, GraphedEngine, bucket_size


def ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


def mlp(seed=0, device="cpu"):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.LayerNorm(8), nn.Linear(8, 3)).to(device)


def batch(n, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g).to(device), torch.randint(0, 3, (n,), generator=g).to(device)


def _same_sums(a, b, coef, **tol):
    sa, sb = a.weighted_sum(coef), b.weighted_sum(coef)
    assert sa.keys() == sb.keys()
    for n in sa:
        torch.testing.assert_close(sa[n], sb[n], **tol)


def _train(engine, sizes, device="cpu", nan_at=None, seed=0):
    """Steps of DPGaussianOptimizer (noise on, one seeded generator) on batches of ``sizes``."""
    model = mlp(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    ledger = PrivacyLedger(1000, 0.01)
    opt = DPGaussianOptimizer(torch.optim.SGD(model.parameters(), lr=0.3), model, ce, 0.7, 1.3,
                              expected_batch_size=8, engine=engine, generator=gen, ledger=ledger)
    losses = []
    for i, n in enumerate(sizes):
        x, y = batch(n, seed=10 + i, device=device)
        if nan_at is not None and n > nan_at:
            x[nan_at] = float("nan")
        losses.append(opt.fit_batch(x, y))
    return [p.detach().clone() for p in model.parameters()], losses, opt, ledger


SIZES = [5, 9, 7, 9, 0, 12, 3, 8]  # padded to 8, 10, 8, 10, -, 12, 8, 8


def test_steps_equal_the_functorch_engine_at_every_batch_size():
    ref, ref_losses, _, ref_ledger = _train("functorch", SIZES)
    got, losses, opt, ledger = _train("graphed", SIZES)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.stack(losses), torch.stack(ref_losses))
    assert len(ledger) == len(ref_ledger) == len(SIZES)
    # one slot per padded size, not per batch size
    assert len(opt._engine(ce)._slots) == len({bucket_size(n) for n in SIZES if n})


def test_a_non_finite_record_is_dropped_and_its_padding_adds_nothing():
    """Record 0 is NaN, so the padded rows (copies of record 0) are NaN too: the sums are those of
    the other records, exactly, and the optimizer counts one dropped record per step."""
    model = mlp()
    x, y = batch(7)
    x[0] = float("nan")
    g = GraphedEngine(model, ce).compute(x, y)  # 7 records padded to 8
    ref = FunctorchEngine(model, ce).compute(x[1:], y[1:])
    assert torch.isnan(g.norms()[0]) and torch.isfinite(g.norms()[1:]).all()
    coef = torch.rand(7)
    coef[0] = 0.0
    sums = g.weighted_sum(coef)
    assert all(torch.isfinite(s).all() for s in sums.values())
    ref_sums = ref.weighted_sum(coef[1:])
    for n in sums:
        torch.testing.assert_close(sums[n], ref_sums[n])

    with pytest.warns(RuntimeWarning, match="non-finite"):
        ref_params, _, _, _ = _train("functorch", [7, 7], nan_at=0)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        got, _, opt, _ = _train("graphed", [7, 7], nan_at=0)
    assert opt.dropped_records == 2
    for a, b in zip(got, ref_params):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_two_passes_held_at_once_keep_their_own_gradients():
    """A second pass of the same padded size replays into the same buffers: the first pass, still
    held, is copied out first (GAN-style steps hold several)."""
    model = mlp()
    eng, ref = GraphedEngine(model, ce), FunctorchEngine(model, ce)
    (x1, y1), (x2, y2) = batch(6, seed=1), batch(5, seed=2)  # both padded to 8
    a, b = eng.compute(x1, y1), eng.compute(x2, y2)
    ra, rb = ref.compute(x1, y1), ref.compute(x2, y2)
    torch.testing.assert_close(a.norms(), ra.norms())
    torch.testing.assert_close(b.norms(), rb.norms())
    _same_sums(a, ra, torch.rand(6))
    _same_sums(b, rb, torch.rand(5))
    for n, m in a.materialize().items():
        torch.testing.assert_close(m, ra.materialize()[n])

    # the same through the optimizer's multi-pass API (joint clipping of two passes)
    results = []
    for engine in ("functorch", "graphed"):
        model = mlp()
        opt = DPGaussianOptimizer(torch.optim.SGD(model.parameters(), lr=0.3), model, ce, 0.5, 0.0,
                                  expected_batch_size=6, engine=engine)
        for _ in range(2):
            opt.zero_grad()
            opt.backward_pass(x1, y1)
            opt.backward_pass(x1, torch.roll(y1, 1))
            opt.step()
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_parameters_that_move_are_captured_again():
    model = mlp()
    eng = GraphedEngine(model, ce)
    x, y = batch(6)
    eng.compute(x, y)
    first = next(iter(eng._slots.values()))
    with torch.no_grad():
        model[0].weight.data = model[0].weight.data.clone() * 2  # new storage, new values
    got = eng.compute(x, y)
    assert next(iter(eng._slots.values())) is not first
    ref = FunctorchEngine(model, ce).compute(x, y)
    torch.testing.assert_close(got.norms(), ref.norms())
    _same_sums(got, ref, torch.rand(6))


def test_parameters_moving_at_every_step_are_named_once():
    model = mlp()
    eng = GraphedEngine(model, ce)
    x, y = batch(6)
    eng.compute(x, y)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(5):
            with torch.no_grad():
                model[0].weight.data = model[0].weight.data.clone()
            eng.compute(x, y)
    moved = [w for w in caught if "moved in memory 3 times" in str(w.message)]
    assert len(moved) == 1 and "engine='functorch'" in str(moved[0].message)


def test_microbatches_equal_the_functorch_engine():
    model = mlp()
    x, y = batch(12)
    got = GraphedEngine(model, ce).compute(x, y, microbatch_size=3)  # 4 records padded to 8
    ref = FunctorchEngine(model, ce).compute(x, y, microbatch_size=3)
    assert got.num_records == 4 and got.losses.shape == (12,)
    torch.testing.assert_close(got.norms(), ref.norms())
    torch.testing.assert_close(got.losses, ref.losses)
    _same_sums(got, ref, torch.rand(4))


def test_train_and_eval_modes_get_their_own_graphs():
    """``self.training`` is read in ``forward`` (dropout here): a graph captured in train mode
    would keep dropping units in eval mode, so the mode is part of the graph's key."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.5), nn.Linear(8, 3))
    eng = GraphedEngine(model, ce)
    x, y = batch(6)
    eng.compute(x, y)
    model.eval()
    got = eng.compute(x, y)
    assert len(eng._slots) == 2
    ref = FunctorchEngine(model, ce).compute(x, y)  # eval: deterministic
    torch.testing.assert_close(got.norms(), ref.norms())
    model.train()
    eng.compute(x, y)
    assert len(eng._slots) == 2


class ScaledInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 3)

    def forward(self, x, scale):
        return self.lin(x) * scale


def test_an_input_without_a_batch_dimension_runs_eagerly_with_a_warning():
    torch.manual_seed(0)
    model = ScaledInput()
    x, y = batch(5)
    inputs = (x, 2.0)  # a Python number: not a tensor with the batch as its leading dimension
    with pytest.warns(RuntimeWarning, match="graphed engine: an input or target"):
        got = GraphedEngine(model, ce).compute(inputs, y)
    ref = FunctorchEngine(model, ce).compute(inputs, y)
    torch.testing.assert_close(got.norms(), ref.norms())


# -------------------------------------------------------------------------------- CUDA graphs


@pytest.mark.gpu
def test_cuda_graph_steps_equal_the_functorch_engine():
    """Real CUDA graphs: steps at several padded sizes, a NaN record and an empty batch give the
    functorch engine's parameters (same noise from the same CUDA generator), and the slots did
    capture."""
    sizes = SIZES + [7, 9]
    ref, _, _, _ = _train("functorch", sizes, device="cuda", nan_at=2)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "graphed engine", RuntimeWarning)  # no fallback to the eager path
        got, _, opt, _ = _train("graphed", sizes, device="cuda", nan_at=2)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    slots = opt._engine(ce)._slots.values()
    assert slots and all(s.capture for s in slots)


@pytest.mark.gpu
def test_cuda_graph_passes_held_at_once_and_moved_parameters():
    model = mlp(device="cuda")
    eng, ref = GraphedEngine(model, ce), FunctorchEngine(model, ce)
    (x1, y1), (x2, y2) = batch(6, seed=1, device="cuda"), batch(5, seed=2, device="cuda")
    a, b = eng.compute(x1, y1), eng.compute(x2, y2)
    c1 = torch.rand(6, device="cuda")
    _same_sums(a, ref.compute(x1, y1), c1, rtol=1e-4, atol=1e-6)
    _same_sums(b, ref.compute(x2, y2), torch.rand(5, device="cuda"), rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        model[0].weight.data = model[0].weight.data.clone() * 2
    got = eng.compute(x1, y1)
    _same_sums(got, ref.compute(x1, y1), c1, rtol=1e-4, atol=1e-6)
