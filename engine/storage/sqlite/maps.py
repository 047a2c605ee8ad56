"""Action outcomes, the identity map, deal keys and shared rate buckets on SQLite.

Each function runs inside the caller's transaction (the group-commit writer's for writes).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from datetime import datetime

from engine.actions import IdentityKey
from engine.storage.records import ActionOutcome, NewOutcome
from engine.storage.sqlite.rows import (
    OUTCOME_COLUMNS,
    dumps_optional,
    outcome_from_row,
    parse_ts,
    ts,
)


def get_outcome(
    connection: sqlite3.Connection, target: str, idempotency_key: str
) -> ActionOutcome | None:
    row = connection.execute(
        f"SELECT {OUTCOME_COLUMNS} FROM action_outcomes WHERE target = ? AND idempotency_key = ?",
        (target, idempotency_key),
    ).fetchone()
    return None if row is None else outcome_from_row(row)


def record_outcome(
    connection: sqlite3.Connection, outcome: NewOutcome, now: str
) -> ActionOutcome:
    next_at = None if outcome.next_attempt_at is None else ts(outcome.next_attempt_at)
    # The WHERE on the conflict branch keeps an `ok` row as it is: success is final.
    connection.execute(
        "INSERT INTO action_outcomes (event_id, rule, action_kind, target,"
        " idempotency_key, status, attempts, request_summary, response, error,"
        " next_attempt_at, created_at, updated_at)"
        " VALUES (?, ?, ?, ?, ?, ?, 1, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (target, idempotency_key) DO UPDATE SET"
        " status = excluded.status, attempts = action_outcomes.attempts + 1,"
        " request_summary = excluded.request_summary, response = excluded.response,"
        " error = excluded.error, next_attempt_at = excluded.next_attempt_at,"
        " updated_at = excluded.updated_at"
        " WHERE action_outcomes.status <> 'ok'",
        (
            outcome.event_id, outcome.rule, outcome.action_kind, outcome.target,
            outcome.idempotency_key, outcome.status, dumps_optional(outcome.request_summary),
            dumps_optional(outcome.response), outcome.error, next_at, now, now,
        ),
    )
    stored = get_outcome(connection, outcome.target, outcome.idempotency_key)
    assert stored is not None  # just written in this transaction
    return stored


def list_outcomes(connection: sqlite3.Connection, event_id: int) -> list[ActionOutcome]:
    rows = connection.execute(
        f"SELECT {OUTCOME_COLUMNS} FROM action_outcomes WHERE event_id = ? ORDER BY id",
        (event_id,),
    ).fetchall()
    return [outcome_from_row(row) for row in rows]


def outcome_counts(connection: sqlite3.Connection) -> dict[tuple[str, str], int]:
    rows = connection.execute(
        "SELECT target, status, COUNT(*) FROM action_outcomes GROUP BY target, status"
    ).fetchall()
    return {(row[0], row[1]): row[2] for row in rows}


def lookup_identity(
    connection: sqlite3.Connection, target: str, keys: Sequence[IdentityKey]
) -> str | None:
    for key in keys:
        row = connection.execute(
            "SELECT record_id FROM identity_map WHERE target = ? AND field = ? AND value = ?",
            (target, key.field, key.value),
        ).fetchone()
        if row is not None:
            return str(row[0])
    return None


def bind_identity(
    connection: sqlite3.Connection, target: str, key: IdentityKey, record_id: str, now: str
) -> str:
    connection.execute(
        "INSERT INTO identity_map (target, field, value, record_id, created_at)"
        " VALUES (?, ?, ?, ?, ?) ON CONFLICT (target, field, value) DO NOTHING",
        (target, key.field, key.value, record_id, now),
    )
    winner = lookup_identity(connection, target, [key])
    assert winner is not None  # just written in this transaction
    return winner


def unbind_identity(connection: sqlite3.Connection, target: str, key: IdentityKey) -> None:
    connection.execute(
        "DELETE FROM identity_map WHERE target = ? AND field = ? AND value = ?",
        (target, key.field, key.value),
    )


def lookup_deal(connection: sqlite3.Connection, target: str, deal_key: str) -> str | None:
    row = connection.execute(
        "SELECT deal_id FROM deal_keys WHERE target = ? AND deal_key = ?", (target, deal_key)
    ).fetchone()
    return None if row is None else str(row[0])


def bind_deal(
    connection: sqlite3.Connection, target: str, deal_key: str, deal_id: str, now: str
) -> str:
    connection.execute(
        "INSERT INTO deal_keys (target, deal_key, deal_id, created_at)"
        " VALUES (?, ?, ?, ?) ON CONFLICT (target, deal_key) DO NOTHING",
        (target, deal_key, deal_id, now),
    )
    winner = lookup_deal(connection, target, deal_key)
    assert winner is not None  # just written in this transaction
    return winner


def take_tokens(
    connection: sqlite3.Connection,
    bucket: str,
    cost: float,
    capacity: float,
    refill_per_second: float,
    now: datetime,
) -> float:
    row = connection.execute(
        "SELECT tokens, updated_at FROM rate_buckets WHERE bucket = ?", (bucket,)
    ).fetchone()
    tokens = capacity
    if row is not None:
        elapsed = max((now - parse_ts(row[1])).total_seconds(), 0.0)
        tokens = min(capacity, row[0] + elapsed * refill_per_second)
    wait = 0.0
    if tokens >= cost:
        tokens -= cost
    else:
        wait = (cost - tokens) / refill_per_second
    connection.execute(
        "INSERT INTO rate_buckets (bucket, tokens, updated_at) VALUES (?, ?, ?)"
        " ON CONFLICT (bucket) DO UPDATE SET"
        " tokens = excluded.tokens, updated_at = excluded.updated_at",
        (bucket, tokens, ts(now)),
    )
    return wait
