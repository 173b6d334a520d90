"""The ghost engine: agreement with functorch, norm routes, selection, hook hygiene, safety."""

from __future__ import annotations

import random
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from pytorch_privacy.optimizer.engines import (
    DPGRU,
    FunctorchEngine,
    GhostEngine,
    LoopEngine,
    NormPolicy,
    select_engine,
)
from pytorch_privacy.optimizer.engines.ghost_rules import (
    EmbeddingContribution,
    OuterContribution,
    sum_sq_norms,
)
from ..reference_models import MnistCNN, SmallResNet, TextClassifier, TinyTransformer

from .engine_cases import build, ce, naive_per_example

TOL = dict(rtol=1e-5, atol=1e-5)
GHOST_CASES = [
    "linear", "linear_seq", "conv1d", "conv2d", "embedding", "tied", "shared_module", "lora",
    "buffer", "tuple_input", "dict_input", "dprnn", "dpgru", "dplstm", "eval_bn", "rmsnorm", "dpmha", "tiny_lm",
]


def _assert_same(a, b):
    torch.testing.assert_close(a.norms(), b.norms(), **TOL)
    c = torch.rand(a.num_records, dtype=a.norms().dtype)
    wa, wb = a.weighted_sum(c), b.weighted_sum(c)
    assert set(wa) == set(wb)
    for n in wa:
        torch.testing.assert_close(wa[n], wb[n], **TOL)
        for pe in (a, b):  # one parameter's sum formed alone (FSDP2's bucketed release), as in the whole
            assert pe.streams_by_name
            only = pe.weighted_sum_of(c, (n,))
            assert list(only) == [n]
            torch.testing.assert_close(only[n], wb[n], **TOL)
    ma, mb = a.materialize(), b.materialize()
    for n in ma:
        torch.testing.assert_close(ma[n], mb[n], **TOL)


@pytest.mark.parametrize("mode", ["auto", "ghost", "materialize"])
@settings(max_examples=12, deadline=None)
@given(
    case=st.sampled_from(GHOST_CASES),
    B=st.integers(1, 6),
    mb_pick=st.integers(0, 5),
    seed=st.integers(0, 2**16),
)
def test_ghost_equals_functorch(mode, case, B, mb_pick, seed):
    divisors = [None] + [b for b in range(1, B + 1) if B % b == 0]
    mb = divisors[mb_pick % len(divisors)]
    model, x, y, loss_fn = build(case, random.Random(seed), B)
    ghost = GhostEngine(model, loss_fn, norm_mode=mode).compute(x, y, microbatch_size=mb)
    ref = FunctorchEngine(model, loss_fn).compute(x, y, microbatch_size=mb)
    _assert_same(ghost, ref)
    torch.testing.assert_close(ghost.losses, ref.losses, **TOL)


def test_norms_then_weighted_sum_in_either_order():
    model, x, y, loss_fn = build("tied", random.Random(2), 4)
    ref = FunctorchEngine(model, loss_fn).compute(x, y)
    c = torch.rand(4, dtype=torch.float64)
    g = GhostEngine(model, loss_fn).compute(x, y)
    ws = g.weighted_sum(c)  # before norms(): from contributions
    g.norms()
    ws2 = g.weighted_sum(c)  # after norms(): possibly from the cache
    for n in ws:
        torch.testing.assert_close(ws[n], ref.weighted_sum(c)[n], **TOL)
        torch.testing.assert_close(ws2[n], ws[n], **TOL)


def test_tied_embedding_cross_term_route_matches_materialised():
    # an embedding tied with an output projection: exact cross term without [R, V, d]
    g = torch.Generator().manual_seed(0)
    R, N1, N2, V, d = 3, 4, 5, 7, 2
    ids = torch.randint(0, V, (R, N1), generator=g)
    e = EmbeddingContribution(ids, torch.randn(R, N1, d, generator=g, dtype=torch.float64), V, torch.Size([V, d]))
    o = OuterContribution(
        torch.randn(R, 1, N2, V, generator=g, dtype=torch.float64),
        torch.randn(R, 1, N2, d, generator=g, dtype=torch.float64),
        torch.Size([V, d]),
    )
    dense = (e.materialize() + o.materialize()).reshape(R, -1).pow(2).sum(1)
    sq_ghost, mat, _ = sum_sq_norms([e, o], NormPolicy("ghost"))
    assert mat is None  # the cross-term route was taken
    torch.testing.assert_close(sq_ghost, dense)
    sq_mat, mat, _ = sum_sq_norms([e, o], NormPolicy("materialize"))
    assert mat is not None
    torch.testing.assert_close(sq_mat, dense)


