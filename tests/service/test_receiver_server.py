"""The real server (uvicorn in a subprocess, loopback): memory under huge bodies, slow clients."""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from engine.runtime.logs import BURST
from engine.signing import sign

pytestmark = pytest.mark.slow

SECRET = "whsec_server_test"
DEADLINE = 2.0
# The app answers 408 at the deadline; the socket-level deadline (deadline + 1 s grace) closes
# whatever the app cannot see. Allow scheduling slack on top.
CUT_OFF_WITHIN = DEADLINE + 1.0 + 1.5
MB = 1024 * 1024

SERVER = """
import os, sys
from engine.service.server import run
from engine.runtime.settings import Settings
run(Settings.from_env(os.environ), host="127.0.0.1", port=int(sys.argv[1]))
"""


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    def rss(self) -> int:
        return _status_kb(self.process.pid, "VmRSS") * 1024

    def peak_rss(self) -> int:
        return _status_kb(self.process.pid, "VmHWM") * 1024

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/{pid}/status")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def _serving(directory: Path) -> Iterator[Server]:
    """`linkcrm serve`'s receiver in a subprocess on a fresh SQLite file, ready to answer."""
    port = _free_port()
    env = {
        **os.environ,
        "WEBHOOK_SECRET": SECRET,
        "LINKCRM_DATABASE_URL": f"sqlite:///{directory / 'linkcrm.db'}",
        "LINKCRM_REQUEST_TIMEOUT": str(DEADLINE),
        "LINKCRM_LOG_LEVEL": "WARNING",
    }
    log = (directory / "server.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(port)], env=env, stdout=log, stderr=log
    )
    started = Server(process, port, directory / "server.log")
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError((directory / "server.log").read_text())
            time.sleep(0.1)
        yield started
    finally:
        process.terminate()
        process.wait(timeout=15)
        log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with _serving(tmp_path_factory.mktemp("server")) as started:
        yield started


