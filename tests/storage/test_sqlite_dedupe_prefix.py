"""SQLite: dedupe keys led by their prefix (migration 9), and the rebuild that brought it."""

from __future__ import annotations

import asyncio
import sqlite3
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from engine.errors import StorageError
from engine.storage import records
from engine.storage.sqlite.schema import LATEST
from engine.storage.sqlite.store import SQLiteStorage
from tests.storage.contract import FakeClock, event
from tests.storage.old_schemas import sqlite_before

LONG_STAMP = "2026-03-01T10:00:00.123456789012345678+00:00"  # longer than the prefix
THEN = "2026-03-01T10:00:01.000000+00:00"

pytestmark = pytest.mark.anyio


def _version_8_database(path: Path) -> None:
    """A database as release 8 left it: a webhook with its ordering keys, an identify call
    with an action outcome, a dead webhook with a shadow result, and an inbox counter that
    has handed out ids no row holds any more."""
    with sqlite3.connect(path, isolation_level=None) as connection:
        connection.execute("PRAGMA foreign_keys = ON")
        connection.execute("BEGIN")
        sqlite_before(connection, 9)
        rows = [("key-hook", "tolinku", LONG_STAMP, "received"),
                ("key-identify", "identify", THEN, "processed"),
                # Stored with its NUL as U+FFFD, as every release has stored text.
                ("key-dead", "tolinku", "not a time \ufffd at all", "dead")]
        for key, source, stamp, status in rows:
            connection.execute(
                "INSERT INTO inbox (dedupe_key, source, event_type, event_timestamp,"
                " received_at, headers, body, status, updated_at)"
                " VALUES (?, ?, 'install.tracked', ?, ?, '{}', x'7b7d', ?, ?)",
                (key, source, stamp, THEN, status, THEN))
        connection.execute("INSERT INTO inbox_ordering_keys VALUES (1, 'hubspot:person-1')")
        connection.execute(
            "INSERT INTO action_outcomes (event_id, rule, action_kind, target, idempotency_key,"
            " status, created_at, updated_at) VALUES (2, 'r', 'upsert_contact', 'local', 'i',"
            " 'ok', ?, ?)", (THEN, THEN))
        connection.execute(
            "INSERT INTO shadow_results (shadow_version, event_id, event_type, outcome, changes,"
            " observed_at) VALUES ('v2', 3, 'install.tracked', 'same', '[]', ?)", (THEN,))
        connection.execute("UPDATE sqlite_sequence SET seq = 10 WHERE name = 'inbox'")
        connection.execute("COMMIT")


def _stored(key: str, source: str, stamp: str, prefix: str) -> records.NewEvent:
    return records.NewEvent(body=b"{}", event_type="install.tracked", event_timestamp=stamp,
                            dedupe_key=key, received_at=datetime(2026, 3, 2, tzinfo=UTC),
                            source=source, dedupe_prefix=prefix)