@settings(max_examples=10, deadline=None)
@given(
    R=st.integers(1, 3), N=st.integers(1, 6), p=st.integers(1, 4), d=st.integers(1, 4), G=st.integers(1, 2),
    seed=st.integers(0, 2**16),
)
def test_outer_contribution_ghost_norm_equals_materialised(R, N, p, d, G, seed):
    g = torch.Generator().manual_seed(seed)
    c = OuterContribution(
        torch.randn(R, G, N, p, generator=g, dtype=torch.float64),
        torch.randn(R, G, N, d, generator=g, dtype=torch.float64),
        torch.Size([G * p, d]),
    )
    mat = c.materialize()
    expect = mat.reshape(R, -1).pow(2).sum(1)
    for mode in ("ghost", "materialize", "auto"):
        torch.testing.assert_close(c.sq_norms(NormPolicy(mode))[0], expect)
    coef = torch.rand(R, generator=g, dtype=torch.float64)
    torch.testing.assert_close(c.weighted_sum(coef), torch.tensordot(coef, mat, dims=1))


@settings(max_examples=10, deadline=None)
@given(R=st.integers(1, 4), N=st.integers(1, 8), V=st.integers(1, 5), d=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_embedding_sorted_segment_norm(R, N, V, d, seed):
    g = torch.Generator().manual_seed(seed)
    e = EmbeddingContribution(
        torch.randint(0, V, (R, N), generator=g),
        torch.randn(R, N, d, generator=g, dtype=torch.float64),
        V,
        torch.Size([V, d]),
    )
    torch.testing.assert_close(e.sq_norms(NormPolicy())[0], e.materialize().reshape(R, -1).pow(2).sum(1))


def test_norm_policy_picks_by_cost():
    pol = NormPolicy("auto", memory_budget_bytes=2**30)
    assert pol.use_ghost(256, 1, 1, 32, 512, 4)  # no sequence: ghost (||g|| ||a||)
    assert not pol.use_ghost(256, 1, 196, 16, 64, 4)  # MNIST conv1: long T, small layer: materialise
    assert pol.use_ghost(8, 1, 16, 4096, 4096, 4)  # short T, big layer: ghost
    assert not pol.use_ghost(256, 1, 64, 1024, 1024, 4)  # materialising is cheaper and fits 1 GiB
    assert NormPolicy("auto").use_ghost(256, 1, 64, 1024, 1024, 4)  # ...but not 256 MiB: ghost
    with pytest.raises(ValueError):
        NormPolicy("fast")


# ------------------------------------------------------------------------------------------
# selection
# ------------------------------------------------------------------------------------------


def test_auto_selection():
    assert select_engine(MnistCNN()).name == "ghost"
    assert select_engine(SmallResNet()).name == "ghost"
    assert select_engine(TextClassifier(rnn="gru", dp_layers=True)).name == "ghost"
    assert select_engine(TinyTransformer()).name == "functorch"  # nn.MultiheadAttention
    assert select_engine(TinyTransformer(dp_attention=True, lm_head=True)).name == "ghost"
    assert select_engine(TextClassifier(rnn="lstm")).name == "functorch"  # float32 LSTM vmaps
    assert select_engine(TextClassifier(rnn="gru")).name == "loop"
    assert select_engine(TextClassifier(rnn="rnn")).name == "loop"
    frozen_attn = TinyTransformer()
    frozen_attn.block.attn.requires_grad_(False)
    assert select_engine(frozen_attn).name == "ghost"  # frozen unsupported layers do not block ghost


def test_unsupported_reason_names_the_module():
    why = GhostEngine.unsupported_reason(TinyTransformer())
    assert "block.attn" in why and "MultiheadAttention" in why
    with pytest.raises(ValueError, match="block.attn"):
        select_engine(TinyTransformer(), "ghost")
    m = nn.Sequential(nn.Linear(2, 2), nn.Embedding(3, 2, max_norm=1.0))
    assert "max_norm" in GhostEngine.unsupported_reason(m)
    bn = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    assert "training mode" in GhostEngine.unsupported_reason(bn)
    bn.eval()
    assert GhostEngine.unsupported_reason(bn) is None

    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(2))
            self.fc = nn.Linear(2, 2)

        def forward(self, x):
            return self.fc(x) * self.scale

    # a raw parameter in a user module: its elementwise uses are tapped (tests/optimizer/test_probe.py)
    assert GhostEngine.unsupported_reason(Custom()) is None

    class MyLinear(nn.Linear):  # overrides forward: not trusted
        def forward(self, x):
            return super().forward(x) * 2

    assert "MyLinear" in GhostEngine.unsupported_reason(nn.Sequential(MyLinear(2, 2)))


