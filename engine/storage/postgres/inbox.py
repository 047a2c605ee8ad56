"""Inbox operations on PostgreSQL: dedupe by constraint, SKIP LOCKED claims, leases, dead letters.

Functions take a connection in autocommit mode; those that need several statements to be one
unit open their own transaction. SQL text is fixed; every value is a parameter.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import datetime

import psycopg

from engine.errors import UnstorableEventError
from engine.storage.postgres.rows import (
    EVENT_COLUMNS,
    EVENT_FIELDS,
    NOW,
    PENDING,
    Conn,
    clean,
    columns,
    dumps,
    event_from_row,
)
from engine.storage.records import (
    EVENT_STATUSES,
    DeadLetter,
    EventStatus,
    InboxEvent,
    InboxStats,
    NewEvent,
    StoreResult,
    describe,
    unstorable,
)

# One statement for a whole batch: the same text whatever its size, so it is prepared once.
# WITH ORDINALITY keeps ids in the order the deliveries arrived.
_INSERT_MANY = (
    "INSERT INTO inbox (dedupe_key, source, event_type, event_timestamp, received_at, headers,"
    " body, updated_at)"
    " SELECT e.key, e.source, e.type, e.stamp, e.received, e.headers::json, e.body, e.received"
    " FROM unnest(%(keys)s::text[], %(sources)s::text[], %(types)s::text[], %(stamps)s::text[],"
    " %(received)s::timestamptz[], %(headers)s::text[], %(bodies)s::bytea[])"
    " WITH ORDINALITY AS e (key, source, type, stamp, received, headers, body, n)"
    " ORDER BY e.n"
    " ON CONFLICT ON CONSTRAINT inbox_dedupe_key DO NOTHING RETURNING id, dedupe_key"
)

MAX_BATCH = 500


async def store_many(
    connection: Conn, events: Sequence[NewEvent]
) -> list[StoreResult | UnstorableEventError]:
    """Insert a batch with one autocommit statement per MAX_BATCH events: committed (and
    flushed) when it returns. The unique constraint decides what is new: a key another
    transaction is inserting makes this one wait for it, so exactly one of concurrent identical
    deliveries is new, whichever receiver got it; of identical copies within one batch, the
    first is.

    An event that can never be stored gets its UnstorableEventError in its place and the others
    go in. When the database refuses the data of the batch anyway (psycopg's DataError, a value
    it cannot encode), this raises UnstorableEventError, and the caller stores the events one by
    one to find the bad one.
    """
    refused = [unstorable(event) for event in events]
    storable = [event for event, error in zip(events, refused, strict=True) if error is None]
    stored: list[StoreResult] = []
    try:
        for start in range(0, len(storable), MAX_BATCH):
            stored += await _store_chunk(connection, storable[start:start + MAX_BATCH])
    except (psycopg.DataError, ValueError, TypeError, OverflowError) as error:
        raise UnstorableEventError(f"the event cannot be stored: {describe(error)}") from None
    results = iter(stored)
    return [next(results) if error is None else error for error in refused]


async def _store_chunk(connection: Conn, events: Sequence[NewEvent]) -> list[StoreResult]:
    new: dict[str, int] = {}
    known: dict[str, int] = {}
    pending = list(events)
    for _ in range(3):
        params = {
            "keys": [e.dedupe_key for e in pending],
            "sources": [clean(e.source) for e in pending],
            "types": [clean(e.event_type) for e in pending],
            "stamps": [clean(e.event_timestamp) for e in pending],
            "received": [e.received_at for e in pending],
            "headers": [dumps(dict(e.headers)) for e in pending],
            "bodies": [e.body for e in pending],
        }
        cursor = await connection.execute(_INSERT_MANY, params)
        new.update({key: event_id for event_id, key in await cursor.fetchall()})
        missing = sorted({e.dedupe_key for e in pending} - new.keys() - known.keys())
        if not missing:
            break
        # A second statement, not a CTE: a CTE would read with the snapshot taken before the
        # INSERT waited, and miss rows the other transactions just committed.
        cursor = await connection.execute(
            "SELECT dedupe_key, id FROM inbox WHERE dedupe_key = ANY(%s)", (missing,))
        known.update(dict(await cursor.fetchall()))
        # Still missing: the other insert rolled back; try those again.
        pending = [e for e in pending if e.dedupe_key not in new and e.dedupe_key not in known]
        if not pending:
            break
    else:
        raise RuntimeError("a dedupe key conflicted but its row could not be read")
    results: list[StoreResult] = []
    first: set[str] = set()
    for event in events:
        key = event.dedupe_key
        if key in new and key not in first:
            first.add(key)  # later identical copies in this batch are its duplicates
            results.append(StoreResult(id=new[key], duplicate=False))
        else:
            results.append(StoreResult(id=new.get(key) or known[key], duplicate=True))
    return results


async def get(connection: Conn, event_id: int) -> InboxEvent | None:
    row = await (await connection.execute(
        f"SELECT {EVENT_COLUMNS} FROM inbox WHERE id = %s", (event_id,))).fetchone()
    return None if row is None else event_from_row(row)


async def list_events(
    connection: Conn, status: EventStatus | None, limit: int, before_id: int | None
) -> list[InboxEvent]:
    # Conditions are chosen from fixed fragments so each shape gets its own plan and index.
    conditions = []
    if status is not None:
        conditions.append("status = %(status)s")
    if before_id is not None:
        conditions.append("id < %(before)s")
    where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
    cursor = await connection.execute(
        f"SELECT {EVENT_COLUMNS} FROM inbox{where} ORDER BY id DESC LIMIT %(limit)s",
        {"status": status, "before": before_id, "limit": max(limit, 0)},
    )
    return [event_from_row(row) for row in await cursor.fetchall()]


# When a pending event is due: a new one when it was received, a rescheduled one at its next
# attempt. Claims take the earliest due first (the `inbox_due` index), so events rescheduled
# again and again (a CRM that hangs) queue behind the events that arrived meanwhile instead of
# in front of them.
DUE = "COALESCE(next_attempt_at, received_at)"

_CLAIM = (
    "WITH due AS ("
    f" SELECT id FROM inbox WHERE {PENDING}"
    f" AND (next_attempt_at IS NULL OR next_attempt_at <= {NOW})"
    f" AND (lease_expires_at IS NULL OR lease_expires_at <= {NOW})"
    f" ORDER BY {DUE}, id LIMIT %(limit)s FOR UPDATE SKIP LOCKED)"
    " UPDATE inbox AS i SET lease_owner = %(worker)s,"
    f" lease_expires_at = {NOW} + make_interval(secs => %(lease)s),"
    f" attempts = i.attempts + 1, updated_at = {NOW}"
    f" FROM due WHERE i.id = due.id RETURNING {columns('i', EVENT_FIELDS)}"
)


async def claim(
    connection: Conn, worker_id: str, limit: int, lease_seconds: float, now: datetime | None
) -> list[InboxEvent]:
    """Rows another claimer has locked are skipped, not waited for; a row whose lease another
    claimer committed meanwhile is re-checked against the WHERE (READ COMMITTED re-reads the
    newest version of a row it locks), so two claimers never lease one event."""
    if limit <= 0:
        return []
    cursor = await connection.execute(_CLAIM, {
        "limit": limit, "worker": worker_id, "lease": float(lease_seconds), "now": now})
    return sorted((event_from_row(row) for row in await cursor.fetchall()),
                  key=lambda e: (e.next_attempt_at or e.received_at, e.id))


# The SET clauses of lease-guarded updates; fixed text, values are always parameters.
FINISH = (
    "status = %(status)s, last_error = %(error)s, next_attempt_at = NULL,"
    f" lease_owner = NULL, lease_expires_at = NULL, updated_at = {NOW}"
)
RETRY_LATER = (
    "status = 'failed', last_error = %(error)s, next_attempt_at = %(next)s,"
    f" lease_owner = NULL, lease_expires_at = NULL, updated_at = {NOW}"
)
EXTEND = f"lease_expires_at = {NOW} + make_interval(secs => %(lease)s)"


async def update_leased(
    connection: Conn, assignments: str, params: dict[str, object], event_id: int, worker_id: str
) -> bool:
    """Apply one of the SET clauses above only while `worker_id` holds the event's lease."""
    cursor = await connection.execute(
        f"UPDATE inbox SET {assignments}"
        f" WHERE id = %(id)s AND lease_owner = %(worker)s AND {PENDING}",
        {**params, "id": event_id, "worker": worker_id},
    )
    return cursor.rowcount == 1


