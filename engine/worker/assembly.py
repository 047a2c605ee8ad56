"""The worker as a service: its HTTP client, targets and options from the settings, clean-up,
and the published rules followed while it runs.

When a new rule version only changes rules, the next claim plans with it (the Worker reads the
follower's snapshot at each claim). When it changes the field map, the targets are built from
it: the new targets are built and started first (a CRM that does not fit the new field map
keeps the old version running, logged), then the running Worker stops claiming and drains, and
a new Worker on the new targets starts with the new rules.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from typing import Any

import httpx

from engine import __version__
from engine.errors import ConfigError
from engine.rules.model import RuleSet
from engine.runtime.metrics import Metrics
from engine.runtime.settings import Settings
from engine.runtime.supervisor import Supervisor
from engine.storage import Storage
from engine.targets.base import Target
from engine.targets.registry import build_targets, start_targets
from engine.worker.follow import RuleFollower
from engine.worker.loop import Worker, WorkerOptions
from engine.worker.retrying import RetryPolicy
from engine.worker.shadow import ShadowObserver
from engine.worker.snapshot import Rules, ShadowHook, same_field_map

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


async def _started_targets(environ: Mapping[str, str], storage: Storage, ruleset: RuleSet,
                           client: httpx.AsyncClient) -> list[Target]:
    """The targets for `ruleset`'s field map, started; closed again when starting fails."""
    targets = build_targets(environ, storage, ruleset.field_map, client)
    try:
        await start_targets(targets)
    except BaseException:
        await _close(targets)
        raise
    return targets


async def _close(targets: Sequence[Target]) -> None:
    for target in targets:
        with contextlib.suppress(Exception):
            await target.aclose()


