"""Who may see the delivery log: one password, a signed session cookie, CSRF tokens, and the
security headers every page carries.

The session cookie is `<expiry>.<nonce>.<signature>`, signed with a key derived from
LINKCRM_UI_PASSWORD, so every `serve` process sharing the password accepts it and changing
the password ends every session. It is HttpOnly and SameSite=Strict (Secure when the page is
served over https). A form's CSRF token is a signature of the session's nonce, checked on
every POST.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable

COOKIE = "linkcrm_ui"
SESSION_SECONDS = 12 * 3600
CSRF_FIELD = "csrf"

# No script at all, styles and images from this server only, forms post here only, never
# framed: the pages work without JavaScript, so nothing injected could run.
CSP = ("default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
       "frame-ancestors 'none'; base-uri 'none'")

HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}


def _sign(key: bytes, text: str) -> str:
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


class Access:
    """Checks the password and issues and verifies sessions and CSRF tokens."""

    def __init__(self, password: str, clock: Callable[[], float] = time.time) -> None:
        self._password = hashlib.sha256(password.encode("utf-8", "surrogatepass")).digest()
        self._key = hmac.new(password.encode("utf-8", "surrogatepass"),
                             b"linkcrm delivery log session", hashlib.sha256).digest()
        self._clock = clock

    def password_matches(self, given: str) -> bool:
        """Constant time in the password's content (both sides are hashed first)."""
        digest = hashlib.sha256(given.encode("utf-8", "surrogatepass")).digest()
        return hmac.compare_digest(digest, self._password)

    def new_session(self) -> str:
        payload = f"{int(self._clock()) + SESSION_SECONDS}.{secrets.token_urlsafe(18)}"
        return f"{payload}.{_sign(self._key, payload)}"

    def session(self, cookie: str | None) -> str | None:
        """The session's nonce when `cookie` is a valid, unexpired session; else None."""
        if not cookie or cookie.count(".") != 2:
            return None
        expires, nonce, signature = cookie.split(".")
        if not hmac.compare_digest(_sign(self._key, f"{expires}.{nonce}"), signature):
            return None
        if not expires.isdigit() or int(expires) < self._clock():
            return None
        return nonce

    def csrf_token(self, nonce: str) -> str:
        return _sign(self._key, f"csrf:{nonce}")

    def csrf_matches(self, nonce: str, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(self.csrf_token(nonce), token or "")
