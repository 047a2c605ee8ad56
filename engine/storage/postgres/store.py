"""The PostgreSQL backend: many receivers and workers on many machines share one database.

PostgreSQL does the coordination: a unique constraint decides what is a duplicate delivery,
`FOR UPDATE SKIP LOCKED` hands each event to one worker under a lease, a row lock makes the
shared rate-limit bucket atomic, advisory locks serialise migrations and "find or create this
contact", and LISTEN/NOTIFY wakes idle workers. Each process keeps a psycopg 3 async pool.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Concatenate, ParamSpec, TypeVar

import psycopg
from psycopg import errors as pg_errors
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from engine.actions import JSON, IdentityKey
from engine.errors import StorageError, UnstorableEventError, UnstorableValueError
from engine.runtime.redact import redact_url
from engine.storage import values
from engine.storage.base import PROBE_BYTES, Clock, Storage, utc_now
from engine.storage.postgres import crm, inbox, maps
from engine.storage.postgres.batch import Batcher
from engine.storage.postgres.config import PoolSettings, split_url
from engine.storage.postgres.connect import check_connection
from engine.storage.postgres.notify import Wakeups
from engine.storage.postgres.rows import Conn
from engine.storage.postgres.schema import current_version
from engine.storage.postgres.schema import migrate as apply_migrations
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
)

T = TypeVar("T")
P = ParamSpec("P")

_SYNCHRONOUS_COMMIT = {"off": 0, "local": 1, "remote_write": 2, "on": 3, "remote_apply": 4}


class PostgresStorage(Storage):
    """Storage in one PostgreSQL database (or one schema of it, chosen by `search_path`).

    Open it with `open_storage("postgresql://user@host/linkcrm?pool_size=20")`. Pool options
    in the URL query (or environment): `pool_size` (LINKCRM_DB_POOL_SIZE, default 10),
    `pool_min_size` (LINKCRM_DB_POOL_MIN_SIZE, 1) and `pool_timeout` seconds
    (LINKCRM_DB_POOL_TIMEOUT, 5); every other parameter goes to libpq as written, e.g.
    `sslmode=require` or `options=-csearch_path%3Dlinkcrm`.

    Times come from the database server's clock, so leases and rate limits agree across
    machines; a `clock` other than `utc_now` (tests) replaces it in every statement.
    """

    def __init__(
        self,
        conninfo: str,
        *,
        pool: PoolSettings | None = None,
        clock: Clock | None = None,
        label: str | None = None,
    ) -> None:
        self._conninfo = conninfo
        self.label = label or redact_url(conninfo)  # names the database in errors
        self.pool_settings = pool or PoolSettings()
        self._clock = clock
        self._pool: AsyncConnectionPool[Conn] = AsyncConnectionPool(
            conninfo,
            min_size=self.pool_settings.min_size,
            max_size=self.pool_settings.size,
            timeout=self.pool_settings.timeout,
            kwargs={"autocommit": True},
            configure=_configure,
            name="linkcrm",
            open=False,
        )
        self._open_lock = asyncio.Lock()
        self._opened = False
        self._closed = False
        self._wakeups = Wakeups(self._pool, conninfo)
        # Why the last store batch could not commit; None once one commits.
        self._write_failure: str | None = None
        # Half the pool at most for store batches: reads and worker calls keep the rest.
        self._stores: Batcher[NewEvent, StoreResult] = Batcher(
            self._store_batch, max(1, self.pool_settings.size // 2))

    @classmethod
    def from_url(
        cls, url: str, *, clock: Clock = utc_now, environ: Mapping[str, str] | None = None
    ) -> PostgresStorage:
        conninfo, pool = split_url(url, os.environ if environ is None else environ)
        return cls(conninfo, pool=pool, clock=None if clock is utc_now else clock,
                   label=redact_url(url))

    # -- connections ----------------------------------------------------------------------------

    def _now(self) -> datetime | None:
        """The `now` parameter of every statement; None means the server's `now()`."""
        return None if self._clock is None else self._clock()

    async def _ready(self) -> AsyncConnectionPool[Conn]:
        if self._closed:
            raise StorageError("the storage is closed")
        if not self._opened:
            async with self._open_lock:
                if not self._opened:
                    # One clear error, not the pool's retry log, when the server is not there.
                    await check_connection(self._conninfo, self.label, self.pool_settings.timeout)
                    # Opened on first use, inside the event loop that will use it.
                    await self._pool.open(wait=False)
                    self._opened = True
        return self._pool

    @asynccontextmanager
    async def _connection(self, doing: str) -> AsyncIterator[Conn]:
        pool = await self._ready()
        try:
            async with pool.connection() as connection:
                yield connection
        except UnicodeEncodeError as error:  # text with a lone surrogate has no UTF-8 form
            raise UnstorableValueError(
                f"{doing}: a value cannot be stored ({values.storable_text(str(error))})"
            ) from None
        except PoolTimeout:
            # The server going away shows as a pool timeout: say so when it is the reason.
            await check_connection(self._conninfo, self.label, self.pool_settings.timeout)
            raise StorageError(
                f"{doing}: no PostgreSQL connection within {self.pool_settings.timeout:g}s "
                f"(pool_size={self.pool_settings.size}); is the database up, and is the pool "
                "big enough for this process's load?"
            ) from None
        except psycopg.Error as error:
            raise storage_error(error, doing) from None

    async def _call(
        self,
        doing: str,
        run: Callable[Concatenate[Conn, P], Awaitable[T]],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        async with self._connection(doing) as connection:
            return await run(connection, *args, **kwargs)

    # -- lifecycle --------------------------------------------------------------------------------

    async def migrate(self) -> int:
        return await self._call("migrate", apply_migrations)

    async def schema_version(self) -> int:
        return await self._call("read the schema version", current_version)

    async def ping(self) -> None:
        if await self.schema_version() == 0:
            raise StorageError("the database has no schema yet; run `linkcrm migrate`")

    async def durability(self) -> Mapping[str, int]:
        async def read(connection: Conn) -> dict[str, int]:
            cursor = await connection.execute(
                "SELECT current_setting('synchronous_commit'), current_setting('fsync')")
            row = await cursor.fetchone()
            assert row is not None
            return {"postgres_synchronous_commit": _SYNCHRONOUS_COMMIT.get(str(row[0]), 3),
                    "postgres_fsync": int(str(row[1]) == "on")}

        return await self._call("read the durability settings", read)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._stores.close()
        await self._wakeups.close()
        if self._opened:
            await self._pool.close()

    async def wait_for_events(self, timeout: float) -> bool:
        if self._closed:
            raise StorageError("the storage is closed")
        return await self._wakeups.wait(timeout)

    # -- inbox ------------------------------------------------------------------------------------

    async def store_event(self, event: NewEvent) -> StoreResult:
        await self._ready()
        return await self._stores.submit(event)

    async def _store_batch(
        self, events: list[NewEvent]
    ) -> list[StoreResult | UnstorableEventError]:
        try:
            results = await self._call("store the event", inbox.store_many, events)
        except UnstorableEventError:
            raise  # the data, not the database
        except StorageError as error:
            self._write_failure = str(error)
            raise
        self._write_failure = None
        if any(isinstance(result, StoreResult) and not result.duplicate for result in results):
            self._wakeups.poke()
        return results

    async def get_event(self, event_id: int) -> InboxEvent | None:
        return await self._call("read the event", inbox.get, event_id)

    async def list_events(
        self, *, status: EventStatus | None = None, limit: int = 100, before_id: int | None = None
    ) -> list[InboxEvent]:
        return await self._call("list events", inbox.list_events, status, limit, before_id)

    async def claim(self, worker_id: str, limit: int, lease_seconds: float) -> list[InboxEvent]:
        return await self._call(
            "claim events", inbox.claim, worker_id, limit, lease_seconds, self._now())

    async def extend_lease(self, event_id: int, worker_id: str, lease_seconds: float) -> bool:
        params: dict[str, object] = {"lease": float(lease_seconds), "now": self._now()}
        return await self._call(
            "extend the lease", inbox.update_leased, inbox.EXTEND, params, event_id, worker_id)

    async def finish(
        self, event_id: int, worker_id: str, status: FinalStatus, error: str | None = None
    ) -> bool:
        if status not in ("processed", "ignored", "dead"):
            raise ValueError(f"finish() takes processed, ignored or dead, not {status!r}")
        params: dict[str, object] = {
            "status": status, "error": values.storable_text(error), "now": self._now()}
        return await self._call(
            "finish the event", inbox.update_leased, inbox.FINISH, params, event_id, worker_id)

    async def retry_later(
        self, event_id: int, worker_id: str, next_attempt_at: datetime, error: str | None
    ) -> bool:
        params: dict[str, object] = {
            "error": values.storable_text(error), "next": next_attempt_at, "now": self._now()}
        return await self._call(
            "schedule the retry", inbox.update_leased, inbox.RETRY_LATER, params, event_id,
            worker_id)

    async def set_ordering_keys(self, event_id: int, keys: Sequence[str]) -> None:
        await self._call("record ordering keys", inbox.set_ordering_keys, event_id, keys)

    async def earlier_pending(
        self, event_id: int, keys: Sequence[str]
    ) -> tuple[list[int], list[int]]:
        return await self._call("check earlier events", inbox.earlier_unfinished, event_id, keys)

    # -- action outcomes --------------------------------------------------------------------------

    async def get_outcome(self, target: str, idempotency_key: str) -> ActionOutcome | None:
        return await self._call("read the outcome", maps.get_outcome, target, idempotency_key)

    async def record_outcome(self, outcome: NewOutcome) -> ActionOutcome:
        outcome = values.storable_outcome(outcome)
        return await self._call("record the outcome", maps.record_outcome, outcome, self._now())

    async def list_outcomes(self, event_id: int) -> list[ActionOutcome]:
        return await self._call("list outcomes", maps.list_outcomes, event_id)

    async def outcome_counts(self) -> Mapping[tuple[str, str], int]:
        return await self._call("count outcomes", maps.outcome_counts)

    # -- dead letters and replay ------------------------------------------------------------------

    async def list_dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        return await self._call("list dead letters", inbox.dead_letters, limit)

    async def requeue(self, event_id: int) -> bool:
        requeued = await self._call("requeue the event", inbox.requeue, event_id, self._now())
        if requeued:
            self._wakeups.poke()
        return requeued

    async def requeue_dead(self) -> list[int]:
        ids = await self._call("requeue dead letters", inbox.requeue_dead, self._now())
        if ids:
            self._wakeups.poke()
        return ids

    # -- identity map and deal keys ---------------------------------------------------------------

    async def lookup_identity(self, target: str, keys: Sequence[IdentityKey]) -> str | None:
        values.require_identity(keys)
        return await self._call("look up the identity", maps.lookup_identity, target, keys)

    async def bind_identity(self, target: str, key: IdentityKey, record_id: str) -> str:
        values.require_identity([key])
        values.require_key("record id", record_id)
        return await self._call(
            "bind the identity", maps.bind_identity, target, key, record_id, self._now())

    async def unbind_identity(self, target: str, key: IdentityKey) -> None:
        values.require_identity([key])
        await self._call("unbind the identity", maps.unbind_identity, target, key)

    async def lookup_deal(self, target: str, deal_key: str) -> str | None:
        values.require_key("deal key", deal_key)
        return await self._call("look up the deal", maps.lookup_deal, target, deal_key)

    async def bind_deal(self, target: str, deal_key: str, deal_id: str) -> str:
        values.require_key("deal key", deal_key)
        values.require_key("deal id", deal_id)
        return await self._call(
            "bind the deal", maps.bind_deal, target, deal_key, deal_id, self._now())

    # -- shared rate limits -----------------------------------------------------------------------

    async def take_tokens(
        self, bucket: str, cost: float, capacity: float, refill_per_second: float
    ) -> float:
        if not 0 < cost <= capacity or refill_per_second <= 0:
            raise ValueError("need 0 < cost <= capacity and refill_per_second > 0")
        return await self._call(
            "take rate-limit tokens", maps.take_tokens, bucket, cost, capacity,
            refill_per_second, self._now())

    # -- the embedded CRM -------------------------------------------------------------------------

    async def local_upsert_contact(
        self,
        identity: Sequence[IdentityKey],
        set: Mapping[str, JSON],
        set_once: Mapping[str, JSON],
    ) -> ContactResult:
        _require_identity(identity)
        values.require_contact(identity, set, set_once)
        return await self._call(
            "upsert the contact", crm.upsert_contact, identity, set, set_once, self._now())

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
        if stage not in stages:  # before taking a connection: a rule error, not a storage one
            raise ValueError(f"unknown stage {stage!r}; the stages are {', '.join(stages)}")
        return await self._call(
            "set the stage", crm.set_stage, identity, stage, stages, event_id, self._now())

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
        return await self._call(
            "create the deal", crm.create_deal, identity, key, title, stage, amount, fields,
            self._now())

    async def local_contacts(self, limit: int | None = None) -> list[LocalContact]:
        return await self._call("list contacts", crm.list_contacts, limit)

    async def local_deals(self, limit: int | None = None) -> list[LocalDeal]:
        return await self._call("list deals", crm.list_deals, limit)

    # -- maintenance and metrics ------------------------------------------------------------------

    async def purge_raw_bodies(self, older_than: datetime) -> int:
        return await self._call("purge raw bodies", inbox.purge_raw_bodies, older_than)

    async def check_writable(self) -> None:
        if self._write_failure is None:
            return
        try:
            await self._call("write a test row", inbox.probe_write, PROBE_BYTES)
        except StorageError as error:
            self._write_failure = str(error)
            raise
        self._write_failure = None

    async def inbox_stats(self) -> InboxStats:
        return await self._call("count the inbox", inbox.stats)


async def _configure(connection: Conn) -> None:
    """Every pooled connection reads times in UTC, and commits durably even on a server whose
    default is `synchronous_commit = off`: "stored" must mean on disk."""
    await connection.execute("SET TIME ZONE 'UTC'")
    cursor = await connection.execute("SELECT current_setting('synchronous_commit')")
    row = await cursor.fetchone()
    if row is not None and row[0] == "off":
        await connection.execute("SET synchronous_commit = on")


def storage_error(error: psycopg.Error, doing: str) -> StorageError:
    """A StorageError that says what failed and what to do. Only the server's primary message
    is kept: its DETAIL can quote row values (emails, tokens) that do not belong in logs."""
    message = (error.diag.message_primary if error.diag else None) or str(error).strip()
    if isinstance(error, pg_errors.UndefinedTable):
        return StorageError(f"{doing}: the schema is missing ({message}); run `linkcrm migrate`")
    if isinstance(error, psycopg.DataError | pg_errors.ProgramLimitExceeded):
        # A value the server (or psycopg) refuses: the same value fails every time.
        return UnstorableValueError(f"{doing}: a value cannot be stored ({message})")
    return StorageError(f"{doing}: {message}")


def _require_identity(identity: Sequence[IdentityKey]) -> None:
    if not identity:
        raise ValueError("a contact action needs at least one identity key")
