"""Shared check for the per-layer ghost-rule tests: the ghost engine (every norm mode) against
the naive per-example loop of engine_cases (plain autograd), in float64 at rtol 1e-9."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from pytorch_privacy.optimizer.engines import GhostEngine, GhostGradients

from .engine_cases import naive_per_example

RTOL, ATOL = 1e-9, 1e-12


def ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


def between(norms: torch.Tensor) -> float:
    """A clipping bound strictly between the smallest and largest norm (so some records are
    clipped and some are not)."""
    s = torch.sort(norms).values
    assert float(s[-1]) > float(s[0]) * (1 + 1e-6), "test needs distinct norms"
    k = len(s) // 2
    return float((s[k - 1] + s[k]) / 2) if len(s) > 1 else float(s[0])


def check_ghost_against_naive(model, x, y, loss_fn=ce, microbatch=None, modes=("auto", "ghost", "materialize")):
    """Norms, clipped sums with C between the norms, and materialised per-record gradients."""
    assert GhostEngine.unsupported_reason(model) is None, GhostEngine.unsupported_reason(model)
    ref = naive_per_example(model, loss_fn, x, y, microbatch)
    ref_norms = torch.sqrt(sum(g.reshape(g.shape[0], -1).pow(2).sum(1) for g in ref.values()))
    C = between(ref_norms)
    coef = torch.clamp(C / ref_norms, max=1.0)
    assert (coef < 1).any() and (coef == 1).any()
    for mode in modes:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # a fallback to another engine fails the test
            res = GhostEngine(model, loss_fn, norm_mode=mode).compute(x, y, microbatch_size=microbatch)
        assert isinstance(res, GhostGradients)
        torch.testing.assert_close(res.norms(), ref_norms, rtol=RTOL, atol=ATOL, msg=f"norms, mode={mode}")
        got = res.weighted_sum(coef)
        assert set(got) == set(ref)
        for n, g in ref.items():
            expect = torch.tensordot(coef, g, dims=([0], [0]))
            torch.testing.assert_close(got[n], expect, rtol=RTOL, atol=ATOL, msg=f"clipped sum {n}, mode={mode}")
        mat = res.materialize()
        for n, g in ref.items():
            torch.testing.assert_close(mat[n], g, rtol=RTOL, atol=ATOL, msg=f"per-record {n}, mode={mode}")
