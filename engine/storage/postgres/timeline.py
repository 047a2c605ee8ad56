"""Reads of the delivery log page on PostgreSQL: filtered keyset pages and per-minute activity.

A time bound becomes an id bound (ids follow arrival) from the receipt-time index, so each
filter shape pages along one index. SQL text is assembled from fixed fragments only; every
value is a parameter.
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
    none is), from the receipt-time index; ids follow arrival."""
    found = await (await connection.execute(
        "SELECT COALESCE((SELECT id FROM inbox WHERE received_at >= %s"
        " ORDER BY received_at, id LIMIT 1), (SELECT MAX(id) + 1 FROM inbox), 1)", (moment,)
    )).fetchone()
    return int(found[0]) if found is not None else 1


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


# Per minute since the start (only minutes that hold events): where the minute starts in the
# ids (one receipt-time index lookup each, on the server), then its events by status from the
# (status, id) index: index-only once (auto)vacuum has marked the pages all-visible, so no
# row is read (0.9 s for a day of 1,000,000 events, against 2.8 s reading the rows).
_EVENT_ACTIVITY = """
WITH known AS (SELECT MIN(received_at) AS first_at, MAX(received_at) AS last_at,
                      COALESCE(MAX(id), 0) + 1 AS top FROM inbox WHERE id >= %(low)s),
starts AS MATERIALIZED (
    SELECT g AS minute, COALESCE((SELECT i.id FROM inbox AS i WHERE i.received_at >= g
                                  ORDER BY i.received_at LIMIT 1), known.top) AS first
    FROM known, generate_series(
        GREATEST(%(start)s::timestamptz, date_trunc('minute', known.first_at)),
        LEAST(COALESCE(%(now)s::timestamptz, now()), known.last_at) + interval '1 minute',
        interval '1 minute') AS g
),
spans AS MATERIALIZED (
    SELECT * FROM (SELECT minute, first AS low, lead(first) OVER (ORDER BY minute) AS high
                   FROM starts) AS all_minutes
    WHERE high > low
)
SELECT spans.minute, s.status, c.n
FROM spans
CROSS JOIN unnest(ARRAY['received', 'processed', 'ignored', 'failed', 'dead']) AS s(status)
CROSS JOIN LATERAL (SELECT COUNT(*) AS n FROM inbox
                    WHERE inbox.status = s.status AND inbox.id >= spans.low
                    AND inbox.id < spans.high) AS c
WHERE c.n > 0
ORDER BY 1, 2
"""


async def event_activity(connection: Conn, since: datetime,
                         now: datetime | None) -> list[records.ActivityCount]:
    start = since.replace(second=0, microsecond=0)
    low = await first_id_at(connection, start)
    rows = await (await connection.execute(
        _EVENT_ACTIVITY, {"start": start, "now": now, "low": low})).fetchall()
    return [records.ActivityCount(_utc(minute), None, status, int(count))
            for minute, status, count in rows]


async def outcome_activity(connection: Conn, since: datetime,
                           limit: int) -> list[records.ActivityCount]:
    first = await first_id_at(connection, since)
    rows = await (await connection.execute(
        "SELECT date_trunc('minute', updated_at AT TIME ZONE 'UTC'), target, status, COUNT(*)"
        " FROM (SELECT updated_at, target, status FROM action_outcomes WHERE event_id >= %s"
        " ORDER BY event_id DESC LIMIT %s) AS latest WHERE updated_at >= %s"
        " GROUP BY 1, 2, 3 ORDER BY 1, 2, 3", (first, max(limit, 0), since))).fetchall()
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
