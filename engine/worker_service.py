"""The worker as a service: its HTTP client, targets and options from the settings, and clean-up."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from typing import Any

import httpx

from engine import __version__
from engine.crm.targets import build_targets
from engine.metrics import Metrics
from engine.retrying import RetryPolicy
from engine.rules import RuleSet
from engine.settings import Settings
from engine.storage import Storage
from engine.worker import Worker, WorkerOptions

# CRM calls: generous reads (batch endpoints are slow), short connects (a dead host fails fast
# into the retry policy instead of holding a lane).
CRM_TIMEOUT = httpx.Timeout(30.0, connect=5.0)

InProcessWorker = Callable[[Storage, Metrics], Coroutine[Any, Any, None]]


def worker_options(settings: Settings, concurrency: int | None = None) -> WorkerOptions:
    return WorkerOptions(
        concurrency=concurrency or settings.worker_concurrency,
        lease_seconds=settings.lease_seconds,
        policy=RetryPolicy(max_attempts=settings.max_attempts),
    )


@contextlib.asynccontextmanager
async def open_worker(
    storage: Storage,
    ruleset: RuleSet,
    settings: Settings,
    environ: Mapping[str, str],
    *,
    metrics: Metrics,
    concurrency: int | None = None,
) -> AsyncIterator[Worker]:
    """A worker on `storage` with the targets the environment selects; the HTTP client and the
    targets are closed on exit. Raises ConfigError for an unknown or unconfigured target.

        async with open_worker(storage, ruleset, settings, os.environ, metrics=m) as worker:
            await worker.run()
    """
    headers = {"user-agent": f"linkcrm/{__version__}"}
    async with httpx.AsyncClient(timeout=CRM_TIMEOUT, headers=headers) as client:
        targets = build_targets(environ, storage, ruleset.field_map, client)
        try:
            yield Worker(storage, ruleset, targets, metrics=metrics,
                         options=worker_options(settings, concurrency))
        finally:
            for target in targets:
                await target.aclose()


def in_process_worker(
    ruleset: RuleSet,
    settings: Settings,
    environ: Mapping[str, str],
    concurrency: int | None = None,
) -> InProcessWorker:
    """The worker as `linkcrm serve` runs it next to the receiver: same event loop, same storage
    and metrics; it stops (draining briefly) when the server shuts down."""

    async def run(storage: Storage, metrics: Metrics) -> None:
        async with open_worker(storage, ruleset, settings, environ, metrics=metrics,
                               concurrency=concurrency) as worker:
            await worker.run()

    return run
