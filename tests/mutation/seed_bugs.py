"""Seed deliberate privacy bugs into a scratch copy of the package and check the tests catch each.

Usage (from the repository root)::

    python tests/mutation/seed_bugs.py                 # every bug
    python tests/mutation/seed_bugs.py --only block_sampler --keep

For every bug: copy the repository (package and tests) to a temporary directory, apply the bug
by a textual patch, run the tests relevant to it there (``PYTHONPATH`` = the copy, so the patched
package is the one imported), and report ``caught`` with the failing tests, ``NOT caught``, or
``patch no longer applies`` (the snippet it edits has changed: update the patch; this is never
reported as caught).  A baseline run of the same tests on the unpatched copy comes first: a test
already failing there does not count as catching anything.

Patches edit small, stable snippets (a function name, one call) or append an override at the end
of a module, so they survive refactors of the code around them; each checks that its snippet is
present exactly once.  Exit status 0 iff every bug is caught.

This file is not a test module (no ``test_`` prefix): pytest does not collect it.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

ROOT = pathlib.Path(__file__).resolve().parents[2]


class PatchError(Exception):
    """The snippet a patch edits is missing or ambiguous."""


def _replace_once(text: str, pattern: str, repl: str, what: str, flags: int = re.M) -> str:
    matches = list(re.finditer(pattern, text, flags))
    if len(matches) != 1:
        raise PatchError(f"{what}: expected exactly one match of {pattern!r}, found {len(matches)}")
    return text[: matches[0].start()] + matches[0].expand(repl) + text[matches[0].end():]


# -- the bugs -------------------------------------------------------------------------------
_NOISE_WRAPPER = '''

# --- seeded bug ({name}) -------------------------------------------------------------------
def add_gaussian_noise(record, stddev, generator=None, **kwargs):
{body}
'''


def _wrap_add_gaussian_noise(text: str, name: str, body: str) -> str:
    """Rename ``add_gaussian_noise`` and append a replacement with the same name: every caller
    (looked up at call time, or imported from this module after it finished loading) gets it."""
    text = _replace_once(
        text, r"^def add_gaussian_noise\(", "def _seeded_original_add_gaussian_noise(", "add_gaussian_noise"
    )
    return text + _NOISE_WRAPPER.format(name=name, body=body)


def noise_low_dict(text: str) -> str:
    # the optimizer's records: one tensor per parameter, in a dict
    return _wrap_add_gaussian_noise(text, "noise 5% low on dict records", (
        "    if isinstance(record, dict):\n"
        "        stddev = stddev * 0.95\n"
        "    return _seeded_original_add_gaussian_noise(record, stddev, generator, **kwargs)"
    ))


def noise_low_list(text: str) -> str:
    # tensors, lists and tuples of tensors (the query-level path)
    return _wrap_add_gaussian_noise(text, "noise 5% low on tensor/list records", (
        "    if not isinstance(record, dict):\n"
        "        stddev = stddev * 0.95\n"
        "    return _seeded_original_add_gaussian_noise(record, stddev, generator, **kwargs)"
    ))


def noise_low_tensor_stddev(text: str) -> str:
    # a stddev held as a 0-dim tensor (adaptive clipping's sum, no host sync)
    return _wrap_add_gaussian_noise(text, "noise 5% low when stddev is a tensor", (
        "    import torch as _torch\n"
        "    if isinstance(stddev, _torch.Tensor):\n"
        "        stddev = stddev * 0.95\n"
        "    return _seeded_original_add_gaussian_noise(record, stddev, generator, **kwargs)"
    ))


def bias_unnoised(text: str) -> str:
    return _wrap_add_gaussian_noise(text, "biases un-noised", (
        "    if isinstance(record, dict) and any(str(k).endswith('bias') for k in record):\n"
        "        rest = {k: v for k, v in record.items() if not str(k).endswith('bias')}\n"
        "        noised = _seeded_original_add_gaussian_noise(rest, stddev, generator) if rest else {}\n"
        "        return {k: (noised[k] if k in noised else v) for k, v in record.items()}\n"
        "    return _seeded_original_add_gaussian_noise(record, stddev, generator, **kwargs)"
    ))


def sigma_not_sigma_c(text: str) -> str:
    # DPGaussianOptimizer builds its query with stddev sigma instead of sigma * C
    return _replace_once(
        text, r"GaussianAverageQuery\(\s*clip,\s*sigma \* clip,", "GaussianAverageQuery(clip, sigma,", "sigma * clip"
    )


_BLOCK_SAMPLER = '''

# --- seeded bug: a binomial batch size, then a contiguous block of indices (wrapping around) ---
def _seeded_block_sample(self):
    import numpy as _np
    rng = getattr(self, "_seeded_rng", None)
    if rng is None:
        rng = self._seeded_rng = _np.random.default_rng(12345)
    m = int(rng.binomial(self.num_samples, self.sample_rate))
    start = int(rng.integers(self.num_samples))
    return (torch.arange(m, dtype=torch.int64) + start) % self.num_samples


def _seeded_block_iter(self):
    for _ in range(len(self)):
        yield _seeded_block_sample(self).tolist()


PoissonSampler.sample = _seeded_block_sample
PoissonSampler.__iter__ = _seeded_block_iter
'''


def block_sampler(text: str) -> str:
    for snippet in (r"^class PoissonSampler\b", r"^\s+def sample\(self", r"^\s+def __iter__\(self"):
        _replace_once(text, snippet, r"\g<0>", f"PoissonSampler ({snippet})")
    return text + _BLOCK_SAMPLER


def ledger_drops_empty(text: str) -> str:
    # the optimizer records a step only when its batch had records
    return _replace_once(
        text,
        r"^(\s*)(self\._ledger\.record_sample\(.*)$",
        r"\1if self._acc.num_records > 0: \2",
        "the optimizer's ledger.record_sample call",
    )


_NO_COEF_BIAS = '''

# --- seeded bug: Linear's bias summed without the clip coefficients in the default mode ---
class _SeededBiasContribution(DirectContribution):
    _auto = True

    def sq_norms(self, policy):
        self._auto = policy.mode == "auto"
        sq, mat = super().sq_norms(policy)
        return sq, (None if self._auto else mat)

    def weighted_sum(self, coefficients, mask=True):
        if self._auto:
            return self.values.sum(0)
        return super().weighted_sum(coefficients, mask)
'''


def ghost_bias_no_coef(text: str) -> str:
    start = text.find("class LinearRule")
    if start < 0:
        raise PatchError("class LinearRule not found")
    end = text.find("\nclass ", start + 1)
    body = text[start:end if end > 0 else len(text)]
    new_body = _replace_once(
        body, r'out\["bias"\] = DirectContribution\(', 'out["bias"] = _SeededBiasContribution(', "LinearRule bias"
    )
    return text[:start] + new_body + text[start + len(body):] + _NO_COEF_BIAS


def compiled_padding_kept(text: str) -> str:
    # the compiled engine's padded records (copies of record 0) are not sliced off
    text = _replace_once(text, r"\{n: g\[:records\] for n, g in grads\.items\(\)\}", "dict(grads)", "the gradient slice")
    return _replace_once(text, r"sq_norms\[:records\]\.sqrt\(\)", "sq_norms.sqrt()", "the norm slice")


def sampling_check_needs_loader(text: str) -> str:
    # an optimizer not given its loader checks no sampler: loaders reseeded alike go unrefused
    return _replace_once(text, r"sampler = self\.sampler if self\.sampler is not None else last_drawn_sampler\(.*\)$",
                         "sampler = self.sampler", "the last-drawn sampler fallback")


def rollback_rewinds_noise(text: str) -> str:
    # rollback=True restores the checkpoint's generator states: the replayed steps reuse the noise
    # of the abandoned ones (whose releases stay in the ledger)
    return _replace_once(text, r"^    if rolling_back:  # the generators go on.*\n        pass\n    elif ", "    if ",
                         "the generators kept on a rollback")


def reuse_guard_forgets(text: str) -> str:
    # released noise positions are not kept: a generator reseeded every epoch repeats its noise unrefused
    return _replace_once(text, r"^            self\._released\.add\(self\._pending\)$", "            pass",
                         "keeping a released step's position")


def graphed_stale_padding(text: str) -> str:
    # the graphed engine leaves the padded rows' coefficients from an earlier, larger batch of the
    # same padded size: copies of record 0 join the sum (record 0 counted several times)
    return _replace_once(text, r"^        self\.coef\.zero_\(\)\n", "", "the coefficients' reset")


def graphed_held_pass_overwritten(text: str) -> str:
    # a pass still held is not copied out before its slot replays: it reads the next pass's gradients
    return _replace_once(text, r"^                held\.evict\(\)$", "                pass", "the eviction")


def scaler_raw_count(text: str) -> str:
    # the dynamic loss scale moves on the true (un-noised) dropped-record count
    return _replace_once(
        text, r"return count \+ sigma_o \* sources\[0\]\.normal\(.*\)$", "return count", "the count's noise"
    )


def count_noise_not_split(text: str) -> str:
    # each rank's share of the count noise divided by W instead of sqrt(W): the world's released
    # count gets sigma_o / sqrt(W), less noise than the privacy argument needs
    return _replace_once(text, r"self\.count_stddev / self\.world_size\*\*0\.5", "self.count_stddev / self.world_size",
                         "the split count noise")


def rewind_after_distributed_refusal(text: str) -> str:
    # a refused DDP/FSDP2 step rewinds the generators: its noise is reused on the next attempt
    text = _replace_once(
        text, r"snapshot_sources\(self\._random_sources\) if enforcing and self\._dist is None else None",
        "snapshot_sources(self._random_sources) if enforcing else None", "the snapshot",
    )
    return _replace_once(
        text, r"^(\s*)# the generators are NOT rewound.*$",
        r"\1restore_sources(self._random_sources, saved) if saved is not None else None", "the no-rewind comment",
    )


def fsdp_last_param_unnoised(text: str) -> str:
    # FSDP2's release noises every parameter's shard but the last one (the bias of a one-layer model)
    return _replace_once(text, r"^(\s*)for n in names:\n(\s*)new_gauss, event = gauss\.noise_in_place",
                         r"\1for n in names[:-1]:\n\2new_gauss, event = gauss.noise_in_place", "the shard noise loop")


def fsdp_slot_sums_kept(text: str) -> str:
    # FSDP2: a slot's clipped sums stay in the accumulator after they were reduce-scattered, so the
    # next slot adds them again (a record of an earlier chunk counts twice: sensitivity 2C, noise for C)
    return _replace_once(text, r"state, acc\.sample_state = acc\.sample_state, None",
                         "state = acc.sample_state", "the slot hand-over")


def fingerprint_ignores_restored_state(text: str) -> str:
    # the distributed noise check hashes fresh OS entropy instead of where an owned generator stands
    # (what the once-only check did): every rank resuming from rank 0's checkpoint then passes, and
    # the ranks' blocks (shards) get identical noise
    return _replace_once(text, r"h\.update\(os\.urandom\(16\) if state is None else state\.numpy\(\)\.tobytes\(\)\)",
                         "h.update(os.urandom(16))", "the fingerprint's hash update")


def settings_fingerprint_ignores_state(text: str) -> str:
    # the ranks' settings fingerprints leave out the global state: a rank built with half the noise
    # (or twice the clip) than rank 0, whose ledger accounts for rank 0's, is accepted
    return _replace_once(text, r"plain = to_plain\(global_state\)", "plain = None", "the settings hash of the global state")


def sampling_fingerprint_blind(text: str) -> str:
    # the ranks' sampling fingerprints ignore the samplers' states: loaders whose generators were
    # reseeded alike after construction draw every rank's part with one inclusion pattern, unrefused
    return _replace_once(text, r"state = None if sampler is None else sampler\.last_draw_state",
                         "state = None", "the sampling fingerprint's state")


def any_loader_on_every_rank(text: str) -> str:
    # a DDP model over W > 1 ranks takes any data loader: a DPDataLoader on every rank samples the
    # whole dataset per rank (an example can join one step twice while the ledger says one draw)
    return _replace_once(text, r"return inner, _check_loader\(step, data_loader\)", "return inner, step",
                         "the DDP loader check")


def checkpoint_rank_unchecked(text: str) -> str:
    # a checkpoint loads on any rank: rank 0 restoring rank 1's gets its empty ledger (the privacy
    # account restarts from nothing)
    return _replace_once(text, r"^(\s*)_check_rank\(opt, state_dict\)$", r"\1pass", "the checkpoint's rank check")


def rewind_after_public_only_step(text: str) -> str:
    # a DDP step in which no rank took a sensitive pass rewinds the generators: the block noise
    # every rank saw in the reduced buffer goes onto the next step's sums
    text = _replace_once(
        text, r"^(\s*)code, mine, header = _OK, None, None$",
        r"\1from .fingerprints import _sources\n\1saved_ = [s.state_dict() for s in _sources(query)]\n"
        r"\1code, mine, header = _OK, None, None", "the snapshot",
    )
    return _replace_once(
        text, r"^(\s*)if not any_sensitive:  # no data released.*$",
        r"\1if not any_sensitive:\n\1    [s.load_state_dict(st) for s, st in zip(_sources(query), saved_)]", "the no-rewind branch",
    )


def prefetch_reused(text: str) -> str:
    # a prefetched draw is handed out and kept: the next draw of that shape returns it again
    return _replace_once(
        text, r"^(\s*)self\._prefetched = None\n(\s*)if untouched and pkey == key:",
        r"\1if not (untouched and pkey == key):\n\1    self._prefetched = None\n\2if untouched and pkey == key:",
        "the prefetch hand-out", flags=re.M,
    )


OPT = "tests/optimizer"
DIST = "tests/optimizer/distributed"


@dataclass
class Bug:
    name: str
    what: str
    #: the file to patch, or candidates (the first that exists and contains ``marker``)
    file: str | tuple[str, ...]
    patch: Callable[[str], str]
    tests: list[str] = field(default_factory=list)
    marker: str = ""

    def target(self, root: pathlib.Path) -> pathlib.Path:
        files = (self.file,) if isinstance(self.file, str) else self.file
        for f in files:
            if (root / f).exists() and self.marker in (root / f).read_text():
                return root / f
        raise PatchError(f"none of {list(files)} exists and contains {self.marker!r}")


BUGS = [
    Bug("noise_low_dict", "noise 5% low on the optimizer's (dict) noise path",
        "pytorch_privacy/dp_query/gaussian_query.py", noise_low_dict,
        [f"{OPT}/test_noise_calibration.py", f"{OPT}/test_dp_optimizer.py", f"{OPT}/test_multipass.py",
         "tests/dp_query/test_gaussian_query.py"]),
    Bug("noise_low_list", "noise 5% low on the tensor/list noise path",
        "pytorch_privacy/dp_query/gaussian_query.py", noise_low_list,
        [f"{OPT}/test_noise_calibration.py", "tests/dp_query/test_gaussian_query.py",
         "tests/dp_query/test_normalized_query.py", "tests/dp_query/test_nested_query.py"]),
    Bug("noise_low_tensor_stddev", "noise 5% low when the stddev is a tensor (adaptive clipping)",
        "pytorch_privacy/dp_query/gaussian_query.py", noise_low_tensor_stddev,
        [f"{OPT}/test_noise_calibration.py", "tests/dp_query/test_quantile_adaptive_clip_sum_query.py"]),
    Bug("bias_unnoised", "biases un-noised", "pytorch_privacy/dp_query/gaussian_query.py", bias_unnoised,
        [f"{OPT}/test_noise_calibration.py", f"{OPT}/test_dp_optimizer.py"]),
    Bug("sigma_not_sigma_c", "sigma instead of sigma*C in DPGaussianOptimizer",
        "pytorch_privacy/optimizer/gaussian_optimizer.py", sigma_not_sigma_c,
        [f"{OPT}/test_noise_calibration.py", f"{OPT}/test_dp_optimizer.py"]),
    Bug("block_sampler", "Poisson sampler: binomial size, then a contiguous block",
        "pytorch_privacy/optimizer/samplers.py", block_sampler,
        [f"{OPT}/test_sampler_independence.py", f"{OPT}/test_samplers.py"]),
    Bug("ledger_drops_empty", "the ledger drops empty (noise-only) steps",
        "pytorch_privacy/optimizer/dp_optimizer.py", ledger_drops_empty,
        [f"{OPT}/test_noise_calibration.py", f"{OPT}/test_dp_optimizer.py", f"{OPT}/test_budget.py"]),
    Bug("ghost_bias_no_coef", "ghost Linear bias rule without the clip coefficient (default norm mode)",
        ("pytorch_privacy/optimizer/engines/rules/linear.py", "pytorch_privacy/optimizer/engines/ghost_rules.py"),
        ghost_bias_no_coef,
        [f"{OPT}/test_engine_matrix.py", f"{OPT}/test_engines.py", f"{OPT}/test_engines_ghost.py"],
        marker="class LinearRule"),
    Bug("compiled_padding_kept", "compiled engine: padded records (copies of record 0) not sliced off",
        "pytorch_privacy/optimizer/engines/compiled_engine.py", compiled_padding_kept,
        [f"{OPT}/test_compiled_engine.py"]),
    Bug("sampling_check_needs_loader", "the per-step sampling check skipped when the optimizer was not given its loader",
        "pytorch_privacy/optimizer/distributed/fingerprints.py", sampling_check_needs_loader,
        [f"{DIST}/test_ddp.py"]),
    Bug("rollback_rewinds_noise", "a rollback to an earlier checkpoint of the run rewinds the noise (replayed steps reuse it)",
        "pytorch_privacy/optimizer/checkpoint.py", rollback_rewinds_noise, [f"{OPT}/test_state_dict.py"]),
    Bug("reuse_guard_forgets", "one process: a generator reseeded every epoch repeats released noise, unrefused",
        "pytorch_privacy/optimizer/noise_reuse.py", reuse_guard_forgets, [f"{OPT}/test_noise_reuse.py"]),
    Bug("graphed_stale_padding", "graphed engine: padded rows keep stale clip coefficients (record 0 counted again)",
        "pytorch_privacy/optimizer/engines/graphed_engine.py", graphed_stale_padding,
        [f"{OPT}/test_graphed_engine.py"]),
    Bug("graphed_held_pass_overwritten", "graphed engine: a held pass reads the next pass's gradients",
        "pytorch_privacy/optimizer/engines/graphed_engine.py", graphed_held_pass_overwritten,
        [f"{OPT}/test_graphed_engine.py"]),
    Bug("scaler_raw_count", "dynamic fp16 loss scale driven by the un-noised overflow count",
        "pytorch_privacy/optimizer/distributed/precision.py", scaler_raw_count, [f"{DIST}/test_precision.py"]),
    Bug("count_noise_not_split", "distributed overflow count noised with sigma_o / W per rank (too little)",
        "pytorch_privacy/optimizer/distributed/ddp.py", count_noise_not_split, [f"{DIST}/test_precision.py"]),
    Bug("rewind_after_distributed_refusal", "a refused DDP/FSDP2 step rewinds the noise generators (noise reuse)",
        "pytorch_privacy/optimizer/dp_optimizer.py", rewind_after_distributed_refusal,
        [f"{DIST}/test_ddp.py", f"{DIST}/test_fsdp.py"]),
    Bug("rewind_after_public_only_step", "a DDP step with public passes only rewinds the noise generators (noise reuse)",
        "pytorch_privacy/optimizer/distributed/ddp.py", rewind_after_public_only_step, [f"{DIST}/test_ddp.py"]),
    Bug("fsdp_last_param_unnoised", "FSDP2 release: the last parameter's shard is not noised",
        "pytorch_privacy/optimizer/distributed/sharded_release.py", fsdp_last_param_unnoised,
        [f"{DIST}/test_fsdp.py", f"{DIST}/test_fsdp_per_unit.py"]),
    Bug("fsdp_slot_sums_kept", "FSDP2: a slot's clipped sums are kept after their reduce-scatter (counted twice)",
        "pytorch_privacy/optimizer/distributed/fsdp.py", fsdp_slot_sums_kept,
        [f"{DIST}/test_fsdp.py", f"{DIST}/test_fsdp_sharded_release.py"]),
    Bug("fingerprint_ignores_restored_state", "the ranks' noise fingerprints ignore restored generator states "
        "(every rank resuming from rank 0's checkpoint noises its block alike)",
        "pytorch_privacy/optimizer/distributed/fingerprints.py", fingerprint_ignores_restored_state,
        [f"{DIST}/test_ddp.py", f"{DIST}/test_fsdp.py"]),
    Bug("settings_fingerprint_ignores_state", "the ranks' settings fingerprints leave out the global state "
        "(a rank with half the noise is accepted)",
        "pytorch_privacy/optimizer/distributed/fingerprints.py", settings_fingerprint_ignores_state,
        [f"{DIST}/test_ddp.py", f"{DIST}/test_fsdp.py"]),
    Bug("sampling_fingerprint_blind", "the ranks' sampling fingerprints ignore the samplers' generator states "
        "(loaders reseeded alike after construction draw correlated parts)",
        "pytorch_privacy/optimizer/distributed/fingerprints.py", sampling_fingerprint_blind, [f"{DIST}/test_ddp.py"]),
    Bug("any_loader_on_every_rank", "a DDP model over 2 ranks takes a one-process DPDataLoader (each rank samples "
        "the whole dataset)", "pytorch_privacy/optimizer/distributed/setup.py", any_loader_on_every_rank,
        [f"{DIST}/test_ddp.py"]),
    Bug("checkpoint_rank_unchecked", "a checkpoint loads on any rank (rank 0 takes rank 1's empty ledger)",
        "pytorch_privacy/optimizer/checkpoint.py", checkpoint_rank_unchecked,
        [f"{OPT}/test_state_dict.py", f"{DIST}/test_ddp.py"]),
    Bug("prefetch_reused", "a prefetched noise draw is returned again by the next draw of its shape",
        "pytorch_privacy/dp_query/randomness.py", prefetch_reused,
        [f"{OPT}/test_randomness.py", f"{DIST}/test_ddp.py"]),
]


# -- running ----------------------------------------------------------------------------------
_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", ".hypothesis", ".pytest_cache", "_build", "generated")


def _copy_repo(src: pathlib.Path, dst: pathlib.Path) -> None:
    for name in ("pytorch_privacy", "tests"):
        shutil.copytree(src / name, dst / name, ignore=_IGNORE)
    for name in ("pyproject.toml", "README.md"):
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)


def _env(copy: pathlib.Path) -> dict:
    env = dict(
        os.environ, PYTHONHASHSEED="0", OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1",
        HYPOTHESIS_PROFILE="mutation",  # report failing properties without shrinking them
    )
    env["PYTHONPATH"] = str(copy)  # the patched package shadows any installed one
    return env


def _run_tests(copy: pathlib.Path, tests: list[str], timeout: int) -> tuple[set[str], int, str]:
    """``(failed test ids, exit status, output tail)`` of pytest on ``tests`` inside ``copy``."""
    tests = [t for t in tests if (copy / t).exists()]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", "--no-header", "--tb=no", "-m", "not gpu",
           "-W", "ignore::DeprecationWarning", *tests]
    try:
        proc = subprocess.run(cmd, cwd=copy, env=_env(copy), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        return set(), -1, f"timed out after {timeout}s: {(exc.stdout or '')[-500:]}"
    out = proc.stdout + proc.stderr
    failed = set(re.findall(r"^(?:FAILED|ERROR) (\S+)", out, flags=re.M))
    return failed, proc.returncode, out[-1500:]


def _check_shadowing(copy: pathlib.Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", "import pytorch_privacy; print(pytorch_privacy.__file__)"],
        cwd=copy, env=_env(copy), capture_output=True, text=True, check=True,
    )
    where = pathlib.Path(proc.stdout.strip()).resolve()
    if copy.resolve() not in where.parents:
        raise SystemExit(f"the copy's package is not the one imported ({where}); cannot seed bugs")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repo", type=pathlib.Path, default=ROOT)
    ap.add_argument("--only", action="append", choices=[b.name for b in BUGS], help="run only this bug (repeatable)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch copies")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per pytest run")
    args = ap.parse_args(argv)
    bugs = [b for b in BUGS if not args.only or b.name in args.only]

    scratch = pathlib.Path(tempfile.mkdtemp(prefix="seed_bugs_"))
    results = []
    try:
        base = scratch / "baseline"
        _copy_repo(args.repo, base)
        _check_shadowing(base)
        all_tests = sorted({t for b in bugs for t in b.tests})
        t0 = time.time()
        base_failed, _, tail = _run_tests(base, all_tests, args.timeout)
        print(f"baseline: {len(all_tests)} test files, {len(base_failed)} failing ({time.time() - t0:.0f}s)")
        for f in sorted(base_failed):
            print(f"  already failing (not counted): {f}")
        for bug in bugs:
            copy = scratch / bug.name
            _copy_repo(args.repo, copy)
            try:
                target = bug.target(copy)
                target.write_text(bug.patch(target.read_text()))
            except PatchError as exc:
                results.append((bug, "patch no longer applies", [str(exc)], 0.0))
                continue
            t0 = time.time()
            failed, rc, tail = _run_tests(copy, bug.tests, args.timeout)
            new = sorted(failed - base_failed)
            status = "caught" if new else "NOT caught"
            if not new and rc not in (0, 1):
                new = [f"pytest exit status {rc}: {tail[-400:]}"]
                status = "NOT caught (pytest error)"
            results.append((bug, status, new, time.time() - t0))
            if not args.keep:
                shutil.rmtree(copy, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
        else:
            print(f"scratch copies kept in {scratch}")

    print()
    ok = True
    for bug, status, tests, dt in results:
        ok &= status == "caught"
        print(f"{bug.name:24s} {status:24s} {dt:5.0f}s  {bug.what}")
        for t in tests[:12]:
            print(f"    {t}")
        if len(tests) > 12:
            print(f"    ... and {len(tests) - 12} more")
    print("\nevery seeded bug caught" if ok else "\nSOME SEEDED BUGS WERE NOT CAUGHT (or no longer apply)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
