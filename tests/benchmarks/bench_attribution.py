"""Benchmark: attributions per second (an identify event's touches: first, last, the install it
claims, the link), through the storage API, on SQLite and on PostgreSQL.

    python tests/benchmarks/bench_attribution.py [--tokens 2000] [--database sqlite|postgres|both]

Each token has an install, a click and a referral sign-up; then one identify per token asks for
its attribution, 32 at a time (a worker's claim attributes its identify events together).
Printed per store: attributions/s and this process's CPU per attribution. PostgreSQL needs a
server on 127.0.0.1 (tests/support/postgres.py).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from engine.storage import open_storage
from engine.storage.touchrecords import AttributionRequest, NewTouch
from tests.support.postgres import fresh_schema, schema_url, unreachable_reason

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
STEPS = ("install.tracked", "link.clicked", "referral.signup")


async def measure(url: str, tokens: int) -> tuple[float, float]:
    """(attributions per second, CPU seconds per attribution) on a fresh store at `url`."""
    async with open_storage(url) as storage:
        await storage.migrate()
        touches = [NewTouch(event_id=n * 10 + k + 1, event_type=step, token=f"tok{n}",
                            campaign="spring", prefix="promo", platform="ios", referrer=None,
                            per_person=False, occurred_at=T0 + timedelta(minutes=k))
                   for n in range(tokens) for k, step in enumerate(STEPS)]
        for start in range(0, len(touches), 500):
            await storage.touches.record_many(touches[start:start + 500])
        asks = [AttributionRequest(event_id=10**6 + n, token=f"tok{n}", platform="ios",
                                   anchor=T0 + timedelta(minutes=5),
                                   before=T0 + timedelta(minutes=5),
                                   since=T0 - timedelta(days=90)) for n in range(tokens)]
        room = asyncio.Semaphore(32)

        async def attribute(ask: AttributionRequest) -> bool:
            async with room:
                return (await storage.touches.attribute(ask)).detail["install"] is not None

        wall, cpu = time.perf_counter(), time.process_time()
        claimed = await asyncio.gather(*(attribute(ask) for ask in asks))
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        if not all(claimed):
            raise SystemExit(f"{claimed.count(False)} identify events claimed no install")
        return tokens / wall, cpu / tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--database", choices=["sqlite", "postgres", "both"], default="both")
    args = parser.parse_args()
    if args.database in ("sqlite", "both"):
        with tempfile.TemporaryDirectory(prefix="linkcrm-bench-") as directory:
            rate, cpu = asyncio.run(measure(f"sqlite:///{Path(directory) / 'a.db'}",
                                            args.tokens))
        print(f"SQLite      {rate:8,.0f} attributions/s  CPU {cpu * 1e6:,.0f} us each")
    if args.database in ("postgres", "both"):
        reason = unreachable_reason()
        if reason:
            sys.exit(reason)
        with fresh_schema("lc_bench_attr") as schema:
            rate, cpu = asyncio.run(measure(schema_url(schema), args.tokens))
        print(f"PostgreSQL  {rate:8,.0f} attributions/s  CPU {cpu * 1e6:,.0f} us each")


if __name__ == "__main__":
    main()
