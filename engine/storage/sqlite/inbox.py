"""The inbox on SQLite: store with dedupe, leases, retries, ordering, dead letters, purge, stats.

Writes run inside the group-commit writer's shared transaction (each in its own savepoint);
reads in one snapshot. SQL text is fixed; every value is a parameter.
"""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta

from engine.errors import StorageError, UnstorableEventError
from engine.storage import checks, records, values
from engine.storage.protocols import Inbox
from engine.storage.sqlite import timeline
from engine.storage.sqlite.database import SQLitePart
from engine.storage.sqlite.groupcommit import OneStatement, fails_one_job, storage_error
from engine.storage.sqlite.outcomes import writing_many
from engine.storage.sqlite.rows import (
    EVENT_COLUMNS,
    dumps,
    event_from_row,
    insert_rows,
    parse_optional_ts,
    parse_ts,
    placeholders,
    ts,
)

PENDING = "status IN ('received', 'failed')"
_IN_LIST = 500  # ids per IN list: well under SQLite's parameter limit

# The SET clauses of lease-guarded updates; fixed text, values are always parameters.
_FINISH = (
    "status = ?, last_error = ?, next_attempt_at = NULL,"
    " lease_owner = NULL, lease_expires_at = NULL, updated_at = ?"
)
_RETRY_LATER = (
    "status = 'failed', last_error = ?, next_attempt_at = ?,"
    " lease_owner = NULL, lease_expires_at = NULL, updated_at = ?"
)
_EXTEND = "lease_expires_at = ?"

# When a pending event is due: a new one when it was received, a rescheduled one at its next
# attempt. Claims take the earliest due first (the `inbox_due` index), so events rescheduled
# again and again (a CRM that hangs) queue behind the events that arrived meanwhile instead of
# in front of them.
DUE = "COALESCE(next_attempt_at, received_at)"

# Dead events and dead action outcomes, newest first.
_DEAD_LETTERS = (
    "SELECT id AS event_id, event_type, NULL AS rule, NULL AS action_kind, NULL AS target,"
    " last_error AS error, attempts, updated_at FROM inbox WHERE status = 'dead'"
    " UNION ALL"
    " SELECT o.event_id, i.event_type, o.rule, o.action_kind, o.target, o.error,"
    " o.attempts, o.updated_at FROM action_outcomes AS o"
    " JOIN inbox AS i ON i.id = o.event_id WHERE o.status = 'dead'"
    " ORDER BY updated_at DESC, event_id DESC LIMIT ?"
)

# The first pending event in arrival order of each pending status: two index lookups.
_OLDEST_PENDING = (
    "SELECT MIN(r) FROM ("
    "SELECT (SELECT received_at FROM inbox WHERE status = 'received' ORDER BY id LIMIT 1) AS r"
    " UNION ALL"
    " SELECT (SELECT received_at FROM inbox WHERE status = 'failed' ORDER BY id LIMIT 1))"
)


