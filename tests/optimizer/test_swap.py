"""swap_to_dp_layers: same function, torch state_dict keys both ways, and exact per-example
gradients under the ghost engine (against a naive autograd loop on the *original* model)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pytorch_privacy.optimizer.engines import (
    DPGRU,
    DPLSTM,
    DPRNN,
    DPMultiheadAttention,
    GhostEngine,
    GhostGradients,
    swap_to_dp_layers,
)

from .engine_cases import naive_per_example

D = torch.float64


def ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


class RNNClassifier(nn.Module):
    def __init__(self, cls, batch_first=True, **kw):
        super().__init__()
        self.batch_first = batch_first
        self.rnn = cls(3, 4, batch_first=batch_first, **kw)
        width = 4 * (2 if kw.get("bidirectional") else 1)
        self.head = nn.Linear(width, 2)

    def forward(self, x):
        out, _ = self.rnn(x if self.batch_first else x.transpose(0, 1))
        out = out if self.batch_first else out.transpose(0, 1)
        return self.head(out[:, -1])


def _native_names(swapped: nn.Module, prefix: str) -> dict[str, str]:
    """own parameter name -> torch's name, for one swapped recurrent module (no stacking)."""
    mod = swapped.get_submodule(prefix)
    return {f"{prefix}.{own[0]}": f"{prefix}.{tn}" for tn, own in mod._name_map()}


