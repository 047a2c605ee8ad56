"""The embedded CRM (`local` target) on SQLite: contacts, identities, stage history, deals.

Each operation is one writer job, so it is atomic; `apply_all` runs an event's operations as
one job, each in its own savepoint.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from typing import overload

from engine.actions import IdentityKey
from engine.errors import UnstorableValueError
from engine.storage import checks, records
from engine.storage.protocols import LocalCRMStore
from engine.storage.sqlite.database import UNSTORABLE, SQLitePart, unstorable
from engine.storage.sqlite.rows import dumps, insert_rows, loads_object, parse_ts, placeholders

# One op's write, run in the writer thread.
_Job = Callable[[sqlite3.Connection], records.LocalResult]


class SQLiteLocalCRM(SQLitePart, LocalCRMStore):
    """Each write is one writer job; the writer runs one job at a time, so "find the contact
    or create it" happens once per person. The more callers at once, the more writes share a
    group commit. `apply_all` is one job, however many ops.

    256 at once: a claim of that many is planned while the previous one is written, and each
    write and finish is shared by four times the events 64 gave. The worker alone went from
    1,550-1,780 to 1,930-2,190 events/s (bench_worker.py, 10,000 events), and in the
    end-to-end drain (20,000 events) the worker kept pace with the receiver: receipt ->
    applied p50 0.16 s and p99 0.67 s instead of 6-7 s and 8-9 s, at the same rate (the
    process is CPU-bound). 512 measured no better, and a claim's one write holds the writer,
    which the receiver's commits wait behind, twice as long."""

    concurrency = 256
    one_write = True

    async def upsert_contact(
        self, identity: records.Keys, set: records.Fields, set_once: records.Fields
    ) -> records.ContactResult:
        return await self._db.write(
            self._job(records.UpsertContactOp(identity, set, set_once)), "upsert the contact")

    async def set_stage(
        self, identity: records.Keys, stage: str, stages: Sequence[str], event_id: int | None = None
    ) -> records.StageResult:
        return await self._db.write(
            self._job(records.SetStageOp(identity, stage, stages, event_id)), "set the stage")

    async def create_deal(self, identity: records.Keys, key: str, title: str,
                          stage: str | None, amount: float | None, fields: records.Fields
                          ) -> records.DealResult:
        return await self._db.write(
            self._job(records.CreateDealOp(identity, key, title, stage, amount, fields)),
            "create the deal")

    async def apply_all(self, ops: Sequence[records.LocalOp]
                        ) -> list[records.LocalResult | Exception]:
        """One writer job for all the ops: an op its own data fails is undone alone;
        anything else undoes the whole job and raises.

        The ops first run together, inside the job's own savepoint; only when one fails on
        its data are they rolled back and run again, each in a savepoint of its own. Two
        statements fewer per op when none fails (each statement is a GIL hand-off for the
        writer thread)."""
        jobs: list[_Job | Exception] = []
        for op in ops:
            try:
                jobs.append(self._job(op))
            except (ValueError, OverflowError, UnstorableValueError) as error:
                jobs.append(error)

        def together(connection: sqlite3.Connection) -> list[records.LocalResult | Exception]:
            connection.execute("SAVEPOINT ops")
            try:
                results = [job if isinstance(job, Exception) else job(connection)
                           for job in jobs]
            except (*UNSTORABLE, ValueError):
                connection.execute("ROLLBACK TO ops")
                connection.execute("RELEASE ops")
                return each_alone(connection)
            connection.execute("RELEASE ops")
            return results

        def each_alone(connection: sqlite3.Connection) -> list[records.LocalResult | Exception]:
            results: list[records.LocalResult | Exception] = []
            for job in jobs:
                if isinstance(job, Exception):
                    results.append(job)
                    continue
                connection.execute("SAVEPOINT op")
                try:
                    results.append(job(connection))
                except (*UNSTORABLE, ValueError) as error:
                    connection.execute("ROLLBACK TO op")
                    results.append(unstorable(error, "apply the actions")
                                   if isinstance(error, UNSTORABLE) else error)
                connection.execute("RELEASE op")
            return results

        return await self._db.write(together, "apply the actions")

    @overload
    def _job(self, op: records.UpsertContactOp) -> Callable[
        [sqlite3.Connection], records.ContactResult]: ...

    @overload
    def _job(self, op: records.SetStageOp) -> Callable[
        [sqlite3.Connection], records.StageResult]: ...

    @overload
    def _job(self, op: records.CreateDealOp) -> Callable[
        [sqlite3.Connection], records.DealResult]: ...

    @overload
    def _job(self, op: records.LocalOp) -> _Job: ...

    def _job(self, op: records.LocalOp) -> _Job:
        """The op's write, to run in the writer; its arguments checked here first."""
        now = self._db.now()
        if isinstance(op, records.UpsertContactOp):
            checks.upsert(op.identity, op.set, op.set_once)
            return lambda connection: _upsert(connection, op, now)
        if isinstance(op, records.SetStageOp):
            checks.stage(op.identity, op.stage, op.stages)
            return lambda connection: _set_stage(connection, op, now)
        checks.deal(op.identity, op.key, op.title, op.stage, op.amount, op.fields)
        return lambda connection: _create_deal(connection, op, now)

    async def contacts(self, limit: int | None = None) -> list[records.LocalContact]:
        def run(connection: sqlite3.Connection) -> list[records.LocalContact]:
            rows = connection.execute(
                "SELECT id, fields, stage, created_at, updated_at FROM local_contacts"
                " ORDER BY id LIMIT ?",
                (-1 if limit is None else limit,),
            ).fetchall()
            ids = [row["id"] for row in rows]
            identities: dict[int, list[IdentityKey]] = {contact_id: [] for contact_id in ids}
            history: dict[int, list[records.StageChange]] = {contact_id: [] for contact_id in ids}
            for contact_id, field, value in connection.execute(
                "SELECT contact_id, field, value FROM local_contact_identities"
                f" WHERE contact_id IN ({placeholders(len(ids))}) ORDER BY rowid",
                ids,
            ):
                identities[contact_id].append(IdentityKey(field, value))
            for row in connection.execute(
                "SELECT contact_id, changed_at, from_stage, to_stage, event_id"
                " FROM local_stage_history"
                f" WHERE contact_id IN ({placeholders(len(ids))}) ORDER BY id",
                ids,
            ):
                history[row[0]].append(records.StageChange(parse_ts(row[1]), *row[2:]))
            return [records.LocalContact(
                key, tuple(identities[key]), loads_object(fields), stage, parse_ts(created_at),
                parse_ts(updated_at), tuple(history[key]),
            ) for key, fields, stage, created_at, updated_at in rows]

        return await self._db.read(run, "list contacts")

    async def deals(self, limit: int | None = None) -> list[records.LocalDeal]:
        return await self._db.rows(
            "list deals",
            "SELECT id, deal_key, title, stage, amount, contact_id, fields, created_at,"
            " updated_at FROM local_deals ORDER BY id LIMIT ?",
            (-1 if limit is None else limit,), _deal)