class SQLiteInbox(SQLitePart, Inbox):
    """Stores are bulk jobs of the group-commit writer: every event queued for the next commit
    goes in with one INSERT. Claims read the due index and lease row by row; nothing else
    writes meanwhile, since the writer holds SQLite's write lock."""

    async def store(self, event: records.NewEvent) -> records.StoreResult:
        try:
            result: records.StoreResult = await self._db.writer.run_bulk(STORE, event)
        except StorageError:
            raise
        except Exception as error:
            if not fails_one_job(error):
                if isinstance(error, sqlite3.Error):
                    raise storage_error(error, "store the event") from None
                raise
            # The writer ran this event alone and it failed on its own data: it always will.
            raise UnstorableEventError(
                f"the event cannot be stored: {records.describe(error)}") from None
        return result

    async def get(self, event_id: int) -> records.InboxEvent | None:
        return await self._db.row("read the event",
                                  f"SELECT {EVENT_COLUMNS} FROM inbox WHERE id = ?", (event_id,),
                                  event_from_row)

    async def list_events(
        self, *, status: records.EventStatus | None = None, limit: int = 100,
        before_id: int | None = None,
    ) -> list[records.InboxEvent]:
        return await self._db.rows(
            "list events",
            f"SELECT {EVENT_COLUMNS} FROM inbox"
            " WHERE (? IS NULL OR status = ?) AND (? IS NULL OR id < ?)"
            " ORDER BY id DESC LIMIT ?",
            (status, status, before_id, before_id, limit), event_from_row)

    async def browse(
        self, where: records.EventFilter, *, limit: int = 50, before_id: int | None = None,
    ) -> list[records.InboxEvent]:
        return await self._db.read(
            lambda c: timeline.browse(c, where, limit, before_id), "browse events")

    async def activity(self, since: datetime) -> list[records.ActivityCount]:
        now = self._db.clock()
        return await self._db.read(
            lambda c: timeline.event_activity(c, since, now, self._minute_starts),
            "count recent events")

    @functools.cached_property
    def _minute_starts(self) -> timeline.MinuteStarts:
        return timeline.MinuteStarts()

    async def claim(
        self, worker_id: str, limit: int, lease_seconds: float
    ) -> list[records.InboxEvent]:
        moment = self._db.clock()
        now, expires = ts(moment), ts(moment + timedelta(seconds=lease_seconds))

        def run(connection: sqlite3.Connection) -> list[records.InboxEvent]:
            # INDEXED BY: without ANALYZE statistics SQLite would read every pending row
            # through `inbox_status` and sort them; the due index stops at `limit` rows.
            due = connection.execute(
                f"SELECT id FROM inbox INDEXED BY inbox_due WHERE {PENDING}"
                " AND (next_attempt_at IS NULL OR next_attempt_at <= ?)"
                " AND (lease_expires_at IS NULL OR lease_expires_at <= ?)"
                f" ORDER BY {DUE}, id LIMIT ?",
                (now, now, max(limit, 0)),
            ).fetchall()
            ids = [event_id for (event_id,) in due]
            leased: dict[int, sqlite3.Row] = {}
            for start in range(0, len(ids), _IN_LIST):  # one statement per chunk, not per row
                chunk = ids[start:start + _IN_LIST]
                leased.update((row["id"], row) for row in connection.execute(
                    "UPDATE inbox SET lease_owner = ?, lease_expires_at = ?,"
                    " attempts = attempts + 1, updated_at = ?"
                    f" WHERE id IN ({placeholders(len(chunk))}) RETURNING {EVENT_COLUMNS}",
                    (worker_id, expires, now, *chunk)))
            return [event_from_row(leased[event_id]) for event_id in ids]  # in due order

        return await self._db.write(run, "claim events")

    async def extend_lease(self, event_id: int, worker_id: str, lease_seconds: float) -> bool:
        expires = ts(self._db.clock() + timedelta(seconds=lease_seconds))
        return await self._leased("extend the lease", _EXTEND, (expires,), event_id, worker_id)

    async def extend_leases(
        self, event_ids: Sequence[int], worker_id: str, lease_seconds: float
    ) -> set[int]:
        expires = ts(self._db.clock() + timedelta(seconds=lease_seconds))
        unique = sorted(set(event_ids))

        def run(connection: sqlite3.Connection) -> set[int]:
            kept: set[int] = set()
            for start in range(0, len(unique), 500):  # well under SQLite's parameter limit
                chunk = unique[start:start + 500]
                kept.update(row[0] for row in connection.execute(
                    f"UPDATE inbox SET {_EXTEND} WHERE id IN ({placeholders(len(chunk))})"
                    f" AND lease_owner = ? AND {PENDING} RETURNING id",
                    (expires, *chunk, worker_id)))
            return kept

        return await self._db.write(run, "extend the leases")

    async def finish(
        self, event_id: int, worker_id: str, status: records.FinalStatus, error: str | None = None,
        *, ordering_keys: Sequence[str] | None = None,
        outcomes: Sequence[records.NewOutcome] = (),
    ) -> bool:
        [finished] = await self.finish_many(worker_id, [records.Finish(
            event_id, status, error, ordering_keys=ordering_keys, outcomes=outcomes)])
        return finished

    async def finish_many(self, worker_id: str, finishes: Sequence[records.Finish]
                          ) -> list[bool]:
        for finish in finishes:
            checks.final_status(finish.status)
        now = self._db.now()
        outcomes = writing_many([o for finish in finishes for o in finish.outcomes], now)
        updates = [(finish.event_id, (finish.status, values.storable_text(finish.error), now))
                   for finish in finishes]

        def run(connection: sqlite3.Connection) -> list[bool]:
            outcomes(connection)  # what the CRM answered, leased or not
            done = _finish_leased(connection, worker_id, updates)
            _replace_keys_many(connection, {
                finish.event_id: finish.ordering_keys
                for finish, finished in zip(finishes, done, strict=True)
                if finished and finish.ordering_keys is not None})
            return done

        return await self._db.write(run, "finish the events" if len(finishes) > 1
                                    else "finish the event")

    async def retry_later(
        self, event_id: int, worker_id: str, next_attempt_at: datetime, error: str | None
    ) -> bool:
        params = (values.storable_text(error), ts(next_attempt_at), self._db.now())
        return await self._leased("schedule the retry", _RETRY_LATER, params, event_id,
                                  worker_id)

    async def _leased(self, doing: str, assignments: str, params: tuple[object, ...],
                      event_id: int, worker_id: str) -> bool:
        """Apply one of the SET clauses above only while `worker_id` holds the lease."""
        def run(connection: sqlite3.Connection) -> bool:
            return connection.execute(
                f"UPDATE inbox SET {assignments} WHERE id = ? AND lease_owner = ? AND {PENDING}",
                (*params, event_id, worker_id)).rowcount == 1

        return await self._db.write(run, doing)

    async def set_ordering_keys(self, event_id: int, keys: Sequence[str]) -> None:
        await self._db.write(lambda c: _replace_keys_many(c, {event_id: keys}),
                             "record ordering keys")

    async def set_ordering_keys_many(self, keys: Mapping[int, Sequence[str]]) -> None:
        def run(connection: sqlite3.Connection) -> None:
            _replace_keys_many(connection, keys)

        await self._db.write(run, "record ordering keys")

    async def earlier_pending(
        self, event_id: int, keys: Sequence[str]
    ) -> tuple[list[int], list[int]]:
        return (await self.earlier_pending_many({event_id: keys}))[event_id]

    async def earlier_pending_many(
        self, wanted: Mapping[int, Sequence[str]]
    ) -> dict[int, tuple[list[int], list[int]]]:
        # Each half reads its own index: a long backlog of events waiting for a retry is not
        # scanned on every check. The unplanned half is read once, up to the latest event.
        def run(connection: sqlite3.Connection) -> dict[int, tuple[list[int], list[int]]]:
            asking = {event_id: sorted(set(keys)) for event_id, keys in wanted.items() if keys}
            unplanned: list[int] = []
            if asking:
                unplanned = [row[0] for row in connection.execute(
                    "SELECT id FROM inbox INDEXED BY inbox_unplanned"
                    f" WHERE id < ? AND {PENDING} AND ordering_recorded = 0 ORDER BY id",
                    (max(asking),))]
            found: dict[int, tuple[list[int], list[int]]] = {}
            for event_id in wanted:
                unique = asking.get(event_id)
                if not unique:
                    found[event_id] = ([], [])
                    continue
                shared = connection.execute(
                    "SELECT DISTINCT k.event_id FROM inbox_ordering_keys AS k"
                    " JOIN inbox AS i ON i.id = k.event_id"
                    f" WHERE k.ordering_key IN ({placeholders(len(unique))}) AND k.event_id < ?"
                    f" AND i.{PENDING} ORDER BY k.event_id",
                    (*unique, event_id),
                ).fetchall()
                found[event_id] = ([row[0] for row in shared],
                                   [other for other in unplanned if other < event_id])
            return found

        return await self._db.read(run, "check earlier events")

    async def dead_letters(self, limit: int = 100) -> list[records.DeadLetter]:
        return await self._db.rows("list dead letters", _DEAD_LETTERS, (limit,), _dead_letter)

    async def requeue(self, event_id: int, rules_version: str | None = None) -> bool:
        if rules_version is not None:
            checks.rule_version_id(rules_version)
        now = self._db.now()
        return await self._db.write(lambda c: _requeue(c, event_id, now, rules_version),
                                    "requeue the event")

    async def requeue_dead(self, rules_version: str | None = None) -> list[int]:
        if rules_version is not None:
            checks.rule_version_id(rules_version)
        now = self._db.now()

        def run(connection: sqlite3.Connection) -> list[int]:
            rows = connection.execute(
                "SELECT id FROM inbox WHERE status = 'dead'"
                " UNION SELECT event_id FROM action_outcomes WHERE status = 'dead' ORDER BY 1"
            ).fetchall()
            return [row[0] for row in rows
                    if _requeue(connection, row[0], now, rules_version)]

        return await self._db.write(run, "requeue dead letters")

    async def purge_raw_bodies(self, older_than: datetime) -> int:
        return await self._db.execute(
            "purge raw bodies",
            "UPDATE inbox SET body = NULL WHERE body IS NOT NULL AND received_at < ?"
            " AND status IN ('processed', 'ignored')",
            (ts(older_than),),
        )

    async def stats(self) -> records.InboxStats:
        # The counts are kept by triggers (migration 3); the oldest pending event is read from
        # the (status, id) index.
        def run(connection: sqlite3.Connection) -> records.InboxStats:
            counts: dict[str, int] = dict.fromkeys(records.EVENT_STATUSES, 0)
            counts.update(connection.execute("SELECT status, n FROM inbox_counts").fetchall())
            oldest = connection.execute(_OLDEST_PENDING).fetchone()
            return records.InboxStats(counts, parse_optional_ts(oldest[0]))

        return await self._db.read(run, "count the inbox")


