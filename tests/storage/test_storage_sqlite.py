"""The storage contract on SQLite, plus what only SQLite has: group commit, pragmas, URLs."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from engine.actions import IdentityKey
from engine.errors import StorageError, UnstorableEventError, UnstorableValueError
from engine.storage import Storage, StoreResult, open_storage, records
from engine.storage.sqlite import crm as sqlite_crm
from engine.storage.sqlite.groupcommit import GroupCommitWriter, OneStatement
from engine.storage.sqlite.rows import insert_rows
from engine.storage.sqlite.schema import LATEST, MIGRATIONS
from engine.storage.sqlite.store import SQLiteStorage
from tests.storage.contract import FakeClock, StorageContract, event
from tests.storage.old_schemas import sqlite_before


def _cannot_grow(connection: sqlite3.Connection) -> None:
    """A database that cannot grow by one page: every write that needs space fails."""
    pages = connection.execute("PRAGMA page_count").fetchone()[0]
    connection.execute(f"PRAGMA max_page_count = {int(pages)}")


class TestSQLiteStorage(StorageContract):
    @pytest.fixture
    def database(self, tmp_path: Path) -> Path:
        return tmp_path / "linkcrm.db"

    @pytest.fixture
    def make_storage(self, database: Path, clock: FakeClock) -> Callable[[], Storage]:
        return lambda: SQLiteStorage(database, clock=clock)

    @pytest.fixture
    async def storage(self, make_storage: Callable[[], Storage]) -> AsyncIterator[Storage]:
        opened = make_storage()
        await opened.migrate()
        yield opened
        await opened.close()

    @pytest.fixture
    async def failing_storage(
        self, database: Path, clock: FakeClock
    ) -> AsyncIterator[Storage]:
        setup = SQLiteStorage(database, clock=clock)
        await setup.migrate()
        await setup.close()
        opened = SQLiteStorage(database, clock=clock, configure=_cannot_grow)
        yield opened
        await opened.close()


pytestmark = pytest.mark.anyio



@pytest.fixture
async def storage(tmp_path: Path) -> AsyncIterator[SQLiteStorage]:
    opened = SQLiteStorage(tmp_path / "linkcrm.db")
    await opened.migrate()
    yield opened
    await opened.close()


async def test_writer_is_wal_with_synchronous_full(storage: SQLiteStorage) -> None:
    assert await storage.durability() == {"sqlite_synchronous": 2, "sqlite_wal": 1}  # FULL
    with sqlite3.connect(storage.path) as other:  # WAL is a property of the file
        assert other.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def _count_commits(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every commit the writer tries: of a transaction, or of a statement that is its own."""
    commits: list[str] = []
    transaction, statement = GroupCommitWriter._commit, GroupCommitWriter._commit_statement

    def counting_transaction(self: GroupCommitWriter, connection: sqlite3.Connection) -> None:
        commits.append("transaction")
        transaction(self, connection)

    def counting_statement(self: GroupCommitWriter, connection: sqlite3.Connection,
                           handler: OneStatement, items: list[Any]) -> Sequence[Any]:
        commits.append("statement")
        return statement(self, connection, handler, items)

    monkeypatch.setattr(GroupCommitWriter, "_commit", counting_transaction)
    monkeypatch.setattr(GroupCommitWriter, "_commit_statement", counting_statement)
    return commits


