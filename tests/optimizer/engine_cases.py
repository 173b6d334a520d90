"""Model/batch factories and a naive per-example reference shared by the engine tests.

Each case builds ``(model, inputs, targets, loss_fn)`` from a ``random.Random``-like draw of
sizes, in float64 so engines can be compared to the naive loop at 1e-5 without rounding noise.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

from pytorch_privacy.optimizer.engines import DPGRU, DPLSTM, DPRNN, DPMultiheadAttention, call_model

DTYPE = torch.float64


def ce(out, y):
    """Per-example cross-entropy (``[B]``)."""
    return F.cross_entropy(out, y, reduction="none")


def seq_ce(out, y):
    """Per-example mean token cross-entropy for ``out [B, T, V]``, ``y [B, T]``."""
    return F.cross_entropy(out.transpose(1, 2), y, reduction="none").mean(1)


def mse(out, y):
    """Per-example squared error summed over features."""
    return (out - y).pow(2).reshape(out.shape[0], -1).sum(1)


def naive_per_example(model: nn.Module, loss_fn, inputs, targets, microbatch_size=None) -> dict[str, torch.Tensor]:
    """The reference: for each record, ``loss.mean().backward()`` on its slice, read ``.grad``."""
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    leaves = [t for t in pytree.tree_leaves(inputs) if isinstance(t, torch.Tensor)]
    B = leaves[0].shape[0]
    b = microbatch_size or 1
    out = {n: [] for n in trainable}
    for r in range(B // b):
        sl = lambda t: t[r * b : (r + 1) * b] if isinstance(t, torch.Tensor) else t  # noqa: E731
        for p in trainable.values():
            p.grad = None
        loss = loss_fn(call_model(model, pytree.tree_map(sl, inputs)), pytree.tree_map(sl, targets)).mean()
        loss.backward()
        for n, p in trainable.items():
            out[n].append(p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
    for p in trainable.values():
        p.grad = None
    return {n: torch.stack(v) if v else torch.zeros((0,) + p.shape, dtype=p.dtype) for (n, v), p in zip(out.items(), trainable.values())}


# ------------------------------------------------------------------------------------------
# model families
# ------------------------------------------------------------------------------------------


class SeqLinear(nn.Module):
    """Linear layers over a sequence ``[B, T, d]``, pooled."""

    def __init__(self, d, h, k):
        super().__init__()
        self.l1, self.l2 = nn.Linear(d, h), nn.Linear(h, k)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x))).mean(1)


class Conv1dNet(nn.Module):
    def __init__(self, c, k, stride, padding, dilation, groups, padding_mode, bias, L):
        super().__init__()
        self.conv = nn.Conv1d(
            c, 2 * groups, k, stride=stride, padding=padding, dilation=dilation, groups=groups,
            padding_mode=padding_mode, bias=bias,
        )
        self.head = nn.LazyLinear(3)
        with torch.no_grad():
            self.head(self.conv(torch.zeros(1, c, L)).flatten(1))

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).flatten(1))


class Conv2dNet(nn.Module):
    def __init__(self, c, k, stride, padding, dilation, groups, padding_mode, bias, H):
        super().__init__()
        self.conv = nn.Conv2d(
            c, 2 * groups, k, stride=stride, padding=padding, dilation=dilation, groups=groups,
            padding_mode=padding_mode, bias=bias,
        )
        self.norm = nn.GroupNorm(groups, 2 * groups)
        self.head = nn.LazyLinear(3)
        with torch.no_grad():
            self.head(self.norm(self.conv(torch.zeros(1, c, H, H))).flatten(1))

    def forward(self, x):
        return self.head(torch.tanh(self.norm(self.conv(x))).flatten(1))


class EmbedNet(nn.Module):
    def __init__(self, V, d, padding_idx):
        super().__init__()
        self.emb = nn.Embedding(V, d, padding_idx=padding_idx)
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, 2)

    def forward(self, x):
        return self.head(self.ln(self.emb(x)).mean(1))


class TiedLM(nn.Module):
    """Embedding and output projection share one Parameter (module-level tying)."""

    def __init__(self, V, d):
        super().__init__()
        self.emb = nn.Embedding(V, d)
        self.mix = nn.Linear(d, d)
        self.out = nn.Linear(d, V, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, x):
        return self.out(torch.tanh(self.mix(self.emb(x))))


class FunctionalTiedLM(TiedLM):
    """The same tying, but the projection is ``F.linear(h, emb.weight)`` in the parent's forward."""

    def forward(self, x):
        return F.linear(torch.tanh(self.mix(self.emb(x))), self.emb.weight)


