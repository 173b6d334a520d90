"""The ``pytorch-privacy`` console script: privacy, noise, audit and demo subcommands."""

import json
import re

import pytest

from pytorch_privacy.cli import main
from pytorch_privacy.dp_query import GaussianEvent, PrivacyLedger


def _floats_after(label, text):
    m = re.search(label + r"[^\n]*?epsilon = ([0-9.]+)", text)
    assert m, f"no '{label}' epsilon in:\n{text}"
    return float(m.group(1))


def test_privacy_reproduces_tf_privacy_example(capsys):
    # TF Privacy's README example: N=60000, batch 256, sigma 1.1, 60 epochs, delta 1e-5
    # gives eps ~2.6 with the tight RDP conversion (published figure).
    rc = main(["privacy", "--N", "60000", "--batch-size", "256", "--noise-multiplier", "1.1",
               "--epochs", "60", "--delta", "1e-5"])
    out = capsys.readouterr().out
    assert rc == 0
    eps = [float(x) for x in re.findall(r"eps = ([0-9]+\.[0-9]+)", out)]
    assert abs(eps[0] - 2.6) < 0.05, out  # tight conversion
    assert abs(eps[1] - 3.01) < 0.05, out  # classic conversion (published 3.01)
    assert "Poisson" in out or "poisson" in out


@pytest.mark.parametrize("N,batch,target,epochs", [(60000, 256, 3.0, 30), (5000, 50, 1.0, 4)])
def test_noise_then_privacy_round_trip(capsys, N, batch, target, epochs):
    """``noise`` answers sigma for a target epsilon; ``privacy`` with that sigma (as printed)
    meets the target, and 1% less noise does not: the answer is the smallest that works."""
    plan = ["--N", str(N), "--batch-size", str(batch), "--epochs", str(epochs), "--delta", "1e-5"]
    assert main(["noise", *plan, "--epsilon", str(target)]) == 0
    sigma = float(re.search(r"noise multiplier ([0-9.]+)", capsys.readouterr().out).group(1))

    def eps_at(s: float) -> float:
        assert main(["privacy", *plan, "--noise-multiplier", repr(s)]) == 0
        return float(re.search(r"eps = ([0-9.]+)", capsys.readouterr().out).group(1))

    assert eps_at(sigma) <= target
    assert eps_at(0.99 * sigma) > target


def test_audit_prints_three_accountants_in_order(tmp_path, capsys):
    ledger = PrivacyLedger(60000, 256 / 60000)
    ledger.record_sample(GaussianEvent(1.1), 2000)
    path = tmp_path / "ledger.json"
    ledger.save(path)
    assert main(["audit", str(path), "--delta", "1e-5"]) == 0
    out = capsys.readouterr().out
    rdp = _floats_after("RDP", out)
    moments = _floats_after("moments", out)
    pld = _floats_after("PLD", out)
    # classic conversion is never tighter than the tight RDP one; PLD is the tightest
    assert pld < rdp <= moments


def test_audit_rejects_corrupt_ledger(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "pytorch_privacy.ledger", "version": 999, "runs": []}))
    assert main(["audit", str(bad)]) == 2
    assert "version" in capsys.readouterr().err


def test_bad_arguments_exit_with_usage_error():
    with pytest.raises(SystemExit) as exc:
        main(["privacy", "--N", "0", "--batch-size", "1", "--noise-multiplier", "1", "--epochs", "1"])
    assert exc.value.code == 2


@pytest.mark.slow
def test_demo_trains_and_saves_an_auditable_ledger(tmp_path, capsys):
    path = tmp_path / "ledger.json"
    assert main(["demo", "--epochs", "2", "--ledger", str(path)]) == 0
    out = capsys.readouterr().out
    acc = float(re.search(r"test accuracy ([0-9.]+)", out).group(1))
    assert acc > 0.3  # 10 classes: chance is 0.1
    ledger = PrivacyLedger.load(path)
    assert len(ledger) == int(re.search(r"over (\d+) steps", out).group(1))
    from pytorch_privacy.analysis import RdpAccountant

    eps_printed = float(re.search(r"\(([0-9.]+), 1e-05\)-DP", out).group(1))
    assert eps_printed == pytest.approx(RdpAccountant().compose_ledger(ledger).get_epsilon(1e-5), abs=1e-3)


# -- audit: integrity verdicts and suspicious content ---------------------------------------

_KEY = "audit-test-key"


def _honest(tmp_path, key=None):
    ledger = PrivacyLedger(60000, 256 / 60000)
    ledger.record_sample(GaussianEvent(1.1), 2000)
    path = tmp_path / "ledger.json"
    ledger.save(path, key=key)
    return path