async def test_the_rebuilt_inbox_keeps_every_event_its_id_references_and_duplicates(
    tmp_path: Path,
) -> None:
    database = tmp_path / "v8.db"
    _version_8_database(database)
    storage = SQLiteStorage(database, clock=FakeClock())
    try:
        assert await storage.migrate() == LATEST >= 9
        listed = await storage.inbox.list_events(limit=10)
        assert [(e.id, e.dedupe_key, e.status) for e in listed] == [
            (3, "key-dead", "dead"), (2, "key-identify", "processed"),
            (1, "key-hook", "received")]
        stats = await storage.inbox.stats()
        assert (stats.by_status["received"], stats.by_status["processed"],
                stats.by_status["dead"]) == (1, 1, 1)
        with sqlite3.connect(database) as other:
            assert other.execute("PRAGMA foreign_key_check").fetchall() == []
            assert other.execute("SELECT COUNT(*) FROM inbox_ordering_keys WHERE event_id = 1"
                                 " UNION ALL SELECT COUNT(*) FROM action_outcomes"
                                 " WHERE event_id = 2 UNION ALL SELECT COUNT(*)"
                                 " FROM shadow_results WHERE event_id = 3").fetchall() == [
                (1,), (1,), (1,)]
            tables = {name for (name,) in other.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert not {name for name in tables if name.endswith("_before_9")}

        # Ids go on from the counter, never from the highest row left.
        new = await storage.inbox.store(_stored("key-new", "tolinku", THEN, THEN))
        assert (new.id, new.duplicate) == (11, False)

        # A retry of each stored delivery, as today's receiver stores it, is its duplicate:
        # a webhook's prefix is its signed timestamp's start (what the migration gave the
        # stored rows), an identify call's is empty.
        prefix = LONG_STAMP[:records.DEDUPE_PREFIX_CHARACTERS]
        retries = [_stored("key-hook", "tolinku", LONG_STAMP, prefix),
                   _stored("key-identify", "identify", "2026-03-02T00:00:00+00:00", ""),
                   _stored("key-dead", "tolinku", "not a time \x00 at all",
                           "not a time \x00 at all")]
        results = await asyncio.gather(*(storage.inbox.store(e) for e in retries))
        assert [(r.id, r.duplicate) for r in results] == [(1, True), (2, True), (3, True)]
        assert (await storage.inbox.stats()).by_status["received"] == 2
    finally:
        await storage.close()


async def test_a_disk_that_fills_during_the_rebuild_leaves_the_old_inbox_whole(
    tmp_path: Path,
) -> None:
    """The rebuild is one transaction: when the disk cannot hold the copy, the migration fails
    with a storage error and the database is still at version 8 with every event in it."""
    database = tmp_path / "v8.db"
    _version_8_database(database)

    def no_room_to_grow(connection: sqlite3.Connection) -> None:
        pages = connection.execute("PRAGMA page_count").fetchone()[0]
        connection.execute(f"PRAGMA max_page_count = {int(pages)}")

    full = SQLiteStorage(database, clock=FakeClock(), configure=no_room_to_grow)
    try:
        with pytest.raises(StorageError, match="full"):
            await full.migrate()
    finally:
        await full.close()
    with sqlite3.connect(database) as other:
        assert other.execute("SELECT MAX(version) FROM schema_version").fetchone() == (8,)
        assert other.execute("SELECT id, dedupe_key FROM inbox ORDER BY id").fetchall() == [
            (1, "key-hook"), (2, "key-identify"), (3, "key-dead")]
        assert other.execute("SELECT COUNT(*) FROM sqlite_master"
                             " WHERE name LIKE '%before_9'").fetchone() == (0,)
    upgraded = SQLiteStorage(database, clock=FakeClock())
    try:
        assert await upgraded.migrate() == LATEST
        assert len(await upgraded.inbox.list_events()) == 3
    finally:
        await upgraded.close()


async def test_an_empty_inbox_is_rebuilt_and_numbers_from_one(tmp_path: Path) -> None:
    storage = SQLiteStorage(tmp_path / "new.db", clock=FakeClock())
    try:
        await storage.migrate()
        assert (await storage.inbox.store(event(1))).id == 1
    finally:
        await storage.close()


async def test_a_prefix_and_key_pair_is_what_dedupes_within_and_across_batches(
    tmp_path: Path,
) -> None:
    storage = SQLiteStorage(tmp_path / "dedupe.db", clock=FakeClock())
    try:
        await storage.migrate()
        one = replace(event(1), dedupe_prefix="2026-03-01T00:00:00Z")
        # Identical copies in one batch: the first is stored (and told so), the second is its
        # duplicate. (The conflicting row uses up an id: ids grow, with gaps.)
        first, copy, two = await asyncio.gather(
            storage.inbox.store(one), storage.inbox.store(one), storage.inbox.store(event(2)))
        assert (first.duplicate, copy.duplicate, two.duplicate) == (False, True, False)
        assert copy.id == first.id < two.id
        again = await asyncio.gather(storage.inbox.store(event(2)), storage.inbox.store(one),
                                     storage.inbox.store(event(3)))
        assert [(r.id, r.duplicate) for r in again[:2]] == [(two.id, True), (first.id, True)]
        assert not again[2].duplicate and again[2].id > two.id
    finally:
        await storage.close()


def _wal_pages(database: Path) -> int:
    with sqlite3.connect(database) as other:
        return int(other.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1])


async def test_deliveries_of_one_moment_share_index_pages(tmp_path: Path) -> None:
    """What migration 9 is for: with 20,000 events stored, a commit of 17 deliveries whose
    keys are led by the moment they were signed writes far fewer pages than 17 whose keys
    fall at random through the index (one leaf each)."""
    database = tmp_path / "pages.db"
    storage = SQLiteStorage(database, clock=FakeClock())

    def delivery(n: int, ordered: bool) -> records.NewEvent:
        stamp = f"2026-03-01T10:{n // 60000 % 60:02d}:{n // 1000 % 60:02d}.{n % 1000:03d}Z"
        return replace(event(n), event_timestamp=stamp, dedupe_prefix=stamp if ordered else "")

    async def commit_pages(first: int, ordered: bool) -> float:
        pages = []
        for start in range(first, first + 170, 17):
            with sqlite3.connect(database) as other:
                other.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            await asyncio.gather(*(storage.inbox.store(delivery(n, ordered))
                                   for n in range(start, start + 17)))
            pages.append(_wal_pages(database))
        return sum(pages) / len(pages)

    try:
        await storage.migrate()
        for start in range(0, 20_000, 1000):
            await asyncio.gather(*(storage.inbox.store(delivery(n, n % 2 == 0))
                                   for n in range(start, start + 1000)))
        ordered = await commit_pages(30_000, ordered=True)
        scattered = await commit_pages(40_000, ordered=False)
    finally:
        await storage.close()
    assert ordered < 0.7 * scattered, (ordered, scattered)
