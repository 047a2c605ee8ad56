"""The storage contract on PostgreSQL, plus what several processes sharing one database need."""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import psycopg
import pytest
from psycopg import sql

from engine.actions import IdentityKey
from engine.errors import StorageError, UnstorableEventError, UnstorableValueError
from engine.storage import NewEvent, Storage, StoreResult, checks, open_storage, records
from engine.storage.postgres import inbox, notify
from engine.storage.postgres.notify import channel_name
from engine.storage.postgres.schema import LATEST, MIGRATIONS
from engine.storage.postgres.store import PostgresStorage
from tests.storage.contract import EMAIL, FakeClock, StorageContract, event
from tests.storage.old_schemas import postgres_before
from tests.support.postgres import fresh_schema, require_postgres, schema_url


@pytest.fixture(scope="session")
def postgres() -> None:
    """Fails (never skips) every test here when the server is down, saying how to start it."""
    require_postgres()


@pytest.fixture
def schema(postgres: None) -> Iterator[str]:
    with fresh_schema() as name:
        yield name


class TestPostgresStorage(StorageContract):
    @pytest.fixture
    def make_storage(self, schema: str, clock: FakeClock) -> Callable[[], Storage]:
        return lambda: PostgresStorage.from_url(schema_url(schema), clock=clock)

    @pytest.fixture
    async def storage(self, make_storage: Callable[[], Storage]) -> AsyncIterator[Storage]:
        opened = make_storage()
        await opened.migrate()
        yield opened
        await opened.close()

    @pytest.fixture
    async def failing_storage(self, schema: str, clock: FakeClock) -> AsyncIterator[Storage]:
        setup = PostgresStorage.from_url(schema_url(schema), clock=clock)
        await setup.migrate()
        await setup.close()
        read_only = schema_url(schema, "default_transaction_read_only=on")
        opened = PostgresStorage.from_url(read_only, clock=clock)
        yield opened
        await opened.close()


pytestmark = pytest.mark.anyio



@pytest.fixture
def url(schema: str) -> str:
    return schema_url(schema)


@pytest.fixture
async def storage(url: str) -> AsyncIterator[PostgresStorage]:
    """On the database server's clock, as in production."""
    opened = PostgresStorage.from_url(url)
    await opened.migrate()
    yield opened
    await opened.close()


async def _open(url: str, count: int) -> list[PostgresStorage]:
    """`count` storages with their own pools: as many processes sharing the database."""
    opened = [PostgresStorage.from_url(url) for _ in range(count)]
    await opened[0].migrate()
    return opened


async def _close(storages: list[PostgresStorage]) -> None:
    await asyncio.gather(*(s.close() for s in storages))


async def test_migrations_from_several_processes_at_once(url: str) -> None:
    script = textwrap.dedent(f"""
        import asyncio
        from engine.storage.postgres.store import PostgresStorage
        async def main():
            storage = PostgresStorage.from_url({url!r})
            print(await storage.migrate())
            await storage.close()
        asyncio.run(main())
    """)
    processes = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    outputs = [p.communicate(timeout=60) for p in processes]
    assert [p.returncode for p in processes] == [0] * 4, outputs
    assert {out.strip() for out, _ in outputs} == {str(LATEST)}
    # And as tasks of one process, each with its own pool, racing the processes' result.
    storages = [PostgresStorage.from_url(url) for _ in range(6)]
    try:
        assert await asyncio.gather(*(s.migrate() for s in storages)) == [LATEST] * 6
    finally:
        await _close(storages)
    with psycopg.connect(url) as connection:
        versions = connection.execute("SELECT version FROM schema_version").fetchall()
    assert sorted(v for (v,) in versions) == [number for number, _ in MIGRATIONS]


async def test_many_claimers_never_share_an_event(url: str) -> None:
    storages = await _open(url, 4)
    try:
        total = 300
        await asyncio.gather(*(storages[n % 4].inbox.store(event(n)) for n in range(total)))
        claimed: list[int] = []

        async def claimer(storage: PostgresStorage, worker: str) -> None:
            while batch := await storage.inbox.claim(worker, 3, 30):
                claimed.extend(e.id for e in batch)
                for leased in batch:
                    assert await storage.inbox.finish(leased.id, worker, "processed")

        await asyncio.gather(*(claimer(storages[n % 4], f"w{n}") for n in range(16)))
        assert len(claimed) == total
        assert len(set(claimed)) == total, "an event was claimed twice"
        events = await storages[0].inbox.list_events(limit=total)
        assert {e.status for e in events} == {"processed"}
        assert {e.attempts for e in events} == {1}
        # The counts /metrics reads, kept by 16 concurrent writers across 4 pools, add up.
        counts = (await storages[3].inbox.stats()).by_status
        assert (counts["processed"], counts["received"]) == (total, 0)
    finally:
        await _close(storages)