class _Reader(threading.Thread):
    """Reads everything the server sends until it closes, while the test keeps writing."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.data = b""
        self.closed_at: float | None = None

    def run(self) -> None:
        try:
            while chunk := self.sock.recv(65536):
                self.data += chunk
        except OSError:
            pass
        self.closed_at = time.monotonic()

    @property
    def status(self) -> int:
        return int(self.data.split(b" ", 2)[1]) if self.data.startswith(b"HTTP/1.1") else 0


def _push(sock: socket.socket, total: int, chunked: bool) -> int:
    """Send up to `total` body bytes; returns how many the server took before closing."""
    chunk = b"x" * 65536
    sent = 0
    try:
        while sent < total:
            if chunked:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            else:
                sock.sendall(chunk)
            sent += len(chunk)
        if chunked:
            sock.sendall(b"0\r\n\r\n")
    except OSError:
        pass
    return sent


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_50_mb_body_is_refused_without_growing_memory(server: Server, chunked: bool) -> None:
    before = server.rss()
    size = 50 * MB
    framing = b"transfer-encoding: chunked" if chunked else b"content-length: %d" % size
    sock = server.connect()
    reader = _Reader(sock)
    reader.start()
    sock.sendall(
        b"POST /webhooks/tolinku HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n"
        b"x-webhook-signature: " + sign(b"{}", SECRET).encode() + b"\r\n" + framing + b"\r\n\r\n"
    )
    sent = _push(sock, size, chunked)
    reader.join(timeout=30)
    sock.close()
    assert reader.status == 413, reader.data[:200]
    assert sent < size, "the server read the whole 50 MB instead of closing"
    print(f"\n50 MB {'chunked' if chunked else 'with Content-Length'}: server took "
          f"{sent / MB:.1f} MB before closing; RSS {before / MB:.1f} MB -> "
          f"{server.rss() / MB:.1f} MB (peak {server.peak_rss() / MB:.1f} MB)")
    assert server.rss() - before < 20 * MB
    assert server.peak_rss() - before < 20 * MB  # no transient spike either
    assert httpx.get(f"http://127.0.0.1:{server.port}/healthz").status_code == 200


def _trickle(sock: socket.socket, data: bytes, stop: threading.Event) -> None:
    for byte in data:
        if stop.wait(1.0):
            return
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            return


@pytest.mark.parametrize(
    ("prefix", "trickled", "expected_status"),
    [
        (b"POST /webhooks/tolinku HTTP/1.1\r\nhost: t\r\nx-webhook-signature: 00\r\n"
         b"content-length: 500\r\n\r\n", b"{" * 500, 408),
        (b"", b"POST /webhooks/tolinku HTTP/1.1\r\nhost: t\r\n" * 10, 408),
        (b"POST /no-such-path HTTP/1.1\r\nhost: t\r\ncontent-length: 500\r\n\r\n",
         b"x" * 500, 404),
    ],
    ids=["slow-body", "slow-headers", "slow-body-nobody-reads"],
)
def test_a_client_sending_one_byte_a_second_is_cut_off(
    server: Server, prefix: bytes, trickled: bytes, expected_status: int
) -> None:
    sock = server.connect()
    started = time.monotonic()
    sock.sendall(prefix)
    stop = threading.Event()
    writer = threading.Thread(target=_trickle, args=(sock, trickled, stop), daemon=True)
    reader = _Reader(sock)
    reader.start()
    writer.start()
    reader.join(timeout=CUT_OFF_WITHIN + 10)
    stop.set()
    sock.close()
    assert reader.closed_at is not None, "the connection is still open"
    held = reader.closed_at - started
    print(f"\nslow client ({expected_status}) cut off after {held:.2f} s")
    assert held < CUT_OFF_WITHIN
    assert reader.status == expected_status


def test_an_idle_connection_is_closed(server: Server) -> None:
    sock = server.connect()
    started = time.monotonic()
    reader = _Reader(sock)
    reader.start()
    reader.join(timeout=CUT_OFF_WITHIN + 10)
    sock.close()
    assert reader.closed_at is not None
    assert reader.closed_at - started < CUT_OFF_WITHIN


def test_many_idle_connections_do_not_flood_the_log(server: Server) -> None:
    """Each connection cut off at the deadline is one WARNING; a client holding many must not
    write one line each: one call site writes at most BURST lines per window."""
    before = len(server.log.read_bytes())
    sockets = [server.connect() for _ in range(3 * BURST)]
    readers = [_Reader(sock) for sock in sockets]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join(timeout=CUT_OFF_WITHIN + 10)
    for sock in sockets:
        sock.close()
    assert all(reader.closed_at is not None for reader in readers)
    time.sleep(0.5)  # the last lines reach the file
    written = server.log.read_bytes()[before:].decode().splitlines()
    cut_off = [line for line in written if "request deadline passed" in line]
    assert 0 < len(cut_off) <= BURST, f"{len(cut_off)} lines for {len(sockets)} connections"


def test_the_server_still_stores_signed_events(server: Server) -> None:
    body = b'{"event":"install.tracked","timestamp":"2026-03-01T00:00:00Z","data":{"token":"s"}}'
    response = httpx.post(
        f"http://127.0.0.1:{server.port}/webhooks/tolinku",
        content=body,
        headers={"x-webhook-signature": sign(body, SECRET)},
    )
    assert response.status_code == 200
    assert response.json()["status"] in ("stored", "duplicate")


@pytest.mark.parametrize(
    "framing",
    [
        b"content-length: 5\r\ntransfer-encoding: chunked\r\n",
        b"Transfer-Encoding: chunked\r\nContent-Length: 40\r\n",
    ],
    ids=["cl-then-te", "te-then-cl"],
)
@pytest.mark.parametrize("path", [b"/webhooks/tolinku", b"/no-such-path"])
def test_both_transfer_encoding_and_content_length_is_400_and_closes(
    server: Server, framing: bytes, path: bytes
) -> None:
    """RFC 9112 section 6.1: never guess the framing, and never keep the connection."""
    smuggled = b"GET /healthz HTTP/1.1\r\nhost: t\r\n\r\n"
    sock = server.connect()
    reader = _Reader(sock)
    reader.start()
    sock.sendall(b"POST " + path + b" HTTP/1.1\r\nhost: t\r\nx-webhook-signature: 00\r\n"
                 + framing + b"\r\n0\r\n\r\n" + smuggled)
    reader.join(timeout=10)
    sock.close()
    assert reader.closed_at is not None, "the connection was kept open"
    assert reader.status == 400, reader.data[:300]
    assert b"connection: close" in reader.data.lower()
    assert b"Transfer-Encoding and Content-Length" in reader.data
    assert reader.data.count(b"HTTP/1.1 ") == 1, "the request after it was served"


def test_pipelined_requests_with_one_framing_header_are_all_served(server: Server) -> None:
    """The control for the test above: the same bytes with one framing header keep going."""
    sock = server.connect()
    sock.sendall(b"POST /no-such-path HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n"
                 b"\r\n0\r\n\r\nGET /healthz HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n")
    reader = _Reader(sock)
    reader.start()
    reader.join(timeout=10)
    sock.close()
    assert reader.data.count(b"HTTP/1.1 ") == 2, reader.data[:300]
    assert b'{"status":"ok"}' in reader.data


def test_readyz_is_503_while_a_file_size_limit_fails_every_write(tmp_path: Path) -> None:
    """The server process may not grow its files (RLIMIT_FSIZE, as a full disk): deliveries
    get 503, and /readyz says so too until writes commit again."""
    with _serving(tmp_path) as server:
        url = f"http://127.0.0.1:{server.port}"

        def deliver(n: int) -> int:
            body = json.dumps({"event": "install.tracked", "timestamp": "2026-03-01T00:00:00Z",
                               "data": {"n": n, "blob": "x" * 200_000}}).encode()
            return httpx.post(f"{url}/webhooks/tolinku", content=body, timeout=10,
                              headers={"x-webhook-signature": sign(body, SECRET)}).status_code

        assert deliver(0) == 200
        largest = max(path.stat().st_size for path in tmp_path.iterdir())
        unlimited = (resource.RLIM_INFINITY, resource.RLIM_INFINITY)
        resource.prlimit(server.process.pid, resource.RLIMIT_FSIZE,
                         (largest + 50_000, resource.RLIM_INFINITY))
        try:
            assert [deliver(n) for n in range(1, 4)] == [503] * 3
            for _ in range(2):  # the test write /readyz makes fails as well
                response = httpx.get(f"{url}/readyz", timeout=10)
                assert response.status_code == 503
                assert response.json()["reason"] == "writes_failing"
        finally:
            resource.prlimit(server.process.pid, resource.RLIMIT_FSIZE, unlimited)
        assert httpx.get(f"{url}/readyz", timeout=10).status_code == 200
        assert deliver(4) == 200