def _edit(path, edit, redigest):
    from pytorch_privacy.dp_query.privacy_ledger import content_digest

    d = json.loads(path.read_text())
    edit(d)
    if redigest:
        d.pop("signature", None)
        content = {k: v for k, v in d.items() if k != "digest"}
        d["digest"] = {"algorithm": "sha256", "value": content_digest(content)}
    path.write_text(json.dumps(d))


def _verdicts(out):
    return [v for v in ("unsigned", "signature OK", "tampered") if f"integrity: {v}" in out]


def test_audit_verdict_signature_ok(tmp_path, capsys):
    path = _honest(tmp_path, key=_KEY)
    assert main(["audit", str(path), "--no-pld", "--key", _KEY]) == 0
    out = capsys.readouterr().out
    assert _verdicts(out) == ["signature OK"] and "WARNING" not in out
    key_file = tmp_path / "key"
    key_file.write_text(_KEY + "\n")
    assert main(["audit", str(path), "--no-pld", "--key-file", str(key_file)]) == 0
    assert _verdicts(capsys.readouterr().out) == ["signature OK"]


def test_audit_verdict_unsigned_honest_file_exits_0(tmp_path, capsys):
    path = _honest(tmp_path)
    assert main(["audit", str(path), "--no-pld"]) == 0
    out = capsys.readouterr().out
    assert _verdicts(out) == ["unsigned"] and "UNSIGNED" in out
    assert "suspicious" not in out


def test_audit_unsigned_but_key_given_is_not_a_pass(tmp_path, capsys):
    path = _honest(tmp_path)
    assert main(["audit", str(path), "--no-pld", "--key", _KEY]) == 3
    assert _verdicts(capsys.readouterr().out) == ["unsigned"]


EPS_LOWERING_EDITS = {
    "huge sigma": lambda d: d["runs"][0]["event"].update(noise_multiplier=1e9),
    "noop": lambda d: d["runs"][0].update(event={"kind": "noop"}),
    "no runs": lambda d: d.update(runs=[]),
    "tiny q": lambda d: d["runs"][0].update(selection_probability=1e-300),
}


@pytest.mark.parametrize("name", sorted(EPS_LOWERING_EDITS))
def test_audit_edit_with_stale_digest_is_tampered(tmp_path, capsys, name):
    path = _honest(tmp_path)
    _edit(path, EPS_LOWERING_EDITS[name], redigest=False)
    assert main(["audit", str(path)]) == 1
    out = capsys.readouterr().out
    assert _verdicts(out) == ["tampered"] and "epsilon =" not in out


@pytest.mark.parametrize("name", sorted(EPS_LOWERING_EDITS))
def test_audit_edit_with_recomputed_digest_is_unsigned_and_flagged(tmp_path, capsys, name):
    # these used to pass with exit 0 and epsilon = 0.0000 and no word of warning
    path = _honest(tmp_path, key=_KEY)
    _edit(path, EPS_LOWERING_EDITS[name], redigest=True)
    assert main(["audit", str(path), "--no-pld"]) == 3
    out = capsys.readouterr().out
    assert _verdicts(out) == ["unsigned"] and "UNSIGNED" in out
    assert "WARNING: suspicious content" in out
    # with the key, the stripped signature is not accepted either
    assert main(["audit", str(path), "--no-pld", "--key", _KEY]) == 3


def test_audit_signed_file_edited_and_redigested_is_tampered_with_key(tmp_path, capsys):
    path = _honest(tmp_path, key=_KEY)
    d = json.loads(path.read_text())
    sig = d["signature"]
    _edit(path, EPS_LOWERING_EDITS["huge sigma"], redigest=True)
    d = json.loads(path.read_text())
    d["signature"] = sig  # keep the old signature
    path.write_text(json.dumps(d))
    assert main(["audit", str(path), "--key", _KEY]) == 1
    assert _verdicts(capsys.readouterr().out) == ["tampered"]


def test_audit_refusals_exit_2_never_1(tmp_path, capsys):
    deep = tmp_path / "deep.json"
    deep.write_text('{"format":"pytorch_privacy.ledger","version":2,"metadata":' + "[" * 900 + "]" * 900 + "}")
    assert main(["audit", str(deep)]) == 2
    assert "nested" in capsys.readouterr().err
    assert main(["audit", str(tmp_path / "missing.json")]) == 2
    empty_key = tmp_path / "k"
    empty_key.write_text("")
    assert main(["audit", str(_honest(tmp_path)), "--key-file", str(empty_key)]) == 2


