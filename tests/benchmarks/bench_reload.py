"""Benchmark: reload latency, from `rules publish` to the first event planned with the new
version, in running processes (SQLite: `serve`; PostgreSQL: `serve --no-worker` + `worker`).

    python tests/benchmarks/bench_reload.py                    # both backends, 10 publishes
    python tests/benchmarks/bench_reload.py --backend sqlite --publishes 20

Not collected by pytest. While installs flow into the receiver (one every 20 ms), a new rule
version (the shipped rules with one description reworded, numbered) is published each
round through the storage API, as `linkcrm rules publish` stores it: every process loads it
afresh. For each publish the latency is
the time from its commit to the first action outcome recorded with the new version (the outcome
is written right after the local CRM applies the action, so the figure includes that apply,
a few milliseconds); next to it, the pickup alone: from the commit to the process's log line
"rules version V active (was ...)". Prints p50 and max per backend; the bar is 2 s.
BENCH_VERBOSE=1 prints each publish, BENCH_PAUSE=S sets the pause between installs (default
0.02), BENCH_KEEP_LOG=FILE keeps the processes' log.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import httpx
import psycopg

from engine.rules.versions import collect
from engine.storage import NewRuleVersion, open_storage
from tests.support.paths import REPO
from tests.support.postgres import fresh_schema, schema_url
from tests.support.service_process import free_port, service_env, signed

BAR_SECONDS = 2.0


def rule_versions(root: Path, count: int) -> list[NewRuleVersion]:
    """The shipped rules (in root/a, what the processes start with), then `count` versions
    that each reword one description."""
    shutil.copytree(REPO / "rules", root / "a")
    versions = []
    for n in range(count):
        folder = root / f"v{n}"
        shutil.copytree(REPO / "rules", folder)
        rules = folder / "attribution.yaml"
        text = rules.read_text()
        marker = "  - name: install-creates-lead\n    description: >-\n"
        if marker not in text:
            raise SystemExit("bench_reload: the shipped rules no longer have the description "
                             "it rewords; update rule_versions()")
        rules.write_text(text.replace(marker, marker + f"      Install {n}.\n", 1))
        files = collect([folder])
        versions.append(NewRuleVersion(files.version, files.files, "bench"))
    if len({v.version for v in versions} | {collect([root / "a"]).version}) != count + 1:
        raise SystemExit("bench_reload: the versions it publishes are not all new")
    return versions


class Flow(threading.Thread):
    """Installs into the receiver, one every `pause` seconds, until stopped."""

    def __init__(self, url: str, pause: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.pause = pause
        self.stopped = threading.Event()
        self.sent = 0

    def run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self.stopped.is_set():
                body, headers = signed({"event": "install.tracked",
                                        "timestamp": "2026-03-01T12:00:00Z",
                                        "data": {"token": f"tok_{self.sent}", "prefix": "b",
                                                 "platform": "web"}})
                client.post(f"{self.url}/webhooks/tolinku", content=body, headers=headers)
                self.sent += 1
                time.sleep(self.pause)


def switched_at(log: Path, version: str) -> float | None:
    """When a process logged that it runs `version` (epoch seconds), or None yet."""
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{") and f'"rules version {version} active (was' in line:
            return datetime.fromisoformat(json.loads(line)["time"]).timestamp()
    return None


def first_outcome_after(url: str, version: str, after: float) -> float | None:
    """The epoch seconds of the first outcome with `version` recorded after `after`."""
    if url.startswith("sqlite:///"):
        with sqlite3.connect(url.removeprefix("sqlite:///"), timeout=5) as connection:
            rows = connection.execute(
                "SELECT updated_at FROM action_outcomes WHERE rules_version = ?",
                (version,)).fetchall()
        moments = [datetime.fromisoformat(row[0]).timestamp() for row in rows]
    else:
        with psycopg.connect(url) as connection:
            rows = connection.execute(
                "SELECT updated_at FROM action_outcomes WHERE rules_version = %s",
                (version,)).fetchall()
        moments = [row[0].timestamp() for row in rows]
    later = [moment for moment in moments if moment >= after]
    return min(later) if later else None


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as sink:
        return subprocess.Popen([sys.executable, "-m", "engine.cli", *args], env=env,
                                cwd=REPO, stdout=sink, stderr=sink)


def wait_ready(url: str, processes: list[subprocess.Popen[bytes]], log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in processes):
            raise SystemExit(f"a process exited:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"serve was not ready:\n{log.read_text()}")


async def publish(url: str, new: NewRuleVersion) -> float:
    storage = open_storage(url, create=False)
    try:
        await storage.rule_versions.publish(new)
        return time.time()
    finally:
        await storage.close()


def measure(url: str, root: Path, publishes: int) -> tuple[list[float], list[float]]:
    versions = rule_versions(root, publishes)
    env = service_env(root, LINKCRM_DATABASE_URL=url, LINKCRM_RULES=str(root / "a"),
                      LINKCRM_LOG_LEVEL="INFO")
    port = free_port()
    log = root / "processes.log"
    processes = []
    postgres = not url.startswith("sqlite")
    processes.append(start(["serve", "--port", str(port), *(["--no-worker"] if postgres
                                                            else [])], env, log))
    server = f"http://127.0.0.1:{port}"
    try:
        wait_ready(server, processes, log)
        if postgres:
            processes.append(start(["worker"], env, log))
        ready = time.monotonic() + 60
        while log.read_text(errors="replace").count('"worker started"') < 1:
            if time.monotonic() > ready or any(p.poll() is not None for p in processes):
                raise SystemExit(f"the worker did not start:\n{log.read_text()}")
            time.sleep(0.1)
        flow = Flow(server, float(os.environ.get("BENCH_PAUSE", "0.02")))
        flow.start()
        time.sleep(2)  # events are flowing
        latencies = []
        pickups = []
        for n in range(publishes):
            new = versions[n]
            committed = asyncio.run(publish(url, new))
            deadline = committed + 30
            while (seen := first_outcome_after(url, new.version, committed)) is None:
                if time.time() > deadline:
                    raise SystemExit(f"version {new.version} never planned an event:\n"
                                     f"{log.read_text()[-3000:]}")
                time.sleep(0.02)
            latencies.append(seen - committed)
            while (switched := switched_at(log, new.version)) is None:
                if time.time() > deadline:
                    raise SystemExit(f"no process logged version {new.version}")
                time.sleep(0.02)
            pickups.append(switched - committed)
            if os.environ.get("BENCH_VERBOSE"):
                print(f"  {new.version}: pickup {switched - committed:.3f} s, first planned "
                      f"{seen - committed:.3f} s")
            time.sleep(0.5)
        flow.stopped.set()
        flow.join(timeout=10)
        if os.environ.get("BENCH_KEEP_LOG"):
            shutil.copy(log, os.environ["BENCH_KEEP_LOG"])
        return latencies, pickups
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()


def report(name: str, measured: tuple[list[float], list[float]]) -> None:
    for what, latencies in zip(("first planned", "pickup"), measured, strict=True):
        ordered = sorted(latencies)
        print(f"{name:<10} {what:<13} publishes={len(ordered):>3}  "
              f"p50={statistics.median(ordered):.3f} s  max={ordered[-1]:.3f} s  "
              f"(bar {BAR_SECONDS:.0f} s: {'ok' if ordered[-1] < BAR_SECONDS else 'MISSED'})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--publishes", type=int, default=10)
    args = parser.parse_args()
    os.environ.setdefault("LINKCRM_LOG_LEVEL", "WARNING")
    if args.backend in ("sqlite", "both"):
        with tempfile.TemporaryDirectory(prefix="linkcrm-bench-reload-") as folder:
            root = Path(folder)
            report("sqlite", measure(f"sqlite:///{root / 'linkcrm.db'}", root,
                                     args.publishes))
    if args.backend in ("postgresql", "both"):
        with tempfile.TemporaryDirectory(prefix="linkcrm-bench-reload-") as folder, \
                fresh_schema("lc_bench") as schema:
            report("postgresql", measure(schema_url(schema), Path(folder), args.publishes))


if __name__ == "__main__":
    main()