async def test_a_dead_workers_events_come_back_after_the_lease(url: str) -> None:
    crashed, survivor = await _open(url, 2)
    try:
        stored = await crashed.inbox.store(event(1))
        assert [e.id for e in await crashed.inbox.claim("crashed", 5, 0.6)] == [stored.id]
        await crashed.close()  # its pool is gone; nothing is released
        assert await survivor.inbox.claim("survivor", 5, 30) == []
        await asyncio.sleep(0.7)
        again = await survivor.inbox.claim("survivor", 5, 30)
        assert [(e.id, e.attempts, e.lease_owner) for e in again] == [
            (stored.id, 2, "survivor")]
        assert await survivor.inbox.finish(stored.id, "survivor", "processed")
    finally:
        await _close([crashed, survivor])


async def test_dedupe_holds_across_two_receivers(url: str) -> None:
    left, right = await _open(url, 2)
    try:
        for n in range(5):
            results = await asyncio.gather(
                *((left if i % 2 else right).inbox.store(event(n)) for i in range(20)))
            assert sum(not r.duplicate for r in results) == 1
            assert len({r.id for r in results}) == 1
        assert len(await left.inbox.list_events()) == 5
    finally:
        await _close([left, right])


async def test_concurrent_stores_share_statements(
    storage: PostgresStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches: list[int] = []
    original = inbox.store_many

    async def counting(connection: Any, events: Sequence[NewEvent]) -> list[StoreResult]:
        batches.append(len(events))
        return await original(connection, events)

    monkeypatch.setattr(inbox, "store_many", counting)
    bodies = [event(n) for n in range(200)] + [event(n) for n in range(0, 200, 10)]
    results = await asyncio.gather(*(storage.inbox.store(e) for e in bodies))
    assert sum(batches) == 220
    assert len(batches) < 50, f"{len(batches)} statements for 220 concurrent stores"
    assert sum(not r.duplicate for r in results) == 200
    assert [r.id for r in results[200:]] == [results[n].id for n in range(0, 200, 10)]
    assert len(await storage.inbox.list_events(limit=500)) == 200


async def test_a_row_postgresql_refuses_fails_alone_in_its_batch(
    storage: PostgresStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Even a bad row the up-front check misses (here the check is switched off) fails only
    its own store: the batch is written again row by row."""
    monkeypatch.setattr(records, "unstorable", lambda event: None)
    bad = replace(event(99), event_timestamp="2026-03-01\udfff")
    results = await asyncio.gather(
        *(storage.inbox.store(event(n)) for n in range(3)), storage.inbox.store(bad),
        *(storage.inbox.store(event(n)) for n in range(3, 6)), return_exceptions=True)
    assert isinstance(results[3], UnstorableEventError), results[3]
    assert "UnicodeEncodeError" in str(results[3])
    assert sum(isinstance(r, StoreResult) for r in results) == 6
    assert len(await storage.inbox.list_events()) == 6


_ROWS_READ = (
    "SELECT SUM(pg_stat_get_xact_tuples_returned(oid)) FROM pg_class WHERE oid = 'inbox'::regclass"
    " OR oid IN (SELECT indexrelid FROM pg_index WHERE indrelid = 'inbox'::regclass)"
)


async def test_inbox_stats_reads_no_more_rows_for_a_bigger_inbox(
    storage: PostgresStorage, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/metrics reads inbox_stats on every scrape: the inbox rows and index entries it reads
    (this transaction's own statistics) stay the same from 100 events to 3,000."""

    async def rows_read() -> int:
        async with await psycopg.AsyncConnection.connect(url) as connection:

            @asynccontextmanager
            async def this_transaction(doing: str) -> AsyncIterator[Any]:
                yield connection

            before = await (await connection.execute(_ROWS_READ)).fetchone()
            with monkeypatch.context() as patched:  # the stats' statements, in this one
                patched.setattr(storage.database, "connection", this_transaction)
                await storage.inbox.stats()
            after = await (await connection.execute(_ROWS_READ)).fetchone()
            assert before is not None and after is not None
            return int(after[0] or 0) - int(before[0] or 0)

    await asyncio.gather(*(storage.inbox.store(event(n)) for n in range(100)))
    claimed = await storage.inbox.claim("w", 50, 30)
    await storage.inbox.finish(claimed[0].id, "w", "processed")
    small = await rows_read()
    await asyncio.gather(*(storage.inbox.store(event(n)) for n in range(100, 3000)))
    large = await rows_read()
    assert (await storage.inbox.stats()).by_status["received"] == 2999
    assert large <= small + 2, f"{small} rows read at 100 events, {large} at 3,000"


async def test_migration_2_counts_the_events_already_stored(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as connection:
        postgres_before(connection, 2)
        for n, status in enumerate(["received"] * 3 + ["dead", "processed", "processed"]):
            connection.execute(
                "INSERT INTO inbox (dedupe_key, source, event_type, event_timestamp,"
                " received_at, headers, status, updated_at) VALUES (%s, 't', 'e', 't', now(),"
                " '{}', %s, now())", (f"k{n}", status))
    upgraded = PostgresStorage.from_url(url)
    try:
        assert await upgraded.migrate() >= 2
        assert dict((await upgraded.inbox.stats()).by_status) == {
            "received": 3, "processed": 2, "ignored": 0, "failed": 0, "dead": 1}
        await upgraded.inbox.store(event(1))
        assert (await upgraded.inbox.stats()).by_status["received"] == 4
    finally:
        await upgraded.close()


async def test_migration_8_gives_stored_events_the_prefix_their_retries_come_with(
    url: str,
) -> None:
    """After the upgrade a retry of a stored webhook (its prefix is its signed timestamp's
    start) and of a stored identify call (no prefix) are duplicates, and (prefix, key) dedupes
    across two receivers as the key alone did."""
    stamp = "2026-03-01T10:00:00.123456789012345678+00:00"  # longer than the prefix
    with psycopg.connect(url, autocommit=True) as connection:
        postgres_before(connection, 8)
        for key, source in (("key-hook", "tolinku"), ("key-identify", "identify")):
            connection.execute(
                "INSERT INTO inbox (dedupe_key, source, event_type, event_timestamp,"
                " received_at, headers, status, updated_at) VALUES (%s, %s, 'e', %s, now(),"
                " '{}', 'processed', now())", (key, source, stamp))
    left, right = await _open(url, 2)
    try:
        prefix = stamp[:records.DEDUPE_PREFIX_CHARACTERS]
        retries = [replace(event(1), dedupe_key="key-hook", event_timestamp=stamp,
                           dedupe_prefix=prefix),
                   replace(event(2), dedupe_key="key-identify", source="identify")]
        results = await asyncio.gather(*(left.inbox.store(e) for e in retries))
        assert [(r.id, r.duplicate) for r in results] == [(1, True), (2, True)]
        fresh = replace(event(3), dedupe_prefix=prefix)
        results = await asyncio.gather(
            *((left if i % 2 else right).inbox.store(fresh) for i in range(20)))
        assert sum(not r.duplicate for r in results) == 1
        assert len({r.id for r in results}) == 1
    finally:
        await _close([left, right])


async def test_check_writable_fails_while_the_disk_is_full_and_recovers(
    storage: PostgresStorage, url: str
) -> None:
    """A full disk, injected: every insert fails with PostgreSQL's own disk_full error."""
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute(
            "CREATE FUNCTION full_disk() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
            " RAISE EXCEPTION 'could not extend file: No space left on device'"
            " USING ERRCODE = 'disk_full'; END $$")
        for table in ("inbox", "write_probe"):
            connection.execute(f"CREATE TRIGGER full_disk BEFORE INSERT ON {table}"
                               " FOR EACH ROW EXECUTE FUNCTION full_disk()")
        with pytest.raises(StorageError, match="No space left"):
            await storage.inbox.store(event(1))
        with pytest.raises(StorageError, match="No space left"):
            await storage.check_writable()
        for table in ("inbox", "write_probe"):
            connection.execute(f"DROP TRIGGER full_disk ON {table}")
    await storage.check_writable()
    assert (await storage.inbox.store(event(1))).duplicate is False
    with psycopg.connect(url) as connection:  # the test write left nothing behind
        assert connection.execute("SELECT COUNT(*) FROM write_probe").fetchone() == (0,)


async def test_rate_limit_bucket_is_shared_by_every_pool(url: str) -> None:
    storages = await _open(url, 3)
    try:
        # Refill too slow to add a token during the test: exactly the capacity is granted.
        waits = await asyncio.gather(*(
            storages[n % 3].rate_limits.take_tokens("hubspot", 1, 10, 0.001) for n in range(60)))
        assert sum(w == 0 for w in waits) == 10
        assert all(w > 0 for w in waits if w != 0)
    finally:
        await _close(storages)


async def test_rolling_windows_are_shared_by_every_pool(url: str) -> None:
    """Pipedrive searches (a search window and the burst window) and writes (the burst window
    alone) from three pools at once: neither window ever grants more than its limit, and a
    refused search took nothing from the burst window."""
    storages = await _open(url, 3)
    search, burst = ("pd:search", 10, 1000.0), ("pd:burst", 25, 1000.0)
    try:
        waits = await asyncio.gather(*(
            storages[n % 3].rate_limits.take_slots([search, burst] if n % 2 else [burst])
            for n in range(60)))
        searches = sum(w == 0 for n, w in enumerate(waits) if n % 2)
        writes = sum(w == 0 for n, w in enumerate(waits) if not n % 2)
        assert searches <= 10 and searches + writes == 25
        assert all(w > 0 for w in waits if w != 0)
    finally:
        await _close(storages)


async def test_rate_limit_bucket_is_shared_with_another_process(
    storage: PostgresStorage, url: str
) -> None:
    waits = [await storage.rate_limits.take_tokens("pipedrive", 1, 10, 0.001) for _ in range(6)]
    assert waits.count(0) == 6
    script = textwrap.dedent(f"""
        import asyncio
        from engine.storage.postgres.store import PostgresStorage
        async def main():
            storage = PostgresStorage.from_url({url!r})
            waits = [await storage.rate_limits.take_tokens("pipedrive", 1, 10,
                                                           0.001) for _ in range(10)]
            print(waits.count(0))
            await storage.close()
        asyncio.run(main())
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, check=True)
    assert done.stdout.strip() == "4", done.stderr  # the 4 this process left, no more


async def test_idle_workers_wake_when_another_process_stores(url: str) -> None:
    receiver, worker = await _open(url, 2)
    try:
        assert await worker.wait_for_events(0.5) in (True, False)  # starts LISTEN
        assert await worker.wait_for_events(0.2) is False
        waiting = asyncio.create_task(worker.wait_for_events(10))
        await asyncio.sleep(0.1)
        started = time.monotonic()
        await receiver.inbox.store(event(1))
        assert await waiting is True
        assert time.monotonic() - started < 2
        await receiver.inbox.store(event(1))  # a duplicate makes nothing new to claim
        assert await worker.wait_for_events(0.3) is False
    finally:
        await _close([receiver, worker])


async def _listen(url: str, heard: list[object]) -> psycopg.AsyncConnection[Any]:
    """A connection LISTENing on the inbox channel of `url`'s schema; `heard` collects what
    comes."""
    listener = await psycopg.AsyncConnection.connect(url, autocommit=True)
    row = await (await listener.execute(f"SELECT {channel_name('inbox')}")).fetchone()
    assert row is not None
    await listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(row[0])))
    listener.add_notify_handler(heard.append)
    return listener


async def test_a_busy_receiver_sends_a_few_notifications_not_one_per_store(url: str) -> None:
    [receiver] = await _open(url, 1)
    heard: list[object] = []
    listener = await _listen(url, heard)
    try:
        started = time.monotonic()
        for n in range(40):  # a store every 5 ms: each makes new work for the workers
            await receiver.inbox.store(event(n))
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.1)
        await listener.execute("SELECT 1")  # deliver what has arrived
        elapsed = time.monotonic() - started
        assert 1 <= len(heard) <= elapsed / notify.SPACING + 2, (len(heard), elapsed)
    finally:
        await listener.close()
        await _close([receiver])


async def test_a_notify_connection_the_server_dropped_is_replaced_at_once(url: str) -> None:
    receiver, worker = await _open(url, 2)
    try:
        assert await worker.wait_for_events(0.5) in (True, False)  # starts LISTEN
        await receiver.inbox.store(event(1))
        assert await worker.wait_for_events(5) is True
        sending = receiver.database.wakeups._sending  # the kept NOTIFY connection
        assert sending is not None
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as admin:
            await admin.execute(  # as a server restart or a proxy's idle timeout would
                "SELECT pg_terminate_backend(%s)", (sending[0].info.backend_pid,))
        await asyncio.sleep(0.1)
        started = time.monotonic()
        await receiver.inbox.store(event(2))
        assert await worker.wait_for_events(5) is True
        assert time.monotonic() - started < 1  # woken by the notification, not the timeout
    finally:
        await _close([receiver, worker])


async def test_commits_are_durable_and_visible_to_other_connections(
    storage: PostgresStorage, url: str
) -> None:
    assert await storage.durability() == {
        "postgres_synchronous_commit": 3, "postgres_fsync": 1}
    stored = await storage.inbox.store(event(1))
    with psycopg.connect(url) as other:
        row = other.execute("SELECT dedupe_key FROM inbox WHERE id = %s", (stored.id,))
        assert row.fetchone() == (event(1).dedupe_key,)


async def test_a_server_that_turned_synchronous_commit_off_is_overridden(schema: str) -> None:
    opened = PostgresStorage.from_url(schema_url(schema, "synchronous_commit=off"))
    try:
        await opened.migrate()
        assert (await opened.durability())["postgres_synchronous_commit"] == 3
    finally:
        await opened.close()


async def test_pool_options_come_from_the_url_or_the_environment(url: str) -> None:
    opened = open_storage(url + "&pool_size=3&pool_timeout=2.5")
    assert isinstance(opened, PostgresStorage)
    assert (opened.database.pool_settings.size, opened.database.pool_settings.timeout) == (3, 2.5)
    try:
        await opened.migrate()  # libpq never sees linkcrm's own parameters
    finally:
        await opened.close()
    from_env = PostgresStorage.from_url(url, environ={"LINKCRM_DB_POOL_SIZE": "7"})
    assert from_env.database.pool_settings.size == 7
    await from_env.close()


@pytest.mark.parametrize(
    ("query", "named"),
    [("pool_size=0", "pool_size"), ("pool_size=lots", "pool_size"),
     ("pool_timeout=-1", "pool_timeout"), ("pool_size=2&pool_min_size=5", "pool_min_size")],
)
def test_bad_pool_options_are_named_without_the_password(query: str, named: str) -> None:
    with pytest.raises(StorageError, match=named) as caught:
        open_storage(f"postgresql://linkcrm:hunter2@db/linkcrm?{query}")
    assert "hunter2" not in str(caught.value)


async def test_an_unreachable_server_is_a_storage_error_in_time(postgres: None) -> None:
    opened = open_storage("postgresql://postgres@127.0.0.1:1/test?pool_timeout=0.5")
    try:
        started = time.monotonic()
        with pytest.raises(StorageError, match=r"^cannot connect to postgresql://postgres@"
                           r"127\.0\.0\.1:1/test\?pool_timeout=0\.5: Connection refused"):
            await opened.inbox.store(event(1))
        assert time.monotonic() - started < 3
    finally:
        await opened.close()


async def test_a_busy_pool_is_not_blamed_on_the_server(schema: str) -> None:
    opened = PostgresStorage.from_url(schema_url(schema, pool_size=1, pool_timeout=0.5))
    try:
        await opened.migrate()
        async with opened.database.connection("hold the only connection"):
            with pytest.raises(StorageError, match=r"no PostgreSQL connection within 0\.5s "
                               r"\(pool_size=1\)"):
                await opened.schema_version()
    finally:
        await opened.close()


async def test_a_missing_schema_says_what_to_create(postgres: None) -> None:
    opened = PostgresStorage.from_url(schema_url("lc_no_such_schema"))
    try:
        with pytest.raises(StorageError, match="CREATE SCHEMA"):
            await opened.migrate()
    finally:
        await opened.close()



async def test_a_value_the_server_refuses_is_permanent_not_transient(
    storage: PostgresStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The net behind the shared values check: what psycopg or the server refuses (a NUL in
    text, a lone surrogate, an index entry over the size limit) fails the same way every
    time, so it is an UnstorableValueError, which the worker never retries."""
    refused = [
        ("text with a NUL", IdentityKey("email", "a\x00b")),
        ("a lone surrogate", IdentityKey("email", "a\ud800")),
        ("an index entry over the limit", IdentityKey("email", secrets.token_hex(8000))),
    ]
    for what, key in refused:
        with pytest.raises(UnstorableValueError, match="bind the identity: a value cannot be"):
            # Straight to the SQL, past the values check, as a value it missed would go.
            with monkeypatch.context() as unchecked:
                unchecked.setattr(checks, "identity_binding", lambda key, record_id: None)
                await storage.identities.bind_identity("hubspot", key, "1")
        assert await storage.identities.lookup_identity("hubspot", [EMAIL]) is None, what
    await storage.identities.bind_identity("hubspot", EMAIL,
                                           "101")  # the connections are still fine
    assert await storage.identities.lookup_identity("hubspot", [EMAIL]) == "101"
