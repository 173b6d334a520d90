"""Process bodies for the FSDP2 tests (module level: ``torch.multiprocessing.spawn`` pickles them
by name).  Every rank shards the same model with ``fully_shard`` (each Linear, then the root)."""

from __future__ import annotations

import os

import torch
from torch import nn

from . import _workers as w


def shard(model: nn.Module, skip_last: bool = False) -> nn.Module:
    """``fully_shard`` on each Linear (``skip_last``: not the last one, whose parameters then
    belong to the root's unit), then on the root."""
    from torch.distributed.fsdp import fully_shard

    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    for m in linears[:-1] if skip_last else linears:
        fully_shard(m)
    fully_shard(model)
    return model


def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded parameters (all-gathered; collective)."""
    return {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}


def train(model, engine, batches, *, rank=0, world=1, sigma=0.0, generator_seed=0, uneven=False, **opt_kwargs):
    """3 DP steps; rank ``r`` of ``world`` takes the ``r``-th consecutive share of each global batch
    (``uneven``: rank 0 takes all of it, the others run with empty local batches)."""
    from pytorch_privacy.optimizer import DPGaussianOptimizer

    opt = DPGaussianOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.5), model, w.loss_fn(), l2_norm_clip=0.3, noise_multiplier=sigma,
        expected_batch_size=8, engine=engine, generator=torch.Generator().manual_seed(generator_seed + rank),
        **opt_kwargs,
    )
    for x, y in batches:
        if uneven:
            opt.fit_batch(x if rank == 0 else x[:0], y if rank == 0 else y[:0])
            continue
        share = x.shape[0] // world
        opt.fit_batch(x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share])
    return opt


def equivalence(rank, world, port, variants, out_dir):
    results = []
    for engine, kw in variants:
        model = shard(w.make_model())
        opt = train(model, engine, w.make_batches(), rank=rank, world=world, **dict(kw))
        assert all(type(p).__name__ == "DTensor" for p in model.parameters())
        results.append({"params": full_params(model), "ledger": opt.ledger.to_dict() if opt.ledger else None,
                        "volume": opt.distributed_step.last_volume_bytes})
    torch.save(results, os.path.join(out_dir, f"fsdp{rank}.pt"))


def norms(rank, world, port, engines, out_dir):
    """Per-example norms of the sharded model on a batch (the step started by zero_grad)."""
    from pytorch_privacy.optimizer import DPGaussianOptimizer

    out = {}
    x, y = w.make_batches(1, batch=6, seed=7 + rank)[0]
    for engine in engines:
        model = shard(w.make_model())
        opt = DPGaussianOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.5), model, w.loss_fn(), l2_norm_clip=0.3, noise_multiplier=0.0,
            expected_batch_size=8, engine=engine, generator=torch.Generator().manual_seed(rank),
        )
        opt.zero_grad()
        out[engine] = opt.per_example_gradients(x, y).norms().detach().clone()
        opt.accumulate_pass(opt.per_example_gradients(x, y))
        opt.step()
    out["x"], out["y"] = x, y
    torch.save(out, os.path.join(out_dir, f"norms{rank}.pt"))


def noise(rank, world, port, out_dir, sigma, clip, denominator, same_seed, general=False):
    """One step with empty local batches on every rank: the update is -noise / D exactly.
    ``general``: a query with its own ``get_noised_result`` (all-reduce, then each rank noises
    its shard through ``acc.finish``) instead of the Gaussian reduce-scatter path."""
    from pytorch_privacy.dp_query import GaussianAverageQuery, PrivacyLedger
    from pytorch_privacy.optimizer import DPGaussianOptimizer, DPOptimizer

    class OwnRelease(GaussianAverageQuery):
        def get_noised_result(self, sample_state, global_state):
            return super().get_noised_result(sample_state, global_state)

    torch.manual_seed(0)
    model = shard(nn.Sequential(nn.Linear(100, 50)))
    before = full_params(model)
    gen = torch.Generator().manual_seed(5 if same_seed else 5 + rank)
    sgd = torch.optim.SGD(model.parameters(), lr=1.0)
    ledger = PrivacyLedger(100, denominator / 100)
    if general:
        query = OwnRelease(clip, sigma * clip, denominator, generator=gen)
        opt = DPOptimizer(sgd, model, w.loss_fn(), query, ledger=ledger)
    else:
        opt = DPGaussianOptimizer(sgd, model, w.loss_fn(), l2_norm_clip=clip, noise_multiplier=sigma, ledger=ledger,
                                  generator=gen)
    try:
        opt.fit_batch(torch.zeros(0, 100), torch.zeros(0, dtype=torch.long))
    except ValueError as exc:
        torch.save({"error": str(exc)}, os.path.join(out_dir, f"noise{rank}.pt"))
        return
    after = full_params(model)
    update = torch.cat([(after[n] - before[n]).reshape(-1) for n in after])
    torch.save({"update": update, "volume": opt.distributed_step.last_volume_bytes, "steps": opt.ledger.steps,
                "ledger": opt.ledger.to_dict()},
               os.path.join(out_dir, f"noise{rank}.pt"))


def resume(rank, world, port, out_dir):
    """Two noisy steps, a checkpoint through torch.save, a second optimizer loading it: both then
    take an empty-batch step; their updates (pure noise) must be equal (each rank's noise stream
    continues from the checkpoint)."""
    import io

    model = shard(w.make_model())
    opt = train(model, "ghost", w.make_batches(2), rank=rank, world=world, sigma=1.0)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    model2 = shard(w.make_model())
    opt2 = train(model2, "ghost", [], rank=rank, world=world, sigma=1.0, generator_seed=100)
    opt2.load_state_dict(torch.load(buf, weights_only=False))
    updates = []
    for m, o in ((model, opt), (model2, opt2)):
        before = full_params(m)
        o.fit_batch(torch.zeros(0, 6), torch.zeros(0, dtype=torch.long))
        after = full_params(m)
        updates.append(torch.cat([(after[n] - before[n]).reshape(-1) for n in after]))
    torch.save({"updates": updates, "steps": opt2.steps}, os.path.join(out_dir, f"resume{rank}.pt"))


# -- per-unit steps ----------------------------------------------------------------------------
def deep_model(seed: int = 0) -> nn.Module:
    """Four Linear units (plus the root): enough units for residency to mean something."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))