class FollowingWorker:
    """A Worker that runs the published rules as they change (see the module docstring).

        following = FollowingWorker(storage, follower, settings, os.environ, metrics=m)
        await following.run()       # until following.stop(); ConfigError when the CRM does
                                    # not fit the field map of the rules it starts with
    """

    def __init__(
        self,
        storage: Storage,
        follower: RuleFollower,
        settings: Settings,
        environ: Mapping[str, str],
        *,
        metrics: Metrics,
        concurrency: int | None = None,
        shadow: ShadowHook | None = None,
    ) -> None:
        self.storage = storage
        self.follower = follower
        self.settings = settings
        self.environ = environ
        self.metrics = metrics
        self.concurrency = concurrency
        # Shadow versions are compared by default; tests pass their own hook.
        self.shadow = shadow if shadow is not None else ShadowObserver(storage, metrics=metrics)
        self.current: Worker | None = None
        self._stopping = False

    def stop(self) -> None:
        self._stopping = True
        if self.current is not None:
            self.current.stop()

    async def run(self) -> None:
        headers = {"user-agent": f"linkcrm/{__version__}"}
        async with httpx.AsyncClient(timeout=CRM_TIMEOUT, headers=headers) as client:
            targets = await _started_targets(self.environ, self.storage,
                                             self.follower.current.active, client)
            try:
                while not self._stopping:
                    change = await self._run_until_field_map_changes(targets, client)
                    if change is None:
                        return
                    rules, new_targets = change
                    await _close(targets)
                    targets = new_targets
                    self.follower.adopt(rules)
            finally:
                await _close(targets)

    async def _run_until_field_map_changes(
        self, targets: list[Target], client: httpx.AsyncClient
    ) -> tuple[Rules, list[Target]] | None:
        """Run a Worker on `targets`, adopting rule changes in place, until it stops (None)
        or a new version needs other targets: those are started, and the Worker has drained."""
        worker = Worker(self.storage, self.follower.current.active, targets,
                        metrics=self.metrics,
                        options=worker_options(self.settings, self.concurrency),
                        rules=lambda: self.follower.current, shadow=self.shadow)
        self.current = worker
        if self._stopping:
            return None
        running = asyncio.create_task(worker.run(), name="linkcrm-worker")
        following = asyncio.create_task(self._next_targets(client), name="linkcrm-rules")
        try:
            await asyncio.wait({running, following}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not following.done():
                following.cancel()
            await asyncio.gather(following, return_exceptions=True)
            if not running.done():
                worker.stop()  # stop claiming; in-flight events finish with their rules
            try:
                await running
            except BaseException:
                if following.done() and not following.cancelled() \
                        and following.exception() is None:
                    await _close(following.result()[1])
                raise
        if following.cancelled() or following.exception() is not None:
            return None
        return following.result()

    async def _next_targets(self, client: httpx.AsyncClient) -> tuple[Rules, list[Target]]:
        """Adopt each published change that keeps the field map; return at the first one that
        does not, with its targets started (one the CRM does not fit is refused: logged, and
        the running version stays)."""
        async for rules in self.follower.changes():
            if same_field_map(rules.active, self.follower.current.active):
                self.follower.adopt(rules)
                continue
            try:
                targets = await _started_targets(self.environ, self.storage, rules.active,
                                                 client)
            except ConfigError as error:
                self.follower.refuse(rules, [problem.render() for problem in error.problems])
                continue
            log.info("the field map changed: the worker drains and restarts on new targets",
                     extra={"rules_version": rules.active.version})
            return rules, targets
        raise AssertionError("the rule changes never end")


def _follower(rules: RuleSet | Rules | RuleFollower, storage: Storage,
              metrics: Metrics) -> RuleFollower:
    if isinstance(rules, RuleFollower):
        return rules
    follower = RuleFollower(storage, rules if isinstance(rules, Rules) else Rules(rules),
                            metrics=metrics)
    follower.announce()
    return follower


def in_process_worker(
    ruleset: RuleSet | Rules,
    settings: Settings,
    environ: Mapping[str, str],
    concurrency: int | None = None,
    *,
    shadow: ShadowHook | None = None,
) -> InProcessWorker:
    """The worker as `linkcrm serve` runs it next to the receiver: same event loop, same storage
    and metrics; it stops (draining briefly) when the server shuts down. It starts with
    `ruleset` and follows the published rule versions. The receiver's supervisor restarts it
    (a new Worker, targets started again, the rules it had) if it ever crashes."""
    followers: list[RuleFollower] = []

    async def worker(storage: Storage, metrics: Metrics) -> None:
        if not followers:
            followers.append(_follower(ruleset, storage, metrics))
        try:
            await FollowingWorker(storage, followers[0], settings, environ, metrics=metrics,
                                  concurrency=concurrency, shadow=shadow).run()
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
    ends it for good. It follows the published rule versions. A ConfigError (a CRM not set up
    for the field map it starts with) is not retried: it ends `run()` so the command can print
    the fix.

        standalone = StandaloneWorker(storage, ruleset, settings, os.environ)
        loop.add_signal_handler(signal.SIGTERM, standalone.stop)
        await standalone.run()
    """

    def __init__(
        self,
        storage: Storage,
        ruleset: RuleSet | Rules,
        settings: Settings,
        environ: Mapping[str, str],
        *,
        concurrency: int | None = None,
        metrics: Metrics | None = None,
        supervisor: Supervisor | None = None,
        shadow: ShadowHook | None = None,
    ) -> None:
        self.storage = storage
        self.settings = settings
        self.environ = environ
        self.concurrency = concurrency
        self.metrics = metrics or Metrics()
        self.supervisor = supervisor or Supervisor(self.metrics, fatal=(ConfigError,))
        self.follower = _follower(ruleset, storage, self.metrics)
        self.shadow = shadow
        self.running: FollowingWorker | None = None
        self._stopping = False

    @property
    def ruleset(self) -> RuleSet:
        return self.follower.current.active

    @property
    def current(self) -> Worker | None:
        return None if self.running is None else self.running.current

    async def run(self) -> None:
        await self.supervisor.run("worker", self._once)

    def stop(self) -> None:
        self._stopping = True
        self.supervisor.stop()
        if self.running is not None:
            self.running.stop()

    async def _once(self) -> None:
        self.running = FollowingWorker(self.storage, self.follower, self.settings, self.environ,
                                       metrics=self.metrics, concurrency=self.concurrency,
                                       shadow=self.shadow)
        if self._stopping:  # stopped while starting
            return
        await self.running.run()
