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
    kw.setdefault("epochs", 1)
    kw.setdefault("batch_size", 20)
    result = demo.run_demo(log=lines.append, **kw)
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


# -- the one-run audit in the demo (demo --audit) --------------------------------------------


def test_demo_audit_prints_the_lower_bound_beside_the_ledger_bounds(tmp_path, small_data):
    result, lines = _run(tmp_path, progress=False, audit=300, noise_multiplier=1.0)
    res = result["audit"]
    line = next(line for line in lines if "empirical epsilon >= " in line)
    assert "(95% confidence)" in line and "RDP" in line and "PLD" in line
    assert f"{res.epsilon_lower_bound:.3f}" in line and res.m == 300
    # a 95% bound that exceeds the claim would be a bug (probability <= 5% on a correct run)
    assert 0 <= res.epsilon_lower_bound <= min(result["epsilon"], result["epsilon_pld"])
    # the ledger's population counts the included canaries (they are records sampled at q)
    ledger = PrivacyLedger.load(tmp_path / "ledger.json")
    assert ledger.population_size == 200 + int(res.included.sum())
    assert len(ledger) == result["steps"]


@pytest.mark.slow
def test_demo_audit_without_noise_finds_the_canaries(tmp_path, small_data):
    """sigma = 0.3 (hardly private: claimed epsilon ~40): 500 Dirac canaries, q = 0.5, 8 steps on
    a model of 9258 coordinates; an included canary is drawn ~4 times (signal ~4 C), the noise on
    its coordinate has sd 0.3 C sqrt(8) ~ 0.85 C: d' ~ 4.7."""
    result, _ = _run(tmp_path, progress=False, audit=500, noise_multiplier=0.3, epochs=4, batch_size=100)
    assert result["audit"].epsilon_lower_bound > 2.0, result["audit"].summary()


def test_demo_audit_plot_draws_roc_and_histogram(tmp_path, small_data):
    pytest.importorskip("matplotlib")
    png = tmp_path / "eps.png"
    _, lines = _run(tmp_path, progress=False, plot_path=str(png), audit=100)
    audit_png = tmp_path / "eps_audit.png"
    data = audit_png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10000
    assert any(str(audit_png) in line for line in lines) and png.exists()


def test_demo_audit_count_is_checked(tmp_path, small_data):
    with pytest.raises(ValueError, match="between 1 and 9258 canaries"):
        _run(tmp_path, progress=False, audit=10**6)


def test_demo_with_almost_no_noise_reports_rdp_when_pld_cannot_be_computed(tmp_path, small_data):
    """sigma = 1e-3: one step's privacy loss is beyond the PLD grid; the demo says so and finishes."""
    result, lines = _run(tmp_path, noise_multiplier=1e-3, progress=False)
    assert result["epsilon_pld"] is None
    assert result["epsilon"] > 1e3
    assert any("PLD bound not computed" in line for line in lines)