class Residency:
    """Counts FSDP2 parameter groups unsharded at once (FSDPParamGroup._to_unsharded/_to_sharded
    patched in this process only): ``peak`` groups and ``peak_elems`` parameter elements."""

    def __init__(self):
        from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

        self.live: dict[int, int] = {}
        self.peak = self.peak_elems = self.gathers = 0
        orig_un, orig_sh = FSDPParamGroup._to_unsharded, FSDPParamGroup._to_sharded
        res = self

        def to_unsharded(group):
            if not group.is_unsharded:
                res.gathers += 1
                res.live[id(group)] = sum(fp.sharded_param.numel() for fp in group.fsdp_params)
                res.peak = max(res.peak, len(res.live))
                res.peak_elems = max(res.peak_elems, sum(res.live.values()))
            orig_un(group)

        def to_sharded(group):
            res.live.pop(id(group), None)
            orig_sh(group)

        FSDPParamGroup._to_unsharded, FSDPParamGroup._to_sharded = to_unsharded, to_sharded

    def reset(self):
        self.peak, self.peak_elems, self.gathers = len(self.live), sum(self.live.values()), 0


def split_train(model, engine, batches, splits, *, rank=0, world=1, res=None, **opt_kwargs):
    """Noise-free DP steps; in step ``t`` rank 0 takes the first ``splits[t]`` examples of the global
    batch and rank 1 the rest (one process: the whole batch); ``zero_grad_first=True``: each step
    is preceded by ``opt.zero_grad()`` and a ``no_grad`` forward.  Returns the optimizer and per step
    ``(path, peak groups, peak elements, all-gathers, first Linear sharded during the last one's forward)``."""
    from pytorch_privacy.optimizer import DPGaussianOptimizer
    from torch.distributed.tensor import DTensor

    per_unit = opt_kwargs.pop("per_unit", True)
    zero_grad_first = opt_kwargs.pop("zero_grad_first", False)
    opt = DPGaussianOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.5), model, w.loss_fn(), l2_norm_clip=0.3, noise_multiplier=0.0,
        expected_batch_size=8, engine=engine, generator=torch.Generator().manual_seed(rank), **opt_kwargs,
    )
    if world > 1:
        opt.distributed_step.per_unit = per_unit
    seen: list[bool] = []
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    linears[-1].register_forward_pre_hook(lambda m, a: seen.append(isinstance(linears[0].weight, DTensor)))
    trace = []
    for (x, y), k in zip(batches, splits):
        xs, ys = (x, y) if world == 1 else ((x[:k], y[:k]) if rank == 0 else (x[k:], y[k:]))
        if zero_grad_first:  # as a plain loop would: zero_grad(), and an evaluation forward, before the step
            opt.zero_grad()
            with torch.no_grad():
                model(xs)
        seen.clear()
        if res is not None:
            res.reset()
        opt.fit_batch(xs, ys)
        if world > 1:
            trace.append((opt.distributed_step.last_path, res.peak, res.peak_elems, res.gathers, all(seen) and bool(seen)))
    return opt, trace


