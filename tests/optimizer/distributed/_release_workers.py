"""Process bodies for the tests of FSDP2's bucketed release (``distributed/sharded_release.py``):
training with small buckets, and a trace of when each clipped sum is formed against the
reduce-scatters (module level: ``torch.multiprocessing.spawn`` pickles them by name)."""

from __future__ import annotations

import os

import torch

from . import _fsdp_workers as fw
from . import _workers as w


def set_bucket_bytes(n: int) -> None:
    """Every ``FSDPStep`` built from now on in this process starts with ``bucket_bytes = n``."""
    from pytorch_privacy.optimizer.distributed import fsdp

    fsdp.DEFAULT_BUCKET_BYTES = n


class Trace:
    """Logs, in order, the clipped sums formed (``("sums", names)``: ``weighted_sum`` or
    ``weighted_sum_of_finite`` of every parameter, ``weighted_sum_of`` of some) and the release's reduce-scatters (``("rs", elements)``)."""

    def __init__(self):
        import pytorch_privacy.optimizer.distributed.sharded_release as sr
        from pytorch_privacy.optimizer.engines.base import MaterializedGradients
        from pytorch_privacy.optimizer.engines.ghost_gradients import GhostGradients

        self.events: list[tuple] = []
        ev = self.events
        for cls in (GhostGradients, MaterializedGradients):
            ws, wsf, wso = cls.weighted_sum, cls.weighted_sum_of_finite, cls.weighted_sum_of

            def weighted_sum(pe, c, _ws=ws):
                ev.append(("sums", tuple(pe.names)))
                return _ws(pe, c)

            def weighted_sum_of_finite(pe, c, _wsf=wsf):
                ev.append(("sums", tuple(pe.names)))
                return _wsf(pe, c)

            def weighted_sum_of(pe, c, names, *, finite=False, _wso=wso):
                ev.append(("sums", tuple(names)))
                return _wso(pe, c, names, finite=finite)

            cls.weighted_sum, cls.weighted_sum_of_finite, cls.weighted_sum_of = weighted_sum, weighted_sum_of_finite, weighted_sum_of
        rs = sr.dist.reduce_scatter_single

        def reduce_scatter_single(out, inp, *a, **k):
            ev.append(("rs", inp.numel()))
            return rs(out, inp, *a, **k)

        sr.dist = _Dist(sr.dist, reduce_scatter_single)


class _Dist:
    """``torch.distributed`` with one function replaced (for the module under test only)."""

    def __init__(self, base, reduce_scatter_single):
        self._base, self.reduce_scatter_single = base, reduce_scatter_single

    def __getattr__(self, name):
        return getattr(self._base, name)


def bucketed(rank, world, port, out_dir, bucket_bytes, cases):
    """Noise-free training of the four-unit model, 3 steps per case (``(engine, splits, kw)`` as
    ``split_train``); per case the parameters and the events of the last step."""
    set_bucket_bytes(bucket_bytes)
    trace = Trace()
    results = []
    for engine, splits, kw in cases:
        model = fw.shard(fw.deep_model())
        opt, _ = fw.split_train(model, engine, w.make_batches(len(splits)), splits, rank=rank, world=world,
                                res=fw.Residency(), **dict(kw))
        trace.events.clear()
        x, y = w.make_batches(1, seed=9)[0]
        k = splits[-1]
        opt.fit_batch(x[:k], y[:k]) if rank == 0 else opt.fit_batch(x[k:], y[k:])
        refused = []
        for bad in (0, -1, 1.5, True, "8MiB"):
            try:
                opt.distributed_step.bucket_bytes = bad
            except ValueError:
                refused.append(bad)
        results.append({"params": fw.full_params(model), "events": list(trace.events), "refused": refused,
                        "bucket_bytes": opt.distributed_step.bucket_bytes,
                        "path": opt.distributed_step.last_path, "volume": opt.distributed_step.last_volume_bytes,
                        "sizes": {n: p.numel() for n, p in model.named_parameters()}})
    torch.save(results, os.path.join(out_dir, f"bucketed{rank}.pt"))


def with_buckets(rank, world, port, bucket_bytes, fn_name, *args):
    """``fn_name`` of ``_fsdp_workers`` / ``_workers`` (in that order) with small buckets."""
    set_bucket_bytes(bucket_bytes)
    fn = getattr(fw, fn_name, None) or getattr(w, fn_name)
    fn(rank, world, port, *args)


def multipass(rank, world, port, out_dir, bucket_bytes):
    """The multi-pass API (two sensitive passes with a flush between, a public pass) on the sharded
    two-layer model: no slots, the sums and public gradients are reduced at the release."""
    set_bucket_bytes(bucket_bytes)
    model = fw.shard(w.make_model())
    w.train(model, "ghost", w.make_batches(), rank=rank, world=world, passes=True)
    torch.save(fw.full_params(model), os.path.join(out_dir, f"multipass{rank}.pt"))


def ddp_sums(rank, world, port, out_dir):
    """Two DDP steps (ghost engine, then functorch); the sums formed in each step's release."""
    from pytorch_privacy.optimizer import DPGaussianOptimizer
    from torch import nn

    trace = Trace()
    out = {}
    for engine in ("ghost", "functorch"):
        model = nn.parallel.DistributedDataParallel(w.make_model())
        opt = DPGaussianOptimizer(
            torch.optim.SGD(model.module.parameters(), lr=0.5), model, w.loss_fn(), l2_norm_clip=0.3,
            noise_multiplier=1.0, expected_batch_size=8, engine=engine, generator=torch.Generator().manual_seed(rank),
        )
        for x, y in w.make_batches(2):
            trace.events.clear()
            opt.fit_batch(x[rank * 4:(rank + 1) * 4], y[rank * 4:(rank + 1) * 4])
        out[engine] = {"events": list(trace.events), "names": [n for n, _ in model.module.named_parameters()]}
    torch.save(out, os.path.join(out_dir, f"ddpsums{rank}.pt"))


def mismatched_settings(rank, world, port, out_dir):
    """``bucket_bytes``, then ``defers_sums``, set differently on rank 1: each ``fit_batch`` must
    refuse on every rank (before any collective of the step beyond the plan), then train on once
    the settings agree again."""
    model = fw.shard(fw.deep_model())
    opt, _ = fw.split_train(model, "ghost", w.make_batches(1), [4], rank=rank, world=world, res=fw.Residency())
    step = opt.distributed_step
    x, y = w.make_batches(1, seed=5)[0]
    errors = {}
    for name, other in (("bucket_bytes", 1), ("defers_sums", False)):
        default = getattr(step, name)
        if rank == 1:
            setattr(step, name, other)
        try:
            opt.fit_batch(x[rank * 4:(rank + 1) * 4], y[rank * 4:(rank + 1) * 4])
            errors[name] = None
        except ValueError as exc:
            errors[name] = str(exc)
        setattr(step, name, default)
    opt.fit_batch(x[rank * 4:(rank + 1) * 4], y[rank * 4:(rank + 1) * 4])  # agreed again: a step
    torch.save({"errors": errors, "path": step.last_path}, os.path.join(out_dir, f"mismatch{rank}.pt"))