# -- audit: bounded cost on hostile ledgers -------------------------------------------------


def _hostile_ledgers():
    """Small (< 1 MB) ledgers built to make the analysis slow or huge."""
    out = {}
    wr = PrivacyLedger(60000, sampling="without_replacement", batch_size=256)
    wr.record_sample(GaussianEvent(0.01), 1000)  # used to grow the audit to 24 GB
    out["without_replacement_sigma_0.01"] = wr
    wr5 = PrivacyLedger(60000, sampling="without_replacement", batch_size=256)
    wr5.record_sample(GaussianEvent(0.05), 1000)  # used to take over 40 s
    out["without_replacement_sigma_0.05"] = wr5
    tiny = PrivacyLedger(60000, sampling="without_replacement", batch_size=256)
    tiny.record_sample(GaussianEvent(1e-250), 10)  # used to raise ZeroDivisionError
    out["sigma_1e-250"] = tiny
    many = PrivacyLedger(60000, 0.01)
    for i in range(400):  # 400 distinct settings: one RDP curve and one PLD each
        many.record_sample(GaussianEvent(0.5 + i * 0.01), 10)
    out["400_distinct_settings"] = many
    steps = PrivacyLedger(60000, 0.01)
    steps.record_sample(GaussianEvent(1.0), 10**9)
    out["1e9_steps"] = steps
    return out


_MEASURE = """
import resource, subprocess, sys
def limit():  # the audit must stay far below this on its own
    resource.setrlimit(resource.RLIMIT_AS, (2 * 2**30, 2 * 2**30))
p = subprocess.run([sys.executable, "-m", "pytorch_privacy.cli", "audit", *sys.argv[1:]],
                   capture_output=True, text=True, preexec_fn=limit)
sys.stdout.write(p.stdout)
sys.stderr.write(p.stderr)
sys.stderr.write("\\nMAXRSS_KB %d\\n" % resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
sys.exit(p.returncode)
"""


def _audit_subprocess(path, *extra, timeout=30):
    """Run the audit in a fresh process under RLIMIT_AS = 2 GiB; return the completed process,
    the wall time and the peak resident memory (KiB) of the audit and its analysis child."""
    import subprocess
    import sys
    import time

    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(path), *extra], capture_output=True, text=True, timeout=timeout
    )
    seconds = time.monotonic() - t0
    m = re.search(r"MAXRSS_KB (\d+)", proc.stderr)
    return proc, seconds, int(m.group(1))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(_hostile_ledgers()))
def test_audit_of_hostile_ledger_is_bounded(tmp_path, name):
    path = tmp_path / "hostile.json"
    _hostile_ledgers()[name].save(path)
    assert path.stat().st_size < 2**20
    proc, seconds, maxrss_kb = _audit_subprocess(path)
    # either a bound or a refusal that says why; never a traceback, a hang or a memory blow-up
    assert "Traceback" not in proc.stderr, proc.stderr
    if proc.returncode == 0:
        assert "RDP (tight conversion)      epsilon = " in proc.stdout
    else:
        assert proc.returncode == 2, (proc.returncode, proc.stderr)
        assert "refused" in proc.stderr or "error:" in proc.stderr
    assert seconds < 25  # 9 s time limit + interpreter start, with slack for a loaded machine
    assert maxrss_kb < 2**20  # under 1 GiB resident


def test_audit_time_limit_refuses_with_the_reason(tmp_path, capsys, monkeypatch):
    import time

    import pytorch_privacy.cli.audit as cli

    def slow(ledger, delta, pld):  # an analysis that never finishes
        time.sleep(60)
        yield "unreachable"

    monkeypatch.setattr(cli, "_analysis_steps", slow)
    path = _honest(tmp_path)
    t0 = time.monotonic()
    assert main(["audit", str(path), "--time-limit", "1"]) == 2
    assert time.monotonic() - t0 < 10
    assert "time limit" in capsys.readouterr().err


def test_audit_time_limit_keeps_the_rdp_bound_already_printed(tmp_path, capsys, monkeypatch):
    import time

    import pytorch_privacy.cli.audit as cli

    def rdp_then_slow_pld(ledger, delta, pld):
        yield "delta = 1e-05"
        yield "  RDP (tight conversion)      epsilon = 1.2345   (order 9)"
        time.sleep(60)
        yield "unreachable"

    monkeypatch.setattr(cli, "_analysis_steps", rdp_then_slow_pld)
    assert main(["audit", str(_honest(tmp_path)), "--time-limit", "1"]) == 0
    out = capsys.readouterr().out
    assert "epsilon = 1.2345" in out and "not computed" in out and "time limit" in out