def per_unit(rank, world, port, cases, out_dir):
    res = Residency()
    results = []
    for engine, splits, kw in cases:
        kw = dict(kw)
        model = shard(deep_model(), skip_last=kw.pop("root_owns_last", False))
        elems = sum(p.numel() for p in model.parameters())
        _, trace = split_train(model, engine, w.make_batches(len(splits)), splits, rank=rank, world=world, res=res, **kw)
        results.append({"params": full_params(model), "trace": trace, "elems": elems})
    torch.save(results, os.path.join(out_dir, f"unit{rank}.pt"))


def per_unit_norms(rank, world, port, out_dir):
    """The per-example norms the ghost engine computes in a per-unit step (step 2; step 1 probes),
    with the full parameters before that step."""
    from pytorch_privacy.optimizer.engines.ghost_gradients import GhostGradients

    captured = []
    orig = GhostGradients.norms

    def norms(self):
        out = orig(self)
        captured.append(out.detach().clone())
        return out

    GhostGradients.norms = norms
    model = shard(deep_model())
    (x1, y1), (x2, y2) = w.make_batches(2, batch=12, seed=3 + rank)
    opt, _ = split_train(model, "ghost", [(x1, y1)], [6], rank=0, world=1)  # every rank its own 12 examples
    before = full_params(model)
    captured.clear()
    opt.fit_batch(x2, y2)
    torch.save({"norms": captured, "path": opt.distributed_step.last_path, "before": before, "x": x2, "y": y2},
               os.path.join(out_dir, f"unorms{rank}.pt"))


def new_signature(rank, world, port, out_dir):
    """Sequences of T positions: a signature new to one rank only sends both to whole-model."""
    from pytorch_privacy.optimizer import DPGaussianOptimizer

    torch.manual_seed(0)
    model = shard(nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)))

    def loss(out, y):
        return nn.functional.cross_entropy(out.mean(1), y, reduction="none")

    opt = DPGaussianOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.5), model, loss, l2_norm_clip=0.3, noise_multiplier=1.0,
        expected_batch_size=8, engine="ghost", generator=torch.Generator().manual_seed(10 + rank),
    )
    g = torch.Generator().manual_seed(rank)
    paths = []
    for t in ([3, 3], [3, 3], [3, 5], [3, 5], [4, 4]):
        x = torch.randn(4, t[rank], 6, generator=g)
        opt.fit_batch(x, torch.randint(0, 3, (4,), generator=g))
        paths.append(opt.distributed_step.last_path)
    torch.save({"paths": paths, "params": full_params(model), "steps": opt.ledger.steps if opt.ledger else None},
               os.path.join(out_dir, f"sig{rank}.pt"))


