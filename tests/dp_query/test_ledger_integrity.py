"""Ledger files: strict schema, bounded size and nesting, content digest, HMAC signatures."""

import json

import pytest

from pytorch_privacy.dp_query import (
    ComposedEvent,
    GaussianEvent,
    NoOpEvent,
    PrivacyLedger,
    SelfComposedEvent,
    event_from_dict,
)
from pytorch_privacy.dp_query.privacy_ledger import (
    LIMITS,
    SIGNATURE_OK,
    UNSIGNED,
    LedgerIntegrityError,
    content_digest,
    suspicious_content,
)

KEY = b"correct horse battery staple"


def _ledger():
    ledger = PrivacyLedger(60000, 256 / 60000, metadata={"model": "cnn"})
    ledger.record_sample(GaussianEvent(1.1), 14062)
    return ledger


def _doc(**kw):
    return json.loads(_ledger().to_json(**kw))


def _redigest(d):
    """What an attacker without the key does after an edit: recompute the digest."""
    content = {k: v for k, v in d.items() if k not in ("digest", "signature")}
    d["digest"] = {"algorithm": "sha256", "value": content_digest(content)}
    return d


# -- strict schema (digest recomputed, so only the schema check can refuse) -------------


@pytest.mark.parametrize("bad", [1.9, 14062.0, "14062", True, None, [14062], -1, 0, 10**9 + 1, 10**40])
def test_count_must_be_an_exact_integer(bad):
    d = _doc()
    d["runs"][0]["count"] = bad
    with pytest.raises(ValueError, match="count"):
        PrivacyLedger.from_json(json.dumps(_redigest(d)))


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d["runs"][0].update(population_size=60000.0),
        lambda d: d["runs"][0].update(population_size="60000"),
        lambda d: d["runs"][0].update(population_size=2**53 + 1),
        lambda d: d["runs"][0].update(selection_probability="0.004"),
        lambda d: d["runs"][0].update(selection_probability=True),
        lambda d: d["runs"][0].update(selection_probability=0),
        lambda d: d["runs"][0].update(sampling="Poisson"),
        lambda d: d["runs"][0].update(sampling=["poisson"]),
        lambda d: d["runs"][0].update(extra=1),
        lambda d: d["runs"][0].update(batch_size=256),  # not a field of a poisson run
        lambda d: d["runs"][0]["event"].update(noise_multiplier="1.1"),
        lambda d: d["runs"][0]["event"].update(noise_multiplier=True),
        lambda d: d["runs"][0]["event"].update(extra=0),
        lambda d: d["runs"][0]["event"].pop("noise_multiplier"),
        lambda d: d["runs"][0].update(event={"kind": ["gaussian"], "noise_multiplier": 1.0}),
        lambda d: d["runs"][0].update(event={"kind": "self_composed", "count": 2.0, "event": {"kind": "noop"}}),
        lambda d: d["runs"][0].update(event={"kind": "composed", "events": {"kind": "noop"}}),
        lambda d: d["current"].update(population_size=True),
        lambda d: d["current"].update(batch_size=5),
        lambda d: d["current"].pop("batch_size"),
        lambda d: d.update(metadata=[1]),
        lambda d: d.update(unknown={}),
        lambda d: d.update(runs={"0": d["runs"][0]}),
    ],
)
def test_schema_violations_are_refused(mutate):
    d = _doc()
    mutate(d)
    with pytest.raises(ValueError):
        PrivacyLedger.from_json(json.dumps(_redigest(d)))


@pytest.mark.parametrize(
    "text_edit",
    [
        lambda t: t.replace('"noise_multiplier":1.1', '"noise_multiplier":NaN'),
        lambda t: t.replace('"noise_multiplier":1.1', '"noise_multiplier":Infinity'),
        lambda t: t.replace('"noise_multiplier":1.1', '"noise_multiplier":1e999'),
        lambda t: t.replace('"count":14062', '"count":14062,"count":1'),  # duplicate key
        lambda t: t.replace('"count":14062', '"count":1' + "0" * 5000),  # int beyond Python's str limit
    ],
)
def test_json_level_tricks_are_refused(text_edit):
    text = text_edit(_ledger().to_json())
    with pytest.raises(ValueError):
        PrivacyLedger.from_json(text)


