"""Test helpers: random record pytrees and float64 reference computations done by hand.

Nothing here calls the code under test: pytrees are walked with a small recursive function of
our own, norms and clipped sums are computed in numpy float64.
"""

from __future__ import annotations

import numpy as np
import torch

#: record structures (leaf shapes); a record is built with these shapes, a batch prepends B
STRUCTURES = {
    "tensor": (5,),
    "matrix": (3, 4),
    "scalar_leaf": [(), (3,)],
    "list": [(2, 3), (4,)],
    "dict": {"w": (2, 2), "b": [(3,), (1, 2)]},
    "tuple": ((6,), {"x": (2,)}),
}


def leaves(tree) -> list:
    """Leaves in depth-first order (dicts in insertion order)."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [l for v in tree.values() for l in leaves(v)]
    if isinstance(tree, (list, tuple)):
        return [l for v in tree for l in leaves(v)]
    raise TypeError(type(tree))


def build(shapes, fn):
    """A tree shaped like ``shapes`` with ``fn(shape)`` at each leaf."""
    if isinstance(shapes, dict):
        return {k: build(v, fn) for k, v in shapes.items()}
    if isinstance(shapes, list):
        return [build(v, fn) for v in shapes]
    if isinstance(shapes, tuple) and (len(shapes) == 0 or not isinstance(shapes[0], int)):
        if len(shapes) == 0:
            return fn(())
        return tuple(build(v, fn) for v in shapes)
    return fn(shapes)


def random_record(structure: str, seed: int, scale: float = 1.0, dtype=torch.float32, batch: int | None = None,
                  row_scales=None):
    """A random record (or a batch of ``batch`` records) of ``STRUCTURES[structure]``."""
    rng = np.random.default_rng(seed)

    def leaf(shape):
        full = ((batch,) if batch is not None else ()) + tuple(shape)
        x = rng.standard_normal(full) * scale
        if batch is not None and row_scales is not None:
            x = x * np.asarray(row_scales).reshape((-1,) + (1,) * len(shape))
        return torch.tensor(x, dtype=dtype)

    return build(STRUCTURES[structure], leaf)


def flat64(tree) -> np.ndarray:
    """All coordinates of a record as one float64 vector."""
    return np.concatenate([l.detach().cpu().double().numpy().reshape(-1) for l in leaves(tree)])


def rows64(batch) -> np.ndarray:
    """A batch as a float64 matrix, one row per record."""
    ls = leaves(batch)
    b = ls[0].shape[0]
    return np.concatenate([l.detach().cpu().double().numpy().reshape(b, -1) for l in ls], axis=1)


def clipped_sum64(rows: np.ndarray, clip: float) -> np.ndarray:
    """sum_i x_i * min(1, C/||x_i||) in float64."""
    norms = np.linalg.norm(rows, axis=1)
    with np.errstate(divide="ignore"):
        coef = np.where(norms > clip, clip / np.where(norms > 0, norms, 1.0), 1.0)
    return (rows * coef[:, None]).sum(axis=0)


def row(batch, i):
    """Record ``i`` of a batch (same structure)."""
    if isinstance(batch, torch.Tensor):
        return batch[i]
    if isinstance(batch, dict):
        return {k: row(v, i) for k, v in batch.items()}
    return type(batch)(row(v, i) for v in batch)


def weighted_sum_fn(batch):
    """The ``weighted_sum`` callback of ``accumulate_records_by_norm``: c -> sum_i c_i x_i."""

    def ws(c):
        def one(x):
            return torch.einsum("b,b...->...", c.to(x.dtype), x)

        def walk(t):
            if isinstance(t, torch.Tensor):
                return one(t)
            if isinstance(t, dict):
                return {k: walk(v) for k, v in t.items()}
            return type(t)(walk(v) for v in t)

        return walk(batch)

    return ws


def run_query(query, records, global_state=None, batched=False):
    """One sample through ``query``'s public contract: ``(result, new global state, event)``.

    Records are accumulated one by one (``accumulate_record``) or, with ``batched``, stacked and
    accumulated at once (``accumulate_records``)."""
    gs = query.initial_global_state() if global_state is None else global_state
    params = query.derive_sample_params(gs)
    state = query.initial_sample_state(records[0])
    if batched:
        state = query.accumulate_records(params, state, torch.stack(records))
    else:
        for r in records:
            state = query.accumulate_record(params, state, r)
    return query.get_noised_result(state, gs)


def int_record(*values):
    """An int32 record tensor."""
    return torch.tensor(values, dtype=torch.int32)
