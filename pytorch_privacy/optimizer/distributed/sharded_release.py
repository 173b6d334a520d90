"""The release of a Gaussian sum/average step under FSDP2, one bucket of parameters at a time.

Rank ``r`` holds its local clipped sums ``S_r`` (and public gradients); for each bucket of
parameters, in the order of the step's template (up to :attr:`FSDPStep.bucket_bytes` of sums and
public gradients per bucket, at least one parameter)::

    buf[s] = [the parts of the bucket's sums in rank s's shard, then of its public gradients]
    buf[r, :own] += N(0, (sigma C)^2 I)       rank r noises its own row's sums, and only those
    out = reduce_scatter(buf)                 rank s receives sum_r buf_r[s]: its shard of S + N
    the bucket's sums and buffer are freed before the next bucket is formed

The last bucket carries the step's counters (``[noised dropped count,] sensitive, examples,
public, refused, failed``) at the end of every row, so every rank receives their world sums.
Each element of every shard is noised exactly once, by the rank that owns it, with that rank's
own generator (the shards are disjoint and cover every parameter).

Memory.  With deferred sums (:class:`~pytorch_privacy.optimizer.step_accumulator.DeferredSums`,
which ``DPOptimizer`` asks for under FSDP2), a parameter's clipped sum is formed when its bucket
is, from the activations and output gradients the ghost engine kept: a step holds one bucket's
sums and buffer at a time, and the shards of the release; never the clipped sum of the whole
model.  (Several physical chunks in one step: the earlier chunks' sums are full-shaped, like the
unsharded gradients of a plain FSDP backward accumulating without reduce-scatter; a batch with
a dropped (NaN/inf) record, or an engine that forms all sums at once, forms them at the first
bucket.)

Lockstep and failures.  Every rank runs the same collectives whatever happens: the buckets
depend only on the template (the same on every rank).  A rank whose release fails, or rank 0
when it refuses the step (budget), sends zeros in its later buckets (never an un-noised sum in
place of a noised one), and every rank learns it from the last bucket's counters; the
generators are not rewound (the first bucket's noised sums already crossed the ranks).
"""

from __future__ import annotations

from typing import Any

import attrs
import torch
import torch.distributed as dist

from ..step_accumulator import DeferredSums
from .ddp import _ERROR, _OK, _REFUSED, _gaussian_part

__all__ = ["scatter_release", "plan_buckets"]

#: default :attr:`FSDPStep.bucket_bytes`: sums and public gradients per reduce-scatter
DEFAULT_BUCKET_BYTES = 32 * 2**20


def _chunks(t: torch.Tensor, world: int, dim: int) -> list[torch.Tensor]:
    """FSDP2's split of a full tensor: ``torch.chunk`` along ``dim``, padded with empty chunks."""
    parts = list(torch.chunk(t, world, dim=dim))
    empty_shape = list(t.shape)
    empty_shape[dim] = 0
    parts += [t.new_empty(empty_shape)] * (world - len(parts))
    return parts


def plan_buckets(template: dict[str, torch.Tensor], element_bytes: int, public: bool, bucket_bytes: int) -> list[list[str]]:
    """The parameter names of each bucket, in template order: a bucket closes before the
    parameter that would take it past ``bucket_bytes`` (its sums, and public gradients when
    ``public``); a parameter larger than that is a bucket of its own."""
    per = element_bytes * (2 if public else 1)
    buckets: list[list[str]] = []
    size = 0
    for n, t in template.items():
        b = t.numel() * per
        if buckets and buckets[-1] and size + b <= bucket_bytes:
            buckets[-1].append(n)
            size += b
        else:
            buckets.append([n])
            size = b
    return buckets


def _take(state: Any, name: str) -> torch.Tensor:
    """A parameter's sum, no longer held by ``state`` (the release consumes the sample state)."""
    return state.take(name) if isinstance(state, DeferredSums) else state.pop(name)


