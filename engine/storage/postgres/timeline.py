"""Reads of the delivery log page on PostgreSQL: filtered keyset pages and per-minute activity.

The inbox has no index on its receipt time (every delivery would pay for it inside the
acknowledging commit), but ids follow arrival, so a time bound becomes an id bound by a
binary search over the primary key: about twenty index lookups on one connection, whatever
the inbox size. SQL text is assembled from fixed fragments only; every value is a parameter.
"""

from __future__ import annotations

from datetime import UTC, datetime

from engine.storage import records
from engine.storage.postgres.rows import (
    EVENT_COLUMNS,
    OUTCOME_COLUMNS,
    Conn,
    event_from_row,
    outcome_from_row,
)


async def first_id_at(connection: Conn, moment: datetime) -> int:
    """The id of the first event received at or after `moment` (one past the newest when
    none is): a lower-bound binary search over the ids, which follow arrival."""
    bounds = await (await connection.execute(
        "SELECT (SELECT MIN(id) FROM inbox), (SELECT MAX(id) FROM inbox)")).fetchone()
    if bounds is None or bounds[0] is None:
        return 1
    low, high = int(bounds[0]), int(bounds[1]) + 1
    while low < high:
        middle = (low + high) // 2
        found = await (await connection.execute(
            "SELECT id, received_at FROM inbox WHERE id >= %s ORDER BY id LIMIT 1", (middle,)
        )).fetchone()
        if found is None or found[1] >= moment:
            high = middle
        else:
            low = int(found[0]) + 1
    return low


async def browse(connection: Conn, where: records.EventFilter, limit: int,
                 before_id: int | None) -> list[records.InboxEvent]:
    conditions: list[str] = []
    params: dict[str, object] = {"limit": max(limit, 0)}
    if where.status is not None:
        conditions.append("status = %(status)s")
        params["status"] = where.status
    if where.event_type is not None:
        conditions.append("event_type = %(event_type)s")
        params["event_type"] = where.event_type
    if where.received_from is not None:
        conditions.append("id >= %(first)s")
        params["first"] = await first_id_at(connection, where.received_from)
    if where.received_until is not None:
        conditions.append("id < %(last)s")
        params["last"] = await first_id_at(connection, where.received_until)
    if before_id is not None:
        conditions.append("id < %(before)s")
        params["before"] = before_id
    if where.touched is not None:
        if not where.touched:
            return []
        conditions.append("id IN (SELECT event_id FROM inbox_ordering_keys"
                          " WHERE ordering_key = ANY(%(touched)s))")
        params["touched"] = list(where.touched)
    clause = f" WHERE {' AND '.join(conditions)}" if conditions else ""
    rows = await (await connection.execute(
        f"SELECT {EVENT_COLUMNS} FROM inbox{clause} ORDER BY id DESC LIMIT %(limit)s",
        params)).fetchall()
    return [event_from_row(row) for row in rows]


def _utc(moment: datetime) -> datetime:
    return moment.astimezone(UTC)


async def event_activity(connection: Conn, since: datetime) -> list[records.ActivityCount]:
    first = await first_id_at(connection, since)
    rows = await (await connection.execute(
        "SELECT date_trunc('minute', received_at AT TIME ZONE 'UTC'), status, COUNT(*)"
        " FROM inbox WHERE id >= %s GROUP BY 1, 2 ORDER BY 1, 2", (first,))).fetchall()
    return [records.ActivityCount(minute.replace(tzinfo=UTC), None, status, int(count))
            for minute, status, count in rows]


async def outcome_activity(connection: Conn, since: datetime) -> list[records.ActivityCount]:
    first = await first_id_at(connection, since)
    rows = await (await connection.execute(
        "SELECT date_trunc('minute', updated_at AT TIME ZONE 'UTC'), target, status, COUNT(*)"
        " FROM action_outcomes WHERE event_id >= %s AND updated_at >= %s"
        " GROUP BY 1, 2, 3 ORDER BY 1, 2, 3", (first, since))).fetchall()
    return [records.ActivityCount(minute.replace(tzinfo=UTC), target, status, int(count))
            for minute, target, status, count in rows]


async def recent_retries(connection: Conn, since: datetime,
                         limit: int) -> list[records.ActionOutcome]:
    first = await first_id_at(connection, since)
    rows = await (await connection.execute(
        f"SELECT {OUTCOME_COLUMNS} FROM action_outcomes WHERE event_id >= %s"
        " AND status = 'retrying' AND updated_at >= %s ORDER BY updated_at DESC, id DESC"
        " LIMIT %s", (first, since, max(limit, 0)))).fetchall()
    return [outcome_from_row(row) for row in rows]
