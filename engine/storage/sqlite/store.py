"""The embedded SQLite backend: one file, WAL, `synchronous=FULL`, group commit.

`SQLiteStorage` opens the file (`SQLiteDatabase`: one writer thread that commits concurrent
callers in shared transactions, reader threads that WAL lets run meanwhile) and hands it to
one class per concern; it keeps the schema and the file's health itself.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Mapping
from pathlib import Path

from engine.errors import StorageError
from engine.storage.protocols import PROBE_BYTES, Clock, Storage, utc_now
from engine.storage.sqlite.crm import SQLiteLocalCRM
from engine.storage.sqlite.database import Configure, SQLiteDatabase
from engine.storage.sqlite.identities import SQLiteIdentityMap
from engine.storage.sqlite.inbox import SQLiteInbox
from engine.storage.sqlite.outcomes import SQLiteOutcomes
from engine.storage.sqlite.ratelimits import SQLiteRateLimits
from engine.storage.sqlite.ruleversions import SQLiteRuleVersions
from engine.storage.sqlite.schema import current_version
from engine.storage.sqlite.schema import migrate as apply_migrations
from engine.storage.sqlite.shadow import SQLiteShadowResults
from engine.storage.sqlite.touches import SQLiteTouches


class SQLiteStorage(Storage):
    """Storage in one SQLite file. Open it with `open_storage("sqlite:///linkcrm.db")`.

    Without `create` the file must exist (commands that only read or change existing data);
    `configure` runs on every new connection after linkcrm's own settings (tests use it to
    limit the file's size or count the work a query does).
    """

    def __init__(
        self, path: str | Path, *, clock: Clock = utc_now, busy_timeout: float = 10.0,
        create: bool = True, configure: Configure | None = None,
    ) -> None:
        self.path = str(path)
        self.database = SQLiteDatabase(self.path, clock=clock, busy_timeout=busy_timeout,
                                       create=create, configure=configure)
        db = self.database
        self.inbox, self.outcomes, self.identities, self.rate_limits, self.local_crm = (
            SQLiteInbox(db), SQLiteOutcomes(db), SQLiteIdentityMap(db), SQLiteRateLimits(db),
            SQLiteLocalCRM(db))
        self.rule_versions = SQLiteRuleVersions(db)
        self.shadow = SQLiteShadowResults(db)
        self.touches = SQLiteTouches(db)

    @classmethod
    def from_url(cls, url: str, *, clock: Clock = utc_now, create: bool = True) -> SQLiteStorage:
        """`sqlite:///relative/path.db` or `sqlite:////absolute/path.db`."""
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

    async def migrate(self) -> int:
        applied_at = self.database.now()
        return await self.database.write(lambda c: apply_migrations(c, applied_at), "migrate")

    async def schema_version(self) -> int:
        return await self.database.read(current_version, "read the schema version")

    async def ping(self) -> None:
        if not self.database.writer.alive:
            raise StorageError("the SQLite writer thread has stopped")
        if await self.schema_version() == 0:
            raise StorageError("the database has no schema yet; run `linkcrm migrate`")

    async def check_writable(self) -> None:
        if self.database.writer.failure is None:
            return

        def probe(connection: sqlite3.Connection) -> None:
            # Committing it takes new pages and WAL space as storing an event would.
            connection.execute("INSERT INTO write_probe (payload) VALUES (zeroblob(?))",
                               (PROBE_BYTES,))
            connection.execute("DELETE FROM write_probe")

        await self.database.write(probe, "write a test row")

    async def durability(self) -> Mapping[str, int]:
        # Through the writer: it is the connection whose commits answer "stored".
        def read(connection: sqlite3.Connection) -> dict[str, int]:
            mode = str(connection.execute("PRAGMA journal_mode").fetchone()[0]).lower()
            level = int(connection.execute("PRAGMA synchronous").fetchone()[0])
            return {"sqlite_synchronous": level, "sqlite_wal": int(mode == "wal")}

        return await self.database.write(read, "read the durability settings")

    async def close(self) -> None:
        if self.database.closed:
            return
        self.database.closed = True
        await asyncio.to_thread(self.database.close)
