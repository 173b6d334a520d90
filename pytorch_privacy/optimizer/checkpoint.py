"""Checkpoints of :class:`~pytorch_privacy.optimizer.DPOptimizer`: what is saved, and what a load
refuses.

A DPOptimizer state dict holds the wrapped optimizer's state, the query's global state, the state
of every :class:`~pytorch_privacy.dp_query.randomness.RandomSource` the query owns, the ledger, the
step count, a run id, the query's *configuration* (its initial global state: clip ``C``, noise
stddev ``sigma*C``, ...), and the sampler state of the data loader given as ``data_loader=`` (so a resumed
run continues its sampling stream too).  It holds only tensors and plain containers, so ``torch.load(weights_only=True)``
reads it.

Loading is refused with a ``ValueError`` (nothing is changed) when the checkpoint contradicts the
optimizer it is loaded into, instead of silently overriding the object:

* a different query configuration (e.g. a checkpoint of a sigma=1 run into an optimizer built
  with sigma=3): the optimizer's attributes and its releases would disagree.  Build the optimizer
  with the checkpoint's settings.  (Adaptive state such as a learnt clip is *restored*: only the
  initial configuration must match.)
* different ledger sampling settings (population size, q, scheme): the loader is the truth about
  sampling, and a checkpoint must not rewrite it.
* a ledger in one and not the other.
* a checkpoint saved by another rank of a distributed run (a one-process optimizer takes rank 0's):
  only rank 0's holds the ledger, and each rank's its own noise stream (``_check_rank``).
* an earlier checkpoint of this run loaded into the optimizer that went past it, unless
  ``rollback=True`` (``_is_rollback``): an exact restore would erase the ledger's records of the
  steps since and make the replayed steps reuse their noise.  A rollback keeps the ledger and the
  generators going, and takes only a checkpoint carrying this optimizer's run id.

Generator states are restored exactly, so a resumed run continues the noise stream of the run it
resumes; it never starts it again, whatever the script seeds.  Checkpoints of version 1 (a bare list
``"generators"`` of ``torch.Generator`` states and no configuration) still load (without the configuration check, which they cannot support).
"""

from __future__ import annotations

import secrets
from typing import Any

import attrs
import torch

from ..dp_query.dp_query import DPQuery
from ..dp_query.events import event_from_dict
from ..dp_query.privacy_ledger import PrivacyLedger
from ..dp_query.randomness import RandomSource

__all__ = [
    "STATE_DICT_FORMAT",
    "STATE_DICT_VERSION",
    "find_random_sources",
    "to_plain",
    "from_plain",
    "snapshot_sources",
    "restore_sources",
]

STATE_DICT_FORMAT = "pytorch_privacy.dp_optimizer"
STATE_DICT_VERSION = 2
_READABLE_VERSIONS = (1, 2)


def find_random_sources(query: DPQuery) -> list[RandomSource]:
    """The :class:`RandomSource` objects of ``query`` and the queries it holds, deduplicated (a
    source shared by two sub-queries is one stream), in a deterministic order.

    A query may list its sources itself with a ``random_sources()`` method; otherwise its
    attributes are searched (queries, lists, tuples and dicts of them, to any depth).
    """
    found: list[RandomSource] = []
    seen: set[int] = set()
    stack: list[Any] = [query]
    while stack:
        o = stack.pop()
        if id(o) in seen:
            continue
        seen.add(id(o))
        if isinstance(o, RandomSource):
            found.append(o)
        elif isinstance(o, DPQuery):
            own = getattr(o, "random_sources", None)
            children = list(own()) if callable(own) else list(vars(o).values())
            stack.extend(reversed(children))
        elif isinstance(o, (list, tuple)):
            stack.extend(reversed(o))
        elif isinstance(o, dict):
            stack.extend(reversed(list(o.values())))
    return found


def snapshot_sources(sources: list[RandomSource]) -> list[dict[str, Any]]:
    """States to undo draws with (a refused step must not advance any generator)."""
    return [s.state_dict() for s in sources]


def restore_sources(sources: list[RandomSource], states: list[dict[str, Any]]) -> None:
    for s, st in zip(sources, states):
        s.load_state_dict(st)


