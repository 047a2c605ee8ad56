"""The embedded SQLite backend: one file, WAL, `synchronous=FULL`, group commit.

Writes go through one writer thread (`GroupCommitWriter`) that commits concurrent callers in
shared transactions; reads run on a small thread pool with their own connections, which WAL
lets proceed while the writer commits. Other processes on the same file (`linkcrm worker`,
`linkcrm replay`) take turns on SQLite's write lock, waiting up to `busy_timeout`.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path
from typing import TypeVar

from engine.actions import JSON, IdentityKey
from engine.errors import StorageError, UnstorableEventError, UnstorableValueError
from engine.storage import values
from engine.storage.base import PROBE_BYTES, Clock, Storage, utc_now
from engine.storage.records import (
    ActionOutcome,
    ContactResult,
    DeadLetter,
    DealResult,
    EventStatus,
    FinalStatus,
    InboxEvent,
    InboxStats,
    LocalContact,
    LocalDeal,
    NewEvent,
    NewOutcome,
    StageResult,
    StoreResult,
    describe,
)
from engine.storage.sqlite import crm, inbox, maps
from engine.storage.sqlite.groupcommit import GroupCommitWriter, fails_one_job, storage_error
from engine.storage.sqlite.opening import check_path, connect
from engine.storage.sqlite.rows import ts
from engine.storage.sqlite.schema import current_version
from engine.storage.sqlite.schema import migrate as apply_migrations

T = TypeVar("T")


class SQLiteStorage(Storage):
    """Storage in one SQLite file. Open it with `open_storage("sqlite:///linkcrm.db")`."""

    def __init__(
        self, path: str | Path, *, clock: Clock = utc_now, busy_timeout: float = 10.0,
        create: bool = True,
    ) -> None:
        self.path = str(path)
        self._create = create
        check_path(self.path, create=create)
        self._clock = clock
        self._busy_timeout = busy_timeout
        self._local = threading.local()
        self._reader_connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._closed = False
        self._readers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="linkcrm-sqlite-read")
        self._writer = GroupCommitWriter(self._connect_writer)

    @classmethod
    def from_url(cls, url: str, *, clock: Clock = utc_now, create: bool = True) -> SQLiteStorage:
        """`sqlite:///relative/path.db` or `sqlite:////absolute/path.db`; without `create`, the
        file must exist."""
        prefix = "sqlite:///"
        if not url.lower().startswith(prefix):
            raise StorageError(
                "a SQLite URL needs three slashes before the path: sqlite:///linkcrm.db "
                "(relative) or sqlite:////var/lib/linkcrm/linkcrm.db (absolute)"
            )
        path = url[len(prefix):]
        if not path or path == ":memory:" or "?" in path:
            raise StorageError(
                "a SQLite URL must name a database file (no :memory:, no ?options), "
                "e.g. sqlite:///linkcrm.db"
            )
        return cls(path, clock=clock, create=create)

    # -- connections ----------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        connection = connect(self.path, create=self._create, timeout=self._busy_timeout)
        connection.row_factory = sqlite3.Row
        self._configure(connection)
        return connection

    def _configure(self, connection: sqlite3.Connection) -> None:
        connection.execute("PRAGMA foreign_keys = ON")
        # FULL: a commit is on disk (the WAL fsynced) before a caller hears "stored".
        connection.execute("PRAGMA synchronous = FULL")

    def _connect_writer(self) -> sqlite3.Connection:
        connection = self._connect()
        try:
            mode = self._switch_to_wal(connection)
        except BaseException:
            connection.close()
            raise
        if str(mode).lower() != "wal":
            connection.close()
            raise sqlite3.OperationalError(f"could not switch the journal to WAL (it is {mode})")
        return connection

    def _switch_to_wal(self, connection: sqlite3.Connection) -> str:
        """`PRAGMA journal_mode = WAL`, waiting up to `busy_timeout` for other connections.

        Switching a new file to WAL reads the header and then takes the write lock. When another
        connection holds that lock (a second process switching or migrating the same new file),
        SQLite answers "database is locked" at once instead of calling the busy handler, since
        waiting while holding a read lock could deadlock. The other connection finishes within
        its own transaction, so trying again is safe and soon finds the file in WAL already.
        """
        deadline = time.monotonic() + self._busy_timeout
        pause = 0.001
        while True:
            try:
                return str(connection.execute("PRAGMA journal_mode = WAL").fetchone()[0])
            except sqlite3.OperationalError as error:
                code = error.sqlite_errorcode & 0xFF
                busy = code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
                if not busy or time.monotonic() + pause > deadline:
                    raise
            time.sleep(pause)
            pause = min(pause * 2, 0.05)

    def _reader(self) -> sqlite3.Connection:
        connection: sqlite3.Connection | None = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._connect()
            self._local.connection = connection
            with self._lock:
                self._reader_connections.append(connection)
        return connection

    def _read_sync(self, run: Callable[[sqlite3.Connection], T], doing: str) -> T:
        try:
            connection = self._reader()
            # One read transaction: a multi-statement read sees one consistent snapshot.
            connection.execute("BEGIN")
            try:
                return run(connection)
            finally:
                connection.execute("ROLLBACK")
        except _UNSTORABLE as error:
            raise unstorable(error, doing) from None
        except sqlite3.Error as error:
            raise storage_error(error, doing) from None

    async def _read(self, run: Callable[[sqlite3.Connection], T], doing: str) -> T:
        if self._closed:
            raise StorageError("the storage is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._readers, self._read_sync, run, doing)

    async def _write(self, run: Callable[[sqlite3.Connection], T], doing: str) -> T:
        try:
            return await self._writer.run(run)
        except _UNSTORABLE as error:  # a value this job could not bind; its batch is kept
            raise unstorable(error, doing) from None
        except sqlite3.Error as error:  # a constraint one job hit; the rest of its batch is kept
            raise storage_error(error, doing) from None

    def _now(self) -> datetime:
        return self._clock()

    # -- lifecycle --------------------------------------------------------------------------------

    async def migrate(self) -> int:
        applied_at = ts(self._now())
        return await self._write(lambda c: apply_migrations(c, applied_at), "migrate")

    async def schema_version(self) -> int:
        return await self._read(current_version, "read the schema version")

    async def ping(self) -> None:
        if not self._writer.alive:
            raise StorageError("the SQLite writer thread has stopped")
        version = await self.schema_version()
        if version == 0:
            raise StorageError("the database has no schema yet; run `linkcrm migrate`")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await asyncio.to_thread(self._close_sync)

    def _close_sync(self) -> None:
        self._writer.close()
        self._readers.shutdown(wait=True)
        with self._lock:
            for connection in self._reader_connections:
                connection.close()
            self._reader_connections.clear()

    # -- inbox ------------------------------------------------------------------------------------

    async def store_event(self, event: NewEvent) -> StoreResult:
        try:
            result: StoreResult = await self._writer.run_bulk(inbox.store_many, event)
        except StorageError:
            raise
        except Exception as error:
            if not fails_one_job(error):
                if isinstance(error, sqlite3.Error):
                    raise storage_error(error, "store the event") from None
                raise
            # The writer ran this event alone and it failed on its own data: it always will.
            raise UnstorableEventError(
                f"the event cannot be stored: {describe(error)}") from None
        return result

    async def get_event(self, event_id: int) -> InboxEvent | None:
        return await self._read(lambda c: inbox.get(c, event_id), "read the event")

    async def list_events(
        self, *, status: EventStatus | None = None, limit: int = 100, before_id: int | None = None
    ) -> list[InboxEvent]:
        return await self._read(
            lambda c: inbox.list_events(c, status, limit, before_id), "list events"
        )

    async def claim(self, worker_id: str, limit: int, lease_seconds: float) -> list[InboxEvent]:
        now = self._now()
        expires = ts(now + timedelta(seconds=lease_seconds))
        return await self._write(
            lambda c: inbox.claim(c, worker_id, limit, ts(now), expires), "claim events"
        )

    async def extend_lease(self, event_id: int, worker_id: str, lease_seconds: float) -> bool:
        expires = ts(self._now() + timedelta(seconds=lease_seconds))
        return await self._write(
            lambda c: inbox.update_leased(c, inbox.EXTEND, (expires,), event_id, worker_id),
            "extend the lease",
        )

    async def finish(
        self, event_id: int, worker_id: str, status: FinalStatus, error: str | None = None
    ) -> bool:
        if status not in ("processed", "ignored", "dead"):
            raise ValueError(f"finish() takes processed, ignored or dead, not {status!r}")
        params = (status, values.storable_text(error), ts(self._now()))
        return await self._write(
            lambda c: inbox.update_leased(c, inbox.FINISH, params, event_id, worker_id),
            "finish the event",
        )

    async def retry_later(
        self, event_id: int, worker_id: str, next_attempt_at: datetime, error: str | None
    ) -> bool:
        params = (values.storable_text(error), ts(next_attempt_at), ts(self._now()))
        return await self._write(
            lambda c: inbox.update_leased(c, inbox.RETRY_LATER, params, event_id, worker_id),
            "schedule the retry",
        )

    async def set_ordering_keys(self, event_id: int, keys: Sequence[str]) -> None:
        await self._write(
            lambda c: inbox.set_ordering_keys(c, event_id, keys), "record ordering keys"
        )

    async def earlier_pending(
        self, event_id: int, keys: Sequence[str]
    ) -> tuple[list[int], list[int]]:
        return await self._read(
            lambda c: inbox.earlier_unfinished(c, event_id, keys), "check earlier events"
        )

    # -- action outcomes --------------------------------------------------------------------------

    async def get_outcome(self, target: str, idempotency_key: str) -> ActionOutcome | None:
        return await self._read(
            lambda c: maps.get_outcome(c, target, idempotency_key), "read the outcome"
        )

    async def record_outcome(self, outcome: NewOutcome) -> ActionOutcome:
        outcome = values.storable_outcome(outcome)
        now = ts(self._now())
        return await self._write(
            lambda c: maps.record_outcome(c, outcome, now), "record the outcome"
        )

    async def list_outcomes(self, event_id: int) -> list[ActionOutcome]:
        return await self._read(lambda c: maps.list_outcomes(c, event_id), "list outcomes")

    async def outcome_counts(self) -> Mapping[tuple[str, str], int]:
        return await self._read(maps.outcome_counts, "count outcomes")

    # -- dead letters and replay ------------------------------------------------------------------

    async def list_dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        return await self._read(lambda c: inbox.dead_letters(c, limit), "list dead letters")

    async def requeue(self, event_id: int) -> bool:
        now = ts(self._now())
        return await self._write(lambda c: inbox.requeue(c, event_id, now), "requeue the event")

    async def requeue_dead(self) -> list[int]:
        now = ts(self._now())
        return await self._write(lambda c: inbox.requeue_dead(c, now), "requeue dead letters")

    # -- identity map and deal keys ---------------------------------------------------------------

    async def lookup_identity(self, target: str, keys: Sequence[IdentityKey]) -> str | None:
        values.require_identity(keys)
        return await self._read(
            lambda c: maps.lookup_identity(c, target, keys), "look up the identity"
        )

    async def bind_identity(self, target: str, key: IdentityKey, record_id: str) -> str:
        values.require_identity([key])
        values.require_key("record id", record_id)
        now = ts(self._now())
        return await self._write(
            lambda c: maps.bind_identity(c, target, key, record_id, now), "bind the identity"
        )

    async def unbind_identity(self, target: str, key: IdentityKey) -> None:
        values.require_identity([key])
        await self._write(lambda c: maps.unbind_identity(c, target, key), "unbind the identity")

    async def lookup_deal(self, target: str, deal_key: str) -> str | None:
        values.require_key("deal key", deal_key)
        return await self._read(lambda c: maps.lookup_deal(c, target, deal_key), "look up the deal")

    async def bind_deal(self, target: str, deal_key: str, deal_id: str) -> str:
        values.require_key("deal key", deal_key)
        values.require_key("deal id", deal_id)
        now = ts(self._now())
        return await self._write(
            lambda c: maps.bind_deal(c, target, deal_key, deal_id, now), "bind the deal"
        )

    # -- shared rate limits -----------------------------------------------------------------------

    async def take_tokens(
        self, bucket: str, cost: float, capacity: float, refill_per_second: float
    ) -> float:
        if not 0 < cost <= capacity or refill_per_second <= 0:
            raise ValueError("need 0 < cost <= capacity and refill_per_second > 0")
        now = self._now()
        return await self._write(
            lambda c: maps.take_tokens(c, bucket, cost, capacity, refill_per_second, now),
            "take rate-limit tokens",
        )

    # -- the embedded CRM -------------------------------------------------------------------------

    async def local_upsert_contact(
        self,
        identity: Sequence[IdentityKey],
        set: Mapping[str, JSON],
        set_once: Mapping[str, JSON],
    ) -> ContactResult:
        _require_identity(identity)
        values.require_contact(identity, set, set_once)
        now = ts(self._now())
        return await self._write(
            lambda c: crm.upsert_contact(c, identity, set, set_once, now), "upsert the contact"
        )

    async def local_set_stage(
        self,
        identity: Sequence[IdentityKey],
        stage: str,
        stages: Sequence[str],
        event_id: int | None = None,
    ) -> StageResult:
        _require_identity(identity)
        values.require_identity(identity)
        values.require_name("stage", stage)
        now = ts(self._now())
        return await self._write(
            lambda c: crm.set_stage(c, identity, stage, stages, event_id, now), "set the stage"
        )

    async def local_create_deal(
        self,
        identity: Sequence[IdentityKey],
        key: str,
        title: str,
        stage: str | None,
        amount: float | None,
        fields: Mapping[str, JSON],
    ) -> DealResult:
        if not key:
            raise ValueError("a deal needs a non-empty key")
        values.require_deal(identity, key, title, stage, amount, fields)
        now = ts(self._now())
        return await self._write(
            lambda c: crm.create_deal(c, identity, key, title, stage, amount, fields, now),
            "create the deal",
        )

    async def local_contacts(self, limit: int | None = None) -> list[LocalContact]:
        return await self._read(lambda c: crm.list_contacts(c, limit), "list contacts")

    async def local_deals(self, limit: int | None = None) -> list[LocalDeal]:
        return await self._read(lambda c: crm.list_deals(c, limit), "list deals")

    # -- maintenance and metrics ------------------------------------------------------------------

    async def purge_raw_bodies(self, older_than: datetime) -> int:
        cutoff = ts(older_than)
        return await self._write(
            lambda c: inbox.purge_raw_bodies(c, cutoff), "purge raw bodies"
        )

    async def inbox_stats(self) -> InboxStats:
        return await self._read(inbox.stats, "count the inbox")

    async def check_writable(self) -> None:
        if self._writer.failure is None:
            return
        await self._write(lambda c: inbox.probe_write(c, PROBE_BYTES), "write a test row")

    async def durability(self) -> Mapping[str, int]:
        # Through the writer: it is the connection whose commits answer "stored".
        def read(connection: sqlite3.Connection) -> dict[str, int]:
            mode = str(connection.execute("PRAGMA journal_mode").fetchone()[0]).lower()
            level = int(connection.execute("PRAGMA synchronous").fetchone()[0])
            return {"sqlite_synchronous": level, "sqlite_wal": int(mode == "wal")}

        return await self._write(read, "read the durability settings")


# What Python's sqlite3 raises for a value it cannot bind: text with a lone surrogate (no
# UTF-8 form), an int beyond 64 bits. The values module refuses these first; this is the net.
_UNSTORABLE = (UnicodeEncodeError, OverflowError, sqlite3.DataError)


def unstorable(error: Exception, doing: str) -> UnstorableValueError:
    return UnstorableValueError(f"{doing}: a value cannot be stored ({type(error).__name__}: "
                                f"{values.storable_text(str(error))})")


def _require_identity(identity: Sequence[IdentityKey]) -> None:
    if not identity:
        raise ValueError("a contact action needs at least one identity key")
