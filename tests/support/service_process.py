"""Run `python -m engine.cli ...` for real: one-shot commands and a `serve` process on loopback."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from engine.signing import sign
from tests.support.paths import REPO

ROOT = REPO
SECRET = "whsec_service_test"
API_KEY = "key_service_test"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def service_env(directory: Path, **extra: str) -> dict[str, str]:
    """An environment with a fresh SQLite database in `directory` and the shipped rules."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("LINKCRM_", "WEBHOOK_", "HUBSPOT_", "SF_", "PIPEDRIVE_"))}
    env.update({
        "WEBHOOK_SECRET": SECRET,
        "LINKCRM_API_KEYS": API_KEY,
        "LINKCRM_DATABASE_URL": f"sqlite:///{directory / 'linkcrm.db'}",
        "LINKCRM_RULES": str(ROOT / "rules"),
        "LINKCRM_LOG_LEVEL": "WARNING",
    })
    env.update(extra)
    return env


def cli(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def cli_json(*args: str, env: dict[str, str]) -> Any:
    done = cli(*args, "--format", "json", env=env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def signed(document: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
    body = json.dumps(document, separators=(",", ":")).encode()
    return body, {"content-type": "application/json", "user-agent": "Tolinku/1.0",
                  "x-webhook-event": str(document["event"]),
                  "x-webhook-signature": sign(body, SECRET)}


@dataclass
class Server:
    """A `linkcrm serve` process; `log` collects its stdout and stderr."""

    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def metric(self, name: str, **labels: str) -> float | None:
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        wanted = ",".join(f"{k}=\"{v}\"" for k, v in labels.items())  # in exposition order
        pattern = re.escape(name) + (r"\{" + re.escape(wanted) + r"\}" if labels else "")
        match = re.search(rf"^{pattern} (\S+)$", text, re.MULTILINE)
        return None if match is None else float(match.group(1))

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.returncode


def start_server(env: dict[str, str], *args: str, port: int | None = None,
                 timeout: float = 30, log: Path | None = None) -> Server:
    """Start `serve`; its output goes to `log` (default: beside the SQLite database)."""
    port = port or free_port()
    log = log or Path(env["LINKCRM_DATABASE_URL"].removeprefix("sqlite:///")).with_suffix(
        f".{port}.log")
    with log.open("ab") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "engine.cli", "serve", "--port", str(port), *args],
            env=env, cwd=ROOT, stdout=sink, stderr=sink)
    server = Server(process, port, log)
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{server.url}/readyz", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            server.stop()
            raise AssertionError(f"serve did not start:\n{log.read_text()}")
        time.sleep(0.05)


def wait_for(condition: Any, timeout: float = 30, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
