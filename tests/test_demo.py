"""The bundled demo (``pytorch_privacy.demo.run_demo``): progress, plot, ledger file.

The demo runs on 200 of the digits images for one epoch here, so each test takes about a second.
"""

import os
import stat

import pytest

import pytorch_privacy.demo as demo
from pytorch_privacy.dp_query import PrivacyLedger


@pytest.fixture
def small_data(monkeypatch):
    real = demo.load_digits_tensors

    def small(seed=0, test_fraction=0.2):
        x, y, xt, yt, src = real(seed, test_fraction)
        return x[:200], y[:200], xt[:100], yt[:100], src

    monkeypatch.setattr(demo, "load_digits_tensors", small)


def _run(tmp_path, **kw):
    lines = []
    kw.setdefault("ledger_path", str(tmp_path / "ledger.json"))
    result = demo.run_demo(epochs=1, batch_size=20, log=lines.append, **kw)
    return result, lines


def test_demo_shows_tqdm_progress_over_the_steps(tmp_path, capsys, small_data):
    pytest.importorskip("tqdm")  # in the [test] extra; the demo works without it
    result, _ = _run(tmp_path, progress=True)
    err = capsys.readouterr().err
    assert "epoch 1/1" in err and f"/{result['steps']}" in err and "step/s" in err


def test_demo_without_progress_is_silent_on_stderr(tmp_path, capsys, small_data):
    _run(tmp_path, progress=False)
    assert capsys.readouterr().err == ""


def test_demo_plot_is_a_png_and_the_ledger_matches_the_result(tmp_path, small_data):
    pytest.importorskip("matplotlib")
    png = tmp_path / "eps.png"
    result, lines = _run(tmp_path, progress=False, plot_path=str(png))
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert any(str(png) in line for line in lines)
    ledger = PrivacyLedger.load(tmp_path / "ledger.json")
    assert len(ledger) == result["steps"] > 0


def test_demo_ledger_mode(tmp_path, small_data):
    old = os.umask(0o022)
    try:
        _run(tmp_path, progress=False, ledger_path=str(tmp_path / "a.json"))
        assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
        _run(tmp_path, progress=False, ledger_path=str(tmp_path / "b.json"), ledger_mode=0o640)
        assert stat.S_IMODE((tmp_path / "b.json").stat().st_mode) == 0o640
    finally:
        os.umask(old)


def test_demo_save_error_names_the_users_path_not_a_temporary_file(tmp_path, small_data):
    target = tmp_path / "gone" / "ledger.json"
    with pytest.raises(ValueError) as exc:
        _run(tmp_path, progress=False, ledger_path=str(target))
    msg = str(exc.value)
    assert str(target) in msg and ".ledger-" not in msg