def test_model_switched_to_training_bn_after_selection_is_rejected():
    model, x, y, loss_fn = build("eval_bn", random.Random(0), 3)
    eng = GhostEngine(model, loss_fn)
    eng.compute(x, y)
    model.bn.train()
    with pytest.raises(ValueError, match="bn"):
        eng.compute(x, y)
    _assert_no_hooks(model)


# ------------------------------------------------------------------------------------------
# hooks and parameters are left alone
# ------------------------------------------------------------------------------------------


def _assert_no_hooks(model):
    for name, m in model.named_modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, f"hook left on {name!r}"
        assert not m._backward_hooks, f"backward hook left on {name!r}"


def test_hooks_removed_after_compute_and_parameters_untouched():
    model, x, y, loss_fn = build("tied", random.Random(0), 3)
    before = {n: (dict(vars(p)), p.requires_grad) for n, p in model.named_parameters()}
    GhostEngine(model, loss_fn).compute(x, y).norms()
    _assert_no_hooks(model)
    for n, p in model.named_parameters():
        assert (dict(vars(p)), p.requires_grad) == before[n]
        assert p.grad is None


def test_hooks_removed_when_loss_raises():
    model, x, y, _ = build("conv2d", random.Random(0), 3)

    def bad_loss(out, target):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        GhostEngine(model, bad_loss).compute(x, y)
    _assert_no_hooks(model)


def test_hooks_removed_when_forward_raises():
    model, x, y, loss_fn = build("linear", random.Random(0), 3)
    with pytest.raises(RuntimeError):
        GhostEngine(model, loss_fn).compute(x[:, :0] if x.shape[1] > 0 else x.reshape(3, 0), y)
    _assert_no_hooks(model)


def test_existing_user_hooks_are_kept():
    model, x, y, loss_fn = build("linear", random.Random(0), 3)
    seen = []
    h = model[0].register_forward_hook(lambda m, a, o: seen.append(o.shape))
    GhostEngine(model, loss_fn).compute(x, y)
    assert seen and len(model[0]._forward_hooks) == 1
    h.remove()


def test_inplace_op_after_hooked_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 2)).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,))
    eng = GhostEngine(model, ce)
    _assert_same(eng.compute(x, y), FunctorchEngine(model, ce).compute(x, y))
    assert eng._tap.__name__ == "CopyTap"  # switched to copying taps, and stays there
    _assert_same(eng.compute(x, y), FunctorchEngine(model, ce).compute(x, y))
    _assert_no_hooks(model)
    plain = GhostEngine(nn.Sequential(nn.Linear(3, 2)).double(), ce)
    plain.compute(x, y)
    assert plain._tap.__name__ == "Tap"  # views (no copy) otherwise


# ------------------------------------------------------------------------------------------
# safety nets
# ------------------------------------------------------------------------------------------


def test_parameter_used_outside_its_module_falls_back():
    model, x, y, loss_fn = build("tied_functional", random.Random(0), 3)
    assert GhostEngine.unsupported_reason(model) is None  # invisible statically
    eng = GhostEngine(model, loss_fn)
    with pytest.warns(RuntimeWarning, match="emb.weight"):
        res = eng.compute(x, y)
    assert isinstance(eng.fallback, FunctorchEngine)
    ref = naive_per_example(model, loss_fn, x, y)
    torch.testing.assert_close(res.materialize()["emb.weight"], ref["emb.weight"], **TOL)
    _assert_no_hooks(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        eng.compute(x, y)  # warns once, then stays on the fallback


def test_parameter_used_outside_falls_back_to_loop_when_functorch_cannot():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)
            self.gru = nn.GRU(2, 2, batch_first=True).requires_grad_(False)

        def forward(self, x):
            h = self.gru(x)[0][:, -1]
            return self.fc(h) + F.linear(h, self.fc.weight)

    model = M().double()
    x, y = torch.randn(3, 4, 2, dtype=torch.float64), torch.randint(0, 2, (3,))
    eng = GhostEngine(model, ce)
    with pytest.warns(RuntimeWarning, match="'loop'"):
        res = eng.compute(x, y)
    assert isinstance(eng.fallback, LoopEngine)
    torch.testing.assert_close(res.materialize()["fc.weight"], naive_per_example(model, ce, x, y)["fc.weight"])


