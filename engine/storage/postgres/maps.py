"""Action outcomes, the identity map, deal keys and shared rate buckets on PostgreSQL.

The unique constraints decide every race: an insert that conflicts waits for the other
transaction and then does nothing, and a second statement reads the winner.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from engine.actions import IdentityKey
from engine.storage.postgres.rows import (
    NOW,
    OUTCOME_COLUMNS,
    Conn,
    clean,
    optional_json,
    outcome_from_row,
)
from engine.storage.records import ActionOutcome, NewOutcome


async def get_outcome(connection: Conn, target: str, idempotency_key: str) -> ActionOutcome | None:
    cursor = await connection.execute(
        f"SELECT {OUTCOME_COLUMNS} FROM action_outcomes"
        " WHERE target = %s AND idempotency_key = %s",
        (target, idempotency_key),
    )
    row = await cursor.fetchone()
    return None if row is None else outcome_from_row(row)


_RECORD = (
    "INSERT INTO action_outcomes AS o (event_id, rule, action_kind, target, idempotency_key,"
    " status, attempts, request_summary, response, error, next_attempt_at, created_at,"
    " updated_at) VALUES (%(event)s, %(rule)s, %(kind)s, %(target)s, %(key)s, %(status)s, 1,"
    f" %(request)s, %(response)s, %(error)s, %(next)s, {NOW}, {NOW})"
    " ON CONFLICT ON CONSTRAINT action_outcomes_key DO UPDATE SET"
    " status = excluded.status, attempts = o.attempts + 1,"
    " request_summary = excluded.request_summary, response = excluded.response,"
    " error = excluded.error, next_attempt_at = excluded.next_attempt_at,"
    " updated_at = excluded.updated_at"
    # Success is final: the conflict branch leaves an `ok` row as it is (and returns nothing).
    " WHERE o.status <> 'ok'"
    f" RETURNING {OUTCOME_COLUMNS}"
)


async def record_outcome(
    connection: Conn, outcome: NewOutcome, now: datetime | None
) -> ActionOutcome:
    cursor = await connection.execute(_RECORD, {
        "event": outcome.event_id, "rule": outcome.rule, "kind": outcome.action_kind,
        "target": outcome.target, "key": outcome.idempotency_key, "status": outcome.status,
        "request": optional_json(outcome.request_summary),
        "response": optional_json(outcome.response), "error": clean(outcome.error),
        "next": outcome.next_attempt_at, "now": now,
    })
    row = await cursor.fetchone()
    if row is not None:
        return outcome_from_row(row)
    stored = await get_outcome(connection, outcome.target, outcome.idempotency_key)
    assert stored is not None  # the conflict branch found it, and outcomes are never deleted
    return stored


async def list_outcomes(connection: Conn, event_id: int) -> list[ActionOutcome]:
    cursor = await connection.execute(
        f"SELECT {OUTCOME_COLUMNS} FROM action_outcomes WHERE event_id = %s ORDER BY id",
        (event_id,),
    )
    return [outcome_from_row(row) for row in await cursor.fetchall()]


async def outcome_counts(connection: Conn) -> dict[tuple[str, str], int]:
    cursor = await connection.execute(
        "SELECT target, status, COUNT(*) FROM action_outcomes GROUP BY target, status")
    return {(row[0], row[1]): row[2] for row in await cursor.fetchall()}


async def lookup_identity(
    connection: Conn, target: str, keys: Sequence[IdentityKey]
) -> str | None:
    """One query for every key; the first key in priority order that is mapped wins."""
    if not keys:
        return None
    cursor = await connection.execute(
        "SELECT m.record_id FROM identity_map AS m"
        " JOIN unnest(%s::text[], %s::text[]) WITH ORDINALITY AS k (field, value, priority)"
        " ON m.field = k.field AND m.value = k.value"
        " WHERE m.target = %s ORDER BY k.priority LIMIT 1",
        ([key.field for key in keys], [key.value for key in keys], target),
    )
    row = await cursor.fetchone()
    return None if row is None else str(row[0])


async def bind_identity(
    connection: Conn, target: str, key: IdentityKey, record_id: str, now: datetime | None
) -> str:
    for _ in range(3):
        cursor = await connection.execute(
            "INSERT INTO identity_map (target, field, value, record_id, created_at)"
            f" VALUES (%(target)s, %(field)s, %(value)s, %(record)s, {NOW})"
            " ON CONFLICT (target, field, value) DO NOTHING RETURNING record_id",
            {"target": target, "field": key.field, "value": key.value, "record": record_id,
             "now": now},
        )
        row = await cursor.fetchone()
        if row is None:
            winner = await lookup_identity(connection, target, [key])
            if winner is None:
                continue  # unbound between the two statements: try to bind again
            return winner
        return str(row[0])
    raise RuntimeError("the identity kept changing while being bound")


async def unbind_identity(connection: Conn, target: str, key: IdentityKey) -> None:
    await connection.execute(
        "DELETE FROM identity_map WHERE target = %s AND field = %s AND value = %s",
        (target, key.field, key.value),
    )


async def lookup_deal(connection: Conn, target: str, deal_key: str) -> str | None:
    cursor = await connection.execute(
        "SELECT deal_id FROM deal_keys WHERE target = %s AND deal_key = %s", (target, deal_key))
    row = await cursor.fetchone()
    return None if row is None else str(row[0])


async def bind_deal(
    connection: Conn, target: str, deal_key: str, deal_id: str, now: datetime | None
) -> str:
    cursor = await connection.execute(
        "INSERT INTO deal_keys (target, deal_key, deal_id, created_at)"
        f" VALUES (%(target)s, %(key)s, %(deal)s, {NOW})"
        " ON CONFLICT (target, deal_key) DO NOTHING RETURNING deal_id",
        {"target": target, "key": deal_key, "deal": deal_id, "now": now},
    )
    row = await cursor.fetchone()
    if row is not None:
        return str(row[0])
    winner = await lookup_deal(connection, target, deal_key)
    assert winner is not None  # deal keys are never deleted
    return winner


# Tokens after refilling for the time since the last take, capped at the capacity. In an
# ON CONFLICT SET every reference to `b.` reads the row as it was before this statement.
_REFILLED = (
    "LEAST(%(capacity)s, b.tokens + %(refill)s"
    f" * GREATEST(EXTRACT(EPOCH FROM {NOW} - b.updated_at)::float8, 0))"
)
_TAKE = (
    "INSERT INTO rate_buckets AS b (bucket, tokens, granted, updated_at)"
    f" VALUES (%(bucket)s, %(capacity)s - %(cost)s, true, {NOW})"
    " ON CONFLICT (bucket) DO UPDATE SET"
    f" granted = {_REFILLED} >= %(cost)s,"
    f" tokens = CASE WHEN {_REFILLED} >= %(cost)s THEN {_REFILLED} - %(cost)s"
    f" ELSE {_REFILLED} END,"
    f" updated_at = {NOW}"
    " RETURNING tokens, granted"
)


async def take_tokens(
    connection: Conn,
    bucket: str,
    cost: float,
    capacity: float,
    refill_per_second: float,
    now: datetime | None,
) -> float:
    """One upsert reads, refills, takes and writes the bucket under its row lock, so every
    worker on every machine draws from the same tokens. The write need not survive a crash
    (a lost refill is harmless), so it skips the WAL flush and holds the hot row's lock for
    a round trip, not for an fsync."""
    async with connection.transaction():
        await connection.execute("SET LOCAL synchronous_commit = off")
        cursor = await connection.execute(_TAKE, {
            "bucket": bucket, "cost": float(cost), "capacity": float(capacity),
            "refill": float(refill_per_second), "now": now,
        })
        row = await cursor.fetchone()
    assert row is not None  # an upsert always returns its row
    tokens, granted = float(row[0]), bool(row[1])
    return 0.0 if granted else (cost - tokens) / refill_per_second