class SharedModule(nn.Module):
    """One Linear applied twice (the gradient is the sum of both calls)."""

    def __init__(self, d):
        super().__init__()
        self.f = nn.Linear(d, d)
        self.head = nn.Linear(d, 2)

    def forward(self, x):
        return self.head(self.f(torch.tanh(self.f(x))))


class LoRALinear(nn.Module):
    """Frozen base Linear plus trainable low-rank adapters ``B A``."""

    def __init__(self, d_in, d_out, r):
        super().__init__()
        self.base = nn.Linear(d_in, d_out)
        self.base.requires_grad_(False)
        self.A = nn.Linear(d_in, r, bias=False)
        self.B = nn.Linear(r, d_out, bias=False)
        nn.init.normal_(self.B.weight)

    def forward(self, x):
        return self.base(x) + self.B(self.A(x))


class LoRANet(nn.Module):
    def __init__(self, d, r):
        super().__init__()
        self.frozen_in = nn.Linear(d, d).requires_grad_(False)
        self.lora = LoRALinear(d, d, r)
        self.head = nn.Linear(d, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.lora(torch.tanh(self.frozen_in(x)))))


class BufferNet(nn.Module):
    """Uses a registered buffer (a fixed feature scale) in forward."""

    def __init__(self, d):
        super().__init__()
        self.register_buffer("scale", torch.linspace(0.5, 2.0, d))
        self.fc = nn.Linear(d, 3)

    def forward(self, x):
        return self.fc(x * self.scale)


class TupleNet(nn.Module):
    """``forward(x, z)``: two inputs."""

    def __init__(self, d):
        super().__init__()
        self.a, self.b = nn.Linear(d, 3), nn.Linear(d, 3)

    def forward(self, x, z):
        return self.a(x) * torch.tanh(self.b(z))


class DictNet(nn.Module):
    """``forward(x=..., mask=...)``: keyword inputs."""

    def __init__(self, d):
        super().__init__()
        self.fc = nn.Linear(d, 3)
        self.ln = nn.LayerNorm(3)

    def forward(self, x, mask):
        return self.ln(self.fc(x * mask))


class RecurrentNet(nn.Module):
    def __init__(self, cls, d, h, **kw):
        super().__init__()
        self.emb = nn.Embedding(7, d)
        self.rnn = cls(d, h, batch_first=True, **kw)
        self.head = nn.Linear(h * (2 if kw.get("bidirectional") else 1), 2)

    def forward(self, x):
        out, _ = self.rnn(self.emb(x))
        return self.head(out[:, -1])


class AttnNet(nn.Module):
    def __init__(self, d, heads, dp=False, batch_first=True):
        super().__init__()
        self.batch_first = batch_first
        self.attn = (DPMultiheadAttention if dp else nn.MultiheadAttention)(d, heads, batch_first=batch_first)
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, 2)

    def forward(self, x):
        h = x if self.batch_first else x.transpose(0, 1)
        a = self.attn(h, h, h, need_weights=False)[0]
        a = a if self.batch_first else a.transpose(0, 1)
        return self.head(self.ln(x + a).mean(1))


