"""Background tasks that come back after a crash: the in-process worker, the standalone worker.

    supervisor = Supervisor(metrics)
    await supervisor.run("worker", run_worker)   # returns when run_worker returns

A task that raises is logged (its type and where it was raised, not its message, which may
quote event data), counted in `linkcrm_task_crashes_total{task}` and started again after a
delay that doubles with each crash in a row, from `first_delay` up to `max_delay` (a run that
lasted `stable_after` seconds starts the count again). While a task waits to restart, `down`
names it: `/readyz` answers 503 and `linkcrm_task_up{task}` is 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable

from engine.errors import trace, where
from engine.runtime.metrics import Counter, Metrics, Sample

log = logging.getLogger("engine.worker.loop")

Task = Callable[[], Awaitable[None]]


class Supervisor:
    """Runs tasks, restarts each one that crashes, and says which are down.

    Exceptions of the `fatal` types are not restarted but raised (a standalone worker whose
    CRM settings are wrong stops with the fix instead of retrying forever). Cancellation
    always goes through; `stop()` ends the waits between restarts, and no task is restarted
    after it.
    """

    def __init__(
        self,
        metrics: Metrics | None = None,
        *,
        first_delay: float = 1.0,
        max_delay: float = 60.0,
        stable_after: float = 60.0,
        fatal: tuple[type[BaseException], ...] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.first_delay = first_delay
        self.max_delay = max_delay
        self.stable_after = stable_after
        self.fatal = fatal
        self.clock = clock
        self.down: dict[str, str] = {}  # task -> the type of the error that stopped it
        self._running: set[str] = set()
        self._stopped = asyncio.Event()
        self._crashes: Counter | None = None
        if metrics is not None:
            self.attach(metrics)

    def attach(self, metrics: Metrics) -> None:
        """Publish the crash counter and the up gauge on `metrics`."""
        self._crashes = metrics.counter(
            "linkcrm_task_crashes_total",
            "Crashes of a background task (the in-process worker), each followed by a restart.",
            ("task",))
        metrics.gauge(
            "linkcrm_task_up",
            "1 while a background task (the in-process worker) runs, 0 while it waits to "
            "restart after a crash.", self._collect)

    @property
    def ready(self) -> bool:
        return not self.down

    def stop(self) -> None:
        """Restart nothing from now on; a task waiting to restart gives up at once."""
        self._stopped.set()

    async def run(self, name: str, start: Task) -> None:
        """Run `start()` until it returns (or `stop()`), restarting it after each crash."""
        if self._crashes is not None:
            self._crashes.inc(0, task=name)  # the series shows from the start, at 0
        in_a_row = 0
        try:
            while True:
                self.down.pop(name, None)
                self._running.add(name)
                began = self.clock()
                try:
                    await start()
                    return
                except self.fatal:
                    raise
                except Exception as error:
                    in_a_row = 1 if self.clock() - began >= self.stable_after else in_a_row + 1
                    delay = min(self.max_delay, self.first_delay * 2 ** (in_a_row - 1))
                    self._crashed(name, error, delay, in_a_row)
                if await self._stopping(delay):
                    return
        finally:
            self._running.discard(name)
            self.down.pop(name, None)

    def _crashed(self, name: str, error: Exception, delay: float, in_a_row: int) -> None:
        self._running.discard(name)
        self.down[name] = type(error).__name__
        if self._crashes is not None:
            self._crashes.inc(task=name)
        log.error("background task crashed; it restarts after a pause", extra={
            "task": name, "error_type": type(error).__name__, "where": where(error),
            "restart_in_seconds": delay, "crashes_in_a_row": in_a_row, "frames": trace(error)})

    async def _stopping(self, delay: float) -> bool:
        """Wait `delay` seconds; True when `stop()` came first (or before)."""
        if self._stopped.is_set():
            return True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._stopped.wait()
        return self._stopped.is_set()

    async def _collect(self) -> Iterable[Sample]:
        names = sorted(self._running | set(self.down))
        return [Sample({"task": name}, 0.0 if name in self.down else 1.0) for name in names]