def _replace_keys_many(connection: sqlite3.Connection,
                       keys: Mapping[int, Sequence[str]]) -> None:
    """Replace each event's ordering keys and mark them recorded: three statements per chunk
    of events, not per event."""
    ids = list(keys)
    for start in range(0, len(ids), _IN_LIST):
        chunk = ids[start:start + _IN_LIST]
        marks = placeholders(len(chunk))
        connection.execute(f"DELETE FROM inbox_ordering_keys WHERE event_id IN ({marks})", chunk)
        insert_rows(connection, "INSERT INTO inbox_ordering_keys (event_id, ordering_key)",
                    "(?, ?)", [(event_id, key) for event_id in chunk for key in keys[event_id]],
                    " ON CONFLICT DO NOTHING")
        connection.execute(f"UPDATE inbox SET ordering_recorded = 1 WHERE id IN ({marks})"
                           " AND ordering_recorded = 0", chunk)


def _finish_leased(connection: sqlite3.Connection, worker_id: str,
                   updates: Sequence[tuple[int, tuple[object, ...]]]) -> list[bool]:
    """Set each event's final columns where `worker_id` still holds its lease; whether each
    was. Events that end alike (a batch's are mostly "processed", no error) share an UPDATE:
    one statement per kind of ending, not one per event (each statement is a GIL hand-off for
    the writer thread)."""
    if len({event_id for event_id, _ in updates}) != len(updates):  # the same event twice
        return [connection.execute(
            f"UPDATE inbox SET {_FINISH} WHERE id = ? AND lease_owner = ? AND {PENDING}",
            (*params, event_id, worker_id)).rowcount == 1 for event_id, params in updates]
    alike: dict[tuple[object, ...], list[int]] = {}
    for event_id, params in updates:
        alike.setdefault(params, []).append(event_id)
    finished: set[int] = set()
    for params, event_ids in alike.items():
        for start in range(0, len(event_ids), _IN_LIST):
            chunk = event_ids[start:start + _IN_LIST]
            finished.update(event_id for (event_id,) in connection.execute(
                f"UPDATE inbox SET {_FINISH} WHERE id IN ({placeholders(len(chunk))})"
                f" AND lease_owner = ? AND {PENDING} RETURNING id",
                (*params, *chunk, worker_id)))
    return [event_id in finished for event_id, _ in updates]