# -- global state <-> plain containers (torch.load(weights_only=True) safe) -------------
def to_plain(x: Any) -> Any:
    """Tensors, numbers, strings, lists and dicts only (attrs classes become dicts)."""
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if attrs.has(type(x)):
        return {a.name: to_plain(getattr(x, a.name)) for a in attrs.fields(type(x))}
    if isinstance(x, (tuple, list)):
        return [to_plain(v) for v in x]
    if isinstance(x, dict):
        return {k: to_plain(v) for k, v in x.items()}
    raise TypeError(f"cannot checkpoint query state of type {type(x).__name__}")


def from_plain(template: Any, plain: Any, where: str = "global_state") -> Any:
    """The inverse of :func:`to_plain`, shaped (types, devices, dtypes) like ``template``."""

    def bad(msg):
        return ValueError(f"checkpointed query state does not match this query at {where}: {msg}")

    if isinstance(template, torch.Tensor):
        if not isinstance(plain, torch.Tensor):
            plain = torch.as_tensor(plain)
        return plain.to(device=template.device, dtype=template.dtype).clone()
    if template is None or isinstance(template, (bool, int, float, str)):
        if isinstance(plain, torch.Tensor) and plain.numel() == 1:
            plain = plain.item()
        if template is not None and plain is not None and not isinstance(plain, (bool, int, float, str)):
            raise bad(f"expected a {type(template).__name__}, got {type(plain).__name__}")
        return plain
    if attrs.has(type(template)):
        if not isinstance(plain, dict):
            raise bad(f"expected fields of {type(template).__name__}")
        kwargs = {}
        for a in attrs.fields(type(template)):
            if a.name not in plain:
                raise bad(f"missing field {a.name!r}")
            if not a.init:
                continue
            alias = getattr(a, "alias", None) or a.name.lstrip("_")
            kwargs[alias] = from_plain(getattr(template, a.name), plain[a.name], f"{where}.{a.name}")
        return attrs.evolve(template, **kwargs)
    if isinstance(template, (tuple, list)):
        if not isinstance(plain, (tuple, list)) or len(plain) != len(template):
            raise bad(f"expected a sequence of length {len(template)}")
        vals = [from_plain(t, p, f"{where}[{i}]") for i, (t, p) in enumerate(zip(template, plain))]
        if isinstance(template, tuple) and hasattr(template, "_fields"):
            return type(template)(*vals)
        return type(template)(vals)
    if isinstance(template, dict):
        if not isinstance(plain, dict) or set(plain) != set(template):
            raise bad(f"expected keys {sorted(template)}")
        return {k: from_plain(template[k], plain[k], f"{where}[{k!r}]") for k in template}
    raise bad(f"unsupported state type {type(template).__name__}")


def _config_diff(saved: Any, ours: Any, where: str = "") -> list[str]:
    """Where two plain configurations differ (numbers compared as floats)."""
    if isinstance(saved, torch.Tensor):
        saved = saved.tolist() if saved.numel() != 1 else saved.item()
    if isinstance(ours, torch.Tensor):
        ours = ours.tolist() if ours.numel() != 1 else ours.item()
    if isinstance(saved, dict) and isinstance(ours, dict):
        out = []
        for k in sorted(set(saved) | set(ours), key=str):
            if k not in saved or k not in ours:
                out.append(f"{where}.{k}: only in {'this optimizer' if k in ours else 'the checkpoint'}")
            else:
                out.extend(_config_diff(saved[k], ours[k], f"{where}.{k}"))
        return out
    if isinstance(saved, (list, tuple)) and isinstance(ours, (list, tuple)):
        if len(saved) != len(ours):
            return [f"{where}: {len(saved)} vs {len(ours)} entries"]
        return [d for i, (a, b) in enumerate(zip(saved, ours)) for d in _config_diff(a, b, f"{where}[{i}]")]
    if isinstance(saved, (int, float)) and isinstance(ours, (int, float)) and not isinstance(saved, bool):
        return [] if float(saved) == float(ours) else [f"{where}: checkpoint {saved!r}, this optimizer {ours!r}"]
    return [] if saved == ours else [f"{where}: checkpoint {saved!r}, this optimizer {ours!r}"]


