"""The strict httptools protocol on real sockets: where llhttp and h11 differ, what is refused.

An in-process uvicorn on uvloop with `deadline_protocol` (the protocol `serve` uses) serves an
echo app that answers each request's headers and body, so a test sees exactly what the app was
given. Each refusal is a 4xx that says what was wrong, with `connection: close`, and nothing sent
after it on the connection is served.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn
import uvloop
from starlette.types import Receive, Scope, Send

from engine.service.deadline import deadline_protocol
from engine.service.framing import AMBIGUOUS_FRAMING, MAX_HEAD_BYTES

# Sent after a request: served when the connection goes on, and it closes the connection then.
HEALTH = b"GET /after HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n"


async def echo(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    body = b""
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        body += message.get("body", b"")
        more = message.get("more_body", False)
    answer = json.dumps({
        "path": scope["path"],
        "headers": [[n.decode("latin-1"), v.decode("latin-1")] for n, v in scope["headers"]],
        "body": body.decode("latin-1"),
    }).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(answer)).encode())]})
    await send({"type": "http.response.body", "body": answer})


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    config = uvicorn.Config(echo, http=deadline_protocol(5.0), ws="none", lifespan="off",
                            log_config=None, access_log=False)
    server = uvicorn.Server(config)

    def serve() -> None:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(server.serve(sockets=[listener]))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    yield int(listener.getsockname()[1])
    server.should_exit = True
    thread.join(timeout=10)
    listener.close()


def exchange(port: int, data: bytes | list[bytes], pause: float = 0.05) -> bytes:
    """Send `data` (pieces, with a pause between them), then read until the server closes
    (the write side stays open: uvicorn closes on end-of-file, pipelined requests or not)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        for piece in [data] if isinstance(data, bytes) else data:
            try:
                sock.sendall(piece)
            except OSError:
                break  # closed on us: what it answered is still to be read
            time.sleep(pause)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
        return received


def answers(received: bytes) -> list[tuple[int, bytes, bytes]]:
    """(status, head, body) for each response in `received`, in order."""
    out = []
    while received:
        head, _, rest = received.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        out.append((status, head.lower(), rest[:length]))
        received = rest[length:]
    return out


def refused(received: bytes, status: int, says: str) -> None:
    """One answer, `status`, saying `says`, closing the connection: nothing after it served."""
    got = answers(received)
    assert len(got) == 1, received[:400]
    code, head, body = got[0]
    assert code == status, received[:400]
    assert b"connection: close" in head
    assert says.encode() in body, body


POST = b"POST /p HTTP/1.1\r\nhost: t\r\n"


# -- where llhttp is stricter than h11 was (400 now, served before) ----------------------------


@pytest.mark.parametrize(
    ("head", "says"),
    [
        (POST + b"x-a: one\r\n two\r\ncontent-length: 0\r\n", "whitespace"),  # obs-fold
        (POST + b"content-length: 2\r\ncontent-length: 2\r\n", "Duplicate Content-Length"),
        (POST + b"content-length: 2, 2\r\n", "Content-Length"),
        (POST + b"x-a: a\x01b\r\ncontent-length: 2\r\n", "header value char"),
        (b"POST /p HTTP/1.1\nhost: t\ncontent-length: 2\n", "CRLF"),
    ],
    ids=["obs-fold", "duplicate-content-length", "content-length-list", "control-char",
         "bare-lf"],
)
def test_what_h11_tolerated_is_now_a_400_that_closes(port: int, head: bytes, says: str) -> None:
    newline = b"\n" if b"\r" not in head else b"\r\n"
    refused(exchange(port, head + newline + b"{}" + HEALTH), 400, says)


def test_a_chunk_size_too_large_to_count_is_a_400(port: int) -> None:
    received = exchange(port, POST + b"transfer-encoding: chunked\r\n\r\n"
                        + b"f" * 20 + b"\r\nhello\r\n0\r\n\r\n")
    refused(received, 400, "overflow")


# -- where both refuse: still refused ----------------------------------------------------------


@pytest.mark.parametrize(
    "head",
    [
        POST + b"x-a: a\x00b\r\ncontent-length: 2\r\n",
        POST + b"x-\x00a: b\r\ncontent-length: 2\r\n",
        POST + b"content-length : 2\r\n",
        POST + b"transfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n",
        POST + b"transfer-encoding: identity\r\n",
    ],
    ids=["nul-in-value", "nul-in-name", "space-before-colon", "transfer-encoding-twice",
         "not-chunked"],
)
def test_malformed_heads_are_a_400_naming_the_fault(port: int, head: bytes) -> None:
    received = exchange(port, head + b"\r\n{}" + HEALTH)
    refused(received, 400, "the request is not valid HTTP/1.1: ")


@pytest.mark.parametrize(
    "framing",
    [b"transfer-encoding: gzip\r\ncontent-length: 5\r\n",
     b"content-length: 5\r\ntransfer-encoding: gzip, chunked\r\n"],
    ids=["te-gzip-then-cl", "cl-then-te-list"],
)
def test_any_transfer_encoding_with_content_length_is_refused_as_ambiguous(
    port: int, framing: bytes
) -> None:
    refused(exchange(port, POST + framing + b"\r\n0\r\n\r\n" + HEALTH), 400, AMBIGUOUS_FRAMING)


def test_a_missing_or_repeated_host_is_a_400_on_http_1_1(port: int) -> None:
    refused(exchange(port, b"POST /p HTTP/1.1\r\ncontent-length: 0\r\n\r\n" + HEALTH), 400,
            "exactly one Host header, not 0")
    refused(exchange(port, POST + b"host: u\r\ncontent-length: 0\r\n\r\n" + HEALTH), 400,
            "exactly one Host header, not 2")


