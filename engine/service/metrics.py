"""`GET /metrics` (Prometheus text) and the gauges the service publishes there.

    register_inbox_gauges(metrics, storage, clock)   # inbox depth, oldest pending age
    register_storage_gauges(metrics, storage)        # the connection's durability settings
    Route("/metrics", MetricsEndpoint(metrics, settings.metrics_keys).scrape, methods=["GET"])
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterable, Sequence

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from engine.runtime.metrics import Metrics, Sample
from engine.service.intake import Rejected, authorized, read_head
from engine.service.refusals import refuse
from engine.storage import Clock, InboxStats, Storage

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class MetricsEndpoint:
    """`GET /metrics`; with LINKCRM_METRICS_KEYS set, only for a `Bearer` key from it."""

    def __init__(self, metrics: Metrics, keys: Sequence[str]) -> None:
        self.metrics = metrics
        self.keys = [key.encode("utf-8") for key in keys]

    async def scrape(self, request: Request) -> Response:
        if self.keys and not authorized(read_head(request.scope), self.keys):
            return refuse(self.metrics, Rejected("unauthorized", 401), close=False)
        return PlainTextResponse(await self.metrics.render(), media_type=CONTENT_TYPE)


class _InboxStatsCache:
    """The inbox gauges' one source: at most one storage read in flight, shared by every
    concurrent scrape, and its answer reused for `max_age` seconds. The read itself is constant
    time (counts kept by triggers), so scrapers, however many, cost the database next to
    nothing and never hold up webhook commits."""

    def __init__(self, storage: Storage, max_age: float = 1.0) -> None:
        self._storage = storage
        self._max_age = max_age
        self._value: InboxStats | None = None
        self._read_at = -math.inf
        self._lock = asyncio.Lock()

    async def get(self) -> InboxStats:
        loop = asyncio.get_running_loop()
        if self._value is not None and loop.time() - self._read_at < self._max_age:
            return self._value
        async with self._lock:  # the scrapes that queue here get the read just made
            if self._value is None or loop.time() - self._read_at >= self._max_age:
                self._value = await self._storage.inbox.stats()
                self._read_at = loop.time()
            return self._value


def register_inbox_gauges(metrics: Metrics, storage: Storage, clock: Clock) -> None:
    """`linkcrm_inbox_events{status}` and `linkcrm_inbox_oldest_pending_age_seconds`."""
    stats = _InboxStatsCache(storage)

    async def inbox_depth() -> Iterable[Sample]:
        by_status = (await stats.get()).by_status
        return [Sample({"status": status}, count) for status, count in by_status.items()]

    async def oldest_pending() -> Iterable[Sample]:
        oldest = (await stats.get()).oldest_pending_received_at
        age = 0.0 if oldest is None else max((clock() - oldest).total_seconds(), 0.0)
        return [Sample({}, age)]

    metrics.gauge("linkcrm_inbox_events", "Inbox events by status.", inbox_depth)
    metrics.gauge(
        "linkcrm_inbox_oldest_pending_age_seconds",
        "Age of the oldest event waiting for the worker (0 when none).",
        oldest_pending,
    )


def register_storage_gauges(metrics: Metrics, storage: Storage) -> None:
    """The live database connection's durability settings, e.g.
    `linkcrm_storage_setting{setting="sqlite_synchronous"} 2` (FULL)."""

    async def collect() -> Iterable[Sample]:
        values = await storage.durability()
        return [Sample({"setting": name}, value) for name, value in sorted(values.items())]

    metrics.gauge("linkcrm_storage_setting",
                  "Durability settings of the live database connection (SQLite: "
                  "sqlite_synchronous 2 = FULL, sqlite_wal 1 = WAL).", collect)