async def set_ordering_keys(connection: Conn, event_id: int, keys: Sequence[str]) -> None:
    async with connection.transaction():
        await connection.execute(
            "DELETE FROM inbox_ordering_keys WHERE event_id = %s", (event_id,))
        if keys:
            await connection.execute(
                "INSERT INTO inbox_ordering_keys (event_id, ordering_key)"
                " SELECT %s, unnest(%s::text[]) ON CONFLICT DO NOTHING",
                (event_id, sorted(set(keys))),
            )
        await connection.execute(
            "UPDATE inbox SET ordering_recorded = true WHERE id = %s AND NOT ordering_recorded",
            (event_id,),
        )


async def earlier_unfinished(
    connection: Conn, event_id: int, keys: Sequence[str]
) -> tuple[list[int], list[int]]:
    """(earlier pending events sharing a key, earlier pending events whose keys are not
    recorded yet). Each half reads its own index: a long backlog of events waiting for a retry
    is not scanned on every check."""
    cursor = await connection.execute(
        "SELECT k.event_id, true FROM inbox_ordering_keys AS k"
        " JOIN inbox AS i ON i.id = k.event_id"
        f" WHERE k.ordering_key = ANY(%(keys)s::text[]) AND k.event_id < %(id)s AND i.{PENDING}"
        " UNION"
        f" SELECT id, false FROM inbox WHERE id < %(id)s AND {PENDING} AND NOT ordering_recorded"
        " ORDER BY 1",
        {"keys": sorted(set(keys)), "id": event_id},
    )
    shared: list[int] = []
    unplanned: list[int] = []
    for found, is_shared in await cursor.fetchall():
        (shared if is_shared else unplanned).append(found)
    return shared, unplanned


