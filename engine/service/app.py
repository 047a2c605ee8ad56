"""The HTTP receiver: verify, store durably, answer; no CRM call ever happens in a request.

    app = create_app(storage, settings)       # a Starlette app (TestClient, any ASGI server)
    run(settings, host="127.0.0.1", port=8000)  # the real server, as `linkcrm serve` runs it

Endpoints: `POST /webhooks/tolinku`, `POST /v1/identify`, `GET /healthz`, `GET /readyz`,
`GET /metrics`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import socket
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Sequence
from typing import Any

import uvicorn
from jsonschema import Draft202012Validator
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from engine.config.resources import validator
from engine.errors import StorageError, UnstorableEventError
from engine.runtime.logs import configure_logging
from engine.runtime.metrics import Metrics, Sample
from engine.runtime.settings import Settings
from engine.runtime.supervisor import Supervisor
from engine.service.deadline import deadline_protocol
from engine.service.intake import (
    Rejected,
    authorized,
    check_declared_size,
    iso_utc,
    parse_envelope,
    parse_json,
    read_body,
    read_head,
    validate_identify,
)
from engine.signing import verify_signature
from engine.storage import Clock, InboxStats, NewEvent, Storage, open_storage, utc_now

log = logging.getLogger(__name__)

IDENTIFY_EVENT = "app.user_identified"
WEBHOOK_PATH = "/webhooks/tolinku"
RETRY_AFTER_SECONDS = "30"
# The socket-level deadline trails the app's body deadline so the app can answer 408 first.
DEADLINE_GRACE_SECONDS = 1.0
_MAX_EVENT_LABELS = 200

BackgroundTask = Callable[[], Coroutine[Any, Any, None]]
Worker = Callable[[Storage, Metrics], Coroutine[Any, Any, None]]


def create_app(
    storage: Storage,
    settings: Settings,
    *,
    metrics: Metrics | None = None,
    clock: Clock = utc_now,
    background: Sequence[BackgroundTask] = (),
    supervisor: Supervisor | None = None,
) -> Starlette:
    """The receiver as a Starlette app. `storage` must be open and migrated; `background`
    coroutines (the in-process worker) run for the app's lifetime under `supervisor`, which
    restarts one that crashes (/readyz answers 503 until it runs again), and are cancelled at
    shutdown.
    """
    metrics = metrics or Metrics()
    supervisor = supervisor or Supervisor()
    supervisor.attach(metrics)
    _register_gauges(metrics, storage, clock)
    metrics_keys = [key.encode("utf-8") for key in settings.metrics_keys]
    identify_schema = validator(f"events/{IDENTIFY_EVENT}.json").evolve(
        format_checker=Draft202012Validator.FORMAT_CHECKER
    )
    api_keys = [key.encode("utf-8") for key in settings.api_keys]
    event_labels: set[str] = set()

    def reject(error: Rejected, *, close: bool) -> Response:
        metrics.rejected.inc(reason=error.reason)
        log.info("request rejected", extra={"reason": error.reason, "status": error.status})
        # A request answered before its body was read in full must not keep the connection:
        # the rest of the body would be read (and dropped) for as long as the client sends it.
        headers = {"connection": "close"} if close else {}
        if error.status == 503:
            headers["retry-after"] = RETRY_AFTER_SECONDS
        if error.status == 401:
            if error.reason == "unauthorized":
                headers["www-authenticate"] = "Bearer"
            return Response(status_code=401, headers=headers)  # no detail, by design
        body = {"error": error.reason, "message": error.message}
        return JSONResponse(body, status_code=error.status, headers=headers)

    async def store(event: NewEvent) -> Response:
        try:
            result = await storage.inbox.store(event)
        except UnstorableEventError as error:
            # It never will be: a 503 would have the sender retry it forever.
            log.info("event refused by the storage", extra={"event_type": event.event_type[:64],
                                                            "error": str(error)})
            return reject(Rejected("bad_envelope", 400, str(error)), close=False)
        except StorageError as error:
            log.error("event not stored", extra={"event_type": event.event_type,
                                                 "error": str(error)})
            return reject(Rejected("storage_unavailable", 503,
                                    "the event could not be stored; retry later"), close=False)
        if result.duplicate:
            metrics.duplicates.inc(source=event.source)
        else:
            metrics.received.inc(event=label_for(event.event_type), source=event.source)
        if log.isEnabledFor(logging.DEBUG):  # skip building the record at thousands a second
            log.debug("event stored", extra={"event_id": result.id,
                                             "event_type": event.event_type,
                                             "duplicate": result.duplicate})
        # Rendered by hand: this answer is sent thousands of times a second.
        status = b"duplicate" if result.duplicate else b"stored"
        return Response(b'{"status":"%s","id":%d}' % (status, result.id),
                        media_type="application/json")

    def label_for(event_type: str) -> str:
        # Event types come from signed bodies, but cap the label set all the same.
        if event_type in event_labels:
            return event_type
        if len(event_labels) < _MAX_EVENT_LABELS and len(event_type) <= 64:
            event_labels.add(event_type)
            return event_type
        return "other"

    async def webhook(request: Request) -> Response:
        head = read_head(request.scope)
        try:
            check_declared_size(head, settings.max_body_bytes)
            signature = head.signature
            if not signature:
                raise Rejected("bad_signature", 401)
        except Rejected as error:
            return reject(error, close=True)
        try:
            body = await read_body(request.receive, settings.max_body_bytes,
                                   settings.request_timeout)
        except Rejected as error:
            return reject(error, close=True)
        except ClientDisconnect:
            return Response(status_code=400)
        try:
            if not verify_signature(body, signature, settings.webhook_secrets):
                raise Rejected("bad_signature", 401)
            envelope = parse_envelope(body)
        except Rejected as error:
            return reject(error, close=False)
        event_type = envelope["event"]
        announced = head.event
        if announced is not None and announced != event_type:
            # The signed body is the truth; the header is not signed. Types only, no data.
            log.warning("X-Webhook-Event disagrees with the signed body", extra={
                "event_type": event_type, "header_event_type": announced[:64]})
        return await store(NewEvent(
            body=body,
            event_type=event_type,
            event_timestamp=envelope["timestamp"],
            dedupe_key=hashlib.sha256(body).hexdigest(),
            received_at=clock(),
            source="tolinku",
            headers=head.kept,
        ))

    async def identify(request: Request) -> Response:
        head = read_head(request.scope)
        if not authorized(head, api_keys):
            return reject(Rejected("unauthorized", 401), close=True)
        try:
            check_declared_size(head, settings.max_body_bytes)
            body = await read_body(request.receive, settings.max_body_bytes,
                                   settings.request_timeout)
        except Rejected as error:
            return reject(error, close=True)
        except ClientDisconnect:
            return Response(status_code=400)
        received_at = clock()
        try:
            data = parse_json(body)
            envelope = {"event": IDENTIFY_EVENT, "timestamp": iso_utc(received_at), "data": data}
            validate_identify(identify_schema, envelope)
        except Rejected as error:
            return reject(error, close=False)
        return await store(NewEvent(
            body=json.dumps(envelope, ensure_ascii=False, separators=(",", ":")).encode(),
            event_type=IDENTIFY_EVENT,
            event_timestamp=envelope["timestamp"],
            # Over the request body, not the envelope (its timestamp differs per call), and in
            # its own namespace so an identify body can never collide with a Tolinku delivery.
            dedupe_key=hashlib.sha256(b"identify\n" + body).hexdigest(),
            received_at=received_at,
            source="identify",
            headers=head.kept,
        ))

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        if not supervisor.ready:
            log.warning("not ready", extra={"error": "a background task crashed",
                                            "down": sorted(supervisor.down)})
            return JSONResponse({"status": "unavailable", "reason": "task_down",
                                 "down": dict(supervisor.down)},
                                status_code=503)
        try:
            await asyncio.wait_for(storage.ping(), timeout=5)
            durability = await asyncio.wait_for(storage.durability(), timeout=5)
        except (StorageError, TimeoutError) as error:
            log.warning("not ready", extra={"error": str(error) or "storage ping timed out"})
            return JSONResponse({"status": "unavailable", "reason": "storage_unreachable"},
                                status_code=503)
        try:
            # Free while writes commit; after a failed commit, a test write decides.
            await asyncio.wait_for(storage.check_writable(), timeout=5)
        except (StorageError, TimeoutError) as error:
            log.warning("not ready: writes fail", extra={
                "error": str(error) or "the test write timed out"})
            return JSONResponse({"status": "unavailable", "reason": "writes_failing"},
                                status_code=503)
        return JSONResponse({"status": "ready", "storage": dict(durability)})

    async def metrics_endpoint(request: Request) -> Response:
        if metrics_keys and not authorized(read_head(request.scope), metrics_keys):
            return reject(Rejected("unauthorized", 401), close=False)
        return PlainTextResponse(
            await metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if not api_keys:
            log.warning("LINKCRM_API_KEYS is not set: POST /v1/identify refuses every call")
        tasks = [asyncio.create_task(supervisor.run(getattr(task, "__name__", "background"), task))
                 for task in background]
        try:
            yield
        finally:
            supervisor.stop()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    app = _ReceiverApp(
        webhook,
        routes=[
            Route(WEBHOOK_PATH, webhook, methods=["POST"]),
            Route("/v1/identify", identify, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/metrics", metrics_endpoint, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    app.state.metrics = metrics
    return app


class _ReceiverApp(Starlette):
    """Starlette, plus a direct path for `POST /webhooks/tolinku`.

    The webhook is the hot path (thousands of deliveries a second); going straight to its
    endpoint instead of through the middleware stack and the router measured about 5% more
    durable acknowledgements per second. Everything else, and the webhook under a root path,
    takes the ordinary Starlette route; an error in the direct path is answered 500 by the
    server, as ServerErrorMiddleware would.
    """

    def __init__(
        self, webhook: Callable[[Request], Coroutine[Any, Any, Response]], **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self._webhook = webhook

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == WEBHOOK_PATH and scope["method"] == "POST":
            scope["app"] = self
            response = await self._webhook(Request(scope, receive, send))
            await response(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


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


def _register_gauges(metrics: Metrics, storage: Storage, clock: Clock) -> None:
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


# -- the server --------------------------------------------------------------------------------


async def serve(
    settings: Settings,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    migrate: bool = True,
    workers: Sequence[Worker] = (),
    sockets: Sequence[socket.socket] | None = None,
) -> None:
    """Open the storage, migrate it, and serve until SIGINT/SIGTERM; `workers` (e.g. the
    in-process worker loop) run alongside on the same event loop and storage. `sockets`, when
    given, are already bound and listening (`host` and `port` then only name them in logs)."""
    settings.require_webhook_secret()
    storage = open_storage(settings.database_url)
    try:
        if migrate:
            await storage.migrate()
        metrics = Metrics()
        background = [_bind(worker, storage, metrics) for worker in workers]
        app = create_app(storage, settings, metrics=metrics, background=background)
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            http=deadline_protocol(settings.request_timeout + DEADLINE_GRACE_SECONDS),
            lifespan="on",
            log_config=None,  # logging is ours: JSON lines, configured by run()
            access_log=False,  # access lines carry client IPs (personal data)
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


def run(
    settings: Settings,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    migrate: bool = True,
    workers: Sequence[Worker] = (),
    sockets: Sequence[socket.socket] | None = None,
) -> None:
    """Blocking entry point for `linkcrm serve`: JSON logs, then `serve(...)` until stopped.

    Raises ConfigError (before binding the port) when WEBHOOK_SECRET is not set.
    """
    settings.require_webhook_secret()
    configure_logging(settings.log_level)
    asyncio.run(serve(settings, host=host, port=port, migrate=migrate, workers=workers,
                      sockets=sockets))
