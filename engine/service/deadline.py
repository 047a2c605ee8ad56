"""A whole-request read deadline under uvicorn, so slow clients cannot hold connections.

uvicorn's h11 protocol has no header timeout at all, and its keep-alive timer is cancelled by
every byte that arrives, so a client sending one byte a second (slow loris) keeps a connection
forever, and so does one that trickles a body the app never reads (a 404 to a POST). This
protocol starts a timer when a request's first byte arrives (or when the connection opens) and
stops it once the whole request, body included, has been received. When it fires first, the
connection is closed: with a bare `408 Request Timeout` if no request line and headers were
complete yet, otherwise by closing (the app's own, slightly shorter, body deadline has usually
answered 408 already).

It also refuses ambiguous framing: a request with both `Transfer-Encoding` and
`Content-Length` is answered 400 and the connection closed (RFC 9112 section 6.1). h11 would
frame it by Transfer-Encoding alone and keep the connection, so a proxy in front that frames by
Content-Length would see a different request boundary: request smuggling.

    config = uvicorn.Config(app, http=deadline_protocol(seconds=11.0))
"""

from __future__ import annotations

import asyncio
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\n"
    b"content-type: text/plain; charset=utf-8\r\n"
    b"content-length: 16\r\n"
    b"connection: close\r\n"
    b"\r\n"
    b"Request Timeout\n"
)

# Client states in which nothing more is expected from the client for this request.
_RECEIVED = (h11.DONE, h11.MUST_CLOSE, h11.CLOSED, h11.ERROR)


AMBIGUOUS_FRAMING = (
    "the request has both Transfer-Encoding and Content-Length; send only one of them"
)


class _FramingCheckedConnection(h11.Connection):
    """h11's connection, refusing a request whose length two headers declare.

    The refusal is a RemoteProtocolError, so uvicorn answers it as any malformed request: 400
    with `connection: close`, then closes without reading what follows.
    """

    refusal: str | None = None

    def next_event(self) -> type[h11.PAUSED] | type[h11.NEED_DATA] | h11.Event:
        event = super().next_event()
        if isinstance(event, h11.Request):
            names = {name for name, _ in event.headers}  # h11 lower-cases header names
            if b"transfer-encoding" in names and b"content-length" in names:
                self.refusal = AMBIGUOUS_FRAMING
                raise h11.RemoteProtocolError(AMBIGUOUS_FRAMING, error_status_hint=400)
        return event


class DeadlineH11Protocol(H11Protocol):
    """uvicorn's h11 protocol plus a deadline on receiving each whole request, and a 400 that
    closes the connection for ambiguous framing."""

    request_deadline: float = 10.0
    _deadline_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # Replaces uvicorn's connection before any byte arrives, with the same size limit.
        limit = self.config.h11_max_incomplete_event_size
        self.conn = (
            _FramingCheckedConnection(h11.SERVER) if limit is None
            else _FramingCheckedConnection(h11.SERVER, max_incomplete_event_size=limit)
        )
        # An idle new connection gets the same deadline: uvicorn would wait forever for it.
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._deadline_timer is None and not self._request_received():
            self._arm()  # the first byte of the next request on a keep-alive connection
        super().data_received(data)
        if self._request_received():
            self._disarm()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's 400 (and close), saying what was wrong when this protocol refused it."""
        refusal = getattr(self.conn, "refusal", None)
        if refusal:
            log.info("request refused", extra={"reason": "ambiguous_framing", "status": 400})
        super().send_400_response(refusal or msg)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _request_received(self) -> bool:
        return self.conn.their_state in _RECEIVED

    def _arm(self) -> None:
        self._disarm()
        self._deadline_timer = self.loop.call_later(self.request_deadline, self._expired)

    def _disarm(self) -> None:
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None

    def _expired(self) -> None:
        self._deadline_timer = None
        if self.transport.is_closing() or self._request_received():
            return
        headers_done = self.conn.their_state is not h11.IDLE
        log.warning(
            "request deadline passed; closing the connection",
            extra={"deadline_seconds": self.request_deadline, "headers_received": headers_done},
        )
        if not headers_done:
            self.transport.write(_TIMEOUT_RESPONSE)
        self.transport.close()


def deadline_protocol(seconds: float) -> type[DeadlineH11Protocol]:
    """A protocol class for `uvicorn.Config(http=...)` with a `seconds` request deadline."""
    if not seconds > 0:
        raise ValueError("the request deadline must be positive")
    return type("DeadlineH11Protocol", (DeadlineH11Protocol,), {"request_deadline": seconds})
