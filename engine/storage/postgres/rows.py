"""Shared SQL fragments and row conversions for the PostgreSQL backend."""

from __future__ import annotations

import json
from typing import Any, TypeAlias, cast

from psycopg import AsyncConnection
from psycopg.types.json import Json

from engine.actions import JSON
from engine.storage.records import ActionOutcome, EventStatus, InboxEvent, OutcomeStatus

Row: TypeAlias = tuple[Any, ...]
Conn: TypeAlias = AsyncConnection[Row]

# The time every statement uses: the injected clock's reading when the storage was opened with
# one (tests move it by hand), else the database server's clock, so that lease expiry and
# rate-limit refills mean the same on every machine whatever their clocks say. Fixed text: the
# value itself is always the `now` parameter.
NOW = "COALESCE(%(now)s::timestamptz, now())"

PENDING = "status IN ('received', 'failed')"

EVENT_FIELDS = (
    "id", "dedupe_key", "source", "event_type", "event_timestamp", "received_at", "headers",
    "body", "status", "attempts", "lease_owner", "lease_expires_at", "next_attempt_at",
    "last_error", "updated_at",
)
EVENT_COLUMNS = ", ".join(EVENT_FIELDS)


def columns(prefix: str, fields: tuple[str, ...]) -> str:
    """`i.id, i.dedupe_key, ...`: the column list qualified by a table alias."""
    return ", ".join(f"{prefix}.{name}" for name in fields)


def dumps(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True)


def as_json(value: JSON | dict[str, JSON]) -> Json:
    """A parameter for a `json` column. `json` rather than `jsonb` keeps an exact copy and
    accepts `\\u0000`, which a CRM's error body may carry and `jsonb` would refuse."""
    return Json(value, dumps=dumps)


def optional_json(value: JSON) -> Json | None:
    return None if value is None else as_json(value)


def clean(text: str | None) -> str | None:
    """PostgreSQL text cannot hold NUL; a signed body or a CRM message may. The raw body keeps
    the exact bytes, so the copy in a text column may show U+FFFD instead."""
    return None if text is None else text.replace("\x00", "\ufffd")


def json_object(value: Any) -> dict[str, JSON]:
    return cast(dict[str, JSON], value) if isinstance(value, dict) else {}


def event_from_row(row: Row) -> InboxEvent:
    (event_id, dedupe_key, source, event_type, event_timestamp, received_at, headers, body,
     status, attempts, lease_owner, lease_expires_at, next_attempt_at, last_error,
     updated_at) = row
    return InboxEvent(
        id=event_id,
        dedupe_key=dedupe_key,
        source=source,
        event_type=event_type,
        event_timestamp=event_timestamp,
        received_at=received_at,
        headers={str(k): str(v) for k, v in json_object(headers).items()},
        body=None if body is None else bytes(body),
        status=cast(EventStatus, status),
        attempts=attempts,
        lease_owner=lease_owner,
        lease_expires_at=lease_expires_at,
        next_attempt_at=next_attempt_at,
        last_error=last_error,
        updated_at=updated_at,
    )


OUTCOME_FIELDS = (
    "id", "event_id", "rule", "action_kind", "target", "idempotency_key", "status", "attempts",
    "request_summary", "response", "error", "next_attempt_at", "created_at", "updated_at",
)
OUTCOME_COLUMNS = ", ".join(OUTCOME_FIELDS)


def outcome_from_row(row: Row) -> ActionOutcome:
    (outcome_id, event_id, rule, action_kind, target, idempotency_key, status, attempts,
     request_summary, response, error, next_attempt_at, created_at, updated_at) = row
    return ActionOutcome(
        id=outcome_id,
        event_id=event_id,
        rule=rule,
        action_kind=action_kind,
        target=target,
        idempotency_key=idempotency_key,
        status=cast(OutcomeStatus, status),
        attempts=attempts,
        request_summary=request_summary,
        response=response,
        error=error,
        next_attempt_at=next_attempt_at,
        created_at=created_at,
        updated_at=updated_at,
    )

