"""Worker speed alone: N distinct events already in the inbox, one in-process worker with the
local CRM, timed from the first claim until every event is finished; prints events/s and,
with --profile, the top of a cProfile of the run (what the worker spends its time on).

    python tests/benchmarks/bench_worker.py [--events 10000] [--concurrency N]
                                            [--database URL] [--profile 25]

Without --database, a fresh SQLite file in a temporary folder. The events are stored through
the storage API (not HTTP), so the figure is the worker's own ceiling: what the receiver and
the worker together reach is bench_receiver.py's end-to-end drain.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import hashlib
import io
import json
import pstats
import resource
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from engine.rules.files import load_ruleset
from engine.runtime.collector import collect_cycles_seldom
from engine.runtime.gil import share_the_gil_promptly
from engine.runtime.metrics import Metrics
from engine.runtime.settings import Settings
from engine.storage import NewEvent, open_storage
from engine.worker.assembly import open_worker
from tests.support.loadgen import webhook_body
from tests.support.paths import REPO


async def fill(url: str, events: int) -> None:
    async with open_storage(url) as storage:
        await storage.migrate()
        now = datetime.now(UTC)

        async def one(n: int) -> None:
            body = webhook_body(n, token=f"tok_{n:07d}")
            payload = json.loads(body)
            await storage.inbox.store(NewEvent(
                body=body, event_type=payload["event"], event_timestamp=payload["timestamp"],
                dedupe_key=hashlib.sha256(body).hexdigest(), received_at=now))

        for start in range(0, events, 500):
            await asyncio.gather(*(one(n) for n in range(start, min(events, start + 500))))


async def work(url: str, concurrency: int | None) -> float:
    ruleset = load_ruleset([REPO / "rules"])
    async with open_storage(url) as storage:
        async with open_worker(storage, ruleset, Settings(), {"LINKCRM_TARGETS": "local"},
                               metrics=Metrics(), concurrency=concurrency) as worker:
            started = time.perf_counter()
            await worker.run_until_idle()
            elapsed = time.perf_counter() - started
        stats = await storage.inbox.stats()
    print(f"  inbox after the run: {dict(stats.by_status)}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=None,
                        help="events at once (default: the target's own; 256 for the local "
                             "CRM on SQLite)")
    parser.add_argument("--database", help="a database URL (default: a fresh SQLite file)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="print the N costliest functions (cumulative and own time)")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        url = options.database or f"sqlite:///{Path(folder) / 'worker.db'}"
        asyncio.run(fill(url, options.events))
        share_the_gil_promptly()  # as `linkcrm worker` and `linkcrm serve` run
        collect_cycles_seldom()
        profiler = cProfile.Profile() if options.profile else None
        if profiler is not None:
            profiler.enable()
        before = resource.getrusage(resource.RUSAGE_SELF)
        elapsed = asyncio.run(work(url, options.concurrency))
        after = resource.getrusage(resource.RUSAGE_SELF)
        if profiler is not None:
            profiler.disable()
    concurrency = options.concurrency or "the target's default"
    print(f"worker alone: {options.events} events in {elapsed:.2f} s = "
          f"{options.events / elapsed:,.0f} events/s (concurrency {concurrency}, "
          f"local CRM, {url.split(':', 1)[0]})")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    print(f"  CPU {cpu:.2f} s = {cpu / options.events * 1e6:,.0f} us per event (user + system, "
          "every thread of this process: what a busy machine moves least)")
    if profiler is not None:
        for order in ("cumulative", "tottime"):
            out = io.StringIO()
            pstats.Stats(profiler, stream=out).sort_stats(order).print_stats(options.profile)
            print(out.getvalue())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
