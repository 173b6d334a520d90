"""Pytree helpers for records: a tensor, or a list/tuple/dict nest of tensors.

(Formerly ``dp_query.tree``; "tree" now belongs to tree aggregation, DP-FTRL.)

Thin wrappers over ``torch.utils._pytree`` so the rest of the package depends on one place.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Callable, Iterator

import torch
from torch.utils import _pytree as pytree

__all__ = [
    "is_flat_dict",
    "scaled_norms",
    "flatten",
    "unflatten",
    "tree_map",
    "check_same_structure",
    "global_norms",
    "record_norm",
    "scale_rows",
    "check_finite_norms",
    "records_known_finite",
    "zeros_like",
]


def flatten(tree: Any) -> tuple[list[torch.Tensor], Any]:
    """Leaves (in a fixed order) and the structure spec."""
    leaves, spec = pytree.tree_flatten(tree)
    for leaf in leaves:
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(
                f"records must be tensors or lists/tuples/dicts of tensors; found a leaf of type "
                f"{type(leaf).__name__}"
            )
    return leaves, spec


def unflatten(leaves: list[torch.Tensor], spec: Any) -> Any:
    return pytree.tree_unflatten(leaves, spec)


def is_flat_dict(t: Any) -> bool:
    """Whether ``t`` is a plain ``dict`` of tensors (the records of the optimizer): the hot
    path, handled without building pytree specs.  Same leaf order as ``flatten``."""
    if type(t) is not dict:
        return False
    for v in t.values():
        if not isinstance(v, torch.Tensor):
            return False
    return True


def tree_map(fn: Callable, *trees: Any) -> Any:
    """Apply ``fn`` leaf-wise over trees of the same structure (checked)."""
    t0 = trees[0]
    if is_flat_dict(t0):
        keys = list(t0)
        if all(is_flat_dict(t) and list(t) == keys for t in trees[1:]):
            if len(trees) == 1:
                return {k: fn(v) for k, v in t0.items()}
            return {k: fn(*vs) for k, vs in zip(keys, zip(*(t.values() for t in trees)))}
    flat0, spec0 = flatten(t0)
    flats = [flat0]
    for t in trees[1:]:
        f, s = flatten(t)
        if s != spec0:
            raise ValueError(f"record structure mismatch: expected {spec0}, got {s}")
        flats.append(f)
    return unflatten([fn(*leaves) for leaves in zip(*flats)], spec0)


def _batch_size(leaves: list) -> int | None:
    """The common leading (batch) dimension of batched leaves; ``ValueError`` when a leaf has none
    or two disagree."""
    b = None
    for i, leaf in enumerate(leaves):
        if leaf.dim() == 0:
            raise ValueError(f"batched record leaf {i} has no batch dimension")
        if b is None:
            b = leaf.shape[0]
        elif leaf.shape[0] != b:
            raise ValueError(f"batched record leaves disagree on batch size: {b} vs {leaf.shape[0]} (leaf {i})")
    return b


def check_same_structure(template: Any, record: Any, *, batched: bool = False) -> None:
    """Raise ``ValueError`` unless ``record`` has the structure and leaf shapes of ``template``.

    With ``batched=True`` every leaf of ``record`` carries one extra leading (batch) dimension,
    the same on every leaf.
    """
    if is_flat_dict(template) and is_flat_dict(record) and list(template) == list(record):
        t_leaves, r_leaves = list(template.values()), list(record.values())
    else:
        t_leaves, t_spec = flatten(template)
        r_leaves, r_spec = flatten(record)
        if t_spec != r_spec:
            raise ValueError(f"record structure does not match the template: expected {t_spec}, got {r_spec}")
    if batched:
        _batch_size(r_leaves)
    for i, (t, r) in enumerate(zip(t_leaves, r_leaves)):
        shape = tuple(r.shape[1:]) if batched else tuple(r.shape)
        if shape != tuple(t.shape):
            raise ValueError(f"record leaf {i} has shape {shape}, expected {tuple(t.shape)}")


def global_norms(batch: Any) -> torch.Tensor:
    """Per-row L2 norm over all leaves together of a batched record: float64, shape ``[B]``.

    Overflow-safe: a row whose largest magnitude ``m`` is large enough for its squares to
    overflow (``m >= 2^(maxexp/2 - 20)``: about 1.8e13 in float32) is first divided by the power
    of two ``2^ceil(log2 m)`` (exact), so finite float32 records whose squares overflow (entries
    of 1e20 and more) get their true norm instead of ``inf``.  Rows with a NaN or infinite entry
    get a NaN or infinite norm (see :func:`check_finite_norms`).  The single-record path
    (:func:`record_norm`) runs the same computation, so both clip a record identically.
    """
    leaves = list(batch.values()) if is_flat_dict(batch) else flatten(batch)[0]
    if not leaves:
        raise ValueError("record has no tensors")
    _batch_size(leaves)
    # integer/bool records are measured in float64
    work = [l if (l.is_floating_point() or l.is_complex()) else l.to(torch.float64) for l in leaves]
    if work[0].device.type != "cpu":
        # no host sync on accelerators: always the scaled computation (for rows that cannot
        # overflow it multiplies by 1 and equals the plain one)
        return scaled_norms(work)
    norms = _plain_norms(work)
    bad = ~torch.isfinite(norms)
    if bool(bad.any()):  # overflowed squares, or NaN/inf entries: measure those rows again, scaled
        idx = bad.nonzero()[:, 0]
        norms[idx] = scaled_norms([x[idx] for x in work])
    return norms


def _rows_norm(x: torch.Tensor) -> torch.Tensor:
    # over every dim but the first; unlike reshape(B, -1) this also works for B == 0
    if x.dim() == 1:
        return x.abs()
    # half-precision rows are reduced into a float32 result (not rounded to 11 or 8 bits)
    wide = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else None
    return torch.linalg.vector_norm(x, dim=tuple(range(1, x.dim())), dtype=wide)


def _plain_norms(work: list[torch.Tensor]) -> torch.Tensor:
    sq = None
    for x in work:
        n = _rows_norm(x).to(torch.float64).square()
        sq = n if sq is None else sq + n.to(sq.device)
    return sq.sqrt()


def scaled_norms(work: list[torch.Tensor]) -> torch.Tensor:
    """Row norms with rows that could overflow when squared first divided by a power of two."""
    amax = None
    for x in work:
        dims = tuple(range(1, x.dim()))
        m = x.abs() if x.dim() == 1 else torch.maximum(x.amax(dim=dims), -x.amin(dim=dims))
        m = m.to(torch.float64)
        amax = m if amax is None else torch.maximum(amax, m.to(amax.device))
    # Rows whose largest magnitude reaches 2^(maxexp/2 - 20) could overflow when squared (for
    # float32 that is about 1.8e13; for float16 every row above 2^-12): they are divided by
    # 2^e >= their largest magnitude first, exactly.  Other rows are measured as they are.
    exps = [math.frexp(torch.finfo(x.dtype).max)[1] for x in work if x.is_floating_point()]
    threshold = 2.0 ** (min(exps) // 2 - 20) if exps else math.inf
    finite = torch.isfinite(amax)
    _, e = torch.frexp(torch.where(finite, amax, torch.zeros_like(amax)))
    e = torch.where(finite & (amax >= threshold), e, torch.zeros_like(e)).clamp_min(0).to(torch.float64)
    inv = torch.exp2(-e)
    sq = None
    for x in work:
        x = x * inv.to(device=x.device, dtype=x.dtype).reshape((-1,) + (1,) * (x.dim() - 1))
        n = _rows_norm(x).to(torch.float64).square()
        sq = n if sq is None else sq + n.to(sq.device)
    return sq.sqrt() * torch.exp2(e).to(sq.device)


def scale_rows(leaf: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """``leaf * coef`` row-wise (``coef`` has one entry per row; a 1-element ``coef`` scales a
    single record).  Half-precision leaves are multiplied in float32 and rounded once, so a tiny
    coefficient is not first rounded to a float16 subnormal (which can leave a clipped record
    percents above its bound); other dtypes multiply in their own dtype."""
    wide = torch.float32 if leaf.dtype in (torch.float16, torch.bfloat16) else leaf.dtype
    c = coef.to(device=leaf.device, dtype=wide)
    if leaf.dim() > 0 and c.numel() == leaf.shape[0] and c.dim() == 1:
        c = c.reshape((-1,) + (1,) * (leaf.dim() - 1))
    else:
        c = c.reshape(())
    out = (leaf if leaf.dtype == wide else leaf.to(wide)) * c
    return out if out.dtype == leaf.dtype else out.to(leaf.dtype)


def record_norm(record: Any) -> torch.Tensor:
    """The global L2 norm of one record (0-dim float64), computed exactly as
    :func:`global_norms` computes each row of a batch."""
    leaves = list(record.values()) if is_flat_dict(record) else flatten(record)[0]
    if not leaves:
        raise ValueError("record has no tensors")
    return global_norms([l.unsqueeze(0) for l in leaves])[0]


def check_finite_norms(norms: torch.Tensor, what: str = "record", *, single: bool = False) -> None:
    """Raise ``ValueError`` naming the first record with a NaN or infinite entry (``single``: the
    norms of one record, named without an index).

    ``norms`` come from :func:`global_norms` (a non-finite norm means a non-finite entry: finite
    records never overflow there).  A query fed such a record would return a NaN result, or, after
    clipping, silently drop it.  The check reads the norms on the host: free for CPU tensors, one
    synchronisation per batch on accelerators (the DP optimizer's fast path,
    ``accumulate_records_by_norm``, is not checked: it masks non-finite records itself).
    """
    if _KNOWN_FINITE.get():
        return
    finite = torch.isfinite(norms)
    if bool(finite.all()):
        return
    bad = (~finite).reshape(-1).nonzero()[0, 0].item()
    v = norms.reshape(-1)[bad].item()
    kind = "NaN" if v != v else "infinite"
    name = f"the {what}" if single else f"{what} {bad}"
    raise ValueError(
        f"{name} has a {kind} entry (its L2 norm is {v}); a non-finite record would make the "
        "noised result NaN. Remove or fix such records before they reach the query (the DP optimizer "
        "drops them itself)"
    )


_KNOWN_FINITE: contextvars.ContextVar[bool] = contextvars.ContextVar("records_known_finite", default=False)


@contextlib.contextmanager
def records_known_finite() -> Iterator[None]:
    """Within this context :func:`check_finite_norms` checks nothing.

    For callers that have already replaced every non-finite record by zeros (the DP optimizer
    masks them before any query sees them): on an accelerator the check would read the norms on
    the host, one device synchronisation per batch, to refuse records that cannot be there.
    Never use it to let non-finite records through: the query would return a NaN result.
    """
    token = _KNOWN_FINITE.set(True)
    try:
        yield
    finally:
        _KNOWN_FINITE.reset(token)


def zeros_like(tree: Any) -> Any:
    return tree_map(torch.zeros_like, tree)