def _check_ghost_equals_naive(orig, swapped, x, y, rename, microbatch=None):
    """norms, clipped sums (C between the norms) and per-record gradients of the swapped model
    under ghost equal the naive loop on the original model, in float64 at rtol 1e-9."""
    eng = GhostEngine(swapped, ce)
    assert GhostEngine.unsupported_reason(swapped) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback to another engine
        res = eng.compute(x, y, microbatch_size=microbatch)
    assert isinstance(res, GhostGradients)
    ref = naive_per_example(orig, ce, x, y, microbatch)
    ref_norms = torch.sqrt(sum(g.reshape(g.shape[0], -1).pow(2).sum(1) for g in ref.values()))
    torch.testing.assert_close(res.norms(), ref_norms, rtol=1e-9, atol=1e-12)
    C = float(ref_norms.median())
    coef = torch.clamp(C / ref_norms, max=1.0)
    got = res.weighted_sum(coef)
    mat = res.materialize()
    own_to_torch = {n: rename.get(n, n) for n in got}
    assert sorted(own_to_torch.values()) == sorted(ref)
    for own, tn in own_to_torch.items():
        expect = torch.tensordot(coef, ref[tn], dims=([0], [0]))
        torch.testing.assert_close(got[own], expect, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(mat[own], ref[tn], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    "cls, drop_in, kw",
    [
        (nn.LSTM, DPLSTM, dict(num_layers=2, bidirectional=True)),
        (nn.LSTM, DPLSTM, dict(bias=False)),
        (nn.GRU, DPGRU, dict(num_layers=2)),
        (nn.RNN, DPRNN, dict(nonlinearity="relu", bidirectional=True)),
    ],
)
@pytest.mark.parametrize("batch_first", [True, False])
def test_recurrent_swap_function_state_dict_and_ghost(cls, drop_in, kw, batch_first):
    torch.manual_seed(0)
    orig = RNNClassifier(cls, batch_first, **kw).to(D)
    swapped = copy.deepcopy(orig)
    with pytest.warns(RuntimeWarning, match="'rnn'"):
        assert swap_to_dp_layers(swapped) == ["rnn"]
    assert type(swapped.rnn) is drop_in
    x = torch.randn(6, 5, 3, dtype=D)  # B=6, T=5
    y = torch.randint(0, 2, (6,))
    torch.testing.assert_close(swapped(x), orig(x), rtol=1e-6, atol=1e-12)
    # state_dict keys are torch's, and checkpoints load both ways
    assert list(swapped.state_dict()) == list(orig.state_dict())
    fresh_native, fresh_dp = RNNClassifier(cls, batch_first, **kw).to(D), copy.deepcopy(swapped)
    for p in fresh_dp.parameters():
        p.data.normal_()
    fresh_native.load_state_dict(swapped.state_dict())
    fresh_dp.load_state_dict(orig.state_dict())
    torch.testing.assert_close(fresh_native(x), orig(x), rtol=0, atol=0)
    torch.testing.assert_close(fresh_dp(x), swapped(x), rtol=0, atol=0)
    _check_ghost_equals_naive(orig, swapped, x, y, _native_names(swapped, "rnn"))
    _check_ghost_equals_naive(orig, swapped, x, y, _native_names(swapped, "rnn"), microbatch=2)


def test_swap_keeps_frozen_flags_training_mode_and_shared_modules():
    torch.manual_seed(0)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.GRU(3, 3, batch_first=True)
            self.b = self.a  # the same module in two places
            self.keep = nn.Linear(3, 3)

    m = Twice().to(D)
    m.a.weight_hh_l0.requires_grad_(False)
    m.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        names = swap_to_dp_layers(m)
    assert names == ["a"]
    assert m.a is m.b and isinstance(m.a, DPGRU) and not m.a.training
    assert not m.a.cells[0].hh.weight.requires_grad and m.a.cells[0].ih.weight.requires_grad
    assert isinstance(m.keep, nn.Linear)
    with pytest.raises(ValueError, match="wrap it"):
        swap_to_dp_layers(nn.LSTM(2, 2))
    assert swap_to_dp_layers(nn.Sequential(nn.Linear(2, 2))) == []


def test_unsupported_configurations_are_left_with_a_warning():
    m = nn.Sequential(nn.LSTM(3, 4, proj_size=2))
    with pytest.warns(RuntimeWarning, match="proj_size"):
        assert swap_to_dp_layers(m) == []
    assert isinstance(m[0], nn.LSTM)
    m = nn.Sequential(nn.MultiheadAttention(4, 2, add_bias_kv=True))
    with pytest.warns(RuntimeWarning, match="add_bias_kv"):
        assert swap_to_dp_layers(m) == []


# ------------------------------------------------------------------------------------------
# attention
# ------------------------------------------------------------------------------------------


class Holder(nn.Module):
    def __init__(self, mha):
        super().__init__()
        self.attn = mha


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kdim", [None, 5])
def test_mha_swap_same_outputs_all_mask_kinds(batch_first, kdim):
    torch.manual_seed(1)
    E, H, B, T, S = 8, 2, 3, 4, 6
    orig = Holder(nn.MultiheadAttention(E, H, batch_first=batch_first, kdim=kdim, vdim=kdim)).to(D)
    with torch.no_grad():  # torch zero-initialises biases; make them count
        for p in orig.parameters():
            p.normal_(0, 0.3)
    swapped = copy.deepcopy(orig)
    with pytest.warns(RuntimeWarning):
        assert swap_to_dp_layers(swapped) == ["attn"]
    assert isinstance(swapped.attn, DPMultiheadAttention)
    assert list(swapped.state_dict()) == list(orig.state_dict())
    kv = E if kdim is None else kdim
    shape = (lambda n, d: (B, n, d)) if batch_first else (lambda n, d: (n, B, d))
    q = torch.randn(*shape(T, E), dtype=D)
    k, v = torch.randn(*shape(S, kv), dtype=D), torch.randn(*shape(S, kv), dtype=D)
    pad = torch.zeros(B, S, dtype=torch.bool)
    pad[0, -2:] = True
    pad[2, -1] = True
    causal = torch.ones(T, S, dtype=torch.bool).triu(1)
    additive = torch.randn(T, S, dtype=D)
    per_head = torch.randn(B * H, T, S, dtype=D)
    for kwargs in (
        {},
        dict(key_padding_mask=pad),
        dict(attn_mask=causal),
        dict(attn_mask=causal, key_padding_mask=pad),
        dict(attn_mask=additive),
        dict(attn_mask=per_head, need_weights=True, average_attn_weights=False),
        dict(attn_mask=causal, is_causal=True, need_weights=False),
        dict(key_padding_mask=pad, need_weights=False),
    ):
        (o1, w1), (o2, w2) = orig.attn(q, k, v, **kwargs), swapped.attn(q, k, v, **kwargs)
        torch.testing.assert_close(o2, o1, rtol=1e-6, atol=1e-10, msg=str(kwargs))
        assert (w1 is None) == (w2 is None)
        if w1 is not None:
            torch.testing.assert_close(w2, w1, rtol=1e-6, atol=1e-10)
    # checkpoints both ways
    back = Holder(nn.MultiheadAttention(E, H, batch_first=batch_first, kdim=kdim, vdim=kdim)).to(D)
    back.load_state_dict(swapped.state_dict())
    torch.testing.assert_close(back.attn(q, k, v)[0], orig.attn(q, k, v)[0], rtol=0, atol=0)
    other = copy.deepcopy(swapped)
    for p in other.parameters():
        p.data.zero_()
    other.load_state_dict(orig.state_dict())
    torch.testing.assert_close(other.attn(q, k, v)[0], swapped.attn(q, k, v)[0], rtol=0, atol=0)


class EncoderLM(nn.Module):
    """A small GPT from torch's layers: embedding + positions + encoder layers with a causal mask."""

    def __init__(self, norm_first, batch_first=True, layers=2, V=11, d=8, T=5, pad=False):
        super().__init__()
        self.batch_first, self.pad = batch_first, pad
        self.emb = nn.Embedding(V, d)
        self.pos = nn.Embedding(T, d)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(d, 2, 16, dropout=0.0, batch_first=batch_first, norm_first=norm_first)
            for _ in range(layers)
        )
        self.head = nn.Linear(d, V)

    def forward(self, x):
        T = x.shape[1]
        h = self.emb(x) + self.pos(torch.arange(T).expand_as(x))
        mask = torch.ones(T, T, dtype=torch.bool).triu(1)
        kpm = (x == 0) if self.pad else None
        h = h if self.batch_first else h.transpose(0, 1)
        for layer in self.layers:
            h = layer(h, src_mask=mask, src_key_padding_mask=kpm, is_causal=True)
        h = h if self.batch_first else h.transpose(0, 1)
        return self.head(h).mean(1)