async def test_concurrent_writes_share_commits(
    storage: SQLiteStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    commits = _count_commits(monkeypatch)
    results = await asyncio.gather(*(storage.inbox.store(event(n)) for n in range(200)))
    assert len({r.id for r in results}) == 200
    assert len(commits) < 100, f"{len(commits)} commits for 200 concurrent writes"


def _writer_statements(statements: list[str]) -> Callable[[sqlite3.Connection], None]:
    """A connection hook recording the first word of each SQL statement the writer thread
    runs (Python's trace repeats a statement's text as each of its trigger steps begins)."""
    def record(sql: str) -> None:
        if threading.current_thread().name == "linkcrm-sqlite-writer" and sql[:2] != "--":
            statements.append(sql.split(None, 1)[0].upper())

    return lambda connection: connection.set_trace_callback(record)


async def test_a_batch_of_stores_alone_is_one_statement_that_commits_itself(
    tmp_path: Path,
) -> None:
    """The receiver's batches under load: the INSERT runs with no BEGIN or COMMIT around it
    (each statement costs the writer thread a wait for the GIL) and is committed all the same,
    as another connection sees. With another write in the batch, it is one transaction."""
    statements: list[str] = []
    opened = SQLiteStorage(tmp_path / "linkcrm.db", configure=_writer_statements(statements))
    await opened.migrate()
    try:
        statements.clear()
        results = await asyncio.gather(*(opened.inbox.store(event(n)) for n in range(50)))
        assert len({result.id for result in results}) == 50
        assert set(statements) == {"INSERT"}, statements
        with sqlite3.connect(opened.path) as other:
            assert other.execute("SELECT COUNT(*) FROM inbox").fetchone() == (50,)

        statements.clear()
        await asyncio.gather(
            *(opened.inbox.store(event(n)) for n in range(50, 60)),
            opened.database.write(lambda c: c.execute("DELETE FROM write_probe"), "probe"))
        assert statements[0] == "BEGIN" and statements[-1] == "COMMIT", statements
        assert "INSERT" in statements
    finally:
        await opened.close()


@pytest.mark.parametrize("batch", ["stores alone", "stores and another write"])
async def test_a_failed_commit_fails_every_waiter_and_keeps_nothing(
    storage: SQLiteStorage, monkeypatch: pytest.MonkeyPatch, batch: str
) -> None:
    def failing(self: GroupCommitWriter, *args: object) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(GroupCommitWriter, "_commit", failing)
    monkeypatch.setattr(GroupCommitWriter, "_commit_statement", failing)
    def another_write(connection: sqlite3.Connection) -> None:
        connection.execute("DELETE FROM write_probe")

    others = [] if batch == "stores alone" else [storage.database.write(another_write, "probe")]
    results = await asyncio.gather(
        *(storage.inbox.store(event(n)) for n in range(20)), *others, return_exceptions=True)
    assert all(isinstance(r, StorageError) for r in results)
    assert "disk I/O error" in str(results[0])
    monkeypatch.undo()
    assert await storage.inbox.list_events() == []
    # The writer recovers: the same events can be stored once the disk is back.
    again = await asyncio.gather(*(storage.inbox.store(event(n)) for n in range(20)))
    assert not any(r.duplicate for r in again)


async def test_one_failing_job_does_not_undo_its_batch_mates(storage: SQLiteStorage) -> None:
    def orphan_key(connection: sqlite3.Connection) -> None:  # refused by the foreign key
        connection.execute("INSERT INTO inbox_ordering_keys VALUES (999999, 'hubspot:1')")

    results = await asyncio.gather(
        storage.inbox.store(event(1)),
        storage.database.write(orphan_key, "record an ordering key"),
        storage.inbox.store(event(2)),
        return_exceptions=True,
    )
    assert isinstance(results[1], StorageError), results[1]
    assert "FOREIGN KEY constraint failed" in str(results[1])
    assert len(await storage.inbox.list_events()) == 2


async def test_apply_all_undoes_an_op_its_data_fails_midway_and_keeps_the_rest(
    storage: SQLiteStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One writer job for an event's ops: an op that fails on its data after writing part of
    itself is rolled back to its own savepoint; the ops before and after it are kept."""
    token = IdentityKey("deep_link_token", "tok_1")
    stages = ("subscriber", "lead", "customer")
    real = sqlite_crm._set_stage

    def half_then_refused(contacts: Any, op: records.SetStageOp) -> records.StageResult:
        real(contacts, op)  # the stage moved and its history row is written...
        if op.stage == "customer":
            raise ValueError("refused after writing")  # ...then this op fails on its data
        return real(contacts, op)

    monkeypatch.setattr(sqlite_crm, "_set_stage", half_then_refused)
    results = await storage.local_crm.apply_all([
        records.SetStageOp([token], "lead", stages),
        records.SetStageOp([token], "customer", stages),
        records.UpsertContactOp([token], {"first_name": "Ada"}, {}),
    ])
    assert isinstance(results[1], ValueError)
    [contact] = await storage.local_crm.contacts()
    assert (contact.stage, dict(contact.fields)) == ("lead", {"first_name": "Ada"})
    assert [change.to_stage for change in contact.stage_history] == ["lead"]


async def test_apply_all_keeps_nothing_when_the_database_fails(
    storage: SQLiteStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = IdentityKey("deep_link_token", "tok_1")

    def broken(contacts: Any, op: records.CreateDealOp) -> records.DealResult:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(sqlite_crm, "_create_deal", broken)
    with pytest.raises(StorageError, match="disk I/O error"):
        await storage.local_crm.apply_all([
            records.UpsertContactOp([token], {"first_name": "Ada"}, {}),
            records.CreateDealOp([token], "deal-1", "Deal", None, None, {}),
        ])
    assert await storage.local_crm.contacts() == []


async def test_a_value_sqlite_cannot_bind_is_permanent_and_fails_alone(
    storage: SQLiteStorage,
) -> None:
    """The net behind the shared values check: a value Python's sqlite3 cannot bind (a lone
    surrogate, an int beyond 64 bits) is an UnstorableValueError, never retried, and its
    batch mates are committed."""
    results = await asyncio.gather(
        storage.inbox.store(event(1)),
        storage.database.write(lambda c: c.execute("SELECT ?", ("a\ud800",)), "bind text"),
        storage.database.write(lambda c: c.execute("SELECT ?", (10 ** 30,)), "bind a number"),
        storage.inbox.store(event(2)),
        return_exceptions=True,
    )
    assert isinstance(results[1], UnstorableValueError)
    assert str(results[1]).startswith("bind text: a value cannot be stored (UnicodeEncodeError")
    assert isinstance(results[2], UnstorableValueError)
    assert len(await storage.inbox.list_events()) == 2
async def test_a_row_sqlite_refuses_fails_alone_in_its_group_commit(
    storage: SQLiteStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Even a bad row the up-front check misses (here the check is switched off) fails only
    its own store: the batch's one INSERT is retried row by row, in one commit."""
    commits = _count_commits(monkeypatch)
    monkeypatch.setattr(records, "unstorable", lambda event: None)
    bad = replace(event(99), event_timestamp="2026-03-01\udfff")
    results = await asyncio.gather(
        *(storage.inbox.store(event(n)) for n in range(3)), storage.inbox.store(bad),
        *(storage.inbox.store(event(n)) for n in range(3, 6)), return_exceptions=True)
    assert isinstance(results[3], UnstorableEventError), results[3]
    assert "UnicodeEncodeError" in str(results[3])
    assert "2026-03-01" not in str(results[3])  # names the error, not the data
    assert sum(isinstance(r, StoreResult) for r in results) == 6
    assert len(await storage.inbox.list_events()) == 6
    # The one statement failed on the bad row and wrote nothing; one transaction wrote the rest.
    assert commits == ["statement", "transaction"]


async def test_a_bulk_handler_failing_on_one_item_keeps_the_others() -> None:
    def insert(connection: sqlite3.Connection, items: Sequence[object]) -> list[int]:
        connection.executemany("INSERT INTO t (v) VALUES (?)", [(item,) for item in items])
        return [len(str(item)) for item in items]

    def connect() -> sqlite3.Connection:
        connection = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        connection.execute("CREATE TABLE t (v TEXT NOT NULL CHECK (v <> 'bad'))")
        return connection

    writer = GroupCommitWriter(connect)
    try:
        results = await asyncio.gather(
            *(writer.run_bulk(insert, item) for item in ("a", "bb", "bad", {"no": "type"}, "c")),
            return_exceptions=True)
        assert results[:2] == [1, 2] and results[4] == 1
        assert isinstance(results[2], sqlite3.IntegrityError)
        assert isinstance(results[3], sqlite3.ProgrammingError)
        rows = await writer.run(lambda c: c.execute("SELECT v FROM t ORDER BY v").fetchall())
        assert rows == [("a",), ("bb",), ("c",)]
    finally:
        writer.close()


async def test_inbox_stats_cost_does_not_grow_with_the_inbox(tmp_path: Path) -> None:
    """/metrics reads inbox_stats on every scrape: counted in SQLite VM steps, reading it for
    6,000 events costs what it costs for 100 (a GROUP BY over the inbox grew with it)."""
    steps = [0]

    def tick() -> int:
        steps[0] += 1
        return 0

    def count_steps(connection: sqlite3.Connection) -> None:
        connection.set_progress_handler(tick, 1)

    counting = SQLiteStorage(tmp_path / "steps.db", configure=count_steps)
    try:
        await counting.migrate()

        async def cost() -> int:
            steps[0] = 0
            await counting.inbox.stats()
            return steps[0]

        await asyncio.gather(*(counting.inbox.store(event(n)) for n in range(100)))
        await counting.inbox.claim("w", 50, 30)  # some pending, some leased, one finished
        await counting.inbox.finish(1, "w", "processed")
        small = await cost()
        await asyncio.gather(*(counting.inbox.store(event(n)) for n in range(100, 6000)))
        large = await cost()
        assert (await counting.inbox.stats()).by_status["received"] == 5999
    finally:
        await counting.close()
    assert large <= small + 20, f"{small} steps at 100 events, {large} at 6,000"


async def test_migration_3_counts_the_events_already_stored(tmp_path: Path) -> None:
    database = tmp_path / "old.db"
    with sqlite3.connect(database, isolation_level=None) as connection:
        sqlite_before(connection, 3)
        for n, status in enumerate(["received"] * 3 + ["dead", "processed", "processed"]):
            connection.execute(
                "INSERT INTO inbox (dedupe_key, source, event_type, event_timestamp,"
                " received_at, headers, status, updated_at) VALUES (?, 't', 'e', 't',"
                " '2026-03-01T00:00:00.000000+00:00', '{}', ?, 'now')", (f"k{n}", status))
    upgraded = SQLiteStorage(database)
    try:
        assert await upgraded.migrate() >= 3
        counts = (await upgraded.inbox.stats()).by_status
        assert dict(counts) == {"received": 3, "processed": 2, "ignored": 0, "failed": 0,
                                "dead": 1}
        await upgraded.inbox.store(event(1))
        assert (await upgraded.inbox.stats()).by_status["received"] == 4
    finally:
        await upgraded.close()


async def test_an_acknowledged_write_is_in_the_file(storage: SQLiteStorage) -> None:
    stored = await storage.inbox.store(event(1))
    with sqlite3.connect(storage.path) as other:
        row = other.execute("SELECT dedupe_key FROM inbox WHERE id = ?", (stored.id,)).fetchone()
    assert row == (event(1).dedupe_key,)


async def test_migrations_from_two_processes_at_once(tmp_path: Path) -> None:
    database = tmp_path / "race.db"
    script = textwrap.dedent(f"""
        import asyncio
        from engine.storage.sqlite.store import SQLiteStorage
        async def main():
            storage = SQLiteStorage({str(database)!r})
            print(await storage.migrate())
            await storage.close()
        asyncio.run(main())
    """)
    processes = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    outputs = [p.communicate(timeout=60) for p in processes]
    assert [p.returncode for p in processes] == [0, 0, 0], outputs
    assert len({out.strip() for out, _ in outputs}) == 1
    with sqlite3.connect(database) as connection:
        versions = connection.execute("SELECT version FROM schema_version").fetchall()
    assert len(versions) == len(set(versions))


async def test_a_new_file_waits_for_a_connection_that_holds_the_write_lock(
    tmp_path: Path,
) -> None:
    """Switching a new file to WAL while another connection writes to it: SQLite answers
    "database is locked" at once there (no busy handler, as waiting while holding a read lock
    could deadlock), which made two processes migrating one new file fail now and then. The
    writer waits for the lock like any other write instead."""
    database = tmp_path / "new.db"
    holder = sqlite3.connect(database, isolation_level=None)
    opened = SQLiteStorage(database)
    try:
        holder.execute("BEGIN IMMEDIATE")
        holder.execute("CREATE TABLE other_process (x)")
        migrating = asyncio.ensure_future(opened.migrate())
        await asyncio.sleep(0.3)
        assert not migrating.done()
        holder.execute("COMMIT")
        assert await asyncio.wait_for(migrating, timeout=10) == LATEST
        assert await opened.schema_version() == LATEST
    finally:
        holder.close()
        await opened.close()


async def test_upgrading_a_version_2_database_keeps_its_backlog_in_order(tmp_path: Path) -> None:
    """Existing pending events keep their place: one that recorded its ordering keys counts as
    planned, one that never did holds later events of any identity back until it is planned."""
    database = tmp_path / "v2.db"
    with sqlite3.connect(database, isolation_level=None) as connection:
        connection.execute("PRAGMA journal_mode = WAL")
        connection.execute("BEGIN")
        sqlite_before(connection, 3)
        for n, status in enumerate(["failed", "received", "processed"], start=1):
            connection.execute(
                "INSERT INTO inbox (dedupe_key, source, event_type, event_timestamp,"
                " received_at, headers, body, status, updated_at)"
                " VALUES (?, 'tolinku', 'install.tracked', 'ts', ?, '{}', x'7b7d', ?, 'then')",
                (f"key-{n}", f"2026-03-01T10:00:0{n}.000000+00:00", status))
        connection.execute("INSERT INTO inbox_ordering_keys VALUES (1, 'hubspot:person-1')")
        connection.execute("COMMIT")
    clock = FakeClock()
    first, second = SQLiteStorage(database, clock=clock), SQLiteStorage(database, clock=clock)
    try:
        assert await asyncio.gather(first.migrate(), second.migrate()) == [LATEST, LATEST]
        assert await first.migrate() == LATEST
        later = (await first.inbox.store(event(9))).id
        await first.inbox.set_ordering_keys(later, ["hubspot:person-2"])
        assert await first.inbox.earlier_unfinished(later, ["hubspot:person-2"]) == [2]
        assert await first.inbox.earlier_unfinished(later, ["hubspot:person-1"]) == [1, 2]
        await second.inbox.set_ordering_keys(2, [])
        assert await first.inbox.earlier_unfinished(later, ["hubspot:person-2"]) == []
        assert [e.id for e in await first.inbox.claim("w", 10, 30)] == [1, 2, later]
    finally:
        await first.close()
        await second.close()
    with sqlite3.connect(database) as connection:
        versions = connection.execute("SELECT version FROM schema_version").fetchall()
    assert sorted(versions) == [(number,) for number, _ in MIGRATIONS]


@pytest.mark.parametrize(
    ("url", "path"),
    [("sqlite:///linkcrm.db", "linkcrm.db"), ("sqlite:////var/lib/l.db", "/var/lib/l.db")],
)
async def test_sqlite_urls(url: str, path: str) -> None:
    opened = open_storage(url)
    try:
        assert isinstance(opened, SQLiteStorage) and opened.path == path
    finally:
        await opened.close()


@pytest.mark.parametrize("url", ["sqlite://linkcrm.db", "sqlite:///:memory:", "sqlite:///"])
def test_bad_sqlite_urls_say_how_to_write_one(url: str) -> None:
    with pytest.raises(StorageError, match=r"sqlite:///linkcrm\.db"):
        open_storage(url)


def test_unknown_scheme_is_named_without_the_rest_of_the_url() -> None:
    with pytest.raises(StorageError, match="'mysql'") as caught:
        open_storage("mysql://admin:hunter2@db/linkcrm")
    assert "hunter2" not in str(caught.value)


async def test_an_unwritable_location_is_a_storage_error(tmp_path: Path) -> None:
    missing = tmp_path / "missing-dir"
    with pytest.raises(StorageError, match=f"the folder {missing} does not exist"):
        SQLiteStorage(missing / "linkcrm.db")
    with pytest.raises(StorageError, match=f"{tmp_path} is a folder"):
        SQLiteStorage(tmp_path)
    with pytest.raises(StorageError, match="no database at .*; run `linkcrm migrate`"):
        SQLiteStorage(tmp_path / "linkcrm.db", create=False)
    assert not (tmp_path / "linkcrm.db").exists() and not missing.exists()


def test_insert_rows_runs_rows_in_order_as_executemany_would() -> None:
    """Multi-row statements in place of executemany: a later row's ON CONFLICT sees the
    earlier rows, the ok row is kept, and more rows than one statement may hold go in too."""
    connection = sqlite3.connect(":memory:", isolation_level=None)
    connection.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 5)  # two rows per statement
    connection.execute("CREATE TABLE t (k TEXT PRIMARY KEY, n INTEGER, s TEXT)")
    connection.execute("INSERT INTO t VALUES ('a', 1, 'ok')")
    rows = [("b", "retry"), ("b", "x"), ("a", "y"), *((f"k{i}", "new") for i in range(20000))]
    insert_rows(connection, "INSERT INTO t (k, n, s)", "(?, 1, ?)", rows,
                " ON CONFLICT (k) DO UPDATE SET n = t.n + 1, s = excluded.s WHERE t.s <> 'ok'")
    assert connection.execute("SELECT * FROM t WHERE k IN ('a', 'b') ORDER BY k").fetchall() == [
        ("a", 1, "ok"), ("b", 2, "x")]
    assert connection.execute("SELECT COUNT(*) FROM t").fetchone() == (20002,)
    insert_rows(connection, "INSERT INTO t (k, n, s)", "(?, 1, ?)", [])  # nothing to do