def test_reshaped_activation_falls_back():
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def forward(self, x):  # [B, T, 2] -> [B*T, 2]: the layer does not see the batch first
            B, T, _ = x.shape
            return self.fc(x.reshape(B * T, 2)).reshape(B, T, 2).sum(1)

    model = Flat().double()
    x, y = torch.randn(3, 4, 2, dtype=torch.float64), torch.randint(0, 2, (3,))
    eng = GhostEngine(model, ce)
    with pytest.warns(RuntimeWarning, match=r"input of module 'fc' has shape \(12, 2\) for a batch of 3.*merged"):
        res = eng.compute(x, y)
    assert isinstance(eng.fallback, FunctorchEngine)
    torch.testing.assert_close(res.materialize()["fc.weight"], naive_per_example(model, ce, x, y)["fc.weight"])
    _assert_no_hooks(model)
    # a rule given a non-batch-first tensor refuses too (defence in depth)
    from pytorch_privacy.optimizer.engines.ghost_rules import LinearRule

    with pytest.raises(ValueError, match="batch-first"):
        LinearRule().contributions(model.fc, torch.zeros(12, 2), torch.zeros(12, 2), 3, 1, frozenset({"weight"}))


def test_unused_layer_gets_zero_gradient():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(2, 2), nn.Linear(2, 2)

        def forward(self, x):
            return self.used(x)

    model = M().double()
    x, y = torch.randn(3, 2, dtype=torch.float64), torch.randint(0, 2, (3,))
    res = GhostEngine(model, ce).compute(x, y)
    assert torch.equal(res.materialize()["unused.weight"], torch.zeros(3, 2, 2, dtype=torch.float64))
    _assert_same(res, FunctorchEngine(model, ce).compute(x, y))


def test_dp_recurrent_layers_match_torch():
    for cls, dp in ((nn.GRU, DPGRU),):
        for bf in (False, True):
            torch.manual_seed(0)
            ref = cls(3, 4, num_layers=2, bidirectional=True, batch_first=bf).double()
            new = dp.from_torch(ref)
            x = torch.randn(5, 2, 3, dtype=torch.float64)
            h0 = torch.randn(4, 5 if bf else 2, 4, dtype=torch.float64)
            (o1, h1), (o2, h2) = ref(x, h0), new(x, h0)
            torch.testing.assert_close(o1, o2)
            torch.testing.assert_close(h1, h2)
            sd = new.to_torch_state_dict()
            assert all(torch.equal(sd[k], v) for k, v in ref.state_dict().items())


def test_dplstm_and_dprnn_match_torch_unbatched_and_batched():
    from pytorch_privacy.optimizer.engines import DPLSTM, DPRNN

    torch.manual_seed(0)
    lstm = nn.LSTM(3, 4, batch_first=True).double()
    dl = DPLSTM.from_torch(lstm)
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    (o1, (h1, c1)), (o2, (h2, c2)) = lstm(x), dl(x)
    for a, b in ((o1, o2), (h1, h2), (c1, c2)):
        torch.testing.assert_close(a, b)
    rnn = nn.RNN(3, 4, nonlinearity="relu").double()
    dr = DPRNN.from_torch(rnn)
    xu = torch.randn(5, 3, dtype=torch.float64)  # unbatched
    torch.testing.assert_close(rnn(xu)[0], dr(xu)[0])
    torch.testing.assert_close(rnn(xu)[1], dr(xu)[1])


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["auto", "ghost", "materialize"])
def test_ghost_equals_functorch_on_cuda(mode, monkeypatch):
    # TF32 convolutions round differently in the two engines' kernels: compare in true float32
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = MnistCNN().to(dev)
    x, y = torch.randn(16, 1, 28, 28, device=dev), torch.randint(0, 10, (16,), device=dev)
    for mb in (None, 4):
        a = GhostEngine(model, ce, norm_mode=mode).compute(x, y, microbatch_size=mb)
        b = FunctorchEngine(model, ce).compute(x, y, microbatch_size=mb)
        torch.testing.assert_close(a.norms(), b.norms(), rtol=1e-4, atol=1e-5)
        c = torch.rand(a.num_records, device=dev)
        wa, wb = a.weighted_sum(c), b.weighted_sum(c)
        for n in wa:
            torch.testing.assert_close(wa[n], wb[n], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["ghost", "materialize"])
