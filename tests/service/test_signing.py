"""Signature verification: the exact raw bytes, the whole secret, constant time, rotation."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest

from engine.signing import parse_secrets, sign, verify_signature

SECRET = "whsec_c2VjcmV0LWtleS1mb3ItdGVzdHM="
BODY = b'{"event":"install.tracked","timestamp":"2026-03-01T00:00:00Z","data":{"token":"t"}}'


def test_sign_is_hex_hmac_sha256_keyed_with_the_whole_secret_string() -> None:
    expected = hmac.new(SECRET.encode(), BODY, hashlib.sha256).hexdigest()
    assert sign(BODY, SECRET) == expected


def test_the_secret_is_not_base64_decoded() -> None:
    decoded_key = base64.b64decode(SECRET.removeprefix("whsec_"))
    decoded = hmac.new(decoded_key, BODY, hashlib.sha256).hexdigest().encode()
    assert verify_signature(BODY, decoded, [SECRET]) is False


@pytest.mark.parametrize(
    "header",
    [
        sign(BODY, SECRET).encode(),
        b"sha256=" + sign(BODY, SECRET).encode(),
        b"SHA256=" + sign(BODY, SECRET).upper().encode(),
        b"  " + sign(BODY, SECRET).encode() + b" ",
    ],
)
def test_valid_signatures(header: bytes) -> None:
    assert verify_signature(BODY, header, [SECRET]) is True


@pytest.mark.parametrize(
    "header",
    [
        None,
        b"",
        b"sha256=",
        b"00" * 32,
        sign(BODY, SECRET)[:-2].encode(),
        sign(BODY, SECRET).encode() + b"00",
        "é".encode() * 32,
        b"\xff\xfe" * 32,
        sign(BODY, "whsec_other").encode(),
        b"sha1=" + sign(BODY, SECRET).encode(),
    ],
)
def test_invalid_signatures_are_false_never_an_exception(header: bytes | None) -> None:
    assert verify_signature(BODY, header, [SECRET]) is False


def test_one_changed_byte_of_the_body_fails() -> None:
    header = sign(BODY, SECRET).encode()
    assert verify_signature(BODY.replace(b'"t"', b'"u"'), header, [SECRET]) is False
    assert verify_signature(BODY + b"\n", header, [SECRET]) is False


def test_rotation_accepts_every_configured_secret() -> None:
    secrets = parse_secrets("whsec_old, whsec_new")
    assert verify_signature(BODY, sign(BODY, "whsec_old").encode(), secrets)
    assert verify_signature(BODY, sign(BODY, "whsec_new").encode(), secrets)
    assert not verify_signature(BODY, sign(BODY, "whsec_gone").encode(), secrets)


def test_no_secret_verifies_nothing() -> None:
    assert verify_signature(BODY, sign(BODY, "").encode(), []) is False


def test_parse_secrets_trims_whitespace() -> None:
    assert parse_secrets(" whsec_a ,whsec_b\t") == ("whsec_a", "whsec_b")


@pytest.mark.parametrize("value", ["whsec_a,,whsec_b", "whsec_a,", ",whsec_a", " , "])
def test_parse_secrets_rejects_empty_entries_without_echoing_secrets(value: str) -> None:
    with pytest.raises(ValueError, match="empty") as caught:
        parse_secrets(value)
    assert "whsec_a" not in str(caught.value)