class EvalBNNet(nn.Module):
    """BatchNorm2d in eval mode (running statistics) with trainable affine parameters."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 2)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2)
            self.bn.weight.uniform_(0.5, 1.5)
        self.bn.eval()

    def forward(self, x):
        return self.head(torch.tanh(self.bn(self.conv(x))).mean((2, 3)))


class RMSNet(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.norm = nn.RMSNorm(d)
        self.head = nn.Linear(d, 2)

    def forward(self, x):
        return self.head(self.norm(self.fc(x)).mean(1))


def _ids(draw_int, B, T, V):
    return torch.tensor([[draw_int(0, V - 1) for _ in range(T)] for _ in range(B)])


def build(case: str, rnd, B: int) -> tuple[nn.Module, Any, Any, Callable]:
    """Build case ``case`` for batch size ``B`` with sizes drawn from ``rnd`` (``random.Random``)."""
    ri = rnd.randint
    g = torch.Generator().manual_seed(ri(0, 2**31))
    randn = lambda *s: torch.randn(*s, generator=g, dtype=DTYPE)  # noqa: E731
    labels = lambda k: torch.randint(0, k, (B,), generator=g)  # noqa: E731
    torch.manual_seed(ri(0, 2**31))
    if case == "linear":
        d, h = ri(1, 5), ri(1, 5)
        m = nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, 3))
        return m.to(DTYPE), randn(B, d), labels(3), ce
    if case == "linear_seq":
        d, h, T = ri(1, 4), ri(1, 4), ri(1, 5)
        return SeqLinear(d, h, 3).to(DTYPE), randn(B, T, d), labels(3), ce
    if case == "conv1d":
        groups = rnd.choice([1, 2])
        c = groups * ri(1, 2)
        k, stride, dilation = ri(1, 3), ri(1, 2), ri(1, 2)
        padding_mode = rnd.choice(["zeros", "reflect", "circular"])
        padding = rnd.choice([0, 1, "same"]) if stride == 1 else rnd.choice([0, 1])
        L = ri(k * dilation + 1, k * dilation + 5)
        m = Conv1dNet(c, k, stride, padding, dilation, groups, padding_mode, rnd.random() < 0.7, L)
        return m.to(DTYPE), randn(B, c, L), labels(3), ce
    if case == "conv2d":
        groups = rnd.choice([1, 2])
        c = groups * ri(1, 2)
        k, stride, dilation = ri(1, 3), ri(1, 2), ri(1, 2)
        padding_mode = rnd.choice(["zeros", "reflect", "circular"])
        padding = rnd.choice([0, 1, "same"]) if stride == 1 else rnd.choice([0, 1])
        H = ri(k * dilation + 1, k * dilation + 3)
        m = Conv2dNet(c, k, stride, padding, dilation, groups, padding_mode, rnd.random() < 0.7, H)
        return m.to(DTYPE), randn(B, c, H, H), labels(3), ce
    if case == "embedding":
        V, d, T = ri(2, 6), ri(1, 4), ri(1, 6)
        pad = rnd.choice([None, 0])
        return EmbedNet(V, d, pad).to(DTYPE), _ids(ri, B, T, V), labels(2), ce
    if case == "tied":
        V, d, T = ri(2, 6), ri(1, 4), ri(1, 5)
        x = _ids(ri, B, T, V)
        return TiedLM(V, d).to(DTYPE), x, _ids(ri, B, T, V), seq_ce
    if case == "tied_functional":
        V, d, T = ri(2, 6), ri(1, 4), ri(1, 5)
        return FunctionalTiedLM(V, d).to(DTYPE), _ids(ri, B, T, V), _ids(ri, B, T, V), seq_ce
    if case == "shared_module":
        d = ri(1, 4)
        return SharedModule(d).to(DTYPE), randn(B, d), labels(2), ce
    if case == "lora":
        d, r = ri(2, 5), ri(1, 2)
        return LoRANet(d, r).to(DTYPE), randn(B, d), labels(2), ce
    if case == "buffer":
        d = ri(1, 5)
        return BufferNet(d).to(DTYPE), randn(B, d), randn(B, 3), mse
    if case == "tuple_input":
        d = ri(1, 4)
        return TupleNet(d).to(DTYPE), (randn(B, d), randn(B, d)), randn(B, 3), mse
    if case == "dict_input":
        d = ri(1, 4)
        inputs = {"x": randn(B, d), "mask": (randn(B, d) > 0).to(DTYPE)}
        return DictNet(d).to(DTYPE), inputs, randn(B, 3), mse
    if case in ("rnn", "gru", "lstm", "dprnn", "dpgru", "dplstm"):
        cls = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM, "dprnn": DPRNN, "dpgru": DPGRU, "dplstm": DPLSTM}[case]
        d, h, T = ri(1, 3), ri(1, 3), ri(1, 4)
        kw = {"bidirectional": rnd.random() < 0.5}
        if case.startswith("dp"):
            kw["num_layers"] = ri(1, 2)
        return RecurrentNet(cls, d, h, **kw).to(DTYPE), _ids(ri, B, T, 7), labels(2), ce
    if case in ("mha", "dpmha"):
        heads = ri(1, 2)
        d, T = heads * ri(1, 3), ri(1, 4)
        m = AttnNet(d, heads, dp=case == "dpmha", batch_first=rnd.random() < 0.5)
        return m.to(DTYPE), randn(B, T, d), labels(2), ce
    if case == "tiny_lm":
        from ..reference_models import TinyTransformer

        V, T = ri(3, 8), ri(1, 4)
        m = TinyTransformer(vocab_size=V, d_model=4, nhead=2, max_len=8, lm_head=True, dp_attention=True)
        return m.to(DTYPE), _ids(ri, B, T, V), _ids(ri, B, T, V), seq_ce
    if case == "eval_bn":
        c = ri(1, 2)
        return EvalBNNet(c).to(DTYPE), randn(B, c, 5, 5), labels(2), ce
    if case == "rmsnorm":
        d, T = ri(1, 4), ri(1, 3)
        return RMSNet(d).to(DTYPE), randn(B, T, d), labels(2), ce
    raise KeyError(case)


#: every case, and which engines must support it (the rest must say why not)
CASES = {
    "linear": {"ghost", "functorch", "compiled", "graphed", "loop"},
    "linear_seq": {"ghost", "functorch", "compiled", "graphed", "loop"},
    "conv1d": {"ghost", "functorch", "compiled", "graphed", "loop"},
    "conv2d": {"ghost", "functorch", "compiled", "graphed", "loop"},
    "embedding": {"ghost", "functorch", "compiled", "graphed", "loop"},
    "tied": {"ghost", "functorch", "compiled", "graphed", "loop"},
    "tied_functional": {"ghost", "functorch", "compiled", "graphed", "loop"},  # ghost falls back (warns)
    "shared_module": {"ghost", "functorch", "compiled", "graphed", "loop"},
    "lora": {"ghost", "functorch", "compiled", "graphed", "loop"},
    "buffer": {"ghost", "functorch", "compiled", "graphed", "loop"},
    "tuple_input": {"ghost", "functorch", "compiled", "graphed", "loop"},
    "dict_input": {"ghost", "functorch", "compiled", "graphed", "loop"},
    "rnn": {"loop"},
    "gru": {"loop"},
    "lstm": {"loop"},  # float64 LSTM does not vmap; float32 does (tested separately)
    "dprnn": {"ghost", "functorch", "compiled", "graphed", "loop"},
    "dpgru": {"ghost", "functorch", "compiled", "graphed", "loop"},
    "dplstm": {"ghost", "functorch", "compiled", "graphed", "loop"},
    "mha": {"functorch", "compiled", "graphed", "loop"},
    "dpmha": {"ghost", "functorch", "compiled", "graphed", "loop"},
    "tiny_lm": {"ghost", "functorch", "compiled", "graphed", "loop"},  # DP attention, tied embedding / LM head
    "eval_bn": {"ghost", "functorch", "compiled", "graphed", "loop"},
    "rmsnorm": {"ghost", "functorch", "compiled", "graphed", "loop"},
}
