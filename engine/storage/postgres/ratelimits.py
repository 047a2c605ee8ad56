"""Shared token buckets (one upsert under the bucket's row lock) and rolling windows (read,
decide and stamp under the bucket's advisory lock) on PostgreSQL."""

from __future__ import annotations

from collections.abc import Sequence

from engine.storage import checks, rolling
from engine.storage.postgres.database import PostgresPart
from engine.storage.postgres.rows import NOW
from engine.storage.protocols import RateLimits

# Tokens after refilling for the time since the last take, capped at the capacity. In an
# ON CONFLICT SET every reference to `b.` reads the row as it was before this statement.
_REFILLED = (
    "LEAST(%(capacity)s, b.tokens + %(refill)s"
    f" * GREATEST(EXTRACT(EPOCH FROM {NOW} - b.updated_at)::float8, 0))"
)


class PostgresRateLimits(PostgresPart, RateLimits):
    """One upsert reads, refills, takes and writes the bucket under its row lock, so every
    worker on every machine draws from the same tokens. The write need not survive a crash
    (a lost refill is harmless), so it skips the WAL flush and holds the hot row's lock for
    a round trip, not for an fsync."""

    async def take_tokens(
        self, bucket: str, cost: float, capacity: float, refill_per_second: float
    ) -> float:
        checks.token_bucket(cost, capacity, refill_per_second)
        async with self._db.connection("take rate-limit tokens") as connection, \
                connection.transaction():
            await connection.execute("SET LOCAL synchronous_commit = off")
            cursor = await connection.execute(
                "INSERT INTO rate_buckets AS b (bucket, tokens, granted, updated_at)"
                f" VALUES (%(bucket)s, %(capacity)s - %(cost)s, true, {NOW})"
                " ON CONFLICT (bucket) DO UPDATE SET"
                f" granted = {_REFILLED} >= %(cost)s,"
                f" tokens = CASE WHEN {_REFILLED} >= %(cost)s THEN {_REFILLED} - %(cost)s"
                f" ELSE {_REFILLED} END,"
                f" updated_at = {NOW}"
                " RETURNING tokens, granted",
                {"bucket": bucket, "cost": float(cost), "capacity": float(capacity),
                 "refill": float(refill_per_second), "now": self._db.now()},
            )
            row = await cursor.fetchone()
        assert row is not None  # an upsert always returns its row
        tokens, granted = float(row[0]), bool(row[1])
        return 0.0 if granted else (cost - tokens) / refill_per_second

    async def take_slots(self, windows: Sequence[tuple[str, int, float]]) -> float:
        checks.window_slots(windows)
        async with self._db.connection("take rate-limit slots") as connection, \
                connection.transaction():
            await connection.execute("SET LOCAL synchronous_commit = off")
            # One taker of these buckets at a time on every machine (locked in one order, so
            # two takers never wait for each other). The time is read once the locks are held
            # (clock_timestamp, not the transaction's start): a request that waited for them
            # goes later than its transaction began.
            for bucket in sorted(bucket for bucket, _, _ in windows):
                await connection.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
                                         (bucket,))
            cursor = await connection.execute(
                "SELECT COALESCE(%(now)s::timestamptz, clock_timestamp())",
                {"now": self._db.now()})
            row = await cursor.fetchone()
            assert row is not None
            now = row[0]
            lows, highs = zip(*(rolling.slot_range(bucket) for bucket, _, _ in windows),
                              strict=True)
            cursor = await connection.execute(
                "SELECT b.bucket, b.updated_at FROM rate_buckets AS b"
                " JOIN unnest(%(lows)s::text[], %(highs)s::text[]) AS r (low, high)"
                " ON b.bucket >= r.low AND b.bucket < r.high",
                {"lows": list(lows), "highs": list(highs)})
            found = [(str(name), at) for name, at in await cursor.fetchall()]
            wait, stamps = rolling.decide_all(windows, rolling.by_window(windows, found), now)
            if stamps:
                await connection.execute(
                    "INSERT INTO rate_buckets (bucket, tokens, granted, updated_at)"
                    " SELECT unnest(%(stamps)s::text[]), 0, true, %(at)s"
                    " ON CONFLICT (bucket) DO UPDATE SET updated_at = excluded.updated_at",
                    {"stamps": stamps, "at": now})
        return wait
