"""Fault injection shared by the emulators: 5xx, 429, slow answers, dropped connections, and
the hard one, a write that commits and then loses its response. A slow answer still commits,
late: after a client that timed out has given up on it.

Wrap an emulator app: `FaultInjector(app, rate=0.2, too_many=lambda: (429, headers, body))`.
Each request draws once from a seeded generator; with probability `rate` it gets one fault from
`kinds`. A dropped connection is made by starting a response and then raising, which makes the
server abort the connection: the client sees a protocol error, exactly like a network cut.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Scope = dict[str, Any]
Receive = Callable[[], Any]
Send = Callable[[dict[str, Any]], Any]
ASGIApp = Callable[[Scope, Receive, Send], Any]

KINDS = ("server_error", "too_many", "slow", "drop_before", "drop_after_commit")


class DroppedConnection(Exception):
    """Raised after the response started so that the server cuts the connection."""


@dataclass
class FaultInjector:
    app: ASGIApp
    rate: float = 0.0
    kinds: tuple[str, ...] = KINDS
    seed: int = 7
    slow_seconds: float = 3.0
    # (status, headers, body) for this CRM's rate-limit answer
    too_many: Callable[[], tuple[int, dict[str, str], Any]] = lambda: (429, {}, {})
    server_error: Callable[[], tuple[int, dict[str, str], Any]] = lambda: (
        503, {}, {"message": "Service Unavailable"})
    injected: dict[str, int] = field(default_factory=dict)
    exempt: Callable[[Scope], bool] = lambda scope: False

    def __post_init__(self) -> None:
        self._random = random.Random(self.seed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.rate <= 0 or self.exempt(scope) \
                or self._random.random() >= self.rate:
            await self.app(scope, receive, send)
            return
        kind = self._random.choice(self.kinds)
        self.injected[kind] = self.injected.get(kind, 0) + 1
        if kind == "server_error":
            await _answer(send, *self.server_error())
        elif kind == "too_many":
            await _answer(send, *self.too_many())
        elif kind == "slow":
            # A slow CRM still does the work: the request is read as it arrived and answered
            # late, so a client that gave up meanwhile never learns that the write happened.
            arrived = await _read_request(receive)
            await asyncio.sleep(self.slow_seconds)
            await self.app(scope, _replay(arrived, receive), send)
        elif kind == "drop_before":
            await _drop(send)
        else:  # drop_after_commit: the write happens, the answer is lost
            async def swallow(message: dict[str, Any]) -> None:
                return None

            await self.app(scope, receive, swallow)
            await _drop(send)


async def _read_request(receive: Receive) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request" or not message.get("more_body", False):
            return messages


def _replay(messages: list[dict[str, Any]], receive: Receive) -> Receive:
    pending = list(messages)

    async def replay() -> Any:
        return pending.pop(0) if pending else await receive()

    return replay


async def _answer(send: Send, status: int, headers: dict[str, str], body: Any) -> None:
    payload = json.dumps(body).encode()
    raw_headers = [(b"content-type", b"application/json"),
                   (b"content-length", str(len(payload)).encode())]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": payload})


async def _drop(send: Send) -> None:
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", b"1000")]})
    raise DroppedConnection("fault injected: connection dropped")
