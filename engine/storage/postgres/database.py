"""The connections of one PostgreSQL database: a psycopg 3 async pool, opened on first use.

Every PostgreSQL concern (inbox, outcomes, identity map, rate limits, local CRM) runs its SQL
on a connection from `connection(doing)`, which turns psycopg's errors into linkcrm's, and
passes `now` to every statement that reads the time.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import datetime

import psycopg
from psycopg import errors as pg_errors
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from engine.errors import StorageError, UnstorableValueError
from engine.storage import values
from engine.storage.postgres.config import PoolSettings
from engine.storage.postgres.connect import check_connection
from engine.storage.postgres.notify import Wakeups
from engine.storage.postgres.rows import Conn, Row
from engine.storage.protocols import Clock

# A statement's parameters: positional (%s) or named (%(name)s).
Params = Sequence[object] | Mapping[str, object] | None


class PostgresDatabase:
    """The pool (autocommit connections; a statement that must be one unit with others opens
    its own transaction), the wake-ups, and the time statements use.

    Times come from the database server's clock, so leases and rate limits agree across
    machines; a `clock` (tests) replaces it in every statement.
    """

    def __init__(self, conninfo: str, *, label: str, pool: PoolSettings,
                 clock: Clock | None) -> None:
        self.label = label  # names the database in errors, without its password
        self.pool_settings = pool
        self._conninfo = conninfo
        self._clock = clock
        self._pool: AsyncConnectionPool[Conn] = AsyncConnectionPool(
            conninfo,
            min_size=pool.min_size,
            max_size=pool.size,
            timeout=pool.timeout,
            kwargs={"autocommit": True},
            configure=_configure,
            name="linkcrm",
            open=False,
        )
        self._open_lock = asyncio.Lock()
        self._opened = False
        self.closed = False
        self.wakeups = Wakeups(conninfo)
        # Rule publishes and activations NOTIFY this one inside their transaction.
        self.rule_changes = Wakeups(conninfo, "rules")
        # Why the last store batch could not commit; None once one commits.
        self.write_failure: str | None = None

    def now(self) -> datetime | None:
        """The `now` parameter of every statement; None means the server's `now()`."""
        return None if self._clock is None else self._clock()

    async def ready(self) -> None:
        """Open the pool on first use, inside the event loop that will use it; one clear
        error, not the pool's retry log, when the server is not there."""
        if self.closed:
            raise StorageError("the storage is closed")
        if not self._opened:
            async with self._open_lock:
                if not self._opened:
                    await check_connection(self._conninfo, self.label, self.pool_settings.timeout)
                    await self._pool.open(wait=False)
                    self._opened = True

    @asynccontextmanager
    async def connection(self, doing: str) -> AsyncIterator[Conn]:
        """A pooled connection; errors inside the block become StorageError (or
        UnstorableValueError for a value the server refuses) that say what `doing` failed."""
        await self.ready()
        try:
            async with self._pool.connection() as connection:
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

    async def rows(self, doing: str, query: str, params: Params = None) -> list[Row]:
        """Every row one statement returns."""
        async with self.connection(doing) as connection:
            return await (await connection.execute(query, params)).fetchall()

    async def row(self, doing: str, query: str, params: Params = None) -> Row | None:
        """The first row one statement returns, or None."""
        async with self.connection(doing) as connection:
            return await (await connection.execute(query, params)).fetchone()

    async def execute(self, doing: str, query: str, params: Params = None) -> int:
        """One statement, committed when it returns; the number of rows it changed."""
        async with self.connection(doing) as connection:
            return (await connection.execute(query, params)).rowcount

    async def close(self) -> None:
        self.closed = True
        await self.wakeups.close()
        await self.rule_changes.close()
        if self._opened:
            await self._pool.close()


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


class PostgresPart:
    """What each concern's class shares: the database its SQL runs on."""

    def __init__(self, database: PostgresDatabase) -> None:
        self._db = database