def _dead_letter(row: sqlite3.Row) -> records.DeadLetter:
    """A row of _DEAD_LETTERS, whose columns are named and ordered as DeadLetter's fields."""
    return records.from_row(records.DeadLetter, row, updated_at=parse_ts)


def _requeue(connection: sqlite3.Connection, event_id: int, now: str,
             rules_version: str | None) -> bool:
    """Pending again, attempts reset, dead outcomes retrying, ordering keys to be recorded
    again (later events wait for its plan), pinned to `rules_version` (None: unpinned); not
    while a worker holds a live lease (it would finish and overwrite the requeue) and not
    once the raw body is gone."""
    cursor = connection.execute(
        "UPDATE inbox SET status = 'received', attempts = 0, last_error = NULL,"
        " next_attempt_at = NULL, lease_owner = NULL, lease_expires_at = NULL, updated_at = ?,"
        " ordering_recorded = 0, rules_version = ?"
        " WHERE id = ? AND body IS NOT NULL"
        " AND (lease_owner IS NULL OR lease_expires_at <= ?)",
        (now, rules_version, event_id, now),
    )
    if cursor.rowcount != 1:
        return False
    connection.execute(
        "UPDATE action_outcomes SET status = 'retrying', attempts = 0, next_attempt_at = NULL,"
        " updated_at = ? WHERE event_id = ? AND status = 'dead'",
        (now, event_id),
    )
    return True


# -- storing: many events, one statement ------------------------------------------------------

_ROW = "(?, ?, ?, ?, ?, ?, ?, ?, 'received', 0, ?)"

# SQLite allows 32766 parameters per statement; 9 per row.
_MAX_ROWS = 1000


