"""Action outcomes on PostgreSQL: one row per (target, idempotency key), success final."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime

from engine.storage import records, values
from engine.storage.postgres import timeline
from engine.storage.postgres.database import PostgresPart
from engine.storage.postgres.rows import (
    NOW,
    OUTCOME_COLUMNS,
    Conn,
    Row,
    clean,
    optional_json,
    outcome_from_row,
)
from engine.storage.protocols import Outcomes

_GET = (f"SELECT {OUTCOME_COLUMNS} FROM action_outcomes"
        " WHERE target = %(target)s AND idempotency_key = %(key)s")
_UPSERT = (
    "INSERT INTO action_outcomes AS o (event_id, rule, action_kind, target,"
    " idempotency_key, status, attempts, request_summary, response, error,"
    " next_attempt_at, created_at, updated_at, rules_version) VALUES (%(event)s,"
    " %(rule)s, %(kind)s, %(target)s, %(key)s, %(status)s, 1, %(request)s,"
    f" %(response)s, %(error)s, %(next)s, {NOW}, {NOW}, %(version)s)"
    " ON CONFLICT ON CONSTRAINT action_outcomes_key DO UPDATE SET"
    " status = excluded.status, attempts = o.attempts + 1,"
    " request_summary = excluded.request_summary, response = excluded.response,"
    " error = excluded.error, next_attempt_at = excluded.next_attempt_at,"
    " updated_at = excluded.updated_at, rules_version = excluded.rules_version"
    # Success is final: the conflict branch leaves an `ok` row as it is (and returns nothing).
    " WHERE o.status <> 'ok'"
    f" RETURNING {OUTCOME_COLUMNS}"
)


class PostgresOutcomes(PostgresPart, Outcomes):
    """One upsert that returns the row it wrote; when it wrote none (the `ok` row is kept),
    a second statement reads that row."""

    async def get(self, target: str, idempotency_key: str) -> records.ActionOutcome | None:
        row = await self._db.row("read the outcome", _GET,
                                 {"target": target, "key": idempotency_key})
        return None if row is None else outcome_from_row(row)

    async def record(self, outcome: records.NewOutcome) -> records.ActionOutcome:
        async with self._db.connection("record the outcome") as connection:
            row = await upsert(connection, values.storable_outcome(outcome), self._db.now())
            if row is None:  # the `ok` row kept; outcomes are never deleted
                row = await (await connection.execute(_GET, {
                    "target": outcome.target, "key": outcome.idempotency_key})).fetchone()
        assert row is not None
        return outcome_from_row(row)

    async def of_event(self, event_id: int) -> list[records.ActionOutcome]:
        rows = await self._db.rows(
            "list outcomes",
            f"SELECT {OUTCOME_COLUMNS} FROM action_outcomes WHERE event_id = %s ORDER BY id",
            (event_id,),
        )
        return [outcome_from_row(row) for row in rows]

    async def of_events(self, event_ids: Sequence[int]) -> dict[int, list[records.ActionOutcome]]:
        unique = sorted(set(event_ids))
        found: dict[int, list[records.ActionOutcome]] = {event_id: [] for event_id in unique}
        if not unique:
            return found
        rows = await self._db.rows(
            "list outcomes",
            f"SELECT {OUTCOME_COLUMNS} FROM action_outcomes WHERE event_id = ANY(%s::bigint[])"
            " ORDER BY id", (unique,))
        for row in rows:
            outcome = outcome_from_row(row)
            found[outcome.event_id].append(outcome)
        return found

    async def counts(self) -> Mapping[tuple[str, str], int]:
        rows = await self._db.rows(
            "count outcomes",
            "SELECT target, status, COUNT(*) FROM action_outcomes GROUP BY target, status")
        return {(target, status): count for target, status, count in rows}

    async def activity(self, since: datetime,
                       limit: int = 20_000) -> list[records.ActivityCount]:
        async with self._db.connection("count recent outcomes") as connection:
            return await timeline.outcome_activity(connection, since, limit)

    async def recent_retries(self, since: datetime, limit: int = 100) -> list[
            records.ActionOutcome]:
        async with self._db.connection("read recent retries") as connection:
            return await timeline.recent_retries(connection, since, limit)


async def upsert(connection: Conn, outcome: records.NewOutcome, now: datetime | None) -> Row | None:
    """Write one cleaned outcome (`values.storable_outcome`); the row written, or None when
    the `ok` row was kept as it is. The inbox's `finish` writes an event's last outcomes
    with this, in its own transaction."""
    params = {
        "event": outcome.event_id, "rule": outcome.rule, "kind": outcome.action_kind,
        "target": outcome.target, "key": outcome.idempotency_key, "status": outcome.status,
        "request": optional_json(outcome.request_summary),
        "response": optional_json(outcome.response), "error": clean(outcome.error),
        "next": outcome.next_attempt_at, "now": now, "version": outcome.rules_version,
    }
    cursor = await connection.execute(_UPSERT, params)
    return await cursor.fetchone()