async def dead_letters(connection: Conn, limit: int) -> list[DeadLetter]:
    cursor = await connection.execute(
        "SELECT id, event_type, NULL, NULL, NULL, last_error, attempts, updated_at"
        " FROM inbox WHERE status = 'dead'"
        " UNION ALL"
        " SELECT o.event_id, i.event_type, o.rule, o.action_kind, o.target, o.error,"
        " o.attempts, o.updated_at FROM action_outcomes AS o"
        " JOIN inbox AS i ON i.id = o.event_id WHERE o.status = 'dead'"
        " ORDER BY 8 DESC, 1 DESC LIMIT %s",
        (max(limit, 0),),
    )
    return [
        DeadLetter(
            event_id=row[0], event_type=row[1], rule=row[2], action_kind=row[3],
            target=row[4], error=row[5], attempts=row[6], updated_at=row[7],
        )
        for row in await cursor.fetchall()
    ]


async def _requeue_in(connection: Conn, event_id: int, now: datetime | None) -> bool:
    cursor = await connection.execute(
        "UPDATE inbox SET status = 'received', attempts = 0, last_error = NULL,"
        f" next_attempt_at = NULL, lease_owner = NULL, lease_expires_at = NULL, updated_at = {NOW},"
        " ordering_recorded = false"
        " WHERE id = %(id)s AND body IS NOT NULL"
        f" AND (lease_owner IS NULL OR lease_expires_at <= {NOW})",
        {"id": event_id, "now": now},
    )
    if cursor.rowcount != 1:
        return False
    await connection.execute(
        "UPDATE action_outcomes SET status = 'retrying', attempts = 0, next_attempt_at = NULL,"
        f" updated_at = {NOW} WHERE event_id = %(id)s AND status = 'dead'",
        {"id": event_id, "now": now},
    )
    return True


async def requeue(connection: Conn, event_id: int, now: datetime | None) -> bool:
    """Pending again, attempts reset, dead outcomes retrying, ordering keys to be recorded
    again (later events wait for its plan); not while a worker holds a live lease (it would
    finish and overwrite the requeue) and not once the raw body is gone."""
    async with connection.transaction():
        return await _requeue_in(connection, event_id, now)


async def requeue_dead(connection: Conn, now: datetime | None) -> list[int]:
    async with connection.transaction():
        cursor = await connection.execute(
            "SELECT id FROM inbox WHERE status = 'dead'"
            " UNION SELECT event_id FROM action_outcomes WHERE status = 'dead' ORDER BY 1"
        )
        ids = [row[0] for row in await cursor.fetchall()]
        return [event_id for event_id in ids if await _requeue_in(connection, event_id, now)]


async def purge_raw_bodies(connection: Conn, cutoff: datetime) -> int:
    cursor = await connection.execute(
        "UPDATE inbox SET body = NULL WHERE body IS NOT NULL AND received_at < %s"
        " AND status IN ('processed', 'ignored')",
        (cutoff,),
    )
    return cursor.rowcount


async def stats(connection: Conn) -> InboxStats:
    """Constant time in the inbox size: the counts are kept by triggers (migration 2), and the
    oldest pending event (first in arrival order) is read from the (status, id) index."""
    counts: dict[str, int] = dict.fromkeys(EVENT_STATUSES, 0)
    cursor = await connection.execute(
        "SELECT status, SUM(n)::bigint FROM inbox_counts GROUP BY status")
    for status, count in await cursor.fetchall():
        counts[status] = int(count)
    cursor = await connection.execute(
        "SELECT LEAST("
        "(SELECT received_at FROM inbox WHERE status = 'received' ORDER BY id LIMIT 1),"
        " (SELECT received_at FROM inbox WHERE status = 'failed' ORDER BY id LIMIT 1))")
    oldest = await cursor.fetchone()
    return InboxStats(by_status=counts, oldest_pending_received_at=oldest[0] if oldest else None)


async def probe_write(connection: Conn, size: int) -> None:
    """Write `size` bytes and delete them again in one committed transaction: the commit
    takes WAL and table space as storing an event would."""
    async with connection.transaction():
        await connection.execute(
            "INSERT INTO write_probe (payload) VALUES (%s)", (os.urandom(size),))
        await connection.execute("DELETE FROM write_probe")