def ledger_settings(ledger: PrivacyLedger | dict) -> dict[str, Any]:
    """The sampling settings of a ledger (or of its ``to_dict()``): N, scheme, q, batch size."""
    if isinstance(ledger, PrivacyLedger):
        return {
            "population_size": ledger.population_size,
            "sampling": ledger.sampling,
            "selection_probability": ledger.selection_probability,
            "batch_size": ledger.batch_size,
        }
    cur = ledger.get("current") if isinstance(ledger, dict) else None
    if not isinstance(cur, dict):
        raise ValueError("the checkpoint's ledger has no 'current' sampling settings; it is corrupt")
    return {k: cur.get(k) for k in ("population_size", "sampling", "selection_probability", "batch_size")}


def new_run_id() -> str:
    """A random id for a new run; a resumed run takes its checkpoint's (:func:`load_state_dict`),
    and ``rollback=True`` accepts only a checkpoint with this optimizer's."""
    return secrets.token_hex(8)


def build_state_dict(opt) -> dict[str, Any]:
    """The state dict of a DPOptimizer (see the module docstring)."""
    return {
        "format": STATE_DICT_FORMAT,
        "version": STATE_DICT_VERSION,
        "optimizer": opt.original_optimizer.state_dict(),
        "query_config": to_plain(opt._release_query.initial_global_state()),
        "query_global_state": to_plain(opt._global_state),
        "random_sources": [s.state_dict() for s in opt._random_sources],
        "ledger": opt._ledger.to_dict() if opt._ledger is not None else None,
        "steps": opt._steps,
        "last_event": opt._last_event.to_dict() if opt._last_event is not None else None,
        "data_loader": _loader_state(opt),
        "distributed": _saved_by(opt),
        "run_id": opt._run_id,
    }


def _saved_by(opt) -> dict[str, int] | None:
    """``{"rank", "world_size"}`` of a distributed optimizer's process, ``None`` for one process."""
    d = getattr(opt, "_dist", None)
    return None if d is None else {"rank": int(d.rank), "world_size": int(d.world_size)}


def _check_rank(opt, state_dict: dict[str, Any]) -> None:
    """Refuse a checkpoint that another rank saved: each rank's holds its own noise stream, and only
    rank 0's holds the run's ledger (the other ranks' stay empty), so rank 0 restoring another
    rank's checkpoint would restart the privacy account from nothing.  A one-process optimizer takes
    rank 0's checkpoint only; a checkpoint of one process loads anywhere (every rank restoring it
    gets the same generator state: the distributed steps refuse that at their first noisy step,
    unless loaded with ``fresh_randomness=True``)."""
    saved = state_dict.get("distributed")
    if saved is None:
        return
    if not isinstance(saved, dict) or not isinstance(saved.get("rank"), int):
        raise ValueError(f"corrupt checkpoint: 'distributed' should be {{'rank': int, 'world_size': int}}, got {saved!r}")
    here = _saved_by(opt)
    rank = 0 if here is None else here["rank"]
    if saved["rank"] != rank:
        where = "this one-process optimizer" if here is None else f"rank {rank} of {here['world_size']}"
        raise ValueError(
            f"this checkpoint was saved by rank {saved['rank']} of {saved.get('world_size')}, and is loaded by {where}. "
            "Each rank must load the checkpoint it saved (e.g. ckpt_rank{torch.distributed.get_rank()}.pt, the "
            "global rank, not LOCAL_RANK): rank 0's holds the run's ledger (another rank's is empty: the privacy "
            "account would restart from nothing) and each rank's holds its own noise stream"
        )


def _loader_state(opt) -> dict[str, Any] | None:
    mon = getattr(opt, "_consistency", None)
    loader = mon.data_loader if mon is not None else None
    sd = getattr(loader, "state_dict", None)
    return sd() if callable(sd) else None


