"""The receiver process: storage, schema, logging, the app and uvicorn, until SIGINT/SIGTERM.

    run(settings, host="127.0.0.1", port=8000)   # what `linkcrm serve` runs, blocking

The HTTP server is uvicorn on uvloop with httptools (llhttp), through the whole-request deadline
protocol (deadline.py, over the strict parsing of framing.py), no access log (client IPs are
personal data) and logging left to engine.runtime.logs. Background
workers (the in-process worker) are given as `worker(storage, metrics)` coroutines, so this
package knows nothing of the worker: `linkcrm serve` (engine/cli/service.py) passes it in.
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import uvicorn
import uvloop
from starlette.routing import BaseRoute

from engine.runtime.collector import collect_cycles_seldom
from engine.runtime.gil import share_the_gil_promptly
from engine.runtime.logs import configure_logging
from engine.runtime.metrics import Metrics
from engine.runtime.settings import Settings
from engine.service.app import BackgroundTask, create_app
from engine.service.deadline import deadline_protocol
from engine.service.metrics import register_storage_gauges
from engine.storage import Storage, open_storage

log = logging.getLogger(__name__)

# The socket-level deadline trails the app's body deadline so the app can answer 408 first.
DEADLINE_GRACE_SECONDS = 1.0

Worker = Callable[[Storage, Metrics], Coroutine[Any, Any, None]]
# More routes on the open storage (the delivery log pages, built by `linkcrm serve`).
Pages = Callable[[Storage], Sequence[BaseRoute]]


def run(
    settings: Settings,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    migrate: bool = True,
    workers: Sequence[Worker] = (),
    sockets: Sequence[socket.socket] | None = None,
    pages: Pages | None = None,
) -> None:
    """Blocking entry point for `linkcrm serve`: JSON logs, then serve until stopped.

    Opens the storage (and migrates it, with `migrate`) and serves on `sockets` when given,
    already bound and listening (`host` and `port` then only name them in logs); `workers`
    run alongside on the same event loop, storage and metrics. Raises ConfigError (before
    anything starts) when WEBHOOK_SECRET is not set.
    """
    settings.require_webhook_secret()
    configure_logging(settings.log_level)
    share_the_gil_promptly()  # the SQLite writer thread hands commits back without waiting
    collect_cycles_seldom()  # thousands of events in flight make each walk long
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_serve(settings, (host, port), sockets, migrate=migrate, workers=workers,
                          pages=pages))


async def _serve(
    settings: Settings,
    address: tuple[str, int],
    sockets: Sequence[socket.socket] | None,
    *,
    migrate: bool,
    workers: Sequence[Worker],
    pages: Pages | None = None,
) -> None:
    storage = open_storage(settings.database_url)
    try:
        if migrate:
            await storage.migrate()
        metrics = Metrics()
        register_storage_gauges(metrics, storage)
        background = [_bind(worker, storage, metrics) for worker in workers]
        app = create_app(storage, settings, metrics=metrics, background=background,
                         pages=pages(storage) if pages is not None else ())
        host, port = address
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            http=deadline_protocol(settings.request_timeout + DEADLINE_GRACE_SECONDS),
            ws="none",  # no WebSocket endpoint: an Upgrade is never switched to
            lifespan="on",
            log_config=None,  # logging is ours: JSON lines, configured by run()
            access_log=False,  # access lines carry client IPs (personal data)
            # Nothing reads the client's address, so X-Forwarded-For is not worth a middleware
            # layer on every request.
            proxy_headers=False,
            server_header=False,
            timeout_keep_alive=5,
            timeout_graceful_shutdown=math.ceil(settings.request_timeout),
        )
        log.info("linkcrm receiver starting", extra={"host": host, "port": port,
                                                     "settings": repr(settings)})
        await uvicorn.Server(config).serve(sockets=list(sockets) if sockets else None)
    finally:
        await storage.close()


def _bind(worker: Worker, storage: Storage, metrics: Metrics) -> BackgroundTask:
    async def task() -> None:
        await worker(storage, metrics)

    task.__name__ = getattr(worker, "__name__", "background")  # the task's name in logs
    return task
