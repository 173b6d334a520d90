"""The release of a Gaussian sum/average step under FSDP2: the clipped sums reduce-scattered one
bucket of parameters at a time, then each rank noises its own shard.

Rank ``r`` holds its local clipped sums ``S_r`` (and public gradients).  For each bucket of
parameters, in the order of the step's template (up to :attr:`FSDPStep.bucket_bytes` of sums and
public gradients per bucket, at least one parameter)::

    buf[s] = [the parts of the bucket's sums in rank s's shard, then of its public gradients]
    out = reduce_scatter(buf)                 rank s receives sum_r buf_r[s]: its shard of S
    the bucket's sums and buffer are freed before the next bucket is formed

(a bucket of one parameter split evenly along dim 0 is already rank-major: it is reduce-scattered
where its sum lies, without a copy), then, on rank ``s``, ``S[s] += N(0, (sigma C)^2 I)`` in place
with its own generator (rank 0 decides the budget on the event), and one all-reduce of the step's
counters (``[noised dropped count,] sensitive, examples, public, refused, failed``) tells every
rank whether to apply.  Each element
of every shard is noised exactly once, by the rank that owns it (the shards are disjoint and cover
every parameter), and the noise never crosses the ranks before the step is applied.

In a ``fit_batch`` step the buckets are reduce-scattered after every physical slot
(:meth:`~.fsdp.FSDPStep.scatter_chunk`: the ranks agreed on the number of slots; a rank without
examples in a slot sends zeros), and each rank adds the slot's shards to its own: the release then
only noises them.  Other steps (the multi-pass API) reduce-scatter once, at the release.

Memory.  With deferred sums (:class:`~pytorch_privacy.optimizer.step_accumulator.DeferredSums`,
which ``DPOptimizer`` asks for under FSDP2), a parameter's clipped sum is formed when its bucket
is, from the activations and output gradients the ghost engine kept: a step holds one bucket's
sums and buffer at a time, and its shards; never the clipped sum of the whole model, with one or
several physical chunks per step.  (A chunk with a dropped (NaN/inf) record, or an engine that
forms all sums at once, forms them at the first bucket; a multi-pass step with several flushes
keeps the earlier flushes' sums full-shaped until the release.)

Trust.  As in plain FSDP2 (and the DDP step), rank ``s`` receives the sum of the ranks' un-noised
shard ``s``: the ranks of one job are inside the privacy boundary; what leaves it is the noised
release (the trained parameters) and the ledger.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch
import torch.distributed as dist

from ..step_accumulator import DeferredSums
from .ddp import _ERROR, _OK, _REFUSED, _gaussian_part, wide_dtype

__all__ = ["scatter_release", "release_own_shards", "reduce_scatter_sums", "plan_buckets"]

#: default :attr:`FSDPStep.bucket_bytes`: sums and public gradients per reduce-scatter
DEFAULT_BUCKET_BYTES = 32 * 2**20


def _chunks(t: torch.Tensor, world: int, dim: int) -> list[torch.Tensor]:
    """FSDP2's split of a full tensor: ``torch.chunk`` along ``dim``, padded with empty chunks."""
    parts = list(torch.chunk(t, world, dim=dim))
    empty_shape = list(t.shape)
    empty_shape[dim] = 0
    parts += [t.new_empty(empty_shape)] * (world - len(parts))
    return parts


def plan_buckets(template: dict[str, torch.Tensor], element_bytes: int, bucket_bytes: int) -> list[list[str]]:
    """The parameter names of each bucket, in template order: a bucket closes before the
    parameter that would take it past ``bucket_bytes`` (``element_bytes`` per parameter element:
    its sum, and its public gradient when both are reduced); a parameter larger than that is a
    bucket of its own."""
    buckets: list[list[str]] = []
    size = 0
    for n, t in template.items():
        b = t.numel() * element_bytes
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


