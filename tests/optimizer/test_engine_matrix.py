"""Every engine, on every supported layer case, against the naive loop: a fixed matrix.

The matrix is every case of :mod:`.engine_cases` x every engine (``ghost`` with norm mode
``ghost`` / ``materialize`` / ``auto``, ``functorch``, ``loop``) x microbatches off / on x biases
on / off, with sizes drawn from a fixed seed per case, in float64.  Per-record norms, losses and
the clipped sum ``sum_r min(1, C / ||g_r||) g_r`` (``C`` = the median norm, so some records are
clipped and some are not) are compared with a naive reference: one ordinary ``loss.backward()``
per record, at ``rtol = 1e-9``.  The clip coefficients come from the naive norms, so a rule that
drops or misapplies them (e.g. a bias contribution summed without its coefficient) is caught
even where the norms are right.

Cases an engine does not support must be refused with a reason (``unsupported_reason``).
"""

from __future__ import annotations

import random
import warnings
import zlib

import pytest
import torch
from torch import nn

from pytorch_privacy.optimizer.engines import FunctorchEngine, GhostEngine, LoopEngine, call_model

from .engine_cases import CASES, build, naive_per_example

TOL = dict(rtol=1e-9, atol=1e-12)
B = 4
ENGINES = {
    "ghost-auto": (GhostEngine, {"norm_mode": "auto"}),
    "ghost-ghost": (GhostEngine, {"norm_mode": "ghost"}),
    "ghost-materialize": (GhostEngine, {"norm_mode": "materialize"}),
    "functorch": (FunctorchEngine, {}),
    "loop": (LoopEngine, {}),
}


def _is_bias(name: str) -> bool:
    return name == "bias" or name.startswith("bias_") or name.endswith("_bias")


def _strip_biases(model: nn.Module) -> nn.Module:
    """The same model without any bias: torch recurrent and attention modules are rebuilt with
    ``bias=False`` (their weights copied), every other module's ``bias`` is set to ``None``."""
    for parent in list(model.modules()):
        for cname, child in list(parent.named_children()):
            if isinstance(child, nn.RNNBase) and child.bias:
                new = type(child)(
                    child.input_size, child.hidden_size, num_layers=child.num_layers, bias=False,
                    batch_first=child.batch_first, bidirectional=child.bidirectional,
                ).to(next(child.parameters()).dtype)
                with torch.no_grad():
                    for n, p in new.named_parameters():
                        p.copy_(getattr(child, n))
                setattr(parent, cname, new)
            elif type(child) is nn.MultiheadAttention and child.in_proj_bias is not None:
                new = nn.MultiheadAttention(
                    child.embed_dim, child.num_heads, bias=False, batch_first=child.batch_first
                ).to(child.in_proj_weight.dtype)
                with torch.no_grad():
                    new.in_proj_weight.copy_(child.in_proj_weight)
                    new.out_proj.weight.copy_(child.out_proj.weight)
                setattr(parent, cname, new)
    for m in model.modules():
        if isinstance(m, nn.RNNBase) or type(m) is nn.MultiheadAttention:
            continue
        for pname in list(m._parameters):
            if _is_bias(pname) and m._parameters[pname] is not None:
                setattr(m, pname, None)
    return model


def _case(case: str, bias: bool):
    seed = zlib.crc32(case.encode())  # fixed per case
    model, x, y, loss_fn = build(case, random.Random(seed), B)
    if not bias:
        model = _strip_biases(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    has_bias = any(_is_bias(n.rsplit(".", 1)[-1]) for n in names)
    assert has_bias == bias, f"{case}: bias={bias} but trainable parameters are {names}"
    return model, x, y, loss_fn, names


def _naive(model, loss_fn, x, y, mb, names):
    ref = naive_per_example(model, loss_fn, x, y, mb)
    assert sorted(ref) == sorted(names)
    norms = torch.sqrt(sum(g.reshape(g.shape[0], -1).pow(2).sum(1) for g in ref.values()))
    clip = float(norms.median())
    coef = torch.clamp(clip / norms, max=1.0)
    clipped = {n: torch.tensordot(coef, g, dims=([0], [0])) for n, g in ref.items()}
    return norms, coef, clipped


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny float64 ops: one intra-op thread is faster (no thread-pool hand-offs), and the
    matrix is sized for one core."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


MATRIX = [
    (case, engine, mb, bias)
    for case in sorted(CASES)
    for engine in ENGINES
    for mb in (None, 2)
    for bias in (True, False)
    if not (case == "lora" and not bias)  # LoRA's adapters carry no bias; covered by bias on
]


@pytest.mark.parametrize("case,engine,mb,bias", MATRIX, ids=[f"{c}-{e}-mb{m}-{'bias' if b else 'nobias'}" for c, e, m, b in MATRIX])
def test_engine_matches_naive_loop(case, engine, mb, bias):
    model, x, y, loss_fn, names = _case(case, bias)
    cls, kwargs = ENGINES[engine]
    reason = cls.unsupported_reason(model)
    if cls.name not in CASES[case]:
        assert reason, f"{engine} should refuse {case} with a reason"
        return
    assert reason is None, f"{engine} should support {case}: {reason}"
    norms, coef, clipped = _naive(model, loss_fn, x, y, mb, names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # vmap performance warnings, ghost fallback notices
        res = cls(model, loss_fn, **kwargs).compute(x, y, microbatch_size=mb)
        assert res.num_records == B // (mb or 1)
        torch.testing.assert_close(res.losses, loss_fn(call_model(model, x), y).detach(), **TOL)
        torch.testing.assert_close(res.norms(), norms, **TOL, msg=lambda m: f"norms: {m}")
        ws = res.weighted_sum(coef)
    assert sorted(ws) == sorted(names)
    for n in names:
        torch.testing.assert_close(ws[n], clipped[n], **TOL, msg=lambda m: f"clipped sum of {n}: {m}")
    for p in model.parameters():
        assert p.grad is None, "engines must not write .grad"
