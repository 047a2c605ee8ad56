"""Reads of the delivery log page on SQLite: filtered keyset pages and per-minute activity.

The inbox has no index on its receipt time (every delivery would pay for it inside the
acknowledging commit), but ids follow arrival, so a time bound becomes an id bound by a
binary search over the primary key: about twenty index lookups, whatever the inbox size.
SQL text is assembled from fixed fragments only; every value is a parameter.
"""

from __future__ import annotations

import sqlite3
from datetime import datetime, timedelta

from engine.storage import records
from engine.storage.sqlite.rows import (
    EVENT_COLUMNS,
    OUTCOME_COLUMNS,
    event_from_row,
    outcome_from_row,
    ts,
)


def _lower_bound(connection: sqlite3.Connection, bound: str, low: int, high: int) -> int:
    """The first id in [low, high) whose event (or the next one after it) was received at or
    after `bound` (stored text), else `high`: a binary search over the primary key."""
    while low < high:
        middle = (low + high) // 2
        found = connection.execute(
            "SELECT id, received_at FROM inbox WHERE id >= ? ORDER BY id LIMIT 1", (middle,)
        ).fetchone()
        if found is None or found[1] >= bound:
            high = middle
        else:
            low = found[0] + 1
    return low


def _id_range(connection: sqlite3.Connection) -> tuple[int, int] | None:
    # Two subqueries: SQLite answers each from the end of the primary key, but not both at once.
    low, high = connection.execute(
        "SELECT (SELECT MIN(id) FROM inbox), (SELECT MAX(id) FROM inbox)").fetchone()
    return None if low is None else (int(low), int(high) + 1)


def first_id_at(connection: sqlite3.Connection, moment: datetime) -> int:
    """The id of the first event received at or after `moment` (one past the newest when
    none is): a lower-bound binary search over the ids, which follow arrival."""
    ids = _id_range(connection)
    if ids is None:
        return 1
    return _lower_bound(connection, ts(moment), *ids)


def browse(connection: sqlite3.Connection, where: records.EventFilter, limit: int,
           before_id: int | None) -> list[records.InboxEvent]:
    conditions: list[str] = []
    params: list[object] = []
    if where.status is not None:
        conditions.append("status = ?")
        params.append(where.status)
    if where.event_type is not None:
        conditions.append("event_type = ?")
        params.append(where.event_type)
    if where.received_from is not None:
        conditions.append("id >= ?")
        params.append(first_id_at(connection, where.received_from))
    if where.received_until is not None:
        conditions.append("id < ?")
        params.append(first_id_at(connection, where.received_until))
    if before_id is not None:
        conditions.append("id < ?")
        params.append(before_id)
    if where.touched is not None:
        if not where.touched:
            return []
        marks = ", ".join("?" * len(where.touched))
        conditions.append("id IN (SELECT event_id FROM inbox_ordering_keys"
                          f" WHERE ordering_key IN ({marks}))")
        params.extend(where.touched)
    clause = f" WHERE {' AND '.join(conditions)}" if conditions else ""
    params.append(max(limit, 0))
    rows = connection.execute(
        f"SELECT {EVENT_COLUMNS} FROM inbox{clause} ORDER BY id DESC LIMIT ?", params)
    return [event_from_row(row) for row in rows]


def _minute(text: str) -> datetime:
    return datetime.fromisoformat(f"{text}:00+00:00")


# A minute with at most this many events is counted from its rows; a busier one from the
# (status, id) index, one count a status, without reading a row.
SMALL_MINUTE = 64
MAX_MINUTES = 7 * 24 * 60
# Where a minute that is over (received_at only grows) starts in the ids does not change: the
# overview remembers it, so a reload searches only the minutes since the last one.
SETTLED = timedelta(minutes=2)
CACHE_LIMIT = 20_000


class MinuteStarts:
    """The first id of each settled minute, found once per process."""

    def __init__(self) -> None:
        self.known: dict[str, int] = {}

    def first_id(self, connection: sqlite3.Connection, minute: datetime, now: datetime,
                 low: int, top: int) -> int:
        bound = ts(minute)
        cached = self.known.get(bound)
        if cached is not None and low <= cached <= top:
            return cached
        found = _lower_bound(connection, bound, low, top)
        if minute <= now - SETTLED and found < top:
            if len(self.known) >= CACHE_LIMIT:
                self.known.clear()
            self.known[bound] = found
        return found


def event_activity(connection: sqlite3.Connection, since: datetime, now: datetime,
                   starts: MinuteStarts) -> list[records.ActivityCount]:
    """Per minute from `since` (rounded down to its minute): the minute's id range by binary
    search (ids follow arrival; remembered once the minute is over), then its events by
    status. The cost grows with the minutes and their events' index entries, never with the
    rows' size."""
    ids = _id_range(connection)
    if ids is None:
        return []
    start = since.replace(second=0, microsecond=0)
    top = ids[1]
    low = starts.first_id(connection, start, now, ids[0], top)
    counts: list[records.ActivityCount] = []
    for minute in range(MAX_MINUTES):
        if low >= top:
            break
        began = start + timedelta(minutes=minute)
        high = starts.first_id(connection, began + timedelta(minutes=1), now, low, top)
        if high - low <= SMALL_MINUTE:
            rows = [(str(row[0]), int(row[1])) for row in connection.execute(
                "SELECT status, COUNT(*) FROM inbox WHERE id >= ? AND id < ? GROUP BY status",
                (low, high))]
        else:
            rows = [(status, connection.execute(
                "SELECT COUNT(*) FROM inbox INDEXED BY inbox_status"
                " WHERE status = ? AND id >= ? AND id < ?", (status, low, high)).fetchone()[0])
                for status in records.EVENT_STATUSES]
        counts += [records.ActivityCount(began, None, status, n)
                   for status, n in sorted(rows) if n]
        low = high
    return counts


def outcome_activity(connection: sqlite3.Connection, since: datetime,
                     limit: int) -> list[records.ActivityCount]:
    rows = connection.execute(
        "SELECT substr(updated_at, 1, 16), target, status, COUNT(*) FROM ("
        " SELECT updated_at, target, status FROM action_outcomes WHERE event_id >= ?"
        " ORDER BY event_id DESC LIMIT ?)"
        " WHERE updated_at >= ? GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
        (first_id_at(connection, since), max(limit, 0), ts(since)))
    return [records.ActivityCount(_minute(minute), target, status, count)
            for minute, target, status, count in rows]


def recent_retries(connection: sqlite3.Connection, since: datetime,
                   limit: int) -> list[records.ActionOutcome]:
    rows = connection.execute(
        f"SELECT {OUTCOME_COLUMNS} FROM action_outcomes WHERE event_id >= ?"
        " AND status = 'retrying' AND updated_at >= ? ORDER BY updated_at DESC, id DESC"
        " LIMIT ?", (first_id_at(connection, since), ts(since), max(limit, 0)))
    return [outcome_from_row(row) for row in rows]
