"""The PostgreSQL backend: many receivers and workers on many machines share one database.

PostgreSQL does the coordination: a unique constraint decides what is a duplicate delivery,
`FOR UPDATE SKIP LOCKED` hands each event to one worker under a lease, a row lock makes the
shared rate-limit bucket atomic, advisory locks serialise migrations and "find or create this
contact", and LISTEN/NOTIFY wakes idle workers. Each process keeps a psycopg 3 async pool
(`PostgresDatabase`) that every concern's class shares.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from engine.errors import StorageError
from engine.runtime.redact import redact_url
from engine.storage.postgres.config import PoolSettings, split_url
from engine.storage.postgres.crm import PostgresLocalCRM
from engine.storage.postgres.database import PostgresDatabase
from engine.storage.postgres.identities import PostgresIdentityMap
from engine.storage.postgres.inbox import PostgresInbox
from engine.storage.postgres.outcomes import PostgresOutcomes
from engine.storage.postgres.ratelimits import PostgresRateLimits
from engine.storage.postgres.ruleversions import PostgresRuleVersions
from engine.storage.postgres.schema import current_version
from engine.storage.postgres.schema import migrate as apply_migrations
from engine.storage.postgres.shadow import PostgresShadowResults
from engine.storage.postgres.touches import PostgresTouches
from engine.storage.protocols import PROBE_BYTES, Clock, Storage, utc_now

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

    inbox: PostgresInbox

    def __init__(
        self,
        conninfo: str,
        *,
        pool: PoolSettings | None = None,
        clock: Clock | None = None,
        label: str | None = None,
    ) -> None:
        self.database = PostgresDatabase(conninfo, label=label or redact_url(conninfo),
                                         pool=pool or PoolSettings(), clock=clock)
        db = self.database
        self.inbox, self.outcomes, self.identities, self.rate_limits, self.local_crm = (
            PostgresInbox(db), PostgresOutcomes(db), PostgresIdentityMap(db),
            PostgresRateLimits(db), PostgresLocalCRM(db))
        self.rule_versions = PostgresRuleVersions(db)
        self.shadow = PostgresShadowResults(db)
        self.touches = PostgresTouches(db)

    @classmethod
    def from_url(
        cls, url: str, *, clock: Clock = utc_now, environ: Mapping[str, str] | None = None
    ) -> PostgresStorage:
        conninfo, pool = split_url(url, os.environ if environ is None else environ)
        return cls(conninfo, pool=pool, clock=None if clock is utc_now else clock,
                   label=redact_url(url))

    async def migrate(self) -> int:
        async with self.database.connection("migrate") as connection:
            return await apply_migrations(connection)

    async def schema_version(self) -> int:
        async with self.database.connection("read the schema version") as connection:
            return await current_version(connection)

    async def ping(self) -> None:
        if await self.schema_version() == 0:
            raise StorageError("the database has no schema yet; run `linkcrm migrate`")

    async def check_writable(self) -> None:
        if self.database.write_failure is None:
            return
        try:
            # Committing it takes WAL and table space as storing an event would.
            async with self.database.connection("write a test row") as connection, \
                    connection.transaction():
                await connection.execute(
                    "INSERT INTO write_probe (payload) VALUES (%s)", (os.urandom(PROBE_BYTES),))
                await connection.execute("DELETE FROM write_probe")
        except StorageError as error:
            self.database.write_failure = str(error)
            raise
        self.database.write_failure = None

    async def durability(self) -> Mapping[str, int]:
        async with self.database.connection("read the durability settings") as connection:
            cursor = await connection.execute(
                "SELECT current_setting('synchronous_commit'), current_setting('fsync')")
            row = await cursor.fetchone()
        assert row is not None
        return {"postgres_synchronous_commit": _SYNCHRONOUS_COMMIT.get(str(row[0]), 3),
                "postgres_fsync": int(str(row[1]) == "on")}

    async def wait_for_events(self, timeout: float) -> bool:
        if self.database.closed:
            raise StorageError("the storage is closed")
        return await self.database.wakeups.wait(timeout)

    async def close(self) -> None:
        if self.database.closed:
            return
        self.database.closed = True
        await self.inbox.drain()
        await self.database.close()
