"""A whole-request read deadline under uvicorn, so slow clients cannot hold connections.

uvicorn has no header timeout at all, and its keep-alive timer is cancelled by every byte that
arrives, so a client sending one byte a second (slow loris) keeps a connection forever, and so
does one that trickles a body the app never reads (a 404 to a POST). This protocol starts a
timer when a request's first byte arrives (or when the connection opens) and stops it once the
whole request, body included, has been received. When it fires first, the connection is
closed: with a bare `408 Request Timeout` if no request line and headers were complete yet,
otherwise by closing (the app's own, slightly shorter, body deadline has usually answered 408
already).

It builds on the strict httptools protocol (framing.py): request smuggling, oversized heads
and malformed requests are refused there.

    config = uvicorn.Config(app, http=deadline_protocol(seconds=11.0), ws="none")
"""

from __future__ import annotations

import asyncio
import logging

from engine.service.framing import AMBIGUOUS_FRAMING, StrictHttpToolsProtocol

__all__ = ["AMBIGUOUS_FRAMING", "DeadlineProtocol", "deadline_protocol"]

log = logging.getLogger(__name__)

_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\n"
    b"content-type: text/plain; charset=utf-8\r\n"
    b"content-length: 16\r\n"
    b"connection: close\r\n"
    b"\r\n"
    b"Request Timeout\n"
)


class DeadlineProtocol(StrictHttpToolsProtocol):
    """The strict httptools protocol plus a deadline on receiving each whole request.

    One timer per connection, not one per request: a request's first byte only notes its
    deadline (`_due`), and the timer, when it fires early, sleeps again until the deadline of
    the request then in progress. Arming and cancelling a timer on every request cost more
    than the rest of this class.
    """

    request_deadline: float = 10.0
    _deadline_timer: asyncio.TimerHandle | None = None
    _due: float | None = None  # when the request in progress must have arrived whole

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # An idle new connection gets the same deadline: uvicorn would wait forever for it.
        self._start_deadline()

    def data_received(self, data: bytes) -> None:
        if self._due is None:  # the first byte of the next request
            self._start_deadline()
        super().data_received(data)
        if self._message_done:
            self._due = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._due = None
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None
        super().connection_lost(exc)

    def _start_deadline(self) -> None:
        self._due = self.loop.time() + self.request_deadline
        if self._deadline_timer is None:
            self._deadline_timer = self.loop.call_at(self._due, self._expired)

    def _expired(self) -> None:
        self._deadline_timer = None
        if self._due is None or self.transport.is_closing():
            return  # no request in progress: the next one starts the timer again
        if self.loop.time() < self._due:
            self._deadline_timer = self.loop.call_at(self._due, self._expired)
            return
        log.warning(
            "request deadline passed; closing the connection",
            extra={"deadline_seconds": self.request_deadline,
                   "headers_received": self._headers_done},
        )
        if not self._headers_done:
            self.transport.write(_TIMEOUT_RESPONSE)
        self.transport.close()


def deadline_protocol(seconds: float) -> type[DeadlineProtocol]:
    """A protocol class for `uvicorn.Config(http=...)` with a `seconds` request deadline."""
    if not seconds > 0:
        raise ValueError("the request deadline must be positive")
    return type("DeadlineProtocol", (DeadlineProtocol,), {"request_deadline": seconds})