def reduce_scatter_sums(
    step: Any, template: dict[str, torch.Tensor], state: Any, public: dict[str, torch.Tensor] | None, *,
    sums: bool = True, into: dict[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int]:
    """Reduce-scatter full-shaped local sums, one bucket at a time (collective: every rank calls it
    with the same template, ``public is None`` and ``sums``).

    ``state``: the local clipped sums (:class:`DeferredSums` or a dict, consumed: each sum is
    dropped from it once its bucket is formed; ``None``: zeros, nothing formed); ``public``: the
    local public gradients (missing names are zeros) or ``None``; ``sums=False``: the public
    gradients only.  Returns this rank's shards ``{name: tensor}`` of the world's sums and of its
    public gradients (views of one buffer per bucket, in :func:`~.ddp.wide_dtype`), and the bytes this
    rank handed to the collectives.  ``into``: shards of an earlier call, to which each bucket's
    sums are added as it arrives (returned as the sums' shards; the bucket's buffer is freed)."""
    world, rank = step.world_size, step.rank
    wide = wide_dtype(template.values())  # the same on every rank: from the template only
    device = next(iter(template.values())).device
    kinds = (("sum",) if sums else ()) + (("pub",) if public is not None else ())
    per = torch.empty((), dtype=wide).element_size()
    shards: dict[str, torch.Tensor] = {}
    pub_shards: dict[str, torch.Tensor] = {}
    volume = 0
    if not kinds:
        return shards, pub_shards, volume
    for bucket in plan_buckets(template, per * len(kinds), step.bucket_bytes):
        layout = [(kind, n, _chunks(template[n], world, step.sharded[n][1])) for kind in kinds for n in bucket]
        lengths = [sum(parts[s].numel() for _, _, parts in layout) for s in range(world)]
        fulls = [(_take(state, n) if state is not None else None) if kind == "sum" else public.get(n) for kind, n, _ in layout]
        n0 = layout[0][1]
        if (
            len(layout) == 1 and fulls[0] is not None and fulls[0].dtype == wide and fulls[0].is_contiguous()
            and step.sharded[n0][1] == 0 and template[n0].dim() > 0 and template[n0].shape[0] % world == 0
        ):  # one tensor split evenly along dim 0: already rank-major, reduced where it lies (no copy)
            flat = fulls[0].reshape(-1)
        else:
            buf = torch.zeros(world, max(lengths), dtype=wide, device=device)
            pos = [0] * world
            for (kind, n, parts), full in zip(layout, fulls):
                pieces = _chunks(full, world, step.sharded[n][1]) if full is not None else parts
                for s, part in enumerate(pieces):
                    if full is not None:
                        buf[s, pos[s] : pos[s] + part.numel()] = part.reshape(-1)
                    pos[s] += part.numel()
            flat = buf.reshape(-1)
            del buf
        del fulls
        out = torch.empty(max(lengths), dtype=wide, device=device)
        dist.reduce_scatter_single(out, flat, op=dist.ReduceOp.SUM, group=step.group)
        volume += flat.numel() * flat.element_size()
        del flat
        pos_out = 0
        for kind, n, parts in layout:
            shape = parts[rank].shape
            view = out[pos_out : pos_out + shape.numel()].view(shape)
            if kind == "sum" and into is not None:  # added as the bucket arrives; its buffer is freed
                shards[n] = into[n].add_(view)
            else:
                (shards if kind == "sum" else pub_shards)[n] = view
            pos_out += shape.numel()
        del out
    return shards, pub_shards, volume


def scatter_release(step: Any, acc: Any, global_state: Any, local_examples: int, check, divisor: float):
    """Release the step of a Gaussian sum/average query on an FSDP2 model (see the module
    docstring); ``step`` is the :class:`~.fsdp.FSDPStep`, holding the shards its slots already
    reduced (if any).  Returns ``(result, new_global_state, event)`` with ``result`` as ``DTensor``
    shards (``None`` when no rank took a sensitive pass), and leaves the public gradients in
    ``acc.public`` as ``DTensor`` shards."""
    from ..budget import PrivacyBudgetExceeded

    query, template, world = acc.query, acc.template, step.world_size
    names = list(template)
    state = acc.sample_state
    reduced = step.take_reduced()  # what the slots reduced, or None
    if reduced is not None and state is not None:  # (every slot ends with its reduce-scatter)
        raise RuntimeError("FSDP2 release: clipped sums were added after the step's last slot; they would be lost")
    has_sensitive = state is not None or (reduced is not None and reduced.sensitive)
    if state is not None:
        step._check_state(acc, state)
    elif reduced is None:  # (slots reduce only the sums of the built-in Gaussian queries)
        step._check_state(acc, query.initial_sample_state(template))
    public = acc.num_public_passes > 0
    pub = dict(acc.public) if public else None
    shards, pub_shards, volume = reduce_scatter_sums(step, template, state, pub, sums=reduced is None)
    if reduced is not None:
        shards, volume = reduced.shards, volume + reduced.volume
    gauss, gauss_state = _gaussian_part(query, global_state)
    stddev, device = gauss_state.stddev, next(iter(template.values())).device
    draws = any(shards[n].numel() for n in names) and not (isinstance(stddev, (int, float)) and stddev == 0)
    fingerprint = step.step_fingerprint(query, device, draws, global_state, acc.noise_scale)  # before the draws
    code, mine, header, event, new_gauss = _OK, None, None, None, gauss_state
    try:  # this rank's shard, its own noise; nothing has crossed the ranks yet
        for n in names:
            new_gauss, event = gauss.noise_in_place(shards[n].reshape(-1), gauss_state)
        if step.is_recorder and check is not None and event is not None:
            check(event)
    except PrivacyBudgetExceeded as exc:
        header = (str(exc), exc.epsilon, exc.target_epsilon, exc.target_delta, exc.steps)
        code, mine = _REFUSED, exc
    except Exception as exc:  # noqa: BLE001 - the others still join the all-reduce, then stop with this rank
        code, mine = _ERROR, exc
    counters = [float(has_sensitive), float(local_examples), float(public), float(code == _REFUSED), float(code == _ERROR)]
    if step.count_stddev is not None:  # each rank's share: the world's noised count once summed
        counters.insert(0, step._local_noised_count(acc, gauss))
    tail_t = torch.tensor(fingerprint + counters, dtype=wide_dtype(template.values()), device=device)
    dist.all_reduce(tail_t, op=dist.ReduceOp.SUM, group=step.group)
    step.last_volume_bytes = volume + tail_t.numel() * tail_t.element_size()
    tail = tail_t.tolist()
    m = len(fingerprint)
    step.last_noised_count = tail[m] if step.count_stddev is not None else None
    any_sensitive, examples, n_public, n_refused, n_errors = (round(v) for v in tail[-5:])
    step.last_global_examples = examples
    step.refuse_step(tail[:m])
    if n_refused or n_errors:
        return step._stop(header, mine, bool(n_refused) and not n_errors)
    if public and n_public != world:
        raise ValueError("a public pass was taken on some ranks only; take public passes on every rank")
    if public:
        acc.public = step._as_dtensors({n: pub_shards[n] / world for n in names})
    if not any_sensitive:  # no data released; the draws stay spent
        return None, global_state, None
    result = {}
    for n in names:  # in place: the shards are this step's own buffers (no second copy of the release)
        r = shards[n].div_(divisor) if divisor != 1.0 else shards[n]
        result[n] = r.mul_(acc.noise_scale) if acc.noise_scale != 1 else r
    step.last_result_owned = True  # the optimizer may clean them in place (NaN/inf guard)
    new_state = global_state if gauss_state is global_state else attrs.evolve(global_state, numerator_state=new_gauss)
    return step._as_dtensors(result), new_state, event


def release_own_shards(step: Any, acc: Any, global_state: Any, check: Any) -> tuple[Any, Any, Any]:
    """The general path's release under FSDP2 (a query with its own ``get_noised_result``, its sums
    already reduced and sharded): every rank releases its own shard with its own query (its own
    noise), rank 0 decides the budget, and one MAX all-reduce of ``[code, noise fingerprints]`` tells
    every rank whether to apply (a refusal or failure anywhere stops every rank; two ranks' noise
    generators in one state are refused).  Returns ``(result as DTensor shards, new global state,
    event)``."""
    from ..budget import PrivacyBudgetExceeded

    # every rank noises its shard; rank 0 decides the budget; one MAX all-reduce of the ranks'
    # codes tells every rank whether to apply (a failure anywhere stops every rank)
    header: list[Any] = [None]
    mine: BaseException | None = None
    code = _OK
    device = next(iter(acc.sample_state.values())).device if acc.sample_state else torch.device("cpu")
    fingerprint = step.noise_fingerprint(acc.query, device)  # before this step's draws
    try:
        result, new_state, event = acc.finish(global_state)  # this rank's shard, this rank's noise
        if step.is_recorder and check is not None and event is not None:
            check(event)
    except PrivacyBudgetExceeded as exc:
        header = [(str(exc), exc.epsilon, exc.target_epsilon, exc.target_delta, exc.steps)]
        code, mine = _REFUSED, exc
    except Exception as exc:
        code, mine = _ERROR, exc
    # (the fingerprints are zero but on their own rank: MAX gathers them as a sum would)
    control = torch.tensor([code] + fingerprint, dtype=torch.long, device=device)  # NCCL needs device tensors
    dist.all_reduce(control, op=dist.ReduceOp.MAX, group=step.group)
    step.last_volume_bytes += control.numel() * control.element_size()
    values = control.tolist()
    code = values[0]
    step.refuse_shared_noise(values[1:])
    if code == _REFUSED:
        dist.broadcast_object_list(header, src=step._src(), group=step.group)
        if mine is not None:
            raise mine
        msg, eps, target_eps, target_delta, steps = header[0]
        raise PrivacyBudgetExceeded(msg, epsilon=eps, target_epsilon=target_eps, target_delta=target_delta, steps=steps)
    if code == _ERROR:
        if mine is not None:
            raise mine
        raise RuntimeError("another rank failed to release its shard of the step; this rank stops with it")
    return step._as_dtensors(result), new_state, event
