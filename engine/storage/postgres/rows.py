"""Shared SQL fragments and row conversions for the PostgreSQL backend."""

from __future__ import annotations

import json
from typing import Any, TypeAlias, cast

from psycopg import AsyncConnection
from psycopg.types.json import Json

from engine.actions import JSON
from engine.storage import values
from engine.storage.records import ActionOutcome, InboxEvent, field_names, from_row

Row: TypeAlias = tuple[Any, ...]
Conn: TypeAlias = AsyncConnection[Row]

# The time every statement uses: the injected clock's reading when the storage was opened with
# one (tests move it by hand), else the database server's clock, so that lease expiry and
# rate-limit refills mean the same on every machine whatever their clocks say. Fixed text: the
# value itself is always the `now` parameter.
NOW = "COALESCE(%(now)s::timestamptz, now())"

PENDING = "status IN ('received', 'failed')"

EVENT_FIELDS = field_names(InboxEvent)
EVENT_COLUMNS = ", ".join(EVENT_FIELDS)
OUTCOME_COLUMNS = ", ".join(field_names(ActionOutcome))


def columns(prefix: str, fields: tuple[str, ...]) -> str:
    """`i.id, i.dedupe_key, ...`: the column list qualified by a table alias."""
    return ", ".join(f"{prefix}.{name}" for name in fields)


# One encoder for every call: json.dumps with any option builds a new one each time, which
# cost as much as the encoding (each stored event's headers go through here).
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), sort_keys=True)


def dumps(value: object) -> str:
    return _ENCODER.encode(value)


def as_json(value: JSON | dict[str, JSON]) -> Json:
    """A parameter for a `json` column. `json` rather than `jsonb` keeps an exact copy and
    accepts `\\u0000`, which a CRM's error body may carry and `jsonb` would refuse."""
    return Json(value, dumps=dumps)


def optional_json(value: JSON) -> Json | None:
    return None if value is None else as_json(value)


def clean(text: str | None) -> str | None:
    """PostgreSQL text cannot hold NUL; a signed body or a CRM message may. The raw body keeps
    the exact bytes, so the copy in a text column may show U+FFFD instead."""
    return None if text is None else values.nul_free(text)


def json_object(value: Any) -> dict[str, JSON]:
    return cast(dict[str, JSON], value) if isinstance(value, dict) else {}


def _headers(value: Any) -> dict[str, str]:
    return {str(k): str(v) for k, v in json_object(value).items()}


def _body(value: Any) -> bytes | None:
    return None if value is None else bytes(value)


def event_from_row(row: Row) -> InboxEvent:
    """An inbox row selected as EVENT_COLUMNS."""
    return from_row(InboxEvent, row, headers=_headers, body=_body)


def outcome_from_row(row: Row) -> ActionOutcome:
    """An action outcome row selected as OUTCOME_COLUMNS."""
    return from_row(ActionOutcome, row)