def _checked_ledger(opt, state_dict: dict[str, Any]) -> PrivacyLedger | None:
    """The checkpoint's ledger, refused unless its presence and sampling settings match ``opt``'s."""
    # 1. the ledger: same presence, same sampling settings (the loader is the truth)
    saved_ledger = state_dict.get("ledger")
    if (saved_ledger is None) != (opt._ledger is None):
        raise ValueError(
            "the checkpoint " + ("has no ledger but this optimizer has one" if saved_ledger is None else
                                 "has a ledger but this optimizer has none")
            + "; the privacy account would not continue. Build the optimizer with the same ledger setup"
        )
    new_ledger = None
    if saved_ledger is not None:
        new_ledger = PrivacyLedger.from_dict(saved_ledger)
        ours, theirs = ledger_settings(opt._ledger), ledger_settings(new_ledger)
        if ours != theirs:
            raise ValueError(
                f"the checkpoint's ledger samples with {theirs}, this optimizer's ledger with {ours}; a "
                "checkpoint never rewrites the sampling settings (the data loader is the truth about them). "
                "Build the ledger from the same loader (DPDataLoader.make_ledger()) as the checkpointed run"
            )
    return new_ledger


def _check_query_config(state_dict: dict[str, Any], template: Any) -> None:
    """Refuse a checkpoint of a differently configured query."""
    # 2. the query's configuration: refuse a checkpoint of a differently configured query
    saved_cfg = state_dict.get("query_config")
    if saved_cfg is not None:
        diff = _config_diff(saved_cfg, to_plain(template), "query")
        if diff:
            raise ValueError(
                "the checkpoint was made by a differently configured query (" + "; ".join(diff[:4])
                + "). Its noise and clip would contradict this optimizer's settings and its privacy "
                "account; build the optimizer with the checkpoint's settings (e.g. the same l2_norm_clip "
                "and noise_multiplier) and load again"
            )


def _checked_random_sources(opt, state_dict: dict[str, Any]) -> tuple[list, Any, Any]:
    """``(sources, saved states, legacy generator states)``, refused when the counts differ."""
    # 3. randomness
    sources = opt._random_sources
    src_states = state_dict.get("random_sources")
    legacy = state_dict.get("generators")
    if src_states is not None:
        if not isinstance(src_states, list) or len(src_states) != len(sources):
            raise ValueError(
                f"the checkpoint holds {len(src_states) if isinstance(src_states, list) else '?'} random "
                f"source state(s), this query has {len(sources)}; build the same query as the checkpointed run"
            )
    elif legacy:
        if len(legacy) != len(sources):
            raise ValueError(f"the checkpoint holds {len(legacy)} generator state(s), this query has {len(sources)}")
    return sources, src_states, legacy


def load_state_dict(opt, state_dict: dict[str, Any], *, fresh_randomness: bool = False, rollback: bool = False) -> None:
    """Check ``state_dict`` against ``opt`` completely, then restore it (nothing changes on refusal).

    ``fresh_randomness=True`` reseeds the owned generators from OS entropy after the restore,
    for a *second* run branched from the same checkpoint (an exact restore would repeat the first
    branch's noise).  ``rollback=True`` (see :func:`_is_rollback`): the wrapped optimizer, the
    query's global state and the step count are restored; the ledger, the noise generators and
    the loader's sampler stay where this run has taken them."""
    if not isinstance(state_dict, dict) or state_dict.get("format") != STATE_DICT_FORMAT:
        raise ValueError(
            "not a DPOptimizer state dict (missing 'format'); to load a plain optimizer state use "
            "dp_optimizer.original_optimizer.load_state_dict(...)"
        )
    version = state_dict.get("version")
    if version not in _READABLE_VERSIONS:
        raise ValueError(f"unsupported DPOptimizer state dict version {version!r} (this release reads {_READABLE_VERSIONS})")

    _check_rank(opt, state_dict)
    new_ledger = _checked_ledger(opt, state_dict)
    rolling_back = _is_rollback(opt, state_dict, new_ledger, rollback)
    template = opt._release_query.initial_global_state()
    _check_query_config(state_dict, template)
    sources, src_states, legacy = _checked_random_sources(opt, state_dict)

    new_global = from_plain(template, state_dict["query_global_state"])
    loader_state = state_dict.get("data_loader")
    mon = getattr(opt, "_consistency", None)
    loader = mon.data_loader if mon is not None else None
    if loader_state is not None and not rolling_back and callable(getattr(loader, "load_state_dict", None)):
        loader.load_state_dict(loader_state)  # checks the loader's N and q before changing anything

    # -- everything checked: restore --------------------------------------------------
    opt.original_optimizer.load_state_dict(state_dict["optimizer"])
    opt._global_state = new_global
    if rolling_back:  # the generators go on from where this run's released steps left them
        pass
    elif src_states is not None:
        for s, st in zip(sources, src_states):
            s.load_state_dict(st)
    elif legacy:
        for s, st in zip(sources, legacy):
            s.set_legacy_state(st)
    if fresh_randomness:
        for s in sources:
            s.reseed()
    if new_ledger is not None and not rolling_back:
        _replace_contents(opt._ledger, new_ledger)
    if opt._budget is not None:
        opt._budget.reset()
    opt._steps = int(state_dict.get("steps", 0))
    if fresh_randomness:  # a branch is a new run
        opt._run_id = new_run_id()
    elif state_dict.get("run_id") is not None:  # a resumed run is the checkpoint's run
        opt._run_id = state_dict["run_id"]
    le = state_dict.get("last_event")
    opt._last_event = event_from_dict(le) if le is not None else None
    opt._acc.reset()
    if getattr(opt, "_consistency", None) is not None:
        opt._consistency.reset()


