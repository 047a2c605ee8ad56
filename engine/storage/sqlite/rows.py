"""Conversions between SQLite rows and storage records (times, JSON columns)."""

from __future__ import annotations

import functools
import json
import sqlite3
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, cast

from engine.actions import JSON
from engine.storage.records import ActionOutcome, InboxEvent, field_names, from_row


def ts(moment: datetime) -> str:
    """A time as ISO 8601 UTC text of fixed width (always microseconds, always `+00:00`), so
    the text sorts in time order and SQL can compare it; a naive datetime is taken as UTC."""
    if moment.tzinfo is UTC:  # nearly always (utc_now): no offset to look up
        return moment.isoformat(timespec="microseconds")
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    elif moment.utcoffset():
        moment = moment.astimezone(UTC)
    return moment.isoformat(timespec="microseconds")


def parse_ts(text: str) -> datetime:
    return datetime.fromisoformat(text)


def parse_optional_ts(text: str | None) -> datetime | None:
    return None if text is None else parse_ts(text)


# One encoder for every call: json.dumps with any option builds a new one each time, which
# cost as much as the encoding (each stored event's headers go through here).
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), sort_keys=True)


def dumps(value: object) -> str:
    return _ENCODER.encode(value)


def dumps_optional(value: JSON) -> str | None:
    return None if value is None else dumps(value)


def loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def loads_object(text: str | None) -> dict[str, JSON]:
    value = loads(text)
    return cast(dict[str, JSON], value) if isinstance(value, dict) else {}


EVENT_COLUMNS = ", ".join(field_names(InboxEvent))
OUTCOME_COLUMNS = ", ".join(field_names(ActionOutcome))


def _headers(text: str) -> dict[str, str]:
    return {str(k): str(v) for k, v in loads_object(text).items()}


def _body(blob: bytes | None) -> bytes | None:
    return None if blob is None else bytes(blob)


def event_from_row(row: sqlite3.Row) -> InboxEvent:
    """An inbox row selected as EVENT_COLUMNS."""
    return from_row(InboxEvent, row, received_at=parse_ts, headers=_headers, body=_body,
                    lease_expires_at=parse_optional_ts, next_attempt_at=parse_optional_ts,
                    updated_at=parse_ts)


def outcome_from_row(row: sqlite3.Row) -> ActionOutcome:
    """An action outcome row selected as OUTCOME_COLUMNS."""
    return from_row(ActionOutcome, row, request_summary=loads, response=loads,
                    next_attempt_at=parse_optional_ts, created_at=parse_ts, updated_at=parse_ts)


def placeholders(count: int) -> str:
    """`?, ?, ?` for an IN list: only the number of parameters is built into the SQL text."""
    return ", ".join("?" * count)


def insert_rows(connection: sqlite3.Connection, head: str, row: str,
                rows: Sequence[Sequence[object]], tail: str = "") -> None:
    """`connection.executemany(f"{head} VALUES {row}{tail}", rows)` in as few statements as
    SQLite's parameter limit allows: `head VALUES (?, ?), (?, ?), ... tail`. SQLite runs the
    rows of one statement in order, as executemany would (a later row's ON CONFLICT sees the
    earlier ones); but Python's executemany steps once per row, and each step hands the GIL
    to the event loop and waits to win it back. `row` holds placeholders (and constants),
    never data."""
    if not rows:
        return
    limit = connection.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)  # 32766 since 3.32
    per_statement = max(1, limit // row.count("?"))
    for start in range(0, len(rows), per_statement):
        chunk = rows[start:start + per_statement]
        connection.execute(_values_sql(head, row, tail, len(chunk)),
                           [value for one in chunk for value in one])


@functools.lru_cache(maxsize=256)
def _values_sql(head: str, row: str, tail: str, count: int) -> str:
    return f"{head} VALUES {', '.join([row] * count)}{tail}"
