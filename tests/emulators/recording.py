"""A strict recording CRM and its target, for scale-out tests and benchmarks.

The emulator keeps one record per idempotency key and answers a repeated key with the same
record, as a CRM with native idempotency would; it takes `latency` seconds per call, can lose
the answer after committing (and counts each loss, so a test can tell a retry from a second
processing), and flags what must never happen: two worker processes inside calls for the same
event at the same time, or two events' calls touching the same identity at once.

Worker processes load the target by running this module instead of `engine.cli`:

    python -m tests.emulators.recording worker --concurrency 4     # LINKCRM_TARGETS=recording
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

from engine.actions import Action
from engine.errors import PermanentCRMError, RetryableCRMError
from engine.targets.base import CallContext, Outcome

URL_VARIABLE = "RECORDING_CRM_URL"


@dataclass
class Record:
    key: str
    event: int
    kind: str
    identity: list[list[str]]
    first_worker: str
    sequence: int  # creation order across all records


@dataclass
class RecordingState:
    """Everything the emulator saw; read it from the test thread under `lock`."""

    latency: float = 0.0
    records: dict[str, Record] = field(default_factory=dict)
    calls: Counter[str] = field(default_factory=Counter)  # key -> calls (retries included)
    dropped: Counter[str] = field(default_factory=Counter)  # key -> answers lost after commit
    events_in_flight: dict[int, Counter[str]] = field(default_factory=dict)
    identities_in_flight: dict[str, tuple[str, int]] = field(default_factory=dict)
    concurrent_events: list[tuple[int, str, str]] = field(default_factory=list)
    identity_overlaps: list[tuple[str, int, int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _enter(self, event: int, worker: str, identities: list[str]) -> None:
        with self.lock:
            workers = self.events_in_flight.setdefault(event, Counter())
            for other, count in workers.items():
                if other != worker and count:
                    self.concurrent_events.append((event, other, worker))
            workers[worker] += 1
            for identity in identities:
                held = self.identities_in_flight.get(identity)
                if held is not None and held[1] != event:
                    self.identity_overlaps.append((identity, held[1], event))
                self.identities_in_flight[identity] = (worker, event)

    def _leave(self, event: int, worker: str, identities: list[str]) -> None:
        with self.lock:
            self.events_in_flight[event][worker] -= 1
            for identity in identities:
                if self.identities_in_flight.get(identity) == (worker, event):
                    del self.identities_in_flight[identity]

    async def write(self, body: dict[str, Any]) -> tuple[Record, bool]:
        key, event, worker = str(body["key"]), int(body["event"]), str(body["worker"])
        identities = ["=".join(pair) for pair in body["identity"]]
        self._enter(event, worker, identities)
        try:
            await asyncio.sleep(self.latency)  # the CRM's work, inside the in-flight window
            with self.lock:
                self.calls[key] += 1
                existing = self.records.get(key)
                if existing is not None:
                    return existing, False
                record = Record(key, event, str(body["kind"]), body["identity"], worker,
                                len(self.records))
                self.records[key] = record
                return record, True
        finally:
            self._leave(event, worker, identities)


class DroppedConnection(Exception):
    """Raised after the response started, so the server cuts the connection."""


class _QuietDrops(logging.Filter):
    """Keeps uvicorn from logging a traceback for every answer lost on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], DroppedConnection))


@dataclass
class RecordingEmulator:
    """The emulator as an ASGI app: `POST /records` with the action's key, event, worker and
    identity. With probability `drop_rate` the write commits and then the answer is lost (the
    connection is cut mid-response); `state.dropped` counts those per key."""

    state: RecordingState
    drop_rate: float = 0.0
    seed: int = 7

    def __post_init__(self) -> None:
        self._random = random.Random(self.seed)
        uvicorn_errors = logging.getLogger("uvicorn.error")
        if not any(isinstance(f, _QuietDrops) for f in uvicorn_errors.filters):
            uvicorn_errors.addFilter(_QuietDrops())

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != "/records" or scope["method"] != "POST":
            await _answer(send, 404, {"error": "not found"})
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = json.loads(b"".join(chunks))
        record, created = await self.state.write(body)
        if self._random.random() < self.drop_rate:
            with self.state.lock:
                self.state.dropped[record.key] += 1
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-length", b"1000")]})
            raise DroppedConnection("fault injected: the answer to a committed write is lost")
        await _answer(send, 201 if created else 200, {"id": record.key[:16], "created": created})


async def _answer(send: Any, status: int, body: dict[str, Any]) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


class RecordingTarget:
    """Sends each action with its idempotency key, event id and worker process to the
    emulator. A lost answer is retryable: the retry finds the record the first call made."""

    name = "recording"

    def __init__(self, client: httpx.AsyncClient, base_url: str) -> None:
        self.client = client
        self.url = base_url.rstrip("/") + "/records"
        self.worker = f"{os.uname().nodename}:{os.getpid()}"

    async def execute(self, action: Action, context: CallContext) -> Outcome:
        body = {
            "key": context.idempotency_key, "event": context.event_id, "worker": self.worker,
            "kind": action.kind,
            "identity": [[key.field, key.value] for key in action.identity],
        }
        try:
            answer = await self.client.post(self.url, json=body)
        except httpx.HTTPError as error:
            raise RetryableCRMError(f"recording: {type(error).__name__}: {error}") from None
        if answer.status_code >= 500 or answer.status_code == 429:
            raise RetryableCRMError(f"recording: HTTP {answer.status_code}")
        if answer.status_code >= 400:
            raise PermanentCRMError(f"recording: HTTP {answer.status_code}: {answer.text}")
        data = answer.json()
        return Outcome(str(data["id"]), f"record {data['id']}", created=bool(data["created"]))

    async def aclose(self) -> None:
        return None


def register() -> None:
    """Add `recording` to the target registry of this process (reads RECORDING_CRM_URL)."""
    from engine.targets.registry import REGISTRY, TargetContext, TargetKind

    def factory(context: TargetContext) -> RecordingTarget:
        return RecordingTarget(context.client, context.environ[URL_VARIABLE])

    REGISTRY["recording"] = TargetKind((URL_VARIABLE,), factory)


if __name__ == "__main__":
    register()
    from engine.cli import main

    main()
