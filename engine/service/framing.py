"""uvicorn's httptools (llhttp) protocol, held to the strictness linkcrm had under h11.

llhttp is a fast C parser and already stricter than h11 in most ways (it refuses obs-fold, a
duplicate Content-Length, control characters in values, bare LF line ends, both
Transfer-Encoding and Content-Length). Where it is looser, or where uvicorn's use of it is,
this protocol closes the gap, and every refusal is a 4xx that says what was wrong, then a close:

- both Transfer-Encoding and Content-Length: 400 saying so (RFC 9112 section 6.1: request
  smuggling), whatever order llhttp meets them in;
- an HTTP/1.1 request without exactly one Host header: 400 (RFC 9112 section 3.2; h11 did it);
- a request line and headers over `max_head_bytes` (16 KiB, as h11's buffer): 431, counted
  while they arrive, so a never-ending header cannot grow memory;
- trailer fields of a chunked body are dropped: uvicorn would append them to the request's
  headers, where a signature or a Content-Length could be slipped in after the body;
- `Upgrade` or CONNECT on a request with a body: 400. llhttp stops parsing at the end of the
  head of such a request, so uvicorn would drop the body and read it as the next request (a
  desync). Without a body, an unused Upgrade is ignored and the connection goes on, as h11 did.

    config = uvicorn.Config(app, http=StrictHttpToolsProtocol, ws="none")
"""

from __future__ import annotations

import asyncio
import logging
from typing import ClassVar

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from engine.service.coalesce import CoalescingTransport

log = logging.getLogger(__name__)

AMBIGUOUS_FRAMING = (
    "the request has both Transfer-Encoding and Content-Length; send only one of them"
)
MAX_HEAD_BYTES = 16 * 1024


class Refused(Exception):
    """A request this protocol answers itself, then closes: `reason` is the log label."""

    def __init__(self, reason: str, status: int, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.status = status
        self.message = message


def _parse_error(error: httptools.HttpParserError) -> Refused:
    """What to answer for an error raised by `feed_data`: this protocol's own refusal when a
    callback raised one, otherwise llhttp's reason, which names what was wrong."""
    cause = error.__context__
    if isinstance(cause, Refused):
        return cause
    text = str(error)
    if "Transfer-Encoding" in text and "Content-Length" in text:
        return Refused("ambiguous_framing", 400, AMBIGUOUS_FRAMING)
    if isinstance(cause, httptools.HttpParserInvalidURLError | UnicodeDecodeError):
        return Refused("malformed", 400, "the request target is not a valid URL; send an "
                                         "absolute path of ASCII characters, %-encoded")
    if isinstance(error, httptools.HttpParserCallbackError):
        text = "it could not be read"  # never echo the request's bytes
    return Refused("malformed", 400, f"the request is not valid HTTP/1.1: {text}")


class StrictHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the checks in the module docstring."""

    max_head_bytes: ClassVar[int] = MAX_HEAD_BYTES

    # Per request; reset by on_message_begin.
    _head_bytes = 0
    _head_began_in_this_read = False
    _headers_done = False
    _message_done = False  # the whole request, body included, has been received
    _hosts = 0
    _has_body = False  # a body is declared (Content-Length above 0, or Transfer-Encoding)
    _content_length = False
    _transfer_encoding = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        # A head and its body in one send (coalesce.py).
        super().connection_made(CoalescingTransport(transport, self.loop))

    def data_received(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        self._head_began_in_this_read = False
        try:
            self._feed(data)
        except Refused as refusal:
            self.refuse(refusal)
            return
        if not self._headers_done and not self._message_done and not self.transport.is_closing():
            # A head still incomplete: count what arrived for it (a read that began it also
            # held the end of the one before, so that read is not counted), so one endless
            # header line is cut off instead of buffered inside the parser.
            if not self._head_began_in_this_read:
                self._head_bytes += len(data)
            if self._head_bytes > self.max_head_bytes:
                self.refuse(self._head_too_large())

    def _feed(self, data: bytes) -> None:
        while True:
            try:
                self.parser.feed_data(data)
                return
            except httptools.HttpParserUpgrade as upgrade:
                # Only a request without a body gets here (on_headers_complete refuses the
                # others) and it is complete: parse what follows as the next request.
                offset = int(upgrade.args[0])
                self.parser = httptools.HttpRequestParser(self)
                self.parser.set_dangerous_leniencies(lenient_data_after_close=True)
                data = data[offset:]
            except httptools.HttpParserError as error:
                raise _parse_error(error) from None

    def refuse(self, refusal: Refused) -> None:
        """Answer `refusal` with its status and message, unless an answer to the current
        request has begun, then close: whatever else was sent is never read."""
        log.info("request refused", extra={"reason": refusal.reason, "status": refusal.status})
        cycle = self.cycle
        if cycle is None or not cycle.response_started or cycle.response_complete:
            message = refusal.message.encode("ascii", "replace")
            self.transport.write(b"".join([
                STATUS_LINE[refusal.status],
                b"content-type: text/plain; charset=utf-8\r\n",
                b"content-length: %d\r\n" % len(message),
                b"connection: close\r\n\r\n",
                message,
            ]))
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # the app's answer, if any, has nowhere to go
            cycle.message_event.set()
        self.transport.close()

    def _head_too_large(self) -> Refused:
        return Refused("headers_too_large", 431, f"the request line and headers are larger "
                       f"than {self.max_head_bytes} bytes; send fewer or shorter headers")

    # -- parser callbacks ---------------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0
        self._head_began_in_this_read = True
        self._headers_done = self._message_done = False
        self._hosts = 0
        self._content_length = self._transfer_encoding = self._has_body = False

    def on_url(self, url: bytes) -> None:
        self._head_bytes += len(url)
        if self._head_bytes > self.max_head_bytes:
            raise self._head_too_large()
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._headers_done:
            return  # a trailer field of a chunked body: not a request header
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > self.max_head_bytes:
            raise self._head_too_large()
        name = name.lower()
        if name == b"host":
            self._hosts += 1
        elif name == b"content-length":
            self._content_length = True
            self._has_body = self._has_body or value.strip().lstrip(b"0") != b""
        elif name == b"transfer-encoding":
            self._transfer_encoding = self._has_body = True
        elif name == b"expect" and value.lower() == b"100-continue":
            self.expect_100_continue = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._headers_done = True
        if self._content_length and self._transfer_encoding:
            raise Refused("ambiguous_framing", 400, AMBIGUOUS_FRAMING)
        if self._hosts != 1 and self.parser.get_http_version() == "1.1":
            raise Refused("bad_host", 400, "an HTTP/1.1 request needs exactly one Host header, "
                                           f"not {self._hosts}")
        if self.parser.should_upgrade() and (
            self._has_body or self.parser.get_method() == b"CONNECT"
        ):
            raise Refused("upgrade", 400, "this server does not switch protocols or tunnel; "
                                          "send the request without Upgrade, or not as CONNECT")
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._message_done = True
        super().on_message_complete()