def test_deep_nesting_is_a_value_error_not_a_recursion_error():
    # 900 levels used to raise RecursionError from the recursive event reader
    ev = {"kind": "gaussian", "noise_multiplier": 1.0}
    for _ in range(900):
        ev = {"kind": "self_composed", "count": 1, "event": ev}
    d = _doc()
    d["runs"][0]["event"] = ev
    with pytest.raises(ValueError, match="nested"):
        PrivacyLedger.from_json(json.dumps(_redigest(d)))
    with pytest.raises(ValueError, match="nested"):
        event_from_dict(ev)
    # far deeper than the JSON parser's own recursion limit
    with pytest.raises(ValueError, match="nested"):
        PrivacyLedger.from_json('{"format":"pytorch_privacy.ledger","version":2,"metadata":' + "[" * 100_000)


def test_nesting_within_the_limit_reads():
    ev = GaussianEvent(1.0)
    for _ in range(5):
        ev = ComposedEvent([SelfComposedEvent(ev, 2)])
    ledger = PrivacyLedger(100, 0.1)
    ledger.record_sample(ev, 3)
    assert PrivacyLedger.from_json(ledger.to_json()) == ledger


def test_oversized_file_is_refused_before_reading(tmp_path, monkeypatch):
    path = tmp_path / "big.json"
    ledger = _ledger()
    ledger.save(path)
    monkeypatch.setitem(LIMITS, "max_file_bytes", 100)
    with pytest.raises(ValueError, match="max_file_bytes"):
        PrivacyLedger.load(path)
    with pytest.raises(ValueError, match="max_file_bytes"):
        PrivacyLedger.from_json(ledger.to_json())


def test_step_and_run_limits():
    d = _doc()
    d["runs"] = [dict(d["runs"][0], count=6 * 10**8) for _ in range(2)]  # 1.2e9 steps in all
    with pytest.raises(ValueError, match="max_steps"):
        PrivacyLedger.from_json(json.dumps(_redigest(d)))
    d = _doc()
    ev = {"kind": "self_composed", "count": 10**12, "event": {"kind": "gaussian", "noise_multiplier": 1.0}}
    d["runs"][0]["event"] = ev
    with pytest.raises(ValueError, match="exceeds the limit"):
        PrivacyLedger.from_json(json.dumps(_redigest(d)))


# -- digest ----------------------------------------------------------------------------------


def test_digest_is_sha256_of_canonical_content():
    import hashlib

    d = _doc()
    content = {k: v for k, v in d.items() if k != "digest"}
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":")).encode()
    assert d["digest"] == {"algorithm": "sha256", "value": hashlib.sha256(canonical).hexdigest()}
    back = PrivacyLedger.from_json(json.dumps(d, indent=2))  # whitespace and key order do not matter
    assert back == _ledger() and back.integrity == UNSIGNED


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d["runs"][0]["event"].update(noise_multiplier=1e9),
        lambda d: d["runs"][0].update(event={"kind": "noop"}),
        lambda d: d.update(runs=[]),
        lambda d: d["runs"][0].update(selection_probability=1e-300),
        lambda d: d["runs"][0].update(count=1),
        lambda d: d["metadata"].update(model="other"),
        lambda d: d.pop("digest"),
        lambda d: d.update(digest={"algorithm": "md5", "value": d["digest"]["value"]}),
        lambda d: d.update(digest=None),
        lambda d: d["digest"].update(value="\u00e9" * 64),  # non-ASCII: compare_digest used to raise TypeError
    ],
)
def test_edits_with_a_stale_digest_are_tampered(edit):
    d = _doc()
    edit(d)
    with pytest.raises(LedgerIntegrityError, match="tampered"):
        PrivacyLedger.from_json(json.dumps(d))


def test_version_1_files_still_read_as_unsigned():
    d = _doc()
    d.pop("digest")
    d["version"] = 1
    ledger = PrivacyLedger.from_json(json.dumps(d))
    assert ledger == _ledger()
    assert ledger.integrity == UNSIGNED and "version-1" in ledger.integrity_detail


def test_version_1_reads_are_strict_too():
    d = _doc()
    d.pop("digest")
    d["version"] = 1
    d["runs"][0]["count"] = 1.9
    with pytest.raises(ValueError, match="count"):
        PrivacyLedger.from_json(json.dumps(d))


# -- signatures ------------------------------------------------------------------------------


def test_hmac_signature_round_trip(tmp_path):
    path = tmp_path / "l.json"
    _ledger().save(path, key=KEY)
    back = PrivacyLedger.load(path, key=KEY)
    assert back == _ledger() and back.integrity == SIGNATURE_OK
    assert PrivacyLedger.load(path, key=KEY.decode()).integrity == SIGNATURE_OK  # str keys are UTF-8
    unverified = PrivacyLedger.load(path)  # no key: the signature cannot be checked
    assert unverified.integrity == UNSIGNED and "NOT verified" in unverified.integrity_detail