@functools.lru_cache(maxsize=64)
def _insert(count: int) -> str:
    """One INSERT for `count` rows: the text holds placeholders only, never data."""
    return (
        "INSERT INTO inbox (dedupe_prefix, dedupe_key, source, event_type, event_timestamp,"
        " received_at, headers, body, status, attempts, updated_at) VALUES "
        + ", ".join([_ROW] * count)
        + " ON CONFLICT (dedupe_prefix, dedupe_key) DO NOTHING"
    )


def store_many(
    connection: sqlite3.Connection, events: Sequence[records.NewEvent]
) -> list[records.StoreResult | UnstorableEventError]:
    """The writer's bulk handler for `SQLiteInbox.store`: a thousand rows per statement at
    most. An event that can never be stored gets its UnstorableEventError in its place; the
    others go in."""
    refused = [records.unstorable(event) for event in events]
    storable = [event for event, error in zip(events, refused, strict=True) if error is None]
    stored: list[records.StoreResult] = []
    for start in range(0, len(storable), _MAX_ROWS):
        stored += _store_chunk(connection, storable[start : start + _MAX_ROWS])
    results = iter(stored)
    return [next(results) if error is None else error for error in refused]


# Up to a thousand events, the one INSERT is the only write: a batch of stores and nothing else
# commits with it, without BEGIN and COMMIT around it.
STORE = OneStatement(store_many, rows=_MAX_ROWS)


@functools.lru_cache(maxsize=256)
def _headers_json(headers: tuple[tuple[str, str], ...]) -> str:
    """The kept headers as stored: one sender sends the same few headers on every delivery,
    so their JSON is encoded once (a seventh of the time of encoding it per event)."""
    return dumps(dict(headers))


def _store_chunk(
    connection: sqlite3.Connection, events: Sequence[records.NewEvent]
) -> list[records.StoreResult]:
    """Insert rows with one statement; the unique (prefix, key) decides what is new.

    One statement is one step for SQLite and one GIL hand-off for Python, which is what keeps
    the writer thread from starving the event loop under load (RETURNING would be one hand-off
    per row). When every row went in, they got consecutive ids in VALUES order (the statement
    holds the write lock), so the ids follow from the last one without another query. When
    some conflicted, each event's row is read by its (prefix, key): a row that conflicts still
    uses up an id, but the rows this statement inserted are the ones with the highest ids, as
    AUTOINCREMENT never hands out an id below one it handed out before. Inbox rows are never
    deleted, so those reads need not share the INSERT's transaction (`STORE`).
    """
    params: list[object] = []
    keys: list[tuple[str, str]] = []
    for event in events:
        received = ts(event.received_at)
        key = (values.nul_free(event.dedupe_prefix), event.dedupe_key)
        keys.append(key)
        # A NUL in these columns becomes U+FFFD, as PostgreSQL text needs; the raw body keeps it.
        params += (
            *key, values.nul_free(event.source),
            values.nul_free(event.event_type), values.nul_free(event.event_timestamp),
            received, _headers_json(tuple(event.headers.items())), event.body, received,
        )
    cursor = connection.execute(_insert(len(events)), params)
    inserted, last = cursor.rowcount, cursor.lastrowid or 0
    if inserted == len(events):
        first = last - inserted + 1
        return [records.StoreResult(id=first + i, duplicate=False) for i in range(inserted)]
    # Some were seen before (a retry, or identical copies within this batch).
    ids = _ids_of(connection, sorted(set(keys)))
    added = set(sorted(ids.values())[len(ids) - inserted:]) if inserted else set()
    results: list[records.StoreResult] = []
    claimed: set[tuple[str, str]] = set()
    for key in keys:
        event_id = ids[key]
        new = event_id in added and key not in claimed
        claimed.add(key)  # the first of identical copies in one batch is the stored one
        results.append(records.StoreResult(id=event_id, duplicate=not new))
    return results


def _ids_of(connection: sqlite3.Connection,
            keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], int]:
    """The id of each stored (prefix, key), through the unique index."""
    ids: dict[tuple[str, str], int] = {}
    for start in range(0, len(keys), _IN_LIST):
        chunk = keys[start:start + _IN_LIST]
        # CROSS JOIN: the given pairs first, each looked up in the index (an IN list of row
        # values would scan the inbox).
        pairs = ", ".join(["(?, ?)"] * len(chunk))
        rows = connection.execute(
            f"SELECT i.dedupe_prefix, i.dedupe_key, i.id FROM (VALUES {pairs}) AS k"
            " CROSS JOIN inbox AS i"
            " ON i.dedupe_prefix = k.column1 AND i.dedupe_key = k.column2",
            [part for key in chunk for part in key])
        ids.update(((prefix, key), event_id) for prefix, key, event_id in rows)
    return ids
