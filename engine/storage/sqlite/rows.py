"""Conversions between SQLite rows and storage records (times, JSON columns)."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime
from typing import Any, cast

from engine.actions import JSON
from engine.storage.records import ActionOutcome, EventStatus, InboxEvent, OutcomeStatus


def ts(moment: datetime) -> str:
    """A time as ISO 8601 UTC text of fixed width (always microseconds, always `+00:00`), so
    the text sorts in time order and SQL can compare it; a naive datetime is taken as UTC."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    elif moment.utcoffset():
        moment = moment.astimezone(UTC)
    return moment.isoformat(timespec="microseconds")


def parse_ts(text: str) -> datetime:
    return datetime.fromisoformat(text)


def parse_optional_ts(text: str | None) -> datetime | None:
    return None if text is None else parse_ts(text)


def dumps(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True)


def dumps_optional(value: JSON) -> str | None:
    return None if value is None else dumps(value)


def loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def loads_object(text: str | None) -> dict[str, JSON]:
    value = loads(text)
    return cast(dict[str, JSON], value) if isinstance(value, dict) else {}


EVENT_COLUMNS = (
    "id, dedupe_key, source, event_type, event_timestamp, received_at, headers, body, status, "
    "attempts, lease_owner, lease_expires_at, next_attempt_at, last_error, updated_at"
)


def event_from_row(row: sqlite3.Row) -> InboxEvent:
    return InboxEvent(
        id=row["id"],
        dedupe_key=row["dedupe_key"],
        source=row["source"],
        event_type=row["event_type"],
        event_timestamp=row["event_timestamp"],
        received_at=parse_ts(row["received_at"]),
        headers={str(k): str(v) for k, v in loads_object(row["headers"]).items()},
        body=None if row["body"] is None else bytes(row["body"]),
        status=cast(EventStatus, row["status"]),
        attempts=row["attempts"],
        lease_owner=row["lease_owner"],
        lease_expires_at=parse_optional_ts(row["lease_expires_at"]),
        next_attempt_at=parse_optional_ts(row["next_attempt_at"]),
        last_error=row["last_error"],
        updated_at=parse_ts(row["updated_at"]),
    )


OUTCOME_COLUMNS = (
    "id, event_id, rule, action_kind, target, idempotency_key, status, attempts, "
    "request_summary, response, error, next_attempt_at, created_at, updated_at"
)


def outcome_from_row(row: sqlite3.Row) -> ActionOutcome:
    return ActionOutcome(
        id=row["id"],
        event_id=row["event_id"],
        rule=row["rule"],
        action_kind=row["action_kind"],
        target=row["target"],
        idempotency_key=row["idempotency_key"],
        status=cast(OutcomeStatus, row["status"]),
        attempts=row["attempts"],
        request_summary=loads(row["request_summary"]),
        response=loads(row["response"]),
        error=row["error"],
        next_attempt_at=parse_optional_ts(row["next_attempt_at"]),
        created_at=parse_ts(row["created_at"]),
        updated_at=parse_ts(row["updated_at"]),
    )


def placeholders(count: int) -> str:
    """`?, ?, ?` for an IN list: only the number of parameters is built into the SQL text."""
    return ", ".join("?" * count)
