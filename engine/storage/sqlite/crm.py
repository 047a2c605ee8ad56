"""The embedded CRM (`local` target) on SQLite: contacts, identities, stage history, deals.

Each operation is one writer job, so it is atomic; `apply_all` runs many operations as one
job, an operation that fails on its own data undone alone.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, overload

from engine.actions import JSON, IdentityKey
from engine.errors import UnstorableValueError
from engine.storage import checks, records
from engine.storage.protocols import LocalCRMStore
from engine.storage.sqlite.database import UNSTORABLE, SQLitePart, unstorable
from engine.storage.sqlite.rows import dumps, insert_rows, loads_object, parse_ts, placeholders

# One op's write, run in the writer thread against the job's contacts.
_Job = Callable[["_Contacts"], records.LocalResult]


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
            self._alone(records.UpsertContactOp(identity, set, set_once)), "upsert the contact")

    async def set_stage(
        self, identity: records.Keys, stage: str, stages: Sequence[str], event_id: int | None = None
    ) -> records.StageResult:
        return await self._db.write(
            self._alone(records.SetStageOp(identity, stage, stages, event_id)), "set the stage")

    async def create_deal(self, identity: records.Keys, key: str, title: str,
                          stage: str | None, amount: float | None, fields: records.Fields
                          ) -> records.DealResult:
        return await self._db.write(
            self._alone(records.CreateDealOp(identity, key, title, stage, amount, fields)),
            "create the deal")

    async def apply_all(self, ops: Sequence[records.LocalOp]
                        ) -> list[records.LocalResult | Exception]:
        """One writer job for all the ops: an op its own data fails is undone alone;
        anything else undoes the whole job and raises.

        The ops first run together, inside the job's own savepoint and sharing one
        `_Contacts`; only when one fails on its data are they rolled back and run again, each
        in a savepoint of its own. Two statements fewer per op when none fails (each statement
        is a GIL hand-off for the writer thread), and each person read and written once."""
        jobs: list[_Job | Exception] = []
        for op in ops:
            try:
                jobs.append(_job(op))
            except (ValueError, OverflowError, UnstorableValueError) as error:
                jobs.append(error)
        now = self._db.now()

        def together(connection: sqlite3.Connection) -> list[records.LocalResult | Exception]:
            connection.execute("SAVEPOINT ops")
            contacts = _Contacts(connection, now)
            try:
                results = [job if isinstance(job, Exception) else job(contacts)
                           for job in jobs]
                contacts.flush()
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
                    contacts = _Contacts(connection, now)
                    results.append(job(contacts))
                    contacts.flush()
                except (*UNSTORABLE, ValueError) as error:
                    connection.execute("ROLLBACK TO op")
                    results.append(unstorable(error, "apply the actions")
                                   if isinstance(error, UNSTORABLE) else error)
                connection.execute("RELEASE op")
            return results

        return await self._db.write(together, "apply the actions")

    @overload
    def _alone(self, op: records.UpsertContactOp) -> Callable[
        [sqlite3.Connection], records.ContactResult]: ...

    @overload
    def _alone(self, op: records.SetStageOp) -> Callable[
        [sqlite3.Connection], records.StageResult]: ...

    @overload
    def _alone(self, op: records.CreateDealOp) -> Callable[
        [sqlite3.Connection], records.DealResult]: ...

    def _alone(self, op: records.LocalOp) -> Callable[[sqlite3.Connection], Any]:
        """The op as a writer job of its own."""
        job, now = _job(op), self._db.now()

        def run(connection: sqlite3.Connection) -> records.LocalResult:
            contacts = _Contacts(connection, now)
            result = job(contacts)
            contacts.flush()
            return result

        return run

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


def _job(op: records.LocalOp) -> _Job:
    """The op's write, to run in the writer; its arguments checked here first."""
    if isinstance(op, records.UpsertContactOp):
        checks.upsert(op.identity, op.set, op.set_once)
        return lambda contacts: _upsert(contacts, op)
    if isinstance(op, records.SetStageOp):
        checks.stage(op.identity, op.stage, op.stages)
        return lambda contacts: _set_stage(contacts, op)
    checks.deal(op.identity, op.key, op.title, op.stage, op.amount, op.fields)
    return lambda contacts: _create_deal(contacts, op)