def double_forward(rank, world, port, out_dir):
    """An engine that runs a second forward in a per-unit step is stopped before its all-gather."""
    from pytorch_privacy.optimizer.engines.ghost_engine import GhostEngine

    model = shard(deep_model())
    opt, _ = split_train(model, "ghost", w.make_batches(1), [4], rank=rank, world=world, res=Residency())
    orig = GhostEngine.compute

    def twice(self, *args, **kwargs):
        orig(self, *args, **kwargs)
        return orig(self, *args, **kwargs)

    GhostEngine.compute = twice
    x, y = w.make_batches(1, seed=5)[0]
    try:
        opt.fit_batch(x[rank * 4:(rank + 1) * 4], y[rank * 4:(rank + 1) * 4])
        out = {"error": None}
    except RuntimeError as exc:
        out = {"error": str(exc)}
    torch.save(out, os.path.join(out_dir, f"twice{rank}.pt"))


def per_unit_noise(rank, world, port, out_dir, sigma, clip, denominator):
    """Two twins of one sharded Linear(100, 50), noise-free and noisy, take a first step at lr 0
    (it verifies and traces the batch: whole-model) and a second, per-unit, at lr 1 on the same
    examples: the difference of their updates is the noise / D alone."""
    from pytorch_privacy.optimizer import DPGaussianOptimizer

    twins = []
    for s in (0.0, sigma):
        torch.manual_seed(0)
        model = shard(nn.Sequential(nn.Linear(100, 50)))
        opt = DPGaussianOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), model, w.loss_fn(), l2_norm_clip=clip,
                                  noise_multiplier=s, expected_batch_size=denominator,
                                  generator=torch.Generator().manual_seed(50 + rank))
        twins.append((model, opt))
    g = torch.Generator().manual_seed(rank)
    batches = [(torch.randn(3 + rank, 100, generator=g), torch.randint(0, 50, (3 + rank,), generator=g)) for _ in range(2)]
    updates, paths = [], []
    for model, opt in twins:
        opt.fit_batch(*batches[0])
        opt.param_groups[0]["lr"] = 1.0
        before = full_params(model)
        opt.fit_batch(*batches[1])
        paths.append(opt.distributed_step.last_path)
        after = full_params(model)
        updates.append(torch.cat([(after[n] - before[n]).reshape(-1) for n in after]))
    torch.save({"noise": updates[1] - updates[0], "clean": updates[0], "paths": paths},
               os.path.join(out_dir, f"unoise{rank}.pt"))


class ViewFlatten(nn.Module):
    """``x.view(B, -1)``: fails on zero examples (the -1 is ambiguous)."""

    def forward(self, x):
        return x.view(x.shape[0], -1)


def zero_examples_fail(rank, world, port, out_dir):
    """A model whose forward fails on zero examples keeps the whole-model path (with a warning)."""
    import warnings

    torch.manual_seed(0)
    model = shard(nn.Sequential(ViewFlatten(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, trace = split_train(model, "ghost", [(x.view(8, 2, 3), y) for x, y in w.make_batches(3)], [4, 8, 4],
                               rank=rank, world=world, res=Residency())
    msgs = [str(c.message) for c in caught if "zero examples" in str(c.message)]
    torch.save({"paths": [t[0] for t in trace], "warnings": msgs}, os.path.join(out_dir, f"zero{rank}.pt"))


def poisson_per_unit(rank, world, port, out_dir, n, q, steps):
    """Noise-free steps on a DistributedDPDataLoader (seeded per rank): each rank's batches, the
    step paths and the final parameters."""
    from torch.utils.data import TensorDataset

    from pytorch_privacy.optimizer import DPGaussianOptimizer
    from pytorch_privacy.optimizer.distributed import DistributedDPDataLoader

    g = torch.Generator().manual_seed(3)
    data = TensorDataset(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g))
    loader = DistributedDPDataLoader(data, q, steps=steps, generator=torch.Generator().manual_seed(11 + rank))
    model = shard(deep_model())
    opt = DPGaussianOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.5), model, w.loss_fn(), l2_norm_clip=0.3, noise_multiplier=0.0,
        data_loader=loader, engine="ghost", generator=torch.Generator().manual_seed(rank),
    )
    batches, paths = [], []
    for x, y in loader:
        opt.fit_batch(x, y)
        batches.append((x, y))
        paths.append(opt.distributed_step.last_path)
    torch.save({"batches": batches, "paths": paths, "params": full_params(model)}, os.path.join(out_dir, f"pois{rank}.pt"))