def test_signature_detects_edits_even_with_a_recomputed_digest():
    d = _doc(key=KEY)
    d["runs"][0]["event"]["noise_multiplier"] = 1e9
    _redigest(d)
    with pytest.raises(LedgerIntegrityError, match="tampered"):
        PrivacyLedger.from_json(json.dumps(d), key=KEY)


def test_wrong_key_or_stripped_signature():
    d = _doc(key=KEY)
    with pytest.raises(LedgerIntegrityError):
        PrivacyLedger.from_json(json.dumps(d), key=b"another key")
    d.pop("signature")
    ledger = PrivacyLedger.from_json(json.dumps(d), key=KEY)
    assert ledger.integrity == UNSIGNED and "no signature" in ledger.integrity_detail
    with pytest.raises(ValueError, match="empty"):
        PrivacyLedger.from_json(json.dumps(_doc(key=KEY)), key=b"")


def test_in_memory_ledger_has_no_verdict():
    assert _ledger().integrity is None


def test_non_json_metadata_is_refused_when_written():
    ledger = PrivacyLedger(10, 0.5, metadata={"bad": object()})
    with pytest.raises(TypeError, match="metadata"):
        ledger.to_json()


# -- suspicious content ----------------------------------------------------------------------


def test_suspicious_content():
    assert suspicious_content(_ledger()) == []
    assert any("no steps" in w for w in suspicious_content(PrivacyLedger(100, 0.1)))
    cases = {
        "noise multiplier above": GaussianEvent(1e9),
        "NoOp": NoOpEvent(),
        "zero noise": GaussianEvent(0.0),
    }
    for needle, ev in cases.items():
        ledger = PrivacyLedger(100, 0.1)
        ledger.record_sample(GaussianEvent(1.0), 5)
        ledger.record_sample(ev, 3)
        ws = suspicious_content(ledger)
        assert any(needle in w and "3 step" in w for w in ws), (needle, ws)
    tiny = PrivacyLedger(60000, 1e-300)
    tiny.record_sample(GaussianEvent(1.0), 5)
    assert any("below one record" in w for w in suspicious_content(tiny))


def test_equivalent_sigma_at_extreme_sigmas():
    from pytorch_privacy.dp_query.events import equivalent_gaussian_noise_multiplier as eq

    # sigma ** -2 used to raise OverflowError below ~1e-154 (and crashed the audit)
    assert eq(ComposedEvent([GaussianEvent(1e-250), GaussianEvent(1e-250)])) == pytest.approx(1e-250 / 2**0.5)
    assert eq(SelfComposedEvent(GaussianEvent(1e-150), 100)) == pytest.approx(1e-151)
    assert eq(ComposedEvent([GaussianEvent(1e300), GaussianEvent(1e300)])) == pytest.approx(1e300 / 2**0.5)
    assert eq(ComposedEvent([GaussianEvent(2.0), SelfComposedEvent(GaussianEvent(4.0), 4)])) == (
        (2.0**-2 + 4 * 4.0**-2) ** -0.5
    )


# -- Ed25519 (optional: only where the 'cryptography' package is installed) -----------------


def test_ed25519_signature_round_trip_and_tampering():
    ed25519 = pytest.importorskip("cryptography.hazmat.primitives.asymmetric.ed25519")
    private = ed25519.Ed25519PrivateKey.generate()
    public = private.public_key()
    d = _doc(key=private)
    assert d["signature"]["algorithm"] == "ed25519"
    ledger = PrivacyLedger.from_json(json.dumps(d), key=public)
    assert ledger.integrity == SIGNATURE_OK and ledger == _ledger()
    assert PrivacyLedger.from_json(json.dumps(d)).integrity == UNSIGNED  # no key: not verified
    other = ed25519.Ed25519PrivateKey.generate().public_key()
    with pytest.raises(LedgerIntegrityError, match="tampered"):
        PrivacyLedger.from_json(json.dumps(d), key=other)
    edited = _redigest(json.loads(json.dumps(d)))
    edited["runs"][0]["event"]["noise_multiplier"] = 1e9
    _redigest(edited)
    with pytest.raises(LedgerIntegrityError, match="tampered"):
        PrivacyLedger.from_json(json.dumps(edited), key=public)
    with pytest.raises(LedgerIntegrityError, match="hmac-sha256 key"):  # algorithm swapped
        PrivacyLedger.from_json(json.dumps(d), key=KEY)
    with pytest.raises(TypeError):
        _ledger().to_json(key=public)  # the public key cannot sign
