"""Inbox operations on SQLite: store with dedupe, leases, retries, dead letters, purge, stats.

Each function runs inside the caller's transaction (the group-commit writer's for writes).
"""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Sequence

from engine.errors import UnstorableEventError
from engine.storage.records import (
    EVENT_STATUSES,
    DeadLetter,
    EventStatus,
    InboxEvent,
    InboxStats,
    NewEvent,
    StoreResult,
    unstorable,
)
from engine.storage.sqlite.rows import (
    EVENT_COLUMNS,
    dumps,
    event_from_row,
    parse_optional_ts,
    parse_ts,
    placeholders,
    ts,
)

PENDING = "status IN ('received', 'failed')"

# The SET clauses of lease-guarded updates; fixed text, values are always parameters.
FINISH = (
    "status = ?, last_error = ?, next_attempt_at = NULL,"
    " lease_owner = NULL, lease_expires_at = NULL, updated_at = ?"
)
RETRY_LATER = (
    "status = 'failed', last_error = ?, next_attempt_at = ?,"
    " lease_owner = NULL, lease_expires_at = NULL, updated_at = ?"
)
EXTEND = "lease_expires_at = ?"


_ROW = "(?, ?, ?, ?, ?, ?, ?, 'received', 0, ?)"


@functools.lru_cache(maxsize=64)
def _insert(count: int) -> str:
    """One INSERT for `count` rows: the text holds placeholders only, never data."""
    return (
        "INSERT INTO inbox (dedupe_key, source, event_type, event_timestamp, received_at,"
        " headers, body, status, attempts, updated_at) VALUES "
        + ", ".join([_ROW] * count)
        + " ON CONFLICT (dedupe_key) DO NOTHING"
    )


# SQLite allows 32766 parameters per statement; 8 per row.
_MAX_ROWS = 1000


def store_many(
    connection: sqlite3.Connection, events: Sequence[NewEvent]
) -> list[StoreResult | UnstorableEventError]:
    """Insert a batch, a thousand rows per statement at most. An event that can never be
    stored gets its UnstorableEventError in its place; the others go in."""
    refused = [unstorable(event) for event in events]
    storable = [event for event, error in zip(events, refused, strict=True) if error is None]
    stored: list[StoreResult] = []
    for start in range(0, len(storable), _MAX_ROWS):
        stored += _store_chunk(connection, storable[start : start + _MAX_ROWS])
    results = iter(stored)
    return [next(results) if error is None else error for error in refused]


def _store_chunk(connection: sqlite3.Connection, events: Sequence[NewEvent]) -> list[StoreResult]:
    """Insert rows with one statement; the unique dedupe key decides what is new.

    One statement is one step for SQLite and one GIL hand-off for Python, which is what keeps
    the writer thread from starving the event loop under load. Rows get consecutive ids in
    VALUES order (the caller holds the write lock), so when every row went in, the ids follow
    from the last one without another query.
    """
    params: list[object] = []
    for event in events:
        received = ts(event.received_at)
        params += (
            event.dedupe_key, event.source, event.event_type, event.event_timestamp,
            received, dumps(dict(event.headers)), event.body, received,
        )
    cursor = connection.execute(_insert(len(events)), params)
    inserted, last = cursor.rowcount, cursor.lastrowid or 0
    if inserted == len(events):
        return [StoreResult(id=last - inserted + 1 + i, duplicate=False) for i in range(inserted)]
    # Some were seen before (a retry, or identical copies within this batch).
    added: dict[str, int] = {}
    if inserted > 0:
        added = dict(connection.execute(
            "SELECT dedupe_key, id FROM inbox WHERE id > ? AND id <= ?", (last - inserted, last)
        ).fetchall())
    results: list[StoreResult] = []
    claimed: set[str] = set()
    for event in events:
        key = event.dedupe_key
        if key in added and key not in claimed:
            claimed.add(key)  # the first of identical copies in one batch is the stored one
            results.append(StoreResult(id=added[key], duplicate=False))
            continue
        existing = added.get(key)
        if existing is None:
            existing = connection.execute(
                "SELECT id FROM inbox WHERE dedupe_key = ?", (key,)
            ).fetchone()[0]
        results.append(StoreResult(id=existing, duplicate=True))
    return results


