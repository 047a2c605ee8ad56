"""A small HTTP/1.1 load generator and process helpers for benchmarks and scale-out tests.

Requests are signed and serialised up front and sent over raw keep-alive sockets, so the
generator spends its CPU on sockets, not on building requests: on a small machine it shares the
cores with the servers it measures, and an httpx client would measure mostly itself.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from engine.signing import sign
from tests.support.paths import REPO

ROOT = REPO
SECRET = "whsec_loadgen"


def webhook_body(n: int, *, kind: int | None = None, token: str | None = None) -> bytes:
    """The n-th distinct Tolinku event: installs, referral sign-ups and conversions."""
    at = (datetime(2026, 3, 1, tzinfo=UTC) + timedelta(seconds=n)).isoformat()
    kind = n % 3 if kind is None else kind
    token = token or f"tok_{n:06d}"
    name, data = [
        ("install.tracked", {"token": token, "prefix": "invite", "campaign": "spring",
                             "platform": "iOS"}),
        ("referral.created", {"token": token, "referrer_token": f"ref_{n % 17}"}),
        ("referral.completed", {"token": token, "referrer_token": f"ref_{n % 17}"}),
    ][kind]
    payload = {"event": name, "timestamp": at.replace("+00:00", "Z"), "data": data}
    return json.dumps(payload, separators=(",", ":")).encode()


def webhook_request(body: bytes, port: int, secret: str = SECRET) -> bytes:
    event = json.loads(body)["event"]
    head = (
        f"POST /webhooks/tolinku HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        "Content-Type: application/json\r\nUser-Agent: Tolinku/1.0\r\n"
        f"X-Webhook-Event: {event}\r\nX-Webhook-Signature: {sign(body, secret)}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


@dataclass
class LoadResult:
    """Per request (in the order given): the HTTP status, or 0 when the connection failed."""

    statuses: list[int]
    seconds: float
    answers: list[bytes] = field(default_factory=list)

    @property
    def acknowledged(self) -> int:
        return sum(status == 200 for status in self.statuses)

    @property
    def rate(self) -> float:
        return self.acknowledged / self.seconds if self.seconds else 0.0


async def drive_paced(
    targets: Sequence[tuple[int, bytes]], rate: float, *, connections: int = 32,
    host: str = "127.0.0.1",
) -> LoadResult:
    """Send every (port, raw request) at a steady `rate` per second (as Tolinku would under a
    steady stream of clicks), over up to `connections` keep-alive connections."""
    statuses = [0] * len(targets)
    answers = [b""] * len(targets)
    due: asyncio.Queue[int | None] = asyncio.Queue()
    started = time.perf_counter()

    async def release() -> None:
        for index in range(len(targets)):
            wait = started + index / rate - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            due.put_nowait(index)
        for _ in range(connections):
            due.put_nowait(None)

    async def connection() -> None:
        streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        while (index := await due.get()) is not None:
            port, request = targets[index]
            try:
                if streams is None:
                    streams = await asyncio.open_connection(host, port)
                streams[1].write(request)
                status, body, keep = await _read_response(streams[0])
                statuses[index], answers[index] = status, body
                if not keep:
                    streams[1].close()
                    streams = None
            except (OSError, asyncio.IncompleteReadError, ValueError):
                if streams is not None:
                    streams[1].close()
                streams = None
        if streams is not None:
            streams[1].close()

    await asyncio.gather(release(), *(connection() for _ in range(connections)))
    return LoadResult(statuses, time.perf_counter() - started, answers)


async def drive(
    targets: Sequence[tuple[int, bytes]], *, connections: int = 32, host: str = "127.0.0.1"
) -> LoadResult:
    """Send every (port, raw request) over `connections` keep-alive connections in total,
    spread over the ports; each connection sends its next request when the answer came."""
    statuses = [0] * len(targets)
    answers = [b""] * len(targets)
    ports = sorted({port for port, _ in targets})
    queues: dict[int, asyncio.Queue[int]] = {port: asyncio.Queue() for port in ports}
    for index, (port, _) in enumerate(targets):
        queues[port].put_nowait(index)

    async def connection(port: int) -> None:
        queue = queues[port]
        reader: asyncio.StreamReader | None = None
        writer: asyncio.StreamWriter | None = None
        while not queue.empty():
            index = queue.get_nowait()
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection(host, port)
                assert reader is not None
                writer.write(targets[index][1])
                status, body, keep = await _read_response(reader)
                statuses[index], answers[index] = status, body
                if not keep:
                    writer.close()
                    writer = None
            except (OSError, asyncio.IncompleteReadError, ValueError):
                statuses[index] = 0
                if writer is not None:
                    writer.close()
                writer = None
        if writer is not None:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(connection(ports[n % len(ports)]) for n in range(connections)))
    return LoadResult(statuses, time.perf_counter() - started, answers)


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in
               (line.partition(":") for line in lines[1:] if line)}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, body, headers.get("connection", "").lower() != "close"


# -- processes ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def linkcrm(args: Iterable[str], env: Mapping[str, str], log: Path,
            module: str = "engine.cli") -> subprocess.Popen[bytes]:
    """Start `linkcrm ARGS` (the real entry point) with `env` on top of this environment."""
    with log.open("ab") as handle:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-m", module, *args], cwd=ROOT, env={**os.environ, **env},
            stdout=handle, stderr=subprocess.STDOUT)


def wait_ready(port: int, process: subprocess.Popen[bytes], log: Path, timeout: float = 30
               ) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"the server was not ready within {timeout} s:\n{log.read_text()}")


def stop(processes: Sequence[subprocess.Popen[Any]], timeout: float = 10) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
