"""The lifecycle part of the storage contract: schema, health, failed commits, close."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from engine.errors import StorageError
from engine.storage import Storage
from tests.storage.contract.support import event


class LifecycleContract:
    """Migrations, /readyz's checks, writes that cannot commit, closing."""

    async def test_migrate_is_idempotent_and_safe_concurrently(
        self, make_storage: Callable[[], Storage]
    ) -> None:
        first, second = make_storage(), make_storage()
        try:
            assert await first.schema_version() == 0
            versions = await asyncio.gather(first.migrate(), second.migrate())
            assert versions[0] == versions[1] >= 1
            stored = await first.inbox.store(event(1))
            assert await second.migrate() == versions[0]
            assert await first.schema_version() == versions[0]
            assert (await second.inbox.store(event(1))).id == stored.id
        finally:
            await first.close()
            await second.close()

    async def test_ping_answers_when_migrated(self, storage: Storage) -> None:
        await storage.ping()
        durability = await storage.durability()
        assert all(isinstance(value, int) for value in durability.values())

    async def test_unmigrated_database_says_to_migrate(
        self, make_storage: Callable[[], Storage]
    ) -> None:
        fresh = make_storage()
        try:
            with pytest.raises(StorageError, match="migrate"):
                await fresh.ping()
            with pytest.raises(StorageError, match="migrate"):
                await fresh.inbox.store(event(1))
        finally:
            await fresh.close()

    async def test_a_write_that_cannot_commit_raises_storage_error(
        self, failing_storage: Storage
    ) -> None:
        big = event(1, body=b"x" * 300_000)
        with pytest.raises(StorageError):
            await failing_storage.inbox.store(big)
        results = await asyncio.gather(
            *(failing_storage.inbox.store(event(n, body=bytes([n]) * 300_000))
              for n in range(1, 6)),
            return_exceptions=True,
        )
        assert all(isinstance(r, StorageError) for r in results)
        assert await failing_storage.inbox.list_events() == []

    async def test_writes_that_fail_make_check_writable_fail(
        self, failing_storage: Storage, storage: Storage
    ) -> None:
        """/readyz asks check_writable: free (nothing written) while commits go through; once
        one fails, only a test write that commits says writable again."""
        await storage.inbox.store(event(1))
        await storage.check_writable()
        await failing_storage.check_writable()  # nothing has failed yet: nothing is probed
        with pytest.raises(StorageError):
            await failing_storage.inbox.store(event(2, body=b"x" * 300_000))
        with pytest.raises(StorageError):
            await failing_storage.check_writable()
        with pytest.raises(StorageError):  # and again: a failed probe clears nothing
            await failing_storage.check_writable()
        assert [e.id for e in await storage.inbox.list_events()] == [1]


    async def test_a_closed_storage_refuses_work(self, storage: Storage) -> None:
        await storage.close()
        with pytest.raises(StorageError):
            await storage.inbox.store(event(1))
        await storage.close()  # idempotent