def _lm_batch(B=4, T=5, V=11):
    x = torch.randint(1, V, (B, T))
    x[1, -2:] = 0  # padding at the end of one sequence
    return x, torch.randint(0, V, (B,))


@pytest.mark.parametrize("norm_first, pad, batch_first", [(False, False, True), (True, True, True), (False, True, False), (True, False, False)])
def test_transformer_encoder_layers_run_on_ghost_after_swap(norm_first, pad, batch_first):
    torch.manual_seed(2)
    orig = EncoderLM(norm_first, batch_first=batch_first, pad=pad).to(D)
    swapped = copy.deepcopy(orig)
    with pytest.warns(RuntimeWarning):
        assert swap_to_dp_layers(swapped) == ["layers.0.self_attn", "layers.1.self_attn"]
    x, y = _lm_batch()
    torch.testing.assert_close(swapped(x), orig(x), rtol=1e-6, atol=1e-10)
    rename = {}  # q/k/v weights compare against slices of torch's in_proj_weight below
    eng = GhostEngine(swapped, ce)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        res = eng.compute(x, y)
    assert isinstance(res, GhostGradients)
    ref = naive_per_example(orig, ce, x, y)
    ref_norms = torch.sqrt(sum(g.reshape(g.shape[0], -1).pow(2).sum(1) for g in ref.values()))
    torch.testing.assert_close(res.norms(), ref_norms, rtol=1e-9, atol=1e-12)
    mat = res.materialize()
    for i in range(2):
        p = f"layers.{i}.self_attn."
        stacked = torch.cat([mat[p + f"{n}_proj.weight"] for n in "qkv"], 1)
        torch.testing.assert_close(stacked, ref[p + "in_proj_weight"], rtol=1e-9, atol=1e-12)
        stacked_b = torch.cat([mat[p + f"{n}_proj.bias"] for n in "qkv"], 1)
        torch.testing.assert_close(stacked_b, ref[p + "in_proj_bias"], rtol=1e-9, atol=1e-12)
    for n, g in ref.items():
        if "in_proj" not in n:
            torch.testing.assert_close(mat[rename.get(n, n)], g, rtol=1e-9, atol=1e-12)
    C = float(ref_norms.median())
    coef = torch.clamp(C / ref_norms, max=1.0)
    got = res.weighted_sum(coef)
    for n, g in ref.items():
        if "in_proj" not in n:
            torch.testing.assert_close(got[n], torch.tensordot(coef, g, dims=([0], [0])), rtol=1e-9, atol=1e-12)