def test_audit_memory_limit_refuses_with_the_reason(tmp_path, capsys, monkeypatch):
    import pytorch_privacy.cli.audit as cli

    def hungry(ledger, delta, pld):  # an analysis that asks for 2 GiB
        yield "delta = 1e-05"
        buf = bytearray(2 * 2**30)
        yield str(len(buf))

    monkeypatch.setattr(cli, "_analysis_steps", hungry)
    assert main(["audit", str(_honest(tmp_path)), "--memory-limit-mb", "200"]) == 2
    assert "memory" in capsys.readouterr().err


def test_audit_ed25519_public_key_file(tmp_path, capsys):
    pytest.importorskip("cryptography")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    private = ed25519.Ed25519PrivateKey.generate()
    pem = tmp_path / "pub.pem"
    pem.write_bytes(private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    path = _honest(tmp_path, key=private)
    assert main(["audit", str(path), "--no-pld", "--public-key-file", str(pem)]) == 0
    assert _verdicts(capsys.readouterr().out) == ["signature OK"]
    _edit(path, EPS_LOWERING_EDITS["huge sigma"], redigest=True)  # drops the signature
    assert main(["audit", str(path), "--no-pld", "--public-key-file", str(pem)]) == 3
    assert _verdicts(capsys.readouterr().out) == ["unsigned"]


# -- CLI polish (issue 15 item 4) ----------------------------------------------------------


def _empty_ledger(tmp_path):
    path = tmp_path / "empty.json"
    PrivacyLedger(1000, 0.01).save(path)
    return path


def test_version_flag(capsys):
    import pytorch_privacy

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"pytorch-privacy {pytorch_privacy.__version__}"


def _subparsers():
    import argparse

    from pytorch_privacy.cli import build_parser

    p = build_parser()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    return p, sub.choices


def test_every_option_has_help_and_shows_its_default(capsys):
    parser, subs = _subparsers()
    for name, sp in subs.items():
        for action in sp._actions:
            if action.dest == "help":
                continue
            assert action.help, f"{name} {action.option_strings or action.dest} has no help text"
        with pytest.raises(SystemExit):
            main([name, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        for action in sp._actions:
            if action.option_strings and action.default not in (None, False) and action.dest != "help":
                shown = action.default if isinstance(action.default, str) else f"{action.default}"
                assert f"(default: {shown})" in text, (name, action.dest, text)


def test_engine_choices_are_the_registered_engines_and_checked_before_data_loads(capsys, monkeypatch, tmp_path):
    from pytorch_privacy.cli import ENGINE_CHOICES
    from pytorch_privacy.optimizer.engines import available_engines

    assert set(ENGINE_CHOICES) == {"auto", *available_engines()} and "loop" in ENGINE_CHOICES
    import pytorch_privacy.demo as demo

    monkeypatch.setattr(demo, "load_digits_tensors", lambda *a, **k: pytest.fail("data loaded"))
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--engine", "nope", "--ledger", str(tmp_path / "l.json")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'nope'" in err and "'loop'" in err


@pytest.mark.parametrize("argv", [
    ["privacy", "--N", "abc", "--batch-size", "1", "--noise-multiplier", "1", "--epochs", "1"],
    ["privacy", "--N", "10", "--batch-size", "1", "--noise-multiplier", "x", "--epochs", "1"],
    ["noise", "--N", "10", "--batch-size", "1", "--epsilon", "1", "--epochs", "1", "--delta", "tiny"],
    ["audit", "x.json", "--time-limit", "soon"],
    ["demo", "--ledger-mode", "rw"],
])
def test_helper_names_never_leak_into_messages(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "error: argument" in err
    assert not re.search(r"invalid _|_positive|_delta|_file_mode|_nonnegative", err), err


def test_privacy_errors_use_this_programs_usage_line(capsys):
    # a plan the library refuses (batch larger than N) and a parse error: both as pytorch-privacy
    assert main(["privacy", "--N", "10", "--batch-size", "100", "--noise-multiplier", "1", "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pytorch-privacy privacy: error:") and "compute_dp_sgd_privacy" not in err
    with pytest.raises(SystemExit):
        main(["privacy", "--N", "0", "--batch-size", "1", "--noise-multiplier", "1", "--epochs", "1"])
    err = capsys.readouterr().err
    assert "usage: pytorch-privacy privacy" in err and "compute_dp_sgd_privacy" not in err


@pytest.mark.parametrize("kind", ["missing", "directory", "binary", "foreign json", "not json"])
def test_audit_non_ledger_files_get_one_wording(tmp_path, capsys, kind):
    path = tmp_path / "thing.json"
    if kind == "directory":
        path.mkdir()
    elif kind == "binary":
        path.write_bytes(bytes(range(256)) * 4)
    elif kind == "foreign json":
        path.write_text('{"hello": 1}')
    elif kind == "not json":
        path.write_text("steps: 94\n")
    assert main(["audit", str(path)]) == 2
    captured = capsys.readouterr()
    assert f"{path} is not a ledger file" in captured.err
    assert "Traceback" not in captured.err and "integrity:" not in captured.out


def test_audit_grammar_and_aligned_columns(tmp_path, capsys):
    one = PrivacyLedger(60000, 0.01)
    one.record_sample(GaussianEvent(1.1), 1)
    p1 = tmp_path / "one.json"
    one.save(p1)
    assert main(["audit", str(p1)]) == 0
    out = capsys.readouterr().out
    assert "PrivacyLedger: 1 step in 1 run, 1 distinct setting" in out
    many = PrivacyLedger(60000, 0.01)
    many.record_sample(GaussianEvent(1.1), 90)
    many.record_sample(GaussianEvent(2.0), 4)
    p2 = tmp_path / "many.json"
    many.save(p2)
    assert main(["audit", str(p2)]) == 0
    out = capsys.readouterr().out
    assert "PrivacyLedger: 94 steps in 2 runs, 2 distinct settings" in out
    cols = [line.index("epsilon =") for line in out.splitlines() if "epsilon =" in line]
    assert len(cols) == 3 and len(set(cols)) == 1, out


def test_audit_empty_ledger_is_zero_from_every_accountant_and_still_flagged(tmp_path, capsys):
    assert main(["audit", str(_empty_ledger(tmp_path))]) == 3  # flagged as suspicious (runs deleted?)
    out = capsys.readouterr().out
    assert "WARNING: suspicious content" in out
    assert _floats_after("RDP", out) == 0.0
    assert _floats_after("moments", out) == 0.0
    assert _floats_after("PLD", out) == 0.0


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_privacy_offers_pld_and_names_the_accountant(capsys, accountant):
    plan = ["--N", "60000", "--batch-size", "256", "--noise-multiplier", "1.1", "--epochs", "60"]
    assert main(["privacy", *plan, "--accountant", accountant]) == 0
    out = capsys.readouterr().out
    assert f"accountant: {accountant.upper()}" in out
    eps = float(re.search(r"eps = ([0-9.]+)", out).group(1))
    if accountant == "rdp":
        assert abs(eps - 2.6) < 0.05
    else:
        # PLD is tighter than RDP for this plan (dp-accounting's PLD gives about 2.38)
        assert 2.2 < eps < 2.55


def test_noise_with_pld_names_it_and_its_answer_meets_the_target_tightly(capsys):
    plan = ["--N", "60000", "--batch-size", "256", "--epochs", "30", "--delta", "1e-5"]
    assert main(["noise", *plan, "--epsilon", "3", "--accountant", "pld"]) == 0
    out = capsys.readouterr().out
    assert "accountant: PLD" in out
    sigma = float(re.search(r"noise multiplier ([0-9.]+)", out).group(1))
    assert main(["noise", *plan, "--epsilon", "3"]) == 0
    out_rdp = capsys.readouterr().out
    assert "accountant: RDP" in out_rdp
    assert sigma < float(re.search(r"noise multiplier ([0-9.]+)", out_rdp).group(1))  # PLD is tighter

    def eps_at(s):
        assert main(["privacy", *plan, "--noise-multiplier", repr(s), "--accountant", "pld"]) == 0
        return float(re.search(r"eps = ([0-9.]+)", capsys.readouterr().out).group(1))

    assert eps_at(sigma) <= 3.0 + 5e-4  # printed to 4 significant digits
    assert eps_at(0.98 * sigma) > 3.0


def _no_training(monkeypatch):
    import pytorch_privacy.demo as demo

    monkeypatch.setattr(demo, "load_digits_tensors", lambda *a, **k: pytest.fail("data loaded"))


def test_demo_ledger_path_mistakes_are_messages_not_tracebacks(tmp_path, capsys, monkeypatch):
    _no_training(monkeypatch)
    missing_parent = tmp_path / "no" / "such" / "ledger.json"
    assert main(["demo", "--ledger", str(missing_parent)]) == 2
    err = capsys.readouterr().err
    assert str(missing_parent) in err and "does not exist" in err and ".ledger-" not in err
    assert main(["demo", "--ledger", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"--ledger {tmp_path} is a directory" in err and "Traceback" not in err


def test_demo_refuses_to_overwrite_an_existing_ledger(tmp_path, capsys, monkeypatch):
    _no_training(monkeypatch)
    path = tmp_path / "ledger.json"
    path.write_text("precious")
    assert main(["demo", "--ledger", str(path)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert path.read_text() == "precious"


def test_demo_device_cuda_without_cuda_is_a_message(capsys, monkeypatch, tmp_path):
    import torch

    _no_training(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["demo", "--device", "cuda", "--ledger", str(tmp_path / "l.json")]) == 2
    err = capsys.readouterr().err
    assert "CUDA is not available" in err and "--device cpu" in err
    assert main(["demo", "--device", "warp-drive", "--ledger", str(tmp_path / "l.json")]) == 2
    assert "is not a torch device" in capsys.readouterr().err


def _tiny_demo(monkeypatch):
    """The demo on 200 images for one epoch (the real data, fewer of them)."""
    import pytorch_privacy.demo as demo

    real = demo.load_digits_tensors

    def small(seed=0, test_fraction=0.2):
        x, y, xt, yt, src = real(seed, test_fraction)
        return x[:200], y[:200], xt[:100], yt[:100], src

    monkeypatch.setattr(demo, "load_digits_tensors", small)


def test_demo_writes_where_asked_readable_by_others_and_overwrites_only_when_told(tmp_path, capsys, monkeypatch):
    import os
    import stat

    _tiny_demo(monkeypatch)
    path = tmp_path / "runs" / "mine.json"
    path.parent.mkdir()
    old = os.umask(0o077)  # even under a strict umask the mode is what was asked for
    try:
        assert main(["demo", "--epochs", "1", "--batch-size", "20", "--ledger", str(path), "--no-progress"]) == 0
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        assert len(PrivacyLedger.load(path)) > 0
        assert main(["demo", "--epochs", "1", "--batch-size", "20", "--ledger", str(path), "--no-progress"]) == 2
        assert main(["demo", "--epochs", "1", "--batch-size", "20", "--ledger", str(path), "--no-progress",
                     "--overwrite", "--ledger-mode", "600"]) == 0
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    finally:
        os.umask(old)
    assert not [p for p in path.parent.iterdir() if p.name != "mine.json"]  # no temporary files left


def _png_ok(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert len(data) > 5000, f"suspiciously small PNG ({len(data)} bytes)"
    import struct

    width, height = struct.unpack(">II", data[16:24])  # IHDR
    assert width >= 300 and height >= 200


def test_audit_plot_writes_a_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")  # in the [test] and [plot] extras
    path = _honest(tmp_path)
    png = tmp_path / "eps.png"
    assert main(["audit", str(path), "--plot", str(png), "--target-epsilon", "2"]) == 0
    assert f"written to {png}" in capsys.readouterr().out
    _png_ok(png)


def test_epsilon_curve_is_monotone_and_ends_at_the_audit_values(tmp_path):
    from pytorch_privacy.analysis import RdpAccountant, compute_pld_from_ledger
    from pytorch_privacy.cli import epsilon_curve

    ledger = PrivacyLedger(60000, 256 / 60000)
    ledger.record_sample(GaussianEvent(1.1), 700)
    ledger.record_sample(GaussianEvent(0.8), 300)
    c = epsilon_curve(ledger, 1e-5, points=20, pld_points=5)
    assert c["steps"][0] == 0 and c["steps"][-1] == 1000 and len(c["steps"]) == 20
    assert c["rdp"][0] == 0.0 and all(a < b for a, b in zip(c["rdp"], c["rdp"][1:]))
    assert c["rdp"][-1] == pytest.approx(RdpAccountant().compose_ledger(ledger).get_epsilon(1e-5), rel=1e-6)
    assert c["pld_steps"][-1] == 1000 and 2 <= len(c["pld_steps"]) <= 6
    assert c["pld"][-1] == pytest.approx(compute_pld_from_ledger(ledger).get_epsilon(1e-5), rel=1e-6)
    # the cut falls inside the second run: 500 steps at sigma 1.1 only
    half = PrivacyLedger(60000, 256 / 60000)
    half.record_sample(GaussianEvent(1.1), 500)
    c2 = epsilon_curve(ledger, 1e-5, points=3, pld=False)
    assert c2["steps"] == [0, 500, 1000]
    assert c2["rdp"][1] == pytest.approx(RdpAccountant().compose_ledger(half).get_epsilon(1e-5), rel=1e-6)


def test_plot_without_matplotlib_is_a_clear_error(tmp_path, capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_mpl(name, *a, **k):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_mpl)
    assert main(["audit", str(_honest(tmp_path)), "--plot", str(tmp_path / "e.png")]) == 2
    err = capsys.readouterr().err
    assert "matplotlib" in err and "pytorch_privacy[plot]" in err
    assert not (tmp_path / "e.png").exists()


def test_epsilon_curve_cost_is_bounded_and_keeps_the_last_step():
    from pytorch_privacy.cli import epsilon_curve

    ledger = PrivacyLedger(60000, 0.01)
    ledger.record_sample(GaussianEvent(1.0), 5000)
    c = epsilon_curve(ledger, 1e-5, points=50, seconds=0.0, pld_seconds=0.0)
    # with no time to spare each accountant still draws the first and the last step
    assert c["steps"] == [0, 5000] and c["pld_steps"] == [0, 5000]
    assert c["rdp"][0] == 0.0 < c["pld"][1] < c["rdp"][1]


def test_audit_plot_path_mistakes_are_messages(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = _honest(tmp_path)
    bad = tmp_path / "missing" / "eps.png"
    assert main(["audit", str(path), "--plot", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "does not exist" in err
    assert main(["audit", str(path), "--plot", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_audit_with_plot_does_not_import_torch(tmp_path):
    pytest.importorskip("matplotlib")
    import subprocess
    import sys

    path = _honest(tmp_path)
    png = tmp_path / "eps.png"
    code = (
        "import sys\nfrom pytorch_privacy.cli import main\n"
        f"rc = main(['audit', {str(path)!r}, '--plot', {str(png)!r}])\n"
        "assert rc == 0, rc\nassert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    _png_ok(png)


def test_audit_plot_leaves_out_pld_when_the_audit_could_not_finish_it(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    import time

    import pytorch_privacy.cli.audit as cli

    def rdp_then_slow_pld(ledger, delta, pld):
        yield "delta = 1e-05"
        yield "  RDP (tight conversion)      epsilon = 1.2345   (order 9)"
        time.sleep(60)
        yield "unreachable"

    seen = {}
    real_curve = cli.epsilon_curve

    def spy(ledger, delta, **kw):
        seen.update(kw)
        return real_curve(ledger, delta, **kw)

    monkeypatch.setattr(cli, "_analysis_steps", rdp_then_slow_pld)
    monkeypatch.setattr(cli, "epsilon_curve", spy)
    png = tmp_path / "eps.png"
    assert main(["audit", str(_honest(tmp_path)), "--time-limit", "1", "--plot", str(png)]) == 0
    assert seen == {"pld": False} and "not computed" in capsys.readouterr().out
    _png_ok(png)


# -- demo --audit: the one-run audit beside the ledger's bounds ------------------------------


def test_demo_audit_option_defaults_and_bounds(tmp_path, capsys, monkeypatch):
    from pytorch_privacy.cli.args import build_parser
    from pytorch_privacy.cli.demo_command import DIGITS_CNN_PARAMETERS
    from pytorch_privacy.demo import DigitsCNN

    p = build_parser()
    assert p.parse_args(["demo"]).audit is None
    assert p.parse_args(["demo", "--audit"]).audit == 1000
    assert p.parse_args(["demo", "--audit", "250"]).audit == 250
    assert DIGITS_CNN_PARAMETERS == sum(q.numel() for q in DigitsCNN().parameters())
    _no_training(monkeypatch)
    assert main(["demo", "--audit", "99999", "--ledger", str(tmp_path / "l.json")]) == 2
    err = capsys.readouterr().err
    assert "--audit 99999" in err and "9258" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["demo", "--audit", "0"])
    assert "positive integer" in capsys.readouterr().err


def test_demo_audit_prints_the_empirical_lower_bound(tmp_path, capsys, monkeypatch):
    _tiny_demo(monkeypatch)
    path = tmp_path / "l.json"
    argv = ["demo", "--epochs", "1", "--batch-size", "20", "--ledger", str(path), "--no-progress", "--audit", "200"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    m = re.search(r"empirical epsilon >= ([0-9.]+) \(95% confidence\); ledger upper bounds: RDP ([0-9.]+), PLD ([0-9.]+)", out)
    assert m, out
    low, rdp, pld = (float(g) for g in m.groups())
    assert 0 <= low <= min(rdp, pld)
    assert rdp == pytest.approx(float(re.search(r"\(([0-9.]+), 1e-05\)-DP", out).group(1)), abs=1e-3)


def _tree_ledger_file(tmp_path, sampling, trees, sigma=2.0, n=1000, b=100):
    from pytorch_privacy.dp_query.tree_events import TreeAggregationStepEvent

    led = PrivacyLedger(n, sampling=sampling, batch_size=None if sampling == "full" else b)
    for size in trees:  # written step by step, starts_tree=1 at each (re)start
        for t in range(size):
            led.record_sample(TreeAggregationStepEvent(sigma, 1 if t == 0 else 0))
    path = tmp_path / f"tree_{sampling}.json"
    led.save(path)
    return path


def test_audit_of_tree_aggregation_ledgers_prints_the_tree_bound(tmp_path, capsys):
    import numpy as np

    from pytorch_privacy.analysis import DEFAULT_ORDERS, get_privacy_spent
    from pytorch_privacy.analysis.tree_aggregation import compute_rdp_single_tree, compute_rdp_tree_restart

    orders = np.array(DEFAULT_ORDERS)
    # fixed order, 10 steps per epoch: a tree per epoch for 3 epochs, then one tree over 2 epochs
    path = _tree_ledger_file(tmp_path, "fixed_order", [10, 10, 10, 20])
    assert main(["audit", str(path), "--delta", "1e-5"]) == 0
    out = capsys.readouterr().out
    # replace-one: sensitivity 2C per participation, i.e. the zero-out bound at half the noise
    rdp = compute_rdp_tree_restart(1.0, [10, 10, 10], orders) + compute_rdp_single_tree(1.0, 20, 2, 9, orders)
    want = get_privacy_spent(orders, rdp, target_delta=1e-5)[0]
    assert _floats_after("RDP", out) == pytest.approx(want, abs=6e-5)  # printed to 4 decimals
    assert _floats_after("PLD", out) <= _floats_after("RDP", out)
    # full batch, add/remove-one: every record in every step of each tree
    path = _tree_ledger_file(tmp_path, "full", [8, 8, 3], sigma=5.0)
    assert main(["audit", str(path), "--delta", "1e-5"]) == 0
    out = capsys.readouterr().out
    rdp = 2 * compute_rdp_single_tree(5.0, 8, 8, 0, orders) + compute_rdp_single_tree(5.0, 3, 3, 0, orders)
    assert _floats_after("RDP", out) == pytest.approx(get_privacy_spent(orders, rdp, target_delta=1e-5)[0], abs=6e-5)


def test_audit_refuses_sampled_tree_steps_with_the_reason(tmp_path, capsys):
    from pytorch_privacy.dp_query.tree_events import TreeAggregationStepEvent

    led = PrivacyLedger(1000, 0.1)
    led.record_sample(TreeAggregationStepEvent(1.0, 1))
    path = tmp_path / "poisson_tree.json"
    led.save(path)
    assert main(["audit", str(path)]) == 2
    assert "no amplification" in capsys.readouterr().err


def test_audit_says_when_pld_cannot_account_an_event(tmp_path, capsys):
    from typing import ClassVar

    import attrs

    from pytorch_privacy.analysis.rdp_accountant import register_rdp_rule
    from pytorch_privacy.dp_query.events import DpEvent

    @attrs.frozen
    class _RdpOnlyEvent(DpEvent):
        kind: ClassVar[str] = "test_cli_rdp_only"
        rho: float = 0.1

    register_rdp_rule(_RdpOnlyEvent)(lambda event, orders, relation: orders * event.rho)
    led = PrivacyLedger(1000, sampling="full")
    led.record_sample(_RdpOnlyEvent(0.1), 3)
    path = tmp_path / "rdp_only.json"
    led.save(path)
    assert main(["audit", str(path)]) == 0
    out = capsys.readouterr().out
    assert _floats_after("RDP", out) > 0
    assert "not computed: the PLD accountant does not support" in out


def test_audit_plot_of_tree_ledgers_draws_rdp_and_pld(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from pytorch_privacy.cli.plot import epsilon_curve

    path = _tree_ledger_file(tmp_path, "fixed_order", [10, 20, 5])
    png = tmp_path / "curve.png"
    assert main(["audit", str(path), "--plot", str(png)]) == 0
    assert png.stat().st_size > 0
    out = capsys.readouterr().out
    curve = epsilon_curve(PrivacyLedger.load(path), 1e-5)
    assert curve["pld"] and curve["pld"][-1] == pytest.approx(_floats_after("PLD", out), abs=6e-5)
    assert all(p <= r + 1e-9 for p, r in zip(curve["pld"], [curve["rdp"][curve["steps"].index(k)] for k in curve["pld_steps"]]))
