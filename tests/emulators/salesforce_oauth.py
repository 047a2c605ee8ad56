"""The Salesforce emulator's OAuth checks: client authentication, JWT assertions, RSA keys."""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections.abc import Sequence
from urllib.parse import unquote_plus

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

MAX_LIFETIME = 180  # Salesforce: the assertion's exp is at most 3 minutes out
SKEW = 5


class OAuthError(Exception):
    """A token endpoint refusal: 400 `{"error", "error_description"}`."""

    def __init__(self, error: str, description: str) -> None:
        super().__init__(description)
        self.body = {"error": error, "error_description": description}


def verify_assertion(
    assertion: str,
    public_key: rsa.RSAPublicKey | None,
    consumer_key: str,
    username: str,
    audiences: Sequence[str],
    now: float | None = None,
) -> None:
    """Accept an RS256 JWT whose iss, sub, aud and exp are what the app and user allow."""
    try:
        head, payload, signature = (_unb64(part) for part in assertion.split("."))
        header, claims = json.loads(head), json.loads(payload)
    except (ValueError, binascii.Error):
        raise OAuthError("invalid_grant", "invalid assertion") from None
    if public_key is None or not isinstance(header, dict) or header.get("alg") != "RS256" \
            or not isinstance(claims, dict):
        raise OAuthError("invalid_grant", "invalid assertion")
    try:
        public_key.verify(signature, assertion.rsplit(".", 1)[0].encode(), padding.PKCS1v15(),
                          hashes.SHA256())
    except InvalidSignature:
        raise OAuthError("invalid_grant", "invalid assertion") from None
    if claims.get("iss") != consumer_key:
        raise OAuthError("invalid_client_id", "client identifier invalid")
    if claims.get("aud") not in audiences:
        raise OAuthError("invalid_grant", "audience is invalid")
    current = time.time() if now is None else now
    exp = claims.get("exp")
    if not isinstance(exp, int) or not current < exp <= current + MAX_LIFETIME + SKEW:
        raise OAuthError("invalid_grant", "invalid assertion: exp must be within 3 minutes")
    if claims.get("sub") != username:
        raise OAuthError("invalid_grant", "user hasn't approved this consumer")


def with_basic_client(authorization: str, form: dict[str, str]) -> dict[str, str]:
    """The token form with the client's credentials from HTTP Basic authentication (RFC 6749
    §2.3.1: each part form-urlencoded, then base64), which Salesforce accepts instead of
    client_id and client_secret in the body. A client uses one method, not both at once."""
    scheme, _, encoded = authorization.partition(" ")
    if scheme.lower() != "basic":
        return form
    try:
        client_id, colon, secret = base64.b64decode(encoded.strip(), validate=True) \
            .decode().partition(":")
    except (ValueError, UnicodeDecodeError):
        raise OAuthError("invalid_client", "invalid client credentials") from None
    if not colon:
        raise OAuthError("invalid_client", "invalid client credentials")
    if "client_secret" in form:
        raise OAuthError("invalid_request", "client authentication must use one method: "
                         "HTTP Basic or client_secret in the body, not both")
    client_id, secret = unquote_plus(client_id), unquote_plus(secret)
    if form.setdefault("client_id", client_id) != client_id:
        raise OAuthError("invalid_client", "client identifier invalid")
    return {**form, "client_secret": secret}


def _unb64(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def public_key_of(private_pem: str) -> rsa.RSAPublicKey:
    """The public half of a PEM private key (what the certificate uploaded to the app holds)."""
    key = serialization.load_pem_private_key(private_pem.encode(), None)
    assert isinstance(key, rsa.RSAPrivateKey)
    return key.public_key()


def new_rsa_key() -> str:
    """A fresh 2048-bit RSA private key as unencrypted PKCS#8 PEM, for JWT bearer tests."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()
