"""The inbox on PostgreSQL: dedupe by constraint, SKIP LOCKED claims, leases, dead letters.

Statements run on autocommit connections; those that must be one unit with others open their
own transaction. SQL text is fixed; every value is a parameter.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime

import psycopg

from engine.errors import StorageError, UnstorableEventError
from engine.storage import checks, records, values
from engine.storage.postgres import timeline
from engine.storage.postgres.batch import Batcher
from engine.storage.postgres.database import PostgresDatabase, PostgresPart
from engine.storage.postgres.outcomes import upsert as upsert_outcome
from engine.storage.postgres.rows import (
    EVENT_COLUMNS,
    EVENT_FIELDS,
    NOW,
    PENDING,
    Conn,
    columns,
    dumps,
    event_from_row,
)
from engine.storage.protocols import Inbox

# When a pending event is due: a new one when it was received, a rescheduled one at its next
# attempt. Claims take the earliest due first (the `inbox_due` index), so events rescheduled
# again and again (a CRM that hangs) queue behind the events that arrived meanwhile instead of
# in front of them.
DUE = "COALESCE(next_attempt_at, received_at)"

# The SET clauses of lease-guarded updates; fixed text, values are always parameters.
_FINISH = (
    "status = %(status)s, last_error = %(error)s, next_attempt_at = NULL,"
    f" lease_owner = NULL, lease_expires_at = NULL, updated_at = {NOW}"
)
_RETRY_LATER = (
    "status = 'failed', last_error = %(error)s, next_attempt_at = %(next)s,"
    f" lease_owner = NULL, lease_expires_at = NULL, updated_at = {NOW}"
)
_EXTEND = f"lease_expires_at = {NOW} + make_interval(secs => %(lease)s)"

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

# Dead events and dead action outcomes, newest first, in DeadLetter's field order.
_DEAD_LETTERS = (
    "SELECT id, event_type, NULL::text, NULL::text, NULL::text, last_error, attempts,"
    " updated_at FROM inbox WHERE status = 'dead'"
    " UNION ALL"
    " SELECT o.event_id, i.event_type, o.rule, o.action_kind, o.target, o.error,"
    " o.attempts, o.updated_at FROM action_outcomes AS o"
    " JOIN inbox AS i ON i.id = o.event_id WHERE o.status = 'dead'"
    " ORDER BY 8 DESC, 1 DESC LIMIT %s"
)


class PostgresInbox(PostgresPart, Inbox):
    """Stores share statements: deliveries that arrive while earlier batches are written go in
    together as the next batch (`Batcher`), one INSERT and one commit. Claims lock due rows
    with SKIP LOCKED, so many workers on many machines never wait for each other."""

    def __init__(self, database: PostgresDatabase) -> None:
        super().__init__(database)
        # Half the pool at most for store batches: reads and worker calls keep the rest.
        self._stores: Batcher[records.NewEvent, records.StoreResult] = Batcher(
            self._store_batch, max(1, database.pool_settings.size // 2))

    async def store(self, event: records.NewEvent) -> records.StoreResult:
        await self._db.ready()
        return await self._stores.submit(event)

    async def _store_batch(
        self, events: list[records.NewEvent]
    ) -> list[records.StoreResult | UnstorableEventError]:
        try:
            async with self._db.connection("store the event") as connection:
                results = await store_many(connection, events)
        except UnstorableEventError:
            raise  # the data, not the database
        except StorageError as error:
            self._db.write_failure = str(error)
            raise
        self._db.write_failure = None
        if any(isinstance(r, records.StoreResult) and not r.duplicate for r in results):
            self._db.wakeups.poke()
        return results

    async def drain(self) -> None:
        """Wait for the store batches already submitted (before the pool closes)."""
        await self._stores.close()

    async def get(self, event_id: int) -> records.InboxEvent | None:
        row = await self._db.row(
            "read the event", f"SELECT {EVENT_COLUMNS} FROM inbox WHERE id = %s", (event_id,))
        return None if row is None else event_from_row(row)

    async def list_events(
        self, *, status: records.EventStatus | None = None, limit: int = 100,
        before_id: int | None = None,
    ) -> list[records.InboxEvent]:
        # Conditions are chosen from fixed fragments so each shape gets its own plan and index.
        conditions = []
        if status is not None:
            conditions.append("status = %(status)s")
        if before_id is not None:
            conditions.append("id < %(before)s")
        where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
        rows = await self._db.rows(
            "list events",
            f"SELECT {EVENT_COLUMNS} FROM inbox{where} ORDER BY id DESC LIMIT %(limit)s",
            {"status": status, "before": before_id, "limit": max(limit, 0)},
        )
        return [event_from_row(row) for row in rows]

    async def browse(
        self, where: records.EventFilter, *, limit: int = 50, before_id: int | None = None,
    ) -> list[records.InboxEvent]:
        async with self._db.connection("browse events") as connection:
            return await timeline.browse(connection, where, limit, before_id)

    async def activity(self, since: datetime) -> list[records.ActivityCount]:
        async with self._db.connection("count recent events") as connection:
            return await timeline.event_activity(connection, since, self._db.now())

    async def claim(
        self, worker_id: str, limit: int, lease_seconds: float
    ) -> list[records.InboxEvent]:
        # Rows another claimer has locked are skipped, not waited for; a row whose lease
        # another claimer committed meanwhile is re-checked against the WHERE (READ COMMITTED
        # re-reads the newest version of a row it locks), so two claimers never lease one.
        if limit <= 0:
            return []
        rows = await self._db.rows("claim events", _CLAIM, {
            "limit": limit, "worker": worker_id, "lease": float(lease_seconds),
            "now": self._db.now()})
        return sorted((event_from_row(row) for row in rows),
                      key=lambda e: (e.next_attempt_at or e.received_at, e.id))

    async def extend_lease(self, event_id: int, worker_id: str, lease_seconds: float) -> bool:
        params = {"lease": float(lease_seconds)}
        return await self._leased("extend the lease", _EXTEND, params, event_id, worker_id)

    async def extend_leases(
        self, event_ids: Sequence[int], worker_id: str, lease_seconds: float
    ) -> set[int]:
        if not event_ids:
            return set()
        rows = await self._db.rows(
            "extend the leases",
            f"UPDATE inbox SET {_EXTEND} WHERE id = ANY(%(ids)s::bigint[])"
            f" AND lease_owner = %(worker)s AND {PENDING} RETURNING id",
            {"lease": float(lease_seconds), "ids": sorted(set(event_ids)), "worker": worker_id,
             "now": self._db.now()})
        return {row[0] for row in rows}

    async def finish(
        self, event_id: int, worker_id: str, status: records.FinalStatus, error: str | None = None,
        *, ordering_keys: Sequence[str] | None = None,
        outcomes: Sequence[records.NewOutcome] = (),
    ) -> bool:
        checks.final_status(status)
        params = {"status": status, "error": values.storable_text(error)}
        then = None if ordering_keys is None else (
            lambda connection: _replace_keys(connection, event_id, ordering_keys))
        cleaned = [values.storable_outcome(outcome) for outcome in outcomes]
        now = self._db.now()

        async def first(connection: Conn) -> None:
            for outcome in cleaned:
                await upsert_outcome(connection, outcome, now)

        return await self._leased("finish the event", _FINISH, params, event_id, worker_id,
                                  then, first if cleaned else None)

    async def finish_many(self, worker_id: str, finishes: Sequence[records.Finish]
                          ) -> list[bool]:
        """`finish` for each, in one transaction: all or none."""
        for finish in finishes:
            checks.final_status(finish.status)
        cleaned = [[values.storable_outcome(outcome) for outcome in finish.outcomes]
                   for finish in finishes]
        now = self._db.now()
        query = (f"UPDATE inbox SET {_FINISH}"
                 f" WHERE id = %(id)s AND lease_owner = %(worker)s AND {PENDING}")
        done: list[bool] = []
        async with self._db.connection("finish the events") as connection, \
                connection.transaction():
            for finish, outcomes in zip(finishes, cleaned, strict=True):
                for outcome in outcomes:  # what the CRM answered, leased or not
                    await upsert_outcome(connection, outcome, now)
                changed = (await connection.execute(query, {
                    "status": finish.status, "error": values.storable_text(finish.error),
                    "id": finish.event_id, "worker": worker_id, "now": now})).rowcount == 1
                if changed and finish.ordering_keys is not None:
                    await _replace_keys(connection, finish.event_id, finish.ordering_keys)
                done.append(changed)
        return done

    async def retry_later(
        self, event_id: int, worker_id: str, next_attempt_at: datetime, error: str | None
    ) -> bool:
        params = {"error": values.storable_text(error), "next": next_attempt_at}
        return await self._leased("schedule the retry", _RETRY_LATER, params, event_id,
                                  worker_id)

    async def _leased(self, doing: str, assignments: str, params: Mapping[str, object],
                      event_id: int, worker_id: str,
                      then: Callable[[Conn], Awaitable[None]] | None = None,
                      first: Callable[[Conn], Awaitable[None]] | None = None) -> bool:
        """Apply one of the SET clauses above only while `worker_id` holds the lease, and then
        `then` in the same transaction when it did; `first`, in the same transaction, either
        way."""
        query = (f"UPDATE inbox SET {assignments}"
                 f" WHERE id = %(id)s AND lease_owner = %(worker)s AND {PENDING}")
        bound = {**params, "id": event_id, "worker": worker_id, "now": self._db.now()}
        if then is None and first is None:
            return await self._db.execute(doing, query, bound) == 1
        async with self._db.connection(doing) as connection, connection.transaction():
            if first is not None:
                await first(connection)
            changed = (await connection.execute(query, bound)).rowcount == 1
            if changed and then is not None:
                await then(connection)
            return changed

    async def set_ordering_keys(self, event_id: int, keys: Sequence[str]) -> None:
        async with self._db.connection("record ordering keys") as connection, \
                connection.transaction():
            await _replace_keys(connection, event_id, keys)

    async def set_ordering_keys_many(self, keys: Mapping[int, Sequence[str]]) -> None:
        if not keys:
            return
        ids = sorted(keys)
        pairs = [(event_id, key) for event_id in ids for key in sorted(set(keys[event_id]))]
        async with self._db.connection("record ordering keys") as connection, \
                connection.transaction():
            await connection.execute(
                "DELETE FROM inbox_ordering_keys WHERE event_id = ANY(%s::bigint[])", (ids,))
            if pairs:
                await connection.execute(
                    "INSERT INTO inbox_ordering_keys (event_id, ordering_key)"
                    " SELECT * FROM unnest(%s::bigint[], %s::text[]) ON CONFLICT DO NOTHING",
                    ([event_id for event_id, _ in pairs], [key for _, key in pairs]))
            await connection.execute(
                "UPDATE inbox SET ordering_recorded = true"
                " WHERE id = ANY(%s::bigint[]) AND NOT ordering_recorded", (ids,))

    async def earlier_pending(
        self, event_id: int, keys: Sequence[str]
    ) -> tuple[list[int], list[int]]:
        return (await self.earlier_pending_many({event_id: keys}))[event_id]

    async def earlier_pending_many(
        self, wanted: Mapping[int, Sequence[str]]
    ) -> dict[int, tuple[list[int], list[int]]]:
        # One round trip; each half reads its own index, so a long backlog of events waiting
        # for a retry is not scanned on every check. The unplanned half is read once, up to
        # the latest event asked about.
        pairs = [(event_id, key) for event_id, keys in wanted.items() for key in set(keys)]
        found: dict[int, tuple[list[int], list[int]]] = {event_id: ([], [])
                                                         for event_id in wanted}
        if not pairs:
            return found
        rows = await self._db.rows(
            "check earlier events",
            "SELECT DISTINCT w.id, k.event_id, true FROM"
            " unnest(%(ids)s::bigint[], %(keys)s::text[]) AS w (id, key)"
            " JOIN inbox_ordering_keys AS k ON k.ordering_key = w.key AND k.event_id < w.id"
            f" JOIN inbox AS i ON i.id = k.event_id AND i.{PENDING}"
            " UNION ALL"
            f" SELECT NULL, id, false FROM inbox WHERE id < %(latest)s AND {PENDING}"
            " AND NOT ordering_recorded ORDER BY 2",
            {"ids": [event_id for event_id, _ in pairs], "keys": [key for _, key in pairs],
             "latest": max(event_id for event_id, _ in pairs)},
        )
        unplanned = [other for _, other, shared in rows if not shared]
        for event_id, other, shared in rows:
            if shared:
                found[event_id][0].append(other)
        for event_id, (_, waiting) in found.items():
            if wanted[event_id]:
                waiting.extend(other for other in unplanned if other < event_id)
        return found

    async def dead_letters(self, limit: int = 100) -> list[records.DeadLetter]:
        rows = await self._db.rows("list dead letters", _DEAD_LETTERS, (max(limit, 0),))
        return [records.from_row(records.DeadLetter, row) for row in rows]

    async def requeue(self, event_id: int, rules_version: str | None = None) -> bool:
        if rules_version is not None:
            checks.rule_version_id(rules_version)
        async with self._db.connection("requeue the event") as connection, \
                connection.transaction():
            requeued = await _requeue(connection, event_id, self._db.now(), rules_version)
        if requeued:
            self._db.wakeups.poke()
        return requeued

    async def requeue_dead(self, rules_version: str | None = None) -> list[int]:
        if rules_version is not None:
            checks.rule_version_id(rules_version)
        now = self._db.now()
        async with self._db.connection("requeue dead letters") as connection, \
                connection.transaction():
            cursor = await connection.execute(
                "SELECT id FROM inbox WHERE status = 'dead'"
                " UNION SELECT event_id FROM action_outcomes WHERE status = 'dead' ORDER BY 1"
            )
            dead = [row[0] for row in await cursor.fetchall()]
            ids = [event_id for event_id in dead
                   if await _requeue(connection, event_id, now, rules_version)]
        if ids:
            self._db.wakeups.poke()
        return ids

    async def purge_raw_bodies(self, older_than: datetime) -> int:
        return await self._db.execute(
            "purge raw bodies",
            "UPDATE inbox SET body = NULL WHERE body IS NOT NULL AND received_at < %s"
            " AND status IN ('processed', 'ignored')",
            (older_than,),
        )

    async def stats(self) -> records.InboxStats:
        # The counts are kept by triggers (migration 2), in shards summed here; the oldest
        # pending event (first in arrival order) is read from the (status, id) index.
        counts: dict[str, int] = dict.fromkeys(records.EVENT_STATUSES, 0)
        async with self._db.connection("count the inbox") as connection:
            cursor = await connection.execute(
                "SELECT status, SUM(n)::bigint FROM inbox_counts GROUP BY status")
            counts.update((status, int(n)) for status, n in await cursor.fetchall())
            cursor = await connection.execute(
                "SELECT LEAST("
                "(SELECT received_at FROM inbox WHERE status = 'received' ORDER BY id LIMIT 1),"
                " (SELECT received_at FROM inbox WHERE status = 'failed' ORDER BY id LIMIT 1))")
            oldest = await cursor.fetchone()
        return records.InboxStats(counts, oldest[0] if oldest else None)


async def _replace_keys(connection: Conn, event_id: int, keys: Sequence[str]) -> None:
    await connection.execute("DELETE FROM inbox_ordering_keys WHERE event_id = %s", (event_id,))
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


async def _requeue(connection: Conn, event_id: int, now: datetime | None,
                   rules_version: str | None) -> bool:
    """Pending again, attempts reset, dead outcomes retrying, ordering keys to be recorded
    again (later events wait for its plan), pinned to `rules_version` (None: unpinned); not
    while a worker holds a live lease (it would
    finish and overwrite the requeue) and not once the raw body is gone. The caller holds a
    transaction."""
    cursor = await connection.execute(
        "UPDATE inbox SET status = 'received', attempts = 0, last_error = NULL,"
        f" next_attempt_at = NULL, lease_owner = NULL, lease_expires_at = NULL, updated_at = {NOW},"
        " ordering_recorded = false, rules_version = %(rules_version)s"
        " WHERE id = %(id)s AND body IS NOT NULL"
        f" AND (lease_owner IS NULL OR lease_expires_at <= {NOW})",
        {"id": event_id, "now": now, "rules_version": rules_version},
    )
    if cursor.rowcount != 1:
        return False
    await connection.execute(
        "UPDATE action_outcomes SET status = 'retrying', attempts = 0, next_attempt_at = NULL,"
        f" updated_at = {NOW} WHERE event_id = %(id)s AND status = 'dead'",
        {"id": event_id, "now": now},
    )
    return True


# -- storing: many events, one statement ------------------------------------------------------

# One statement for a whole batch: the same text whatever its size, so it is prepared once.
# WITH ORDINALITY keeps ids in the order the deliveries arrived. The arrays go in binary (%b):
# psycopg quotes a text-format array element by element in Python, 14 us per event here, a
# fifth of the receiver's event loop on PostgreSQL; binary takes a tenth of that.
_INSERT_MANY = (
    "INSERT INTO inbox (dedupe_prefix, dedupe_key, source, event_type, event_timestamp,"
    " received_at, headers, body, updated_at)"
    " SELECT e.prefix, e.key, e.source, e.type, e.stamp, e.received, e.headers::json, e.body,"
    " e.received"
    " FROM unnest(%(prefixes)b::text[], %(keys)b::text[], %(sources)b::text[],"
    " %(types)b::text[], %(stamps)b::text[], %(received)b::timestamptz[], %(headers)b::text[],"
    " %(bodies)b::bytea[])"
    " WITH ORDINALITY AS e (prefix, key, source, type, stamp, received, headers, body, n)"
    " ORDER BY e.n"
    " ON CONFLICT ON CONSTRAINT inbox_dedupe DO NOTHING RETURNING id, dedupe_prefix, dedupe_key"
)

# The rows of the (prefix, key) pairs given, through the unique index.
_FIND = (
    "SELECT i.dedupe_prefix, i.dedupe_key, i.id FROM inbox AS i"
    " JOIN unnest(%s::text[], %s::text[]) AS k (prefix, key)"
    " ON i.dedupe_prefix = k.prefix AND i.dedupe_key = k.key"
)

MAX_BATCH = 500


async def store_many(
    connection: Conn, events: Sequence[records.NewEvent]
) -> list[records.StoreResult | UnstorableEventError]:
    """Insert a batch with one autocommit statement per MAX_BATCH events: committed (and
    flushed) when it returns. The unique constraint decides what is new: a key another
    transaction is inserting makes this one wait for it, so exactly one of concurrent identical
    deliveries is new, whichever receiver got it; of identical copies within one batch, the
    first is.

    An event that can never be stored gets its UnstorableEventError in its place and the others
    go in. When the database refuses the data of the batch anyway (psycopg's DataError, a value
    it cannot encode), this raises UnstorableEventError, and the batcher stores the events one
    by one to find the bad one.
    """
    refused = [records.unstorable(event) for event in events]
    storable = [event for event, error in zip(events, refused, strict=True) if error is None]
    stored: list[records.StoreResult] = []
    try:
        for start in range(0, len(storable), MAX_BATCH):
            stored += await _store_chunk(connection, storable[start:start + MAX_BATCH])
    except (psycopg.DataError, ValueError, TypeError, OverflowError) as error:
        raise UnstorableEventError(
            f"the event cannot be stored: {records.describe(error)}") from None
    results = iter(stored)
    return [next(results) if error is None else error for error in refused]


async def _store_chunk(
    connection: Conn, events: Sequence[records.NewEvent]
) -> list[records.StoreResult]:
    new: dict[tuple[str, str], int] = {}
    known: dict[tuple[str, str], int] = {}
    keys = [(values.nul_free(e.dedupe_prefix), e.dedupe_key) for e in events]
    pending = list(zip(keys, events, strict=True))
    for _ in range(3):
        params = {
            "prefixes": [key[0] for key, _ in pending],
            "keys": [e.dedupe_key for _, e in pending],
            "sources": [values.nul_free(e.source) for _, e in pending],
            "types": [values.nul_free(e.event_type) for _, e in pending],
            "stamps": [values.nul_free(e.event_timestamp) for _, e in pending],
            "received": [e.received_at for _, e in pending],
            "headers": [dumps(dict(e.headers)) for _, e in pending],
            "bodies": [e.body for _, e in pending],
        }
        cursor = await connection.execute(_INSERT_MANY, params)
        new.update({(prefix, key): event_id
                    for event_id, prefix, key in await cursor.fetchall()})
        missing = sorted({key for key, _ in pending} - new.keys() - known.keys())
        if not missing:
            break
        # A second statement, not a CTE: a CTE would read with the snapshot taken before the
        # INSERT waited, and miss rows the other transactions just committed.
        cursor = await connection.execute(
            _FIND, ([prefix for prefix, _ in missing], [key for _, key in missing]))
        known.update({(prefix, key): event_id
                      for prefix, key, event_id in await cursor.fetchall()})
        # Still missing: the other insert rolled back; try those again.
        pending = [(key, e) for key, e in pending if key not in new and key not in known]
        if not pending:
            break
    else:
        raise RuntimeError("a dedupe key conflicted but its row could not be read")
    results: list[records.StoreResult] = []
    first: set[tuple[str, str]] = set()
    for key in keys:
        if key in new and key not in first:
            first.add(key)  # later identical copies in this batch are its duplicates
            results.append(records.StoreResult(id=new[key], duplicate=False))
        else:
            results.append(records.StoreResult(id=new.get(key) or known[key], duplicate=True))
    return results