class EarlyUse(nn.Module):
    """Uses the second Linear's weight before that unit's forward, for batches of 3 only (a
    data-dependent use outside the owning module that no earlier batch revealed)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        extra = nn.functional.linear(h, self.b.weight) if x.shape[0] == 3 else 0
        return self.b(h) + extra


def early_use(rank, world, port):
    """Step 1 (4 examples each) probes; step 2 gives rank 0 three examples: its per-unit forward
    meets the second unit's parameter before that unit's forward and must raise."""
    model = shard(EarlyUse())
    x, y = w.make_batches(1, batch=8)[0]
    opt, _ = split_train(model, "ghost", [(x, y)], [4], rank=rank, world=world, res=Residency())
    x2, y2 = w.make_batches(1, batch=8, seed=2)[0]
    opt.fit_batch(x2[:3], y2[:3]) if rank == 0 else opt.fit_batch(x2[3:], y2[3:])


def naive_norms(model, x, y, rank: int):
    """Per-example gradient norms of ``model`` computed one example at a time (the reference), and
    the norms over rank ``rank``'s half of every gradient alone (what a per-shard norm would be)."""
    expected, own_shard = [], []
    for i in range(x.shape[0]):
        loss = w.loss_fn()(model(x[i:i + 1]), y[i:i + 1]).sum()
        grads = torch.autograd.grad(loss, list(model.parameters()))
        expected.append(torch.sqrt(sum((g ** 2).sum() for g in grads)))
        own_shard.append(torch.sqrt(sum((torch.chunk(g, 2, 0)[rank] ** 2).sum() for g in grads)))
    return torch.stack(expected), torch.stack(own_shard)


def autocast_paths(rank, world, port, out_dir):
    """Three bf16-autocast steps on rank ``rank``'s half of each batch, once with per-unit steps and
    once whole-model (noise off): saves both runs' parameters, the paths taken and the dtypes of
    the clipped sums the ghost engine formed."""
    from pytorch_privacy.optimizer import DPGaussianOptimizer
    from pytorch_privacy.optimizer.engines.ghost_gradients import GhostGradients

    dtypes = set()
    formed = GhostGradients._weighted_sum

    def weighted_sum(pe, *args):
        sums = formed(pe, *args)
        dtypes.update(str(t.dtype) for t in sums.values())
        return sums

    GhostGradients._weighted_sum = weighted_sum
    out = {}
    for per_unit in (True, False):
        model = shard(deep_model())
        opt = DPGaussianOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.5), model, w.loss_fn(), l2_norm_clip=0.3, noise_multiplier=0.0,
            expected_batch_size=8, generator=torch.Generator().manual_seed(rank),
        )
        opt.distributed_step.per_unit = per_unit
        paths = []
        for x, y in w.make_batches(3):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                opt.fit_batch(x[rank * 4:(rank + 1) * 4], y[rank * 4:(rank + 1) * 4])
            paths.append(opt.distributed_step.last_path)
        out[per_unit] = {"params": full_params(model), "paths": paths}
    out["sum_dtypes"] = sorted(dtypes)
    torch.save(out, os.path.join(out_dir, f"autocast{rank}.pt"))