def _is_rollback(opt, state_dict: dict[str, Any], saved_ledger: PrivacyLedger | None, rollback: bool) -> bool:
    """Whether the load rolls this run back: ``opt`` has taken more steps than the checkpoint holds.

    An exact restore then would erase the ledger's records of the steps taken since (they did
    access the data; the ledger must keep every access) and rewind the noise and sampling
    generators, so the next steps would reuse those steps' noise on other batches: the
    difference of two releases with one noise is the difference of their sums, noise-free.  So
    it is refused unless ``rollback=True``, which is allowed only for a checkpoint of this run
    (its ledger a prefix of this optimizer's)."""
    ours, theirs = opt._steps, int(state_dict.get("steps", 0))
    if ours <= theirs:
        return False
    if not rollback:
        raise ValueError(
            f"this optimizer has taken {ours} steps and the checkpoint holds {theirs}: loading it would roll the run "
            f"back, erasing the ledger's records of the {ours - theirs} steps taken since (they did access the data) "
            "and rewinding the noise and sampling generators, so the next steps would reuse their noise. To roll "
            "back (after a loss spike, say), pass rollback=True: the optimizer and query state are restored, while "
            "the ledger keeps every step and the generators go on. To resume or branch a run, load into a newly "
            "built optimizer"
        )
    saved_id = state_dict.get("run_id")
    other = saved_id != opt._run_id or (saved_ledger is not None and not _is_prefix(saved_ledger.runs, opt._ledger.runs))
    if other:
        raise ValueError(
            "rollback=True restores a checkpoint of this run, but this one " + (
                "holds no run id (saved by an older release)" if saved_id is None else "is of another run")
            + ": this ledger does not hold its run's privacy cost. Load it into a newly built optimizer (its own "
            "ledger comes with it)"
        )
    return True


def _is_prefix(runs: tuple, of: tuple) -> bool:
    """Whether the ledger runs ``runs`` are the first steps of the runs ``of``."""
    if not runs:
        return True
    if len(runs) > len(of):
        return False
    *whole, last = runs
    return all(a == b for a, b in zip(whole, of)) and last.same_settings(of[len(runs) - 1]) and (
        last.count <= of[len(runs) - 1].count)


def _replace_contents(ledger: PrivacyLedger, new: PrivacyLedger) -> None:
    """Give ``ledger`` the recorded runs and metadata of ``new`` in place (their sampling settings
    were checked equal): the QueryWithLedger and the user hold this object.  (The ledger has no
    ``load_state_dict`` of its own yet; this is the one place that writes its fields.)"""
    vars(ledger).clear()
    vars(ledger).update(vars(new))
