"""The storage contract on PostgreSQL, plus what several processes sharing one database need."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

import psycopg
import pytest

from engine.errors import StorageError
from engine.storage import NewEvent, Storage, StoreResult, open_storage
from engine.storage import postgres_inbox as inbox
from engine.storage.postgres import PostgresStorage
from engine.storage.postgres_schema import LATEST
from tests.postgres_support import fresh_schema, require_postgres, schema_url
from tests.storage_contract import FakeClock, StorageContract, event


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
def anyio_backend() -> str:
    return "asyncio"


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
        from engine.storage.postgres import PostgresStorage
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
    assert sorted(v for (v,) in versions) == list(range(1, LATEST + 1))


async def test_many_claimers_never_share_an_event(url: str) -> None:
    storages = await _open(url, 4)
    try:
        total = 300
        await asyncio.gather(*(storages[n % 4].store_event(event(n)) for n in range(total)))
        claimed: list[int] = []

        async def claimer(storage: PostgresStorage, worker: str) -> None:
            while batch := await storage.claim(worker, 3, 30):
                claimed.extend(e.id for e in batch)
                for leased in batch:
                    assert await storage.finish(leased.id, worker, "processed")

        await asyncio.gather(*(claimer(storages[n % 4], f"w{n}") for n in range(16)))
        assert len(claimed) == total
        assert len(set(claimed)) == total, "an event was claimed twice"
        events = await storages[0].list_events(limit=total)
        assert {e.status for e in events} == {"processed"}
        assert {e.attempts for e in events} == {1}
    finally:
        await _close(storages)


async def test_a_dead_workers_events_come_back_after_the_lease(url: str) -> None:
    crashed, survivor = await _open(url, 2)
    try:
        stored = await crashed.store_event(event(1))
        assert [e.id for e in await crashed.claim("crashed", 5, 0.6)] == [stored.id]
        await crashed.close()  # its pool is gone; nothing is released
        assert await survivor.claim("survivor", 5, 30) == []
        await asyncio.sleep(0.7)
        again = await survivor.claim("survivor", 5, 30)
        assert [(e.id, e.attempts, e.lease_owner) for e in again] == [
            (stored.id, 2, "survivor")]
        assert await survivor.finish(stored.id, "survivor", "processed")
    finally:
        await _close([crashed, survivor])


async def test_dedupe_holds_across_two_receivers(url: str) -> None:
    left, right = await _open(url, 2)
    try:
        for n in range(5):
            results = await asyncio.gather(
                *((left if i % 2 else right).store_event(event(n)) for i in range(20)))
            assert sum(not r.duplicate for r in results) == 1
            assert len({r.id for r in results}) == 1
        assert len(await left.list_events()) == 5
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
    results = await asyncio.gather(*(storage.store_event(e) for e in bodies))
    assert sum(batches) == 220
    assert len(batches) < 50, f"{len(batches)} statements for 220 concurrent stores"
    assert sum(not r.duplicate for r in results) == 200
    assert [r.id for r in results[200:]] == [results[n].id for n in range(0, 200, 10)]
    assert len(await storage.list_events(limit=500)) == 200


async def test_rate_limit_bucket_is_shared_by_every_pool(url: str) -> None:
    storages = await _open(url, 3)
    try:
        # Refill too slow to add a token during the test: exactly the capacity is granted.
        waits = await asyncio.gather(*(
            storages[n % 3].take_tokens("hubspot", 1, 10, 0.001) for n in range(60)))
        assert sum(w == 0 for w in waits) == 10
        assert all(w > 0 for w in waits if w != 0)
    finally:
        await _close(storages)


async def test_rate_limit_bucket_is_shared_with_another_process(
    storage: PostgresStorage, url: str
) -> None:
    waits = [await storage.take_tokens("pipedrive", 1, 10, 0.001) for _ in range(6)]
    assert waits.count(0) == 6
    script = textwrap.dedent(f"""
        import asyncio
        from engine.storage.postgres import PostgresStorage
        async def main():
            storage = PostgresStorage.from_url({url!r})
            waits = [await storage.take_tokens("pipedrive", 1, 10, 0.001) for _ in range(10)]
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
        await receiver.store_event(event(1))
        assert await waiting is True
        assert time.monotonic() - started < 2
        await receiver.store_event(event(1))  # a duplicate makes nothing new to claim
        assert await worker.wait_for_events(0.3) is False
    finally:
        await _close([receiver, worker])


async def test_commits_are_durable_and_visible_to_other_connections(
    storage: PostgresStorage, url: str
) -> None:
    assert await storage.durability() == {
        "postgres_synchronous_commit": 3, "postgres_fsync": 1}
    stored = await storage.store_event(event(1))
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
    assert (opened.pool_settings.size, opened.pool_settings.timeout) == (3, 2.5)
    try:
        await opened.migrate()  # libpq never sees linkcrm's own parameters
    finally:
        await opened.close()
    from_env = PostgresStorage.from_url(url, environ={"LINKCRM_DB_POOL_SIZE": "7"})
    assert from_env.pool_settings.size == 7
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
        with pytest.raises(StorageError, match="no PostgreSQL connection within 0.5s"):
            await opened.store_event(event(1))
        assert time.monotonic() - started < 3
    finally:
        await opened.close()


async def test_a_missing_schema_says_what_to_create(postgres: None) -> None:
    opened = PostgresStorage.from_url(schema_url("lc_no_such_schema"))
    try:
        with pytest.raises(StorageError, match="CREATE SCHEMA"):
            await opened.migrate()
    finally:
        await opened.close()