def get(connection: sqlite3.Connection, event_id: int) -> InboxEvent | None:
    row = connection.execute(
        f"SELECT {EVENT_COLUMNS} FROM inbox WHERE id = ?", (event_id,)
    ).fetchone()
    return None if row is None else event_from_row(row)


def list_events(
    connection: sqlite3.Connection, status: EventStatus | None, limit: int, before_id: int | None
) -> list[InboxEvent]:
    rows = connection.execute(
        f"SELECT {EVENT_COLUMNS} FROM inbox"
        " WHERE (? IS NULL OR status = ?) AND (? IS NULL OR id < ?)"
        " ORDER BY id DESC LIMIT ?",
        (status, status, before_id, before_id, limit),
    ).fetchall()
    return [event_from_row(row) for row in rows]


# When a pending event is due: a new one when it was received, a rescheduled one at its next
# attempt. Claims take the earliest due first (the `inbox_due` index), so events rescheduled
# again and again (a CRM that hangs) queue behind the events that arrived meanwhile instead of
# in front of them.
DUE = "COALESCE(next_attempt_at, received_at)"


def claim(
    connection: sqlite3.Connection, worker_id: str, limit: int, now: str, expires: str
) -> list[InboxEvent]:
    # INDEXED BY: without ANALYZE statistics SQLite would read every pending row through
    # `inbox_status` and sort them; the due index stops at `limit` rows.
    due = connection.execute(
        f"SELECT id FROM inbox INDEXED BY inbox_due WHERE {PENDING}"
        " AND (next_attempt_at IS NULL OR next_attempt_at <= ?)"
        " AND (lease_expires_at IS NULL OR lease_expires_at <= ?)"
        f" ORDER BY {DUE}, id LIMIT ?",
        (now, now, max(limit, 0)),
    ).fetchall()
    claimed = []
    for (event_id,) in due:
        row = connection.execute(
            "UPDATE inbox SET lease_owner = ?, lease_expires_at = ?,"
            " attempts = attempts + 1, updated_at = ?"
            f" WHERE id = ? RETURNING {EVENT_COLUMNS}",
            (worker_id, expires, now, event_id),
        ).fetchone()
        claimed.append(event_from_row(row))
    return claimed


def update_leased(
    connection: sqlite3.Connection,
    assignments: str,
    params: tuple[object, ...],
    event_id: int,
    worker_id: str,
) -> bool:
    """Apply one of the SET clauses above only while `worker_id` holds the event's lease."""
    cursor = connection.execute(
        f"UPDATE inbox SET {assignments} WHERE id = ? AND lease_owner = ? AND {PENDING}",
        (*params, event_id, worker_id),
    )
    return cursor.rowcount == 1


def set_ordering_keys(connection: sqlite3.Connection, event_id: int, keys: Sequence[str]) -> None:
    """Replace the event's keys and mark them recorded, in the caller's transaction."""
    connection.execute("DELETE FROM inbox_ordering_keys WHERE event_id = ?", (event_id,))
    connection.executemany(
        "INSERT INTO inbox_ordering_keys (event_id, ordering_key) VALUES (?, ?)"
        " ON CONFLICT DO NOTHING",
        [(event_id, key) for key in keys],
    )
    connection.execute(
        "UPDATE inbox SET ordering_recorded = 1 WHERE id = ? AND ordering_recorded = 0",
        (event_id,),
    )


def earlier_unfinished(
    connection: sqlite3.Connection, event_id: int, keys: Sequence[str]
) -> tuple[list[int], list[int]]:
    """(earlier pending events sharing a key, earlier pending events whose keys are not
    recorded yet). Each half reads its own index: a long backlog of events waiting for a retry
    is not scanned on every check."""
    unique = sorted(set(keys))
    if not unique:
        return [], []
    shared = connection.execute(
        "SELECT DISTINCT k.event_id FROM inbox_ordering_keys AS k"
        " JOIN inbox AS i ON i.id = k.event_id"
        f" WHERE k.ordering_key IN ({placeholders(len(unique))}) AND k.event_id < ?"
        f" AND i.{PENDING} ORDER BY k.event_id",
        (*unique, event_id),
    ).fetchall()
    unplanned = connection.execute(
        f"SELECT id FROM inbox INDEXED BY inbox_unplanned"
        f" WHERE id < ? AND {PENDING} AND ordering_recorded = 0 ORDER BY id",
        (event_id,),
    ).fetchall()
    return [row[0] for row in shared], [row[0] for row in unplanned]


