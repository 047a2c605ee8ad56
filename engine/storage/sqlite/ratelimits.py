"""Shared token buckets and rolling windows on SQLite: read, decide and write in one writer
job."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from engine.storage import checks, rolling
from engine.storage.protocols import RateLimits
from engine.storage.sqlite.database import SQLitePart
from engine.storage.sqlite.rows import insert_rows, parse_ts, ts


class SQLiteRateLimits(SQLitePart, RateLimits):
    """The writer holds SQLite's write lock while a job runs: no other process takes tokens
    between the read and the write of a bucket."""

    async def take_tokens(
        self, bucket: str, cost: float, capacity: float, refill_per_second: float
    ) -> float:
        checks.token_bucket(cost, capacity, refill_per_second)
        now = self._db.clock()

        def run(connection: sqlite3.Connection) -> float:
            row = connection.execute(
                "SELECT tokens, updated_at FROM rate_buckets WHERE bucket = ?", (bucket,)
            ).fetchone()
            tokens = capacity
            if row is not None:
                elapsed = max((now - parse_ts(row[1])).total_seconds(), 0.0)
                tokens = min(capacity, row[0] + elapsed * refill_per_second)
            wait = 0.0
            if tokens >= cost:
                tokens -= cost
            else:
                wait = (cost - tokens) / refill_per_second
            connection.execute(
                "INSERT INTO rate_buckets (bucket, tokens, updated_at) VALUES (?, ?, ?)"
                " ON CONFLICT (bucket) DO UPDATE SET"
                " tokens = excluded.tokens, updated_at = excluded.updated_at",
                (bucket, tokens, ts(now)),
            )
            return wait

        return await self._db.write(run, "take rate-limit tokens")

    async def take_slots(self, windows: Sequence[tuple[str, int, float]]) -> float:
        checks.window_slots(windows)
        now = self._db.clock()

        def run(connection: sqlite3.Connection) -> float:
            rows = [[(name, parse_ts(at)) for name, at in connection.execute(
                "SELECT bucket, updated_at FROM rate_buckets WHERE bucket >= ? AND bucket < ?",
                rolling.slot_range(bucket))] for bucket, _, _ in windows]
            wait, stamps = rolling.decide_all(windows, rows, now)
            insert_rows(connection, "INSERT INTO rate_buckets (bucket, tokens, updated_at)",
                        "(?, 0, ?)", [(stamp, ts(now)) for stamp in stamps],
                        " ON CONFLICT (bucket) DO UPDATE SET updated_at = excluded.updated_at")
            return wait

        return await self._db.write(run, "take rate-limit slots")
