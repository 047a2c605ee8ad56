"""The worker as a service: its HTTP client, targets and options from the settings, and clean-up."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from typing import Any

import httpx

from engine import __version__
from engine.crm.targets import build_targets, start_targets
from engine.errors import ConfigError
from engine.metrics import Metrics
from engine.retrying import RetryPolicy
from engine.rules import RuleSet
from engine.settings import Settings
from engine.storage import Storage
from engine.worker import Worker, WorkerOptions

log = logging.getLogger("engine.worker")

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
    """A worker on `storage` with the targets the environment selects, started (Pipedrive's
    labels resolved); the HTTP client and the targets are closed on exit. Raises ConfigError
    for an unknown or unconfigured target, or a CRM not set up for the field map.

        async with open_worker(storage, ruleset, settings, os.environ, metrics=m) as worker:
            await worker.run()
    """
    headers = {"user-agent": f"linkcrm/{__version__}"}
    async with httpx.AsyncClient(timeout=CRM_TIMEOUT, headers=headers) as client:
        targets = build_targets(environ, storage, ruleset.field_map, client)
        try:
            await start_targets(targets)
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
        try:
            async with open_worker(storage, ruleset, settings, environ, metrics=metrics,
                                   concurrency=concurrency) as worker:
                await worker.run()
        except ConfigError as error:
            # `serve` checked the targets before binding; one changed since (a Pipedrive field
            # deleted): say so, since nobody awaits this task until shutdown.
            log.error("the worker cannot start", extra={
                "problems": [problem.render() for problem in error.problems]})
            raise

    return run
