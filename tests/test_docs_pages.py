"""The landing page's code runs as written; the Opacus page names only things that exist; the
CLI page's plot is a PNG that ``audit --plot`` can produce."""

import importlib
import pathlib
import re
import subprocess
import sys

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"
ROOT = DOCS.parent


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_landing_page_shows_code_that_runs(tmp_path):
    blocks = _python_blocks((DOCS / "index.md").read_text())
    assert blocks, "the landing page shows no code"
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-c", "\n\n".join(blocks)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    eps = float(re.search(r"epsilon = ([0-9.]+) at delta = 1e-5", proc.stdout).group(1))
    assert 0 < eps < 10
    assert (tmp_path / "ledger.json").stat().st_size > 0


def _resolve(dotted: str):
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for p in parts[i:]:
            obj = getattr(obj, p)
        return obj
    raise ImportError(dotted)


def test_opacus_page_names_exist():
    text = (DOCS / "coming_from_opacus.md").read_text()
    # every right-hand column entry of the table that names our code must resolve
    names = set(re.findall(r"`(pytorch_privacy(?:\.\w+)+)", text))
    names |= {f"pytorch_privacy.optimizer.{n}" for n in ("DPGaussianOptimizer", "DPOptimizer", "DPDataLoader",
                                                         "PoissonSampler", "validate_model", "replace_batchnorm",
                                                         "select_engine", "PrivacyBudgetExceeded")}
    names |= {"pytorch_privacy.analysis.RdpAccountant", "pytorch_privacy.analysis.compute_epochs",
              "pytorch_privacy.dp_query.PrivacyLedger"}
    assert len(names) >= 12
    for name in sorted(names):
        _resolve(name)  # raises if the page names something that does not exist
    from pytorch_privacy.cli import ENGINE_CHOICES

    for engine in ENGINE_CHOICES:
        assert f'"{engine}"' in text


def test_cli_page_shows_the_audit_plot():
    text = (DOCS / "cli.md").read_text()
    image = re.search(r"```\{image\} (\S+)", text).group(1)
    data = (DOCS / image).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and 5000 < len(data) < 200_000
    assert "--plot" in text and "cli" in (DOCS / "index.md").read_text()


def test_footer_names_the_copyright_holder():
    text = (DOCS / "conf.py").read_text()
    assert re.search(r'^copyright = ".*the pytorch_privacy authors"', text, flags=re.M)
