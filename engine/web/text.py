"""Event data as text a page can show: every value visible, nothing that acts.

Jinja escapes HTML; this makes the rest visible: control characters (terminal escapes, NUL),
lone surrogates (which no UTF-8 page can carry) and bidirectional overrides are shown as
`\\x1b`, `\\ud800`, `\\u202e`. Newlines and tabs stay. Very long values are cut with a note.
"""

from __future__ import annotations

import json
import re
from typing import Any

from markupsafe import Markup

# A page shows at most this much of the raw body, and of any other one value (a 1 MB string
# keeps the page fast and readable).
BODY_SHOWN = 256 * 1024
MAX_SHOWN = BODY_SHOWN + 1024

_HIDDEN = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069"
                     r"\ufeff\ud800-\udfff]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def visible(value: Any, limit: int = MAX_SHOWN) -> str:
    """`value` as text with every invisible or unencodable character spelled out. Markup
    (a macro's output, already escaped) passes unchanged."""
    if isinstance(value, Markup):
        return value
    text = value if isinstance(value, str) else "" if value is None else str(value)
    cut = len(text) > limit
    if cut:
        text = text[:limit]
    text = _HIDDEN.sub(_escape, text)
    if cut:
        text += f"\n… (cut: {len(value):,} characters in all)" if isinstance(value, str) else \
            "\n… (cut)"
    return text


def _cut(text: str, body: bytes) -> str:
    if len(text) <= BODY_SHOWN:
        return text
    return text[:BODY_SHOWN] + f"\n… (cut: the body is {len(body):,} bytes)"


def pretty_body(body: bytes | None) -> tuple[str, Any]:
    """(the stored body pretty-printed for reading, the parsed envelope or None); a body that
    is not JSON, or nests too deeply to parse, is shown as it came."""
    if body is None:
        return "(purged: the raw body was dropped by `linkcrm purge`)", None
    raw = body[:BODY_SHOWN + 1].decode("utf-8", "replace")
    try:
        envelope = json.loads(body)
    except (RecursionError, ValueError):
        return _cut(raw, body), None
    try:
        text = json.dumps(envelope, indent=2, ensure_ascii=False)
    except (RecursionError, ValueError):
        text = raw
    return _cut(text, body), envelope


def as_json(value: Any) -> str:
    """A stored JSON value (a request summary, a CRM reply) for reading."""
    try:
        return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True)
    except (RecursionError, ValueError, TypeError):
        return repr(value)
