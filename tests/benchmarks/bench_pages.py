"""Benchmark: the delivery log's events page at 1,000,000 events, on SQLite and PostgreSQL.

    python tests/benchmarks/bench_pages.py            # both backends, 1,000,000 events
    python tests/benchmarks/bench_pages.py --events 100000 --backend sqlite

Not collected by pytest. Fills a fresh database in bulk (tests/benchmarks/pagedata.py), then
times each page shape twice: the storage read alone (`Inbox.browse`, 50 events) and the whole
page as a browser gets it (`GET /ui/events?...` through the app, logged in: the read, the
filter parsing and the HTML). Prints the median and the worst of the runs in milliseconds;
the goal is under 200 ms a page.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from urllib.parse import urlencode

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import httpx

from engine.storage import EventFilter, Storage, open_storage
from tests.benchmarks.pagedata import (
    RARE,
    STEP,
    fill_postgres,
    fill_sqlite,
    person,
    start_for,
)
from tests.support.postgres import fresh_schema, schema_url, unreachable_reason
from tests.support.web import PASSWORD, login, web_app

RUNS = 7


def shapes(count: int, start: datetime) -> list[
        tuple[str, EventFilter, dict[str, str], int | None]]:
    """(name, filter, the page's query, before_id) for each page shape measured."""
    middle = start + STEP * (count // 2)
    hour = start + STEP * (count // 3)
    return [
        ("newest page", EventFilter(), {}, None),
        ("page deep in the log (before the middle id)", EventFilter(), {},
         count // 2),
        ("status=dead (1 in 1000)", EventFilter(status="dead"), {"status": "dead"}, None),
        ("status=dead, deep", EventFilter(status="dead"), {"status": "dead"}, count // 2),
        ("type=install.tracked (1 in 4)", EventFilter(event_type="install.tracked"),
         {"type": "install.tracked"}, None),
        (f"type={RARE} (1 in 10,000)", EventFilter(event_type=RARE), {"type": RARE}, None),
        ("received in one hour mid-log", EventFilter(
            received_from=hour, received_until=hour + (middle - hour) / 10),
         {"from": hour.isoformat(), "until": (hour + (middle - hour) / 10).isoformat()}, None),
        ("search an email (its events)", EventFilter(touched=(person(count // 2),)),
         {"q": f"person{count // 2}@example.com"}, None),
    ]


async def _time(call: Callable[[], Awaitable[object]]) -> tuple[float, float]:
    took = []
    for _ in range(RUNS):
        began = time.perf_counter()
        await call()
        took.append((time.perf_counter() - began) * 1000)
    return statistics.median(took), max(took)


async def measure(url: str, count: int, start: datetime) -> None:
    storage: Storage = open_storage(url)
    try:
        app = web_app(storage)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            await login(client, PASSWORD)
            print(f"{'page':<46} {'read median/max ms':>20} {'page median/max ms':>20}")
            for name, where, query, before in shapes(count, start):
                async def read(where: EventFilter = where, before: int | None = before) -> None:
                    await storage.inbox.browse(where, limit=50, before_id=before)

                page_query = dict(query)
                if before is not None:
                    page_query["before"] = str(before)
                address = "/ui/events?" + urlencode(page_query)

                async def page(address: str = address) -> None:
                    answer = await client.get(address)
                    assert answer.status_code == 200, (address, answer.status_code)

                read_median, read_max = await _time(read)
                page_median, page_max = await _time(page)
                print(f"{name:<46} {read_median:>9.1f} / {read_max:<8.1f} "
                      f"{page_median:>9.1f} / {page_max:<8.1f}", flush=True)

            async def overview() -> None:
                answer = await client.get("/ui/")
                assert answer.status_code == 200

            overview_median, overview_max = await _time(overview)
            print(f"{'overview (24 h of activity, every event)':<46} {'':>20} "
                  f"{overview_median:>9.1f} / {overview_max:<8.1f}", flush=True)
    finally:
        await storage.close()


async def first_received(url: str) -> datetime:
    storage = open_storage(url, create=False)
    try:
        first = await storage.inbox.get(1)
        assert first is not None, "the file holds no events"
        return first.received_at - STEP
    finally:
        await storage.close()


async def prepared(url: str) -> None:
    storage = open_storage(url)
    await storage.migrate()
    await storage.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--backend", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--sqlite-file", type=Path,
                        help="measure this SQLite file, filled by an earlier run with the same "
                             "--events (kept), instead of filling a temporary one")
    options = parser.parse_args()
    if options.backend in ("sqlite", "both") and options.sqlite_file is not None:
        url = f"sqlite:///{options.sqlite_file}"
        if not options.sqlite_file.exists():
            asyncio.run(prepared(url))
            fill_sqlite(str(options.sqlite_file), options.events, start_for(options.events))
        start = asyncio.run(first_received(url))
        print(f"SQLite, {options.events:,} events in {options.sqlite_file}")
        asyncio.run(measure(url, options.events, start))
    elif options.backend in ("sqlite", "both"):
        with tempfile.TemporaryDirectory() as folder:
            path = str(Path(folder) / "bench.db")
            url = f"sqlite:///{path}"
            asyncio.run(prepared(url))
            began = time.perf_counter()
            start = start_for(options.events)
            fill_sqlite(path, options.events, start)
            print(f"SQLite, {options.events:,} events (filled in "
                  f"{time.perf_counter() - began:.0f} s)")
            asyncio.run(measure(url, options.events, start))
    if options.backend in ("postgresql", "both"):
        reason = unreachable_reason()
        if reason is not None:
            sys.exit(reason)
        with fresh_schema("lc_bench") as schema:
            url = schema_url(schema)
            asyncio.run(prepared(url))
            began = time.perf_counter()
            start = start_for(options.events)
            fill_postgres(url, options.events, start)
            print(f"PostgreSQL, {options.events:,} events (filled in "
                  f"{time.perf_counter() - began:.0f} s)")
            asyncio.run(measure(url, options.events, start))


if __name__ == "__main__":
    main()
