"""The connections of one SQLite file: one group-commit writer, a pool of WAL readers.

Every SQLite concern (inbox, outcomes, identity map, rate limits, local CRM) runs its SQL
through `read` (a consistent snapshot on a reader thread) or `write` (a savepoint inside the
writer's next shared transaction), and reads the time from `now`.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from engine.errors import StorageError, UnstorableValueError
from engine.storage import values
from engine.storage.protocols import Clock
from engine.storage.sqlite.groupcommit import GroupCommitWriter, storage_error
from engine.storage.sqlite.opening import check_path, connect
from engine.storage.sqlite.rows import ts

T = TypeVar("T")

# Extra set-up for every new connection, after linkcrm's own (tests: a size limit).
Configure = Callable[[sqlite3.Connection], None]

# What Python's sqlite3 raises for a value it cannot bind: text with a lone surrogate (no
# UTF-8 form), an int beyond 64 bits. The values module refuses these first; this is the net.
UNSTORABLE = (UnicodeEncodeError, OverflowError, sqlite3.DataError)


def unstorable(error: Exception, doing: str) -> UnstorableValueError:
    return UnstorableValueError(f"{doing}: a value cannot be stored ({type(error).__name__}: "
                                f"{values.storable_text(str(error))})")


class SQLiteDatabase:
    """Reads run on a small thread pool with their own connections, which WAL lets proceed
    while the writer commits; writes go through one `GroupCommitWriter`. Other processes on
    the same file take turns on SQLite's write lock, waiting up to `busy_timeout`."""

    def __init__(
        self, path: str, *, clock: Clock, busy_timeout: float, create: bool,
        configure: Configure | None = None,
    ) -> None:
        check_path(path, create=create)
        self.path = path
        self._create = create
        self.clock = clock
        self._busy_timeout = busy_timeout
        self._extra = configure
        self._local = threading.local()
        self._reader_connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self.closed = False
        self._readers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="linkcrm-sqlite-read")
        self.writer = GroupCommitWriter(self._connect_writer)

    def now(self) -> str:
        """The clock's reading as stored (ISO 8601 UTC text)."""
        return ts(self.clock())

    async def read(self, run: Callable[[sqlite3.Connection], T], doing: str) -> T:
        """`run(connection)` in one read transaction: a multi-statement read sees one
        consistent snapshot. `doing` names the operation in errors."""
        if self.closed:
            raise StorageError("the storage is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._readers, self._read_sync, run, doing)

    async def write(self, run: Callable[[sqlite3.Connection], T], doing: str) -> T:
        """`run(connection)` in its own savepoint of the writer's next commit: when it fails
        on its own data, it is undone alone and the rest of its batch is kept."""
        try:
            return await self.writer.run(run)
        except UNSTORABLE as error:
            raise unstorable(error, doing) from None
        except sqlite3.Error as error:
            raise storage_error(error, doing) from None

    async def rows(self, doing: str, query: str, params: Sequence[object],
                   convert: Callable[[sqlite3.Row], T]) -> list[T]:
        """Every row one read statement returns, converted on the reader thread: parsing
        times and JSON stays off the event loop the receiver answers on."""
        return await self.read(
            lambda c: [convert(row) for row in c.execute(query, params)], doing)

    async def row(self, doing: str, query: str, params: Sequence[object],
                  convert: Callable[[sqlite3.Row], T]) -> T | None:
        """The first row one read statement returns, converted on the reader thread; None
        when there is none."""
        def run(connection: sqlite3.Connection) -> T | None:
            found = connection.execute(query, params).fetchone()
            return None if found is None else convert(found)

        return await self.read(run, doing)

    async def execute(self, doing: str, query: str, params: Sequence[object] = ()) -> int:
        """One write statement in the writer's next commit; the number of rows it changed."""
        return await self.write(lambda c: c.execute(query, params).rowcount, doing)

    def close(self) -> None:
        """Run the queued writes, then close every connection (blocking; idempotent)."""
        self.closed = True
        self.writer.close()
        self._readers.shutdown(wait=True)
        with self._lock:
            for connection in self._reader_connections:
                connection.close()
            self._reader_connections.clear()

    # -- connections ----------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        connection = connect(self.path, create=self._create, timeout=self._busy_timeout)
        connection.row_factory = sqlite3.Row
        connection.execute("PRAGMA foreign_keys = ON")
        # FULL: a commit is on disk (the WAL fsynced) before a caller hears "stored".
        connection.execute("PRAGMA synchronous = FULL")
        if self._extra is not None:
            self._extra(connection)
        return connection

    def _connect_writer(self) -> sqlite3.Connection:
        connection = self._connect()
        # Every batch's INSERT runs in a savepoint, so SQLite keeps a statement journal for it:
        # as a temp file that was created, written and deleted once per commit (a third of
        # the writer's system calls). It only ever serves rolling a statement back, never
        # recovery, so memory holds it; the WAL and its fsync are as they were.
        connection.execute("PRAGMA temp_store = MEMORY")
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
            connection.execute("BEGIN")
            try:
                return run(connection)
            finally:
                connection.execute("ROLLBACK")
        except UNSTORABLE as error:
            raise unstorable(error, doing) from None
        except sqlite3.Error as error:
            raise storage_error(error, doing) from None


class SQLitePart:
    """What each concern's class shares: the database its SQL runs on."""

    def __init__(self, database: SQLiteDatabase) -> None:
        self._db = database
