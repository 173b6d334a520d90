"""Integrity of ledger files: a SHA-256 digest of the canonical JSON content, checked on load,
and an optional signature (HMAC-SHA256 with a user key, or Ed25519 when the optional
``cryptography`` package is installed).  ``pytorch-privacy audit`` reports the verdict.

This module imports neither torch nor numpy.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

__all__ = [
    "UNSIGNED", "SIGNATURE_OK", "TAMPERED", "LedgerIntegrityError", "canonical_bytes", "content_digest",
    "key_bytes", "hmac_signature", "ed25519_kind", "sign_content", "verify_integrity",
]

#: Integrity verdicts (:attr:`PrivacyLedger.integrity`, ``pytorch-privacy audit``).
UNSIGNED = "unsigned"
SIGNATURE_OK = "signature OK"
TAMPERED = "tampered"

class LedgerIntegrityError(ValueError):
    """The ledger's digest or signature does not match its content: it was edited (tampered)."""


def canonical_bytes(content: dict[str, Any]) -> bytes:
    try:
        return json.dumps(
            content, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
        ).encode("ascii")
    except (TypeError, ValueError) as exc:
        raise TypeError(f"ledger content is not plain JSON (check metadata): {exc}") from None


def content_digest(content: dict[str, Any]) -> str:
    """Hex SHA-256 of the canonical JSON of ``content`` (sorted keys, no whitespace, ASCII,
    no NaN).  ``content`` is the ledger dict without its ``digest`` and ``signature`` fields."""
    return hashlib.sha256(canonical_bytes(content)).hexdigest()


def key_bytes(key: bytes | str) -> bytes:
    if isinstance(key, str):
        key = key.encode("utf-8")
    if not isinstance(key, (bytes, bytearray)):
        raise TypeError(f"key must be bytes or str, got {type(key).__name__}")
    if len(key) == 0:
        raise ValueError("the signing key is empty")
    return bytes(key)


def hmac_signature(content: dict[str, Any], key: bytes | str) -> str:
    """Hex HMAC-SHA256 of the canonical JSON of ``content`` under ``key``."""
    return hmac.new(key_bytes(key), canonical_bytes(content), hashlib.sha256).hexdigest()


def ed25519_kind(key: Any) -> str | None:
    """``"private"`` / ``"public"`` for an Ed25519 key of the optional ``cryptography`` package,
    else ``None`` (the package is imported only when it is already installed)."""
    try:
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:  # pragma: no cover - optional dependency
        return None
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "private"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "public"
    return None


def sign_content(content: dict[str, Any], key: Any) -> dict[str, str]:
    kind = ed25519_kind(key)
    if kind == "private":
        return {"algorithm": "ed25519", "value": key.sign(canonical_bytes(content)).hex()}
    if kind == "public":
        raise TypeError("signing needs the Ed25519 private key (the public key only verifies)")
    return {"algorithm": "hmac-sha256", "value": hmac_signature(content, key)}


def verify_integrity(d: dict, version: int, key: bytes | str | None) -> tuple[str, str]:
    """Integrity verdict of a ledger dict: ``(UNSIGNED | SIGNATURE_OK, detail)`` or raise
    :class:`LedgerIntegrityError`."""
    if version == 1:
        if key is not None:
            return UNSIGNED, "version-1 file: no digest and no signature, although a key was given"
        return UNSIGNED, "version-1 file: no digest and no signature"
    content = {k: v for k, v in d.items() if k not in ("digest", "signature")}
    dg = d.get("digest")
    if not (isinstance(dg, dict) and set(dg) == {"algorithm", "value"} and dg["algorithm"] == "sha256"
            and isinstance(dg["value"], str)):
        raise LedgerIntegrityError(
            "tampered: the content digest is missing or malformed (version-2 ledgers carry "
            '{"digest": {"algorithm": "sha256", "value": <hex>}})'
        )
    try:
        actual = content_digest(content)
    except TypeError as exc:
        raise ValueError(f"corrupt ledger: {exc}") from None
    if not hmac.compare_digest(actual.encode(), dg["value"].encode("utf-8", "surrogatepass")):
        raise LedgerIntegrityError(
            "tampered: the SHA-256 content digest does not match the ledger's content "
            "(the file was edited after it was written)"
        )
    sig = d.get("signature")
    if sig is None:
        if "signature" in d:
            raise LedgerIntegrityError("tampered: 'signature' is null")
        if key is not None:
            return UNSIGNED, "digest OK, but the file carries no signature although a key was given"
        return UNSIGNED, "digest OK, no signature: anyone who edits the file can recompute the digest"
    if not (isinstance(sig, dict) and set(sig) == {"algorithm", "value"}
            and sig["algorithm"] in ("hmac-sha256", "ed25519") and isinstance(sig["value"], str)):
        raise LedgerIntegrityError(
            'tampered: malformed signature (expected {"algorithm": "hmac-sha256" or "ed25519", "value": <hex>})'
        )
    algorithm = sig["algorithm"]
    if key is None:
        return UNSIGNED, f"digest OK; carries an {algorithm} signature, NOT verified (no key given)"
    kind = ed25519_kind(key)
    if kind == "private":
        key = key.public_key()
    expected = "ed25519" if kind else "hmac-sha256"
    if algorithm != expected:
        raise LedgerIntegrityError(
            f"tampered: the file carries an {algorithm} signature but an {expected} key was given"
        )
    if kind:
        from cryptography.exceptions import InvalidSignature

        try:
            key.verify(bytes.fromhex(sig["value"]), canonical_bytes(content))
        except (InvalidSignature, ValueError):
            raise LedgerIntegrityError(
                "tampered: the Ed25519 signature does not match (the file was edited, or the key is wrong)"
            ) from None
        return SIGNATURE_OK, "ed25519 signature verified with the given public key"
    if not hmac.compare_digest(hmac_signature(content, key).encode(), sig["value"].encode("utf-8", "surrogatepass")):
        raise LedgerIntegrityError(
            "tampered: the HMAC-SHA256 signature does not match (the file was edited, or the key is wrong)"
        )
    return SIGNATURE_OK, "hmac-sha256 signature verified with the given key"
