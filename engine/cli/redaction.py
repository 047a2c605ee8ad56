"""`events export --redact`: emails, names and free text become stable placeholders.

The same value always gets the same placeholder within one export (and across exports made
with the same `--redact-key`), so a person's events still group and rules that match on equal
values still match; what rules key on is kept. Exactly:

- Kept as they are: the envelope's `event` and `timestamp`; object keys; numbers, booleans and
  nulls; strings without whitespace (tokens, codes, ids, campaigns, platforms, hosts, URLs,
  dates) other than those below; and strings with whitespace under a key rules commonly read:
  `token`, `prefix`, `campaign`, `platform`, `device_type`, `milestone`, `hostname`, `status`,
  `type`, `currency`, any key starting with `utm_` or ending in `_id`, `_token`, `_code`,
  `_at` or `_date`, and any string that is an ISO 8601 date or date-time.
- An email address anywhere in any string (written plainly, `name@domain.tld`) becomes
  `user-<hash>@redacted.invalid`; the hash is of the address lower-cased, so one address
  written two ways gets one placeholder.
- The value of a name key becomes `name-<hash>`: `name`, `first_name`, `last_name`,
  `middle_name`, `full_name`, `display_name`, `given_name`, `family_name`, `nickname`,
  `username` (any case, with or without `_` or `-`: `firstName` too).
- The value of a personal key becomes `text-<hash>`: `phone`, `phone_number`, `mobile`, `ip`,
  `ip_address`, `address`, `street`, `postal_code`, `zip`, `user_agent`.
- Any other string holding whitespace (around it does not count) is free text (a message, a
  note, a title) and becomes `text-<hash>`.

`<hash>` is the first 12 hex digits of an HMAC-SHA256 of the value under the export's key: a
random key per export unless `--redact-key` (or LINKCRM_REDACT_KEY) gives one, so nobody can
test a guessed email against the file.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from datetime import date, datetime
from typing import Any

_EMAIL = re.compile(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}")
_WHITESPACE = re.compile(r"\s")

NAME_KEYS = frozenset({"name", "firstname", "lastname", "middlename", "fullname", "displayname",
                       "givenname", "familyname", "nickname", "username"})
PERSONAL_KEYS = frozenset({"phone", "phonenumber", "mobile", "ip", "ipaddress", "address",
                           "street", "postalcode", "zip", "useragent"})
KEPT_KEYS = frozenset({"token", "prefix", "campaign", "platform", "devicetype", "milestone",
                       "hostname", "status", "type", "currency"})
KEPT_SUFFIXES = ("_id", "_token", "_code", "_at", "_date")


def _normal(key: str) -> str:
    return re.sub(r"[_\-\s]", "", key).lower()


def _is_date(text: str) -> bool:
    if not 8 <= len(text) <= 40 or not text[:4].isdigit():
        return False
    try:
        if len(text) == 10:
            date.fromisoformat(text)
        else:
            datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return False
    return True


class Redactor:
    """Replaces emails, names and free text in events; `key` makes placeholders repeatable."""

    def __init__(self, key: str | None = None) -> None:
        self._key = key.encode("utf-8", "surrogatepass") if key else secrets.token_bytes(32)

    def _hash(self, text: str) -> str:
        digest = hmac.new(self._key, text.encode("utf-8", "surrogatepass"), hashlib.sha256)
        return digest.hexdigest()[:12]

    def _email(self, match: re.Match[str]) -> str:
        return f"user-{self._hash('email:' + match.group().lower())}@redacted.invalid"

    def text(self, value: str, key: str | None) -> str:
        """`value` found under object key `key` (None: at the top, or in a list at the top)."""
        normal = _normal(key) if key is not None else ""
        if normal in NAME_KEYS:
            return f"name-{self._hash('name:' + value)}"
        if normal in PERSONAL_KEYS:
            return f"text-{self._hash('text:' + value)}"
        value = _EMAIL.sub(self._email, value)
        inner = value.strip()  # spaces around a token or an address are kept, not free text
        if not _WHITESPACE.search(inner) or self._kept(key, normal) or _is_date(inner):
            return value
        return f"text-{self._hash('text:' + value)}"

    @staticmethod
    def _kept(key: str | None, normal: str) -> bool:
        if key is None:
            return False
        lowered = key.lower()
        return (normal in KEPT_KEYS or lowered.startswith("utm_")
                or lowered.endswith(KEPT_SUFFIXES))

    def envelope(self, envelope: Any) -> Any:
        """A redacted copy of `envelope`; the original is left alone. Iterative, so a value
        nested as deeply as a parser allows is redacted too."""
        holder: list[Any] = [envelope]
        stack: list[tuple[Any, Any, str | None]] = [(holder, 0, None)]
        while stack:
            parent, slot, key = stack.pop()
            value = parent[slot]
            if isinstance(value, dict):
                copy = dict(value)
                parent[slot] = copy
                stack.extend((copy, name, name) for name in copy)
            elif isinstance(value, list):
                items = list(value)
                parent[slot] = items
                stack.extend((items, index, key) for index in range(len(items)))
            elif isinstance(value, str):
                parent[slot] = self.text(value, key)
        result = holder[0]
        if isinstance(envelope, dict) and isinstance(result, dict):
            for name in ("event", "timestamp"):  # rules dispatch and date on them
                if name in envelope:
                    result[name] = envelope[name]
        return result
