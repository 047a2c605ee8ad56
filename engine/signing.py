"""Tolinku webhook signatures: parse the configured secrets, sign, and verify in constant time.

The sender signs the exact raw body with HMAC-SHA256, keyed with the whole secret string
(`whsec_...` included, not base64-decoded), and sends the hex digest in `X-Webhook-Signature`,
optionally prefixed with `sha256=`. Several secrets may be configured so a rotation loses nothing.

    >>> secrets = parse_secrets("whsec_old, whsec_new")
    >>> verify_signature(b"{}", sign(b"{}", "whsec_new").encode(), secrets)
    True
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

_PREFIX = b"sha256="


def parse_secrets(value: str) -> tuple[str, ...]:
    """Split a comma-separated secret list, trimming whitespace around each entry.

    An empty entry (`a,,b`, a trailing comma) is rejected rather than skipped: it is almost
    always a typo, and silently dropping it could hide a missing rotation secret.
    Raises ValueError with a message that never contains the secrets themselves.
    """
    entries = [entry.strip() for entry in value.split(",")]
    for position, entry in enumerate(entries, start=1):
        if not entry:
            raise ValueError(
                f"entry {position} of {len(entries)} is empty; separate secrets with single "
                "commas and no trailing comma"
            )
    return tuple(entries)


def sign(body: bytes, secret: str) -> str:
    """The lowercase hex HMAC-SHA256 of `body` keyed with the whole `secret` string."""
    # Not hmac.digest, the one-shot C path: it releases the GIL around every call, however
    # small the body, so in the receiver each delivery handed the GIL to the SQLite writer
    # thread and waited to get it back. An HMAC object (hashlib's OpenSSL sha256) keeps the GIL
    # below 2 KiB, takes the same time alone, and still lets go for a large body.
    return hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def verify_signature(body: bytes, header_value: bytes | None, secrets: Iterable[str]) -> bool:
    """True when `header_value` is the signature of `body` under any of `secrets`.

    The header is compared as bytes with `hmac.compare_digest`, so a non-ASCII or wrong-length
    value is simply not a match (never an exception). Every secret is tried, even after a match,
    so the time taken does not reveal which secret matched.
    """
    if not header_value:
        return False
    candidate = header_value.strip()
    if candidate[: len(_PREFIX)].lower() == _PREFIX:
        candidate = candidate[len(_PREFIX) :]
    # Hex digits are case-insensitive; bytes.lower() only touches ASCII letters.
    candidate = candidate.lower()
    matched = False
    for secret in secrets:
        expected = sign(body, secret).encode("ascii")
        matched |= hmac.compare_digest(expected, candidate)
    return matched
