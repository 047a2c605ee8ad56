"""What a store can keep: one rule for both backends, and for the planner before them.

Data (the embedded CRM's contacts and deals, the identity map, deal keys) is kept exactly as
given or refused with UnstorableValueError, the same way on SQLite and PostgreSQL:

- text must be Unicode text: a lone surrogate (a JSON escape such as "\\ud800" on its own)
  has no UTF-8 form, so neither database, nor any CRM, can take it;
- keys and names (identity fields and values, deal keys, CRM record ids, titles, stages) hold
  no NUL character, since PostgreSQL text cannot; a NUL inside a field value is kept (both
  backends store field values as JSON, where it is the escape `\\u0000`);
- a key is at most MAX_KEY_CHARS characters (PostgreSQL indexes keys, and an index entry has
  a size limit that SQLite does not have);
- numbers are finite: `1e400` parses as infinity, which JSON cannot carry;
- JSON values nest at most MAX_DEPTH levels.

Diagnostics (error messages, outcome summaries) are cleaned instead of refused: NUL and lone
surrogates become U+FFFD, so recording why something failed can never fail itself.

    require_identity([IdentityKey("deep_link_token", "x\\ud800")])   # raises
    storable_text("bad\\x00byte")                                      # 'bad\\ufffdbyte'
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import replace

from engine.actions import JSON, IdentityKey
from engine.errors import UnstorableValueError
from engine.storage.records import NewOutcome, NewShadowResult

MAX_KEY_CHARS = 512
MAX_DEPTH = 64
# Python writes an int of more digits than this as JSON only with its digit limit raised.
MAX_INT_BITS = 4000 * 3
_PATH_LEVELS = 8

_SURROGATE = re.compile("[\ud800-\udfff]")
_UNSTORABLE_TEXT = re.compile("[\x00\ud800-\udfff]")
_FIX = "no store can keep it as it is; fix the value at its source, or map another field"


def text_problem(text: str, *, noun: str | None = None, limit: int | None = None) -> str | None:
    """Why `text` cannot be stored, or None. A `noun` ("key", "name") means a text column,
    which holds no NUL; `limit` is the most characters it may have."""
    surrogate = None if text.isascii() else _SURROGATE.search(text)  # ASCII: none, quickly
    if surrogate is not None:
        return (f"holds a lone surrogate (\\u{ord(surrogate.group()):04x}) at character "
                f"{surrogate.start() + 1}, which is not Unicode text")
    if noun is not None and "\x00" in text:
        return (f"holds a NUL character (\\x00) at character {text.index(chr(0)) + 1}, "
                f"which a {noun} cannot hold")
    if limit is not None and len(text) > limit:
        return f"is {len(text)} characters long; a {noun or 'text'} holds at most {limit}"
    return None


def number_problem(value: float) -> str | None:
    """Why `value` cannot be stored as a finite floating-point number, or None."""
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an int beyond the float range
        return f"is a {len(str(abs(int(value))))}-digit number, too large for a decimal number"
    if not finite:
        return f"is not a finite number ({value!r}); JSON cannot carry it (1e400 overflows)"
    return None


def json_problem(value: object, depth: int = 0) -> tuple[str, str] | None:
    """The path inside `value` and why it cannot be stored as JSON, or None."""
    # Exact types first, as storable_json does: every field of every planned action passes
    # here, and ASCII text, plain numbers and dicts with ASCII keys are nearly all there is.
    kind = type(value)
    if depth >= MAX_DEPTH:
        return _json_problem(value, depth)
    if kind is str:
        return None if value.isascii() else _text_at(value)  # type: ignore[attr-defined,arg-type]
    if kind is int or value is None or kind is bool:
        return None
    if kind is dict:
        for name, item in value.items():  # type: ignore[attr-defined]
            if type(name) is not str or not name.isascii():
                return _json_problem(value, depth)  # the general path says which and why
            found = json_problem(item, depth + 1)
            if found is not None:
                return _path(f".{_printable(name)}", found, depth)
        return None
    return _json_problem(value, depth)


def _text_at(text: str) -> tuple[str, str] | None:
    problem = text_problem(text)
    return None if problem is None else ("", problem)


def _json_problem(value: object, depth: int) -> tuple[str, str] | None:
    if depth > MAX_DEPTH:
        return "", f"nests deeper than {MAX_DEPTH} levels"
    if value is None or isinstance(value, bool | int):
        return None
    if isinstance(value, float):
        problem = number_problem(value)
        return None if problem is None else ("", problem)
    if isinstance(value, str):
        problem = text_problem(value)
        return None if problem is None else ("", problem)
    if isinstance(value, list):
        for index, item in enumerate(value):
            found = json_problem(item, depth + 1)
            if found is not None:
                return _path(f"[{index}]", found, depth)
        return None
    if isinstance(value, dict):
        for name, item in value.items():
            if not isinstance(name, str):
                return "", f"has a key of type {type(name).__name__}"
            problem = text_problem(name)
            if problem is not None:
                return "", f"has a key that {problem}"
            found = json_problem(item, depth + 1)
            if found is not None:
                return _path(f".{_printable(name)}", found, depth)
        return None
    return "", f"is a {type(value).__name__}, not a JSON value"


def _path(step: str, found: tuple[str, str], depth: int) -> tuple[str, str]:
    # Paths show the first few levels, then an ellipsis: a deep path would drown the message.
    return (step + found[0] if depth < _PATH_LEVELS else "...", found[1])


def _printable(name: str) -> str:
    return name if name.isidentifier() else repr(storable_text(name))


# -- refusing data ------------------------------------------------------------------------------


def _refuse(what: str, problem: str) -> UnstorableValueError:
    return UnstorableValueError(f"{what} {problem}: {_FIX}")


def require_key(what: str, text: str) -> None:
    """An identity value, deal key or record id: no NUL, at most MAX_KEY_CHARS characters."""
    problem = text_problem(text, noun="key", limit=MAX_KEY_CHARS)
    if problem is not None:
        raise _refuse(what, problem)


def require_name(what: str, text: str | None) -> None:
    """A title or stage: no NUL (a text column), any length."""
    problem = None if text is None else text_problem(text, noun="name")
    if problem is not None:
        raise _refuse(what, problem)


def require_identity(identity: Iterable[IdentityKey]) -> None:
    for key in identity:
        require_key("identity field name", key.field)
        require_key(f"identity {_printable(key.field)}", key.value)


def require_fields(what: str, fields: Mapping[str, JSON]) -> None:
    found = json_problem(dict(fields))
    if found is not None:
        raise _refuse(f"{what}{found[0]}", found[1])


def require_amount(amount: float | None) -> None:
    problem = None if amount is None else number_problem(amount)
    if problem is not None:
        raise _refuse("amount", problem)


# -- cleaning diagnostics -----------------------------------------------------------------------


def nul_free(text: str) -> str:
    """`text` with NUL characters replaced by U+FFFD, for the inbox's type, time and source
    columns (PostgreSQL text cannot hold NUL; the raw body keeps it). Lone surrogates are left
    for the up-front check (`records.unstorable`) or the database to refuse."""
    return text.replace("\x00", "\ufffd")


def storable_text(text: str | None) -> str | None:
    """`text` with NUL characters and lone surrogates replaced by U+FFFD."""
    if text is None:
        return None
    return _clean(text)


def storable_json(value: JSON, depth: int = 0) -> JSON:
    """A copy of `value` that every backend stores: cleaned strings and keys, non-finite
    numbers as their text, containers deeper than MAX_DEPTH as a note."""
    # Exact types first: every outcome's summary and response passes here, and plain JSON
    # values are nearly all there ever is. Subclasses take the general path below.
    kind = type(value)
    if kind is str:
        return _clean(value)  # type: ignore[arg-type]
    if value is None or kind is bool:
        return value
    if kind is dict and depth < MAX_DEPTH:
        return {_clean(name) if type(name) is str else _clean(str(name)):
                storable_json(item, depth + 1)
                for name, item in value.items()}  # type: ignore[union-attr]
    if kind is list and depth < MAX_DEPTH:
        return [storable_json(item, depth + 1) for item in value]  # type: ignore[union-attr]
    return _storable_other(value, depth)


def _storable_other(value: JSON, depth: int) -> JSON:
    if isinstance(value, str):
        return _clean(value)
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, int) and not isinstance(value, bool) \
            and value.bit_length() > MAX_INT_BITS:
        return f"(a number of about {int(value.bit_length() * 0.30103)} digits)"
    if isinstance(value, list | dict) and depth >= MAX_DEPTH:
        return f"(nested deeper than {MAX_DEPTH} levels)"
    if isinstance(value, list):
        return [storable_json(item, depth + 1) for item in value]
    if isinstance(value, dict):
        return {_clean(str(name)): storable_json(item, depth + 1)
                for name, item in value.items()}
    return value


def _clean(text: str) -> str:
    # Most text is ASCII without NUL: nothing to replace, and no pattern to run.
    if text.isascii() and "\x00" not in text:
        return text
    return _UNSTORABLE_TEXT.sub("\ufffd", text)


def storable_outcome(outcome: NewOutcome) -> NewOutcome:
    """The outcome with its diagnostics (error, request summary, response) cleaned."""
    return replace(outcome, error=storable_text(outcome.error),
                   request_summary=storable_json(outcome.request_summary),
                   response=storable_json(outcome.response),
                   rules_version=storable_text(outcome.rules_version))



def storable_shadow_result(result: NewShadowResult) -> NewShadowResult:
    """The shadow result with what came from the event (changes, event type, error) cleaned."""
    changes = storable_json(list(result.changes))
    return replace(result, event_type=storable_text(result.event_type) or "",
                   changes=changes if isinstance(changes, list) else [changes],
                   error=storable_text(result.error),
                   active_version=storable_text(result.active_version))
