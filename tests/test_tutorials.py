"""Every tutorial script runs to completion (fast settings) — tutorials are executed in CI."""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TUTORIALS = sorted((ROOT / "tutorials").glob("[0-9]*.py"))


def test_tutorials_exist():
    assert TUTORIALS, "no tutorials found"


@pytest.mark.parametrize("path", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_runs(path, tmp_path):
    env = dict(os.environ, TUTORIAL_FAST="1", PYTHONHASHSEED="0", OMP_NUM_THREADS="1")
    # the package is importable whether it is installed or only on the path: the script runs
    # from a temporary directory, so put the repository root on its PYTHONPATH
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, str(path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"{path.name} failed:\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-3000:]}"


def test_distributed_tutorial_under_torchrun(tmp_path):
    """The torchrun branch of tutorial 07 (the launch the docs give), which the plain run above
    does not take: 2 CPU processes from ``torch.distributed.run --standalone`` (gloo on localhost),
    one ledger on rank 0, every rank resuming its own checkpoint."""
    import ast
    import re

    path = ROOT / "tutorials" / "07_distributed.py"
    env = dict(os.environ, TUTORIAL_FAST="1", PYTHONHASHSEED="0", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env["CUDA_VISIBLE_DEVICES"] = ""  # gloo on CPU (two processes would need two GPUs under NCCL)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(path)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"STDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-3000:]}"
    out = {int(r): ast.literal_eval(d) for r, d in re.findall(r"^rank (\d): (\{.*\})$", proc.stdout, re.M)}
    assert set(out) == {0, 1}, proc.stdout[-2000:]
    assert out[0]["steps"] == out[1]["steps"] == out[0]["ledger_steps"] > 0 and out[1]["ledger_steps"] == 0
    assert out[0]["resumed_ledger_steps"] == out[0]["ledger_steps"] and out[1]["resumed_ledger_steps"] == 0
    assert "saved by rank 0 of 2" in out[1]["refusal"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["ckpt_rank0.pt", "ckpt_rank1.pt"]
