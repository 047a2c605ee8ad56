"""The worker as a service: its HTTP client, targets and options from the settings, and clean-up."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from typing import Any

import httpx

from engine import __version__
from engine.errors import ConfigError
from engine.rules.model import RuleSet
from engine.runtime.metrics import Metrics
from engine.runtime.settings import Settings
from engine.runtime.supervisor import Supervisor
from engine.storage import Storage
from engine.targets.registry import build_targets, start_targets
from engine.worker.loop import Worker, WorkerOptions
from engine.worker.retrying import RetryPolicy

log = logging.getLogger("engine.worker.loop")

# CRM calls: generous reads (batch endpoints are slow), short connects (a dead host fails fast
# into the retry policy instead of holding a lane).
CRM_TIMEOUT = httpx.Timeout(30.0, connect=5.0)

InProcessWorker = Callable[[Storage, Metrics], Coroutine[Any, Any, None]]


def worker_options(settings: Settings, concurrency: int | None = None) -> WorkerOptions:
    return WorkerOptions(
        concurrency=concurrency or settings.worker_concurrency,
        lease_seconds=settings.lease_seconds,
        policy=RetryPolicy(max_attempts=settings.max_attempts),
        touch_retention_days=settings.touch_retention_days,
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
    and metrics; it stops (draining briefly) when the server shuts down. The receiver's
    supervisor restarts it (a new Worker, targets started again) if it ever crashes."""

    async def worker(storage: Storage, metrics: Metrics) -> None:
        try:
            async with open_worker(storage, ruleset, settings, environ, metrics=metrics,
                                   concurrency=concurrency) as running:
                await running.run()
        except ConfigError as error:
            # `serve` checked the targets before binding; one changed since (a Pipedrive field
            # deleted): say so, since nobody awaits this task until shutdown.
            log.error("the worker cannot start", extra={
                "problems": [problem.render() for problem in error.problems]})
            raise

    return worker


class StandaloneWorker:
    """`linkcrm worker`: the worker under a supervisor, so a crash restarts it (a new Worker,
    targets started again) instead of ending the process; `stop()` (from a signal handler)
    ends it for good. A ConfigError (a CRM not set up for the field map) is not retried: it
    ends `run()` so the command can print the fix.

        standalone = StandaloneWorker(storage, ruleset, settings, os.environ)
        loop.add_signal_handler(signal.SIGTERM, standalone.stop)
        await standalone.run()
    """

    def __init__(
        self,
        storage: Storage,
        ruleset: RuleSet,
        settings: Settings,
        environ: Mapping[str, str],
        *,
        concurrency: int | None = None,
        metrics: Metrics | None = None,
        supervisor: Supervisor | None = None,
    ) -> None:
        self.storage = storage
        self.ruleset = ruleset
        self.settings = settings
        self.environ = environ
        self.concurrency = concurrency
        self.metrics = metrics or Metrics()
        self.supervisor = supervisor or Supervisor(self.metrics, fatal=(ConfigError,))
        self.current: Worker | None = None
        self._stopping = False

    async def run(self) -> None:
        await self.supervisor.run("worker", self._once)

    def stop(self) -> None:
        self._stopping = True
        self.supervisor.stop()
        if self.current is not None:
            self.current.stop()

    async def _once(self) -> None:
        async with open_worker(self.storage, self.ruleset, self.settings, self.environ,
                               metrics=self.metrics, concurrency=self.concurrency) as worker:
            self.current = worker
            if self._stopping:  # stopped while the targets were starting
                return
            await worker.run()