def test_http_1_0_needs_no_host(port: int) -> None:
    received = exchange(port, b"POST /p HTTP/1.0\r\ncontent-length: 2\r\n\r\n{}")
    [(status, _, body)] = answers(received)
    assert status == 200
    assert json.loads(body)["body"] == "{}"


# -- what is served, and served exactly ---------------------------------------------------------


def test_chunk_extensions_are_ignored_and_the_connection_goes_on(port: int) -> None:
    received = exchange(port, POST + b"transfer-encoding: chunked\r\n\r\n"
                        b"3;name=value\r\n{\"a\r\n5;q=\"x;y\"\r\n\":1}\n\r\n0\r\n\r\n" + HEALTH)
    (first_status, _, first), (second_status, _, second) = answers(received)
    assert (first_status, second_status) == (200, 200)
    assert json.loads(first)["body"] == '{"a":1}\n'
    assert json.loads(second)["path"] == "/after"


def test_trailer_fields_never_become_request_headers(port: int) -> None:
    """uvicorn would append a chunked body's trailers to the headers the app reads: a
    signature slipped in after the body."""
    received = exchange(port, POST + b"transfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n"
                        b"x-webhook-signature: sha256=00\r\nhost: u\r\n\r\n" + HEALTH)
    (status, _, body), (after, _, _) = answers(received)
    assert (status, after) == (200, 200)
    names = [name for name, _ in json.loads(body)["headers"]]
    assert names == ["host", "transfer-encoding"]


def test_a_content_length_trailer_is_refused_as_ambiguous(port: int) -> None:
    received = exchange(port, POST + b"transfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n"
                        b"content-length: 999\r\n\r\n" + HEALTH)
    refused(received, 400, AMBIGUOUS_FRAMING)


def test_expect_100_continue_is_answered(port: int) -> None:
    received = exchange(port, [POST + b"expect: 100-continue\r\nconnection: close\r\n"
                                      b"content-length: 2\r\n\r\n",
                               b"{}"])
    assert received.startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
    [(status, _, body)] = answers(received.removeprefix(b"HTTP/1.1 100 Continue\r\n\r\n"))
    assert status == 200 and json.loads(body)["body"] == "{}"


# -- Upgrade and CONNECT ------------------------------------------------------------------------


def test_an_upgrade_with_a_body_is_refused_and_its_body_never_served(port: int) -> None:
    """llhttp stops at the head of an Upgrade request; the body, sent in a later packet,
    would have been read as the next request."""
    received = exchange(port, [POST + b"connection: upgrade\r\nupgrade: h2c\r\n"
                                      b"content-length: 33\r\n\r\n", HEALTH])
    refused(received, 400, "without Upgrade")


def test_an_upgrade_without_a_body_is_served_and_the_connection_goes_on(port: int) -> None:
    received = exchange(port, b"GET /up HTTP/1.1\r\nhost: t\r\nconnection: upgrade\r\n"
                              b"upgrade: h2c\r\n\r\n" + HEALTH)
    (status, _, body), (after, _, second) = answers(received)
    assert (status, after) == (200, 200)
    assert json.loads(body)["path"] == "/up"
    assert json.loads(second)["path"] == "/after"


def test_connect_is_refused(port: int) -> None:
    refused(exchange(port, b"CONNECT example.com:443 HTTP/1.1\r\nhost: example.com:443\r\n\r\n"),
            400, "not as CONNECT")


# -- the head's size ----------------------------------------------------------------------------


def test_a_head_over_16_kib_is_a_431(port: int) -> None:
    big = POST + b"x-big: " + b"a" * MAX_HEAD_BYTES + b"\r\ncontent-length: 0\r\n\r\n"
    refused(exchange(port, big + HEALTH), 431, "larger than 16384 bytes")
    long_url = b"GET /" + b"a" * MAX_HEAD_BYTES + b" HTTP/1.1\r\nhost: t\r\n\r\n"
    refused(exchange(port, long_url), 431, "larger than 16384 bytes")


def test_a_head_just_under_the_cap_is_served(port: int) -> None:
    head = (b"POST /p HTTP/1.1\r\nhost: t\r\nconnection: close\r\nx-big: "
            + b"a" * (MAX_HEAD_BYTES - 200) + b"\r\ncontent-length: 0\r\n\r\n")
    [(status, _, _)] = answers(exchange(port, head))
    assert status == 200


def test_an_endless_header_line_is_cut_off_while_it_arrives(port: int) -> None:
    """One header line that never ends must not be buffered in the parser until the deadline:
    the connection closes with a 431 long before 20 MB have been taken."""
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(POST + b"x-endless: ")
        try:
            while sent < 20 * 1024 * 1024:
                sock.sendall(b"a" * 65536)
                sent += 65536
        except OSError:
            pass
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
    assert sent < 20 * 1024 * 1024, "the server took 20 MB of one header line"
    assert received.startswith(b"HTTP/1.1 431 "), received[:200]


def test_pipelined_requests_whose_heads_are_each_small_are_all_served(port: int) -> None:
    """The head cap is per request: many small requests in one packet are not one big head."""
    one = POST + b"content-length: 2\r\n\r\n{}"
    received = exchange(port, one * 2000 + b"GET /last HTTP/1.1\r\nhost: t\r\n"
                              b"connection: close\r\n\r\n")
    got = answers(received)
    assert [status for status, _, _ in got] == [200] * 2001
    assert json.loads(got[-1][2])["path"] == "/last"