def test_transformer_inference_fast_path_uses_current_weights():
    """In eval mode under no_grad torch's encoder layer takes its fused path, reading
    ``in_proj_weight`` / ``in_proj_bias`` from the swapped attention."""
    torch.manual_seed(3)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).eval()
    orig = nn.Sequential(layer)
    swapped = copy.deepcopy(orig)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        swap_to_dp_layers(swapped)
    x = torch.randn(3, 5, 8)
    with torch.no_grad():
        torch.testing.assert_close(swapped(x), orig(x), rtol=1e-5, atol=1e-6)
        enc_o = nn.TransformerEncoder(copy.deepcopy(layer), 2, enable_nested_tensor=False).eval()
        enc_s = copy.deepcopy(enc_o)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            swap_to_dp_layers(enc_s)
        kpm = torch.zeros(3, 5, dtype=torch.bool)
        kpm[0, -1] = True
        torch.testing.assert_close(enc_s(x, src_key_padding_mask=kpm), enc_o(x, src_key_padding_mask=kpm), rtol=1e-5, atol=1e-6)


class DecoderNet(nn.Module):
    def __init__(self, norm_first, batch_first):
        super().__init__()
        self.batch_first = batch_first
        self.dec = nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0, batch_first=batch_first, norm_first=norm_first)
        self.head = nn.Linear(8, 3)

    def forward(self, tgt, mem):
        T = tgt.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(T, dtype=tgt.dtype)
        mpad = torch.zeros(mem.shape[0], mem.shape[1], dtype=torch.bool)
        mpad[:, -1] = True
        if not self.batch_first:
            tgt, mem = tgt.transpose(0, 1), mem.transpose(0, 1)
        out = self.dec(tgt, mem, tgt_mask=mask, memory_key_padding_mask=mpad, tgt_is_causal=True)
        out = out if self.batch_first else out.transpose(0, 1)
        return self.head(out.mean(1))


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_decoder_layer_after_swap(norm_first, batch_first):
    torch.manual_seed(4)
    orig = DecoderNet(norm_first, batch_first).to(D)
    swapped = copy.deepcopy(orig)
    with pytest.warns(RuntimeWarning):
        assert swap_to_dp_layers(swapped) == ["dec.self_attn", "dec.multihead_attn"]
    tgt, mem = torch.randn(4, 5, 8, dtype=D), torch.randn(4, 7, 8, dtype=D)
    y = torch.randint(0, 3, (4,))
    torch.testing.assert_close(swapped(tgt, mem), orig(tgt, mem), rtol=1e-6, atol=1e-10)
    with warnings.catch_warnings():
        # a sequence-first layout may be computed by the ghost engine's exact fallback
        warnings.simplefilter("ignore")
        res = GhostEngine(swapped, ce).compute((tgt, mem), y, microbatch_size=2)
    ref = naive_per_example(orig, ce, (tgt, mem), y, 2)
    ref_norms = torch.sqrt(sum(g.reshape(g.shape[0], -1).pow(2).sum(1) for g in ref.values()))
    torch.testing.assert_close(res.norms(), ref_norms, rtol=1e-9, atol=1e-12)
    C = float(ref_norms.median())
    coef = torch.clamp(C / ref_norms, max=1.0)
    got = res.weighted_sum(coef)
    for n, g in ref.items():
        if "in_proj" in n:
            mod = n.rsplit(".", 1)[0]
            kind = "weight" if n.endswith("weight") else "bias"
            val = torch.cat([got[f"{mod}.{q}_proj.{kind}"] for q in "qkv"], 0)
        else:
            val = got[n]
        torch.testing.assert_close(val, torch.tensordot(coef, g, dims=([0], [0])), rtol=1e-9, atol=1e-12)