def test_zero_coefficient_silences_a_non_finite_record(mode):
    # batch 7: no spatial size equals the batch, so the ghost path itself runs (no fallback)
    model, x, y, loss_fn = build("conv2d", random.Random(4), 7)
    x = x.clone()
    x[1] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        res = GhostEngine(model, loss_fn, norm_mode=mode).compute(x, y)
    norms = res.norms()
    keep = [0, 2, 3, 4, 5, 6]
    assert torch.isnan(norms[1]) and torch.isfinite(norms[keep]).all()  # records stay separate
    c = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.25, 1.0, 0.75], dtype=torch.float64)
    ws = res.weighted_sum(c)
    ref = naive_per_example(model, loss_fn, x[keep], y[keep])
    for n in ws:
        assert torch.isfinite(ws[n]).all()
        torch.testing.assert_close(ws[n], torch.tensordot(c[keep], ref[n], dims=1), **TOL)


@pytest.mark.parametrize("batch_first", [False, True])
def test_dp_multihead_attention_matches_torch(batch_first):
    from pytorch_privacy.optimizer.engines import DPMultiheadAttention

    torch.manual_seed(0)
    for kdim in (None, 3):
        ref = nn.MultiheadAttention(8, 2, batch_first=batch_first, kdim=kdim, vdim=kdim).double()
        new = DPMultiheadAttention.from_torch(ref)
        B, T, S = 3, 4, 5
        shape = lambda n, e: (B, n, e) if batch_first else (n, B, e)  # noqa: E731
        q = torch.randn(shape(T, 8), dtype=torch.float64)
        k, v = (torch.randn(shape(S, kdim or 8), dtype=torch.float64) for _ in range(2))
        kpm = torch.zeros(B, S, dtype=torch.bool)
        kpm[0, -2:] = True
        am = torch.rand(T, S) > 0.7
        am[:, 0] = False
        for kw in ({}, {"key_padding_mask": kpm}, {"attn_mask": am}, {"attn_mask": torch.randn(T, S, dtype=torch.float64)},
                   {"key_padding_mask": kpm, "attn_mask": am, "average_attn_weights": False}, {"need_weights": False}):
            (o1, w1), (o2, w2) = ref(q, k, v, **kw), new(q, k, v, **kw)
            torch.testing.assert_close(o1, o2)
            if w1 is not None:
                torch.testing.assert_close(w1, w2)
    x = torch.randn(T, 8, dtype=torch.float64)
    causal = torch.ones(T, T, dtype=torch.bool).triu(1)
    new8 = DPMultiheadAttention.from_torch(nn.MultiheadAttention(8, 2).double())
    torch.testing.assert_close(new8(x, x, x, is_causal=True)[0], new8(x, x, x, attn_mask=causal)[0])
    with pytest.raises(ValueError):
        DPMultiheadAttention(8, 2, add_bias_kv=True)


# -- book-keeping contractions and shared row norms -------------------------------------------
@pytest.mark.parametrize("positions", [1, 3])
def test_one_group_contraction_equals_the_per_record_sum(positions):
    g0 = torch.Generator().manual_seed(2)
    R, N, p, d = 5, positions, 4, 3
    g, a = torch.randn(R, 1, N, p, generator=g0), torch.randn(R, 1, N, d, generator=g0)
    c = torch.rand(R, generator=g0)
    contrib = OuterContribution(g, a, torch.Size([p, d]))
    ref = sum(c[r] * g[r, 0].t().double() @ a[r, 0].double() for r in range(R))
    for mask in (False, True):
        torch.testing.assert_close(contrib.weighted_sum(c, mask).double(), ref, rtol=1e-5, atol=1e-6)


def test_linear_bias_norms_reuse_the_weights_row_norms_only_for_the_same_data():
    from pytorch_privacy.optimizer.engines.ghost_rules import DirectContribution, NormPolicy

    g0 = torch.Generator().manual_seed(6)
    R, p, d = 9, 5, 4
    g, a = torch.randn(R, 1, 1, p, generator=g0), torch.randn(R, 1, 1, d, generator=g0)
    w = OuterContribution(g, a, torch.Size([p, d]))
    linked = DirectContribution(g.reshape(R, p), torch.Size([p]), rows_of=w)
    other = DirectContribution(g.reshape(R, p).clone() * 2, torch.Size([p]), rows_of=w)  # not g: not linked
    ref = (g.reshape(R, p).double() ** 2).sum(1)
    torch.testing.assert_close(linked.sq_norms(NormPolicy())[0].double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(other.sq_norms(NormPolicy())[0].double(), 4 * ref, rtol=1e-5, atol=1e-6)
    assert linked.sq_norms(NormPolicy())[0].shape == (R,)
    wsq = w.sq_norms(NormPolicy())[0].double()
    torch.testing.assert_close(wsq, ref * (a.reshape(R, d).double() ** 2).sum(1), rtol=1e-5, atol=1e-6)