def scatter_release(step: Any, acc: Any, global_state: Any, local_examples: int, check, divisor: float):
    """Release the step of a Gaussian sum/average query on an FSDP2 model (see the module
    docstring); ``step`` is the :class:`~.fsdp.FSDPStep`.  Returns ``(result, new_global_state,
    event)`` with ``result`` as ``DTensor`` shards (``None`` when no rank took a sensitive pass),
    and leaves the public gradients in ``acc.public`` as ``DTensor`` shards."""
    from ..budget import PrivacyBudgetExceeded

    query, template, world, rank = acc.query, acc.template, step.world_size, step.rank
    names = list(template)
    has_sensitive = acc.sample_state is not None
    state = acc.sample_state
    if has_sensitive:
        step._check_state(acc, state)
    else:
        step._check_state(acc, query.initial_sample_state(template))
    public = acc.num_public_passes > 0
    wide = torch.float64 if any(t.dtype == torch.float64 for t in template.values()) else torch.float32
    device = next(iter(template.values())).device
    k = 5 if step.count_stddev is None else 6  # [the noised dropped count,] then 5 counters
    buckets = plan_buckets(template, torch.empty((), dtype=wide).element_size(), public, step.bucket_bytes)
    gauss, gauss_state = _gaussian_part(query, global_state)
    step._check_distinct_sources(query, gauss_state.stddev)
    code, mine, header, event, new_gauss = _OK, None, None, None, None
    shards: dict[str, torch.Tensor] = {}
    pub_shards: dict[str, torch.Tensor] = {}
    volume = 0

    def zeros(n: str) -> torch.Tensor:
        t = template[n]
        return torch.zeros(t.shape, dtype=t.dtype, device=t.device)

    kinds = ("sum", "pub") if public else ("sum",)
    for b, bucket in enumerate(buckets):
        last = b == len(buckets) - 1
        sent = code == _OK  # after a failure or refusal: zeros only
        layout = [(kind, n, _chunks(template[n], world, step.sharded[n][1])) for kind in kinds for n in bucket]
        lengths = [sum(parts[s].numel() for _, _, parts in layout) for s in range(world)]
        length = max(lengths)
        buf = torch.zeros(world, length + (k if last else 0), dtype=wide, device=device)
        if sent:
            rows: list[list[torch.Tensor]] = [[] for _ in range(world)]
            for kind, n, _ in layout:
                if kind == "sum":
                    full = _take(state, n) if has_sensitive else zeros(n)
                else:
                    full = acc.public.get(n)
                    full = zeros(n) if full is None else full
                for s, part in enumerate(_chunks(full, world, step.sharded[n][1])):
                    rows[s].append(part.reshape(-1).to(wide))
                del full
            for s, row in enumerate(rows):
                if lengths[s]:
                    torch.cat(row, out=buf[s, : lengths[s]])
            del rows
        own = sum(parts[rank].numel() for kind, _, parts in layout if kind == "sum")
        if sent:
            try:
                noised, new_gauss, ev = gauss.get_noised_result(buf[rank, :own], gauss_state)
                buf[rank, :own] = noised
                del noised
                if event is None:
                    event = ev
                    if step.is_recorder and check is not None and event is not None:
                        check(event)
            except PrivacyBudgetExceeded as exc:
                header = (str(exc), exc.epsilon, exc.target_epsilon, exc.target_delta, exc.steps)
                code, mine = _REFUSED, exc
            except Exception as exc:  # noqa: BLE001 - the others still join the collectives, then stop with this rank
                code, mine = _ERROR, exc
                buf.zero_()  # this bucket's noise may be missing: send nothing of it
        if last:
            counters = [float(has_sensitive), float(local_examples), float(public), float(code == _REFUSED), float(code == _ERROR)]
            if k == 6:  # the same share in every row: every rank receives the world's noised count
                counters.insert(0, step._local_noised_count(acc, gauss))
            buf[:, length:] = torch.tensor(counters, dtype=wide)
        out = torch.empty(buf.shape[1], dtype=wide, device=device)
        dist.reduce_scatter_single(out, buf.reshape(-1), op=dist.ReduceOp.SUM, group=step.group)
        volume += buf.numel() * buf.element_size()
        del buf
        pos = 0
        for kind, n, parts in layout:
            shape = parts[rank].shape
            (shards if kind == "sum" else pub_shards)[n] = out[pos : pos + shape.numel()].view(shape)
            pos += shape.numel()
        if last:
            tail = out[length:].tolist()
    step.last_volume_bytes = volume
    step.last_noised_count = tail[0] if k == 6 else None
    any_sensitive, examples, n_public, n_refused, n_errors = (round(v) for v in tail[-5:])
    step.last_global_examples = examples
    if n_refused or n_errors:
        return step._stop(header, mine, bool(n_refused) and not n_errors)
    if public and n_public != world:
        raise ValueError("a public pass was taken on some ranks only; take public passes on every rank")
    if public:
        acc.public = step._as_dtensors({n: pub_shards[n] / world for n in names})
    if not any_sensitive:  # no data released; the draws stay spent: the reduced buffers showed them to every rank
        return None, global_state, None
    result = {}
    for n in names:
        r = shards[n] / divisor if divisor != 1.0 else shards[n]
        result[n] = r * acc.noise_scale if acc.noise_scale != 1 else r
    new_state = global_state if gauss_state is global_state else attrs.evolve(global_state, numerator_state=new_gauss)
    return step._as_dtensors(result), new_state, event