def _upsert(connection: sqlite3.Connection, op: records.UpsertContactOp,
            now: str) -> records.ContactResult:
    result = _ensure_contact(connection, op.identity, now)
    row = connection.execute(
        "SELECT fields FROM local_contacts WHERE id = ?", (result.contact_id,)).fetchone()
    fields = loads_object(row[0])
    merged = records.merge_contact_fields(fields, op.set, op.set_once)
    if merged != fields:
        connection.execute(
            "UPDATE local_contacts SET fields = ?, updated_at = ? WHERE id = ?",
            (dumps(merged), now, result.contact_id),
        )
    return result


def _set_stage(connection: sqlite3.Connection, op: records.SetStageOp,
               now: str) -> records.StageResult:
    contact_id = _ensure_contact(connection, op.identity, now).contact_id
    row = connection.execute(
        "SELECT stage FROM local_contacts WHERE id = ?", (contact_id,)).fetchone()
    current: str | None = row[0]
    if not records.advances(current, op.stage, op.stages):
        return records.StageResult(contact_id, current, current, changed=False)
    connection.execute(
        "UPDATE local_contacts SET stage = ?, updated_at = ? WHERE id = ?",
        (op.stage, now, contact_id),
    )
    connection.execute(
        "INSERT INTO local_stage_history (contact_id, from_stage, to_stage, changed_at,"
        " event_id) VALUES (?, ?, ?, ?, ?)",
        (contact_id, current, op.stage, now, op.event_id),
    )
    return records.StageResult(contact_id, from_stage=current, to_stage=op.stage, changed=True)


def _create_deal(connection: sqlite3.Connection, op: records.CreateDealOp,
                 now: str) -> records.DealResult:
    existing = connection.execute(
        "SELECT id, contact_id FROM local_deals WHERE deal_key = ?", (op.key,)
    ).fetchone()
    if existing is not None:
        return records.DealResult(existing[0], existing[1], created=False)
    contact_id = (_ensure_contact(connection, op.identity, now).contact_id
                  if op.identity else None)
    row = connection.execute(
        "INSERT INTO local_deals"
        " (deal_key, title, stage, amount, contact_id, fields, created_at, updated_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
        (op.key, op.title, op.stage, op.amount, contact_id,
         dumps(records.kept_fields(op.fields)), now, now),
    ).fetchone()
    return records.DealResult(deal_id=int(row[0]), contact_id=contact_id, created=True)


def _deal(row: sqlite3.Row) -> records.LocalDeal:
    return records.from_row(records.LocalDeal, row, fields=loads_object, created_at=parse_ts,
                            updated_at=parse_ts)


def _ensure_contact(
    connection: sqlite3.Connection, identity: records.Keys, now: str
) -> records.ContactResult:
    """Find the contact of the first key, in priority order, that is known, or create it;
    then attach every key not yet owned by another contact."""
    contact_id: int | None = None
    for key in identity:
        row = connection.execute(
            "SELECT contact_id FROM local_contact_identities WHERE field = ? AND value = ?",
            (key.field, key.value),
        ).fetchone()
        if row is not None:
            contact_id = int(row[0])
            break
    created = contact_id is None
    if contact_id is None:
        row = connection.execute(
            "INSERT INTO local_contacts (fields, stage, created_at, updated_at)"
            " VALUES ('{}', NULL, ?, ?) RETURNING id",
            (now, now),
        ).fetchone()
        contact_id = int(row[0])
    # A key already owned by another contact stays there: linkcrm never merges contacts itself.
    insert_rows(connection, "INSERT INTO local_contact_identities (field, value, contact_id)",
                "(?, ?, ?)", [(key.field, key.value, contact_id) for key in identity],
                " ON CONFLICT (field, value) DO NOTHING")
    return records.ContactResult(contact_id=contact_id, created=created)