def dead_letters(connection: sqlite3.Connection, limit: int) -> list[DeadLetter]:
    rows = connection.execute(
        "SELECT id, event_type, NULL, NULL, NULL, last_error, attempts, updated_at"
        " FROM inbox WHERE status = 'dead'"
        " UNION ALL"
        " SELECT o.event_id, i.event_type, o.rule, o.action_kind, o.target, o.error,"
        " o.attempts, o.updated_at FROM action_outcomes AS o"
        " JOIN inbox AS i ON i.id = o.event_id WHERE o.status = 'dead'"
        " ORDER BY 8 DESC, 1 DESC LIMIT ?",
        (limit,),
    ).fetchall()
    return [
        DeadLetter(
            event_id=row[0], event_type=row[1], rule=row[2], action_kind=row[3],
            target=row[4], error=row[5], attempts=row[6], updated_at=parse_ts(row[7]),
        )
        for row in rows
    ]


def requeue(connection: sqlite3.Connection, event_id: int, now: str) -> bool:
    """Pending again, attempts reset, dead outcomes retrying, ordering keys to be recorded
    again (later events wait for its plan); not while a worker holds a live lease (it would
    finish and overwrite the requeue) and not once the raw body is gone."""
    cursor = connection.execute(
        "UPDATE inbox SET status = 'received', attempts = 0, last_error = NULL,"
        " next_attempt_at = NULL, lease_owner = NULL, lease_expires_at = NULL, updated_at = ?,"
        " ordering_recorded = 0"
        " WHERE id = ? AND body IS NOT NULL"
        " AND (lease_owner IS NULL OR lease_expires_at <= ?)",
        (now, event_id, now),
    )
    if cursor.rowcount != 1:
        return False
    connection.execute(
        "UPDATE action_outcomes SET status = 'retrying', attempts = 0, next_attempt_at = NULL,"
        " updated_at = ? WHERE event_id = ? AND status = 'dead'",
        (now, event_id),
    )
    return True


def requeue_dead(connection: sqlite3.Connection, now: str) -> list[int]:
    rows = connection.execute(
        "SELECT id FROM inbox WHERE status = 'dead'"
        " UNION SELECT event_id FROM action_outcomes WHERE status = 'dead' ORDER BY 1"
    ).fetchall()
    return [row[0] for row in rows if requeue(connection, row[0], now)]


def purge_raw_bodies(connection: sqlite3.Connection, cutoff: str) -> int:
    cursor = connection.execute(
        "UPDATE inbox SET body = NULL WHERE body IS NOT NULL AND received_at < ?"
        " AND status IN ('processed', 'ignored')",
        (cutoff,),
    )
    return cursor.rowcount


# The first pending event in arrival order of each pending status: two index lookups.
OLDEST_PENDING = (
    "SELECT MIN(r) FROM ("
    "SELECT (SELECT received_at FROM inbox WHERE status = 'received' ORDER BY id LIMIT 1) AS r"
    " UNION ALL"
    " SELECT (SELECT received_at FROM inbox WHERE status = 'failed' ORDER BY id LIMIT 1))"
)


def stats(connection: sqlite3.Connection) -> InboxStats:
    """Constant time in the inbox size: the counts are kept by triggers (migration 3), and the
    oldest pending event is read from the (status, id) index."""
    counts: dict[str, int] = dict.fromkeys(EVENT_STATUSES, 0)
    for status, count in connection.execute("SELECT status, n FROM inbox_counts"):
        counts[status] = count
    oldest = connection.execute(OLDEST_PENDING).fetchone()
    return InboxStats(by_status=counts, oldest_pending_received_at=parse_optional_ts(oldest[0]))


def probe_write(connection: sqlite3.Connection, size: int) -> None:
    """Write `size` bytes and delete them again, in the caller's transaction: committing it
    takes new pages and WAL space as storing an event would."""
    connection.execute("INSERT INTO write_probe (payload) VALUES (zeroblob(?))", (size,))
    connection.execute("DELETE FROM write_probe")