@dataclass
class _Row:
    """A contact's columns that ops change."""

    fields: dict[str, JSON]
    stage: str | None


class _Contacts:
    """The contacts one writer job reads and changes: each identity is resolved, and each
    contact's row read, once per job; the rows it changed are written back by `flush`, once
    each, at the job's end. An event's upsert, stage and deal for one person cost one lookup
    and one UPDATE instead of three each (bench_worker.py: ~5 statements fewer per event).

    Sound because a job is the only writer while it runs and a key, once attached, stays with
    its contact: the same identity resolves to the same contact for the rest of the job."""

    def __init__(self, connection: sqlite3.Connection, now: str) -> None:
        self.connection = connection
        self.now = now
        self._ids: dict[tuple[IdentityKey, ...], int] = {}
        self._rows: dict[int, _Row] = {}
        self._changed: set[int] = set()

    def ensure(self, identity: records.Keys) -> records.ContactResult:
        keys = tuple(identity)
        contact_id = self._ids.get(keys)
        if contact_id is not None:
            return records.ContactResult(contact_id=contact_id, created=False)
        result = _ensure_contact(self.connection, keys, self.now)
        self._ids[keys] = result.contact_id
        if result.created:
            self._rows[result.contact_id] = _Row({}, None)
        return result

    def row(self, contact_id: int) -> _Row:
        """The contact's fields and stage as this job left them; change them through
        `changed`."""
        row = self._rows.get(contact_id)
        if row is None:
            fields, stage = self.connection.execute(
                "SELECT fields, stage FROM local_contacts WHERE id = ?", (contact_id,)
            ).fetchone()
            row = self._rows[contact_id] = _Row(loads_object(fields), stage)
        return row

    def changed(self, contact_id: int) -> _Row:
        """The contact's row, to change: written back by `flush`."""
        self._changed.add(contact_id)
        return self.row(contact_id)

    def flush(self) -> None:
        """Write back the rows this job changed."""
        if self._changed:
            self.connection.executemany(
                "UPDATE local_contacts SET fields = ?, stage = ?, updated_at = ? WHERE id = ?",
                [(dumps(self._rows[contact_id].fields), self._rows[contact_id].stage, self.now,
                  contact_id) for contact_id in sorted(self._changed)])
            self._changed.clear()


def _upsert(contacts: _Contacts, op: records.UpsertContactOp) -> records.ContactResult:
    result = contacts.ensure(op.identity)
    fields = contacts.row(result.contact_id).fields
    merged = records.merge_contact_fields(fields, op.set, op.set_once)
    if merged != fields:
        contacts.changed(result.contact_id).fields = merged
    return result


def _set_stage(contacts: _Contacts, op: records.SetStageOp) -> records.StageResult:
    contact_id = contacts.ensure(op.identity).contact_id
    current = contacts.row(contact_id).stage
    if not records.advances(current, op.stage, op.stages):
        return records.StageResult(contact_id, current, current, changed=False)
    contacts.changed(contact_id).stage = op.stage
    contacts.connection.execute(
        "INSERT INTO local_stage_history (contact_id, from_stage, to_stage, changed_at,"
        " event_id) VALUES (?, ?, ?, ?, ?)",
        (contact_id, current, op.stage, contacts.now, op.event_id),
    )
    return records.StageResult(contact_id, from_stage=current, to_stage=op.stage, changed=True)


def _create_deal(contacts: _Contacts, op: records.CreateDealOp) -> records.DealResult:
    connection = contacts.connection
    existing = connection.execute(
        "SELECT id, contact_id FROM local_deals WHERE deal_key = ?", (op.key,)
    ).fetchone()
    if existing is not None:
        return records.DealResult(existing[0], existing[1], created=False)
    contact_id = contacts.ensure(op.identity).contact_id if op.identity else None
    row = connection.execute(
        "INSERT INTO local_deals"
        " (deal_key, title, stage, amount, contact_id, fields, created_at, updated_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
        (op.key, op.title, op.stage, op.amount, contact_id,
         dumps(records.kept_fields(op.fields)), contacts.now, contacts.now),
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
