"""The end-to-end drain for bench_receiver.py: N distinct events into one `linkcrm serve` (receiver
and worker, SQLite, the local CRM), from the first delivery until every one is applied.

    result = drain(20_000, directory)   # a DrainResult: acknowledged/s, applied/s, latencies
"""

from __future__ import annotations

import asyncio
import sqlite3
import statistics
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from tests.support.loadgen import (
    SECRET,
    drive,
    drive_paced,
    free_port,
    linkcrm,
    stop,
    wait_ready,
    webhook_body,
    webhook_request,
)
from tests.support.paths import REPO

FINISHED = "('processed', 'ignored', 'dead')"


@dataclass
class DrainResult:
    events: int
    acknowledged_per_s: float
    applied_per_s: float  # events / (last applied - first received)
    p50_s: float  # receipt -> applied
    p99_s: float
    dead: int
    rss_mb: float  # the serve process's peak resident memory
    rate: float | None = None  # the steady delivery rate, or None: as fast as acknowledged

    def lines(self, durable_rate: float | None) -> list[str]:
        share = (f" ({self.applied_per_s / durable_rate:.0%} of the durable receiver's rate)"
                 if durable_rate else "")
        if self.rate is not None:
            return [
                f"steady {self.rate:,.0f} events/s for {self.events / self.rate:.0f} s into "
                f"linkcrm serve (SQLite, local CRM): all applied at "
                f"{self.applied_per_s:,.0f} events/s",
                f"  receipt -> applied p50 {self.p50_s:.2f} s, p99 {self.p99_s:.2f} s "
                f"(target p99 < 1 s: {'met' if self.p99_s < 1 else 'MISSED'}); dead "
                f"{self.dead}; serve peak RSS {self.rss_mb:.0f} MB",
            ]
        return [
            f"end-to-end drain of {self.events} distinct events (linkcrm serve, SQLite, local "
            f"CRM): acknowledged {self.acknowledged_per_s:,.0f}/s, all applied at "
            f"{self.applied_per_s:,.0f} events/s{share}",
            f"  receipt -> applied p50 {self.p50_s:.2f} s, p99 {self.p99_s:.2f} s; dead "
            f"{self.dead}; serve peak RSS {self.rss_mb:.0f} MB",
        ]


def drain(events: int, directory: Path, *, connections: int = 32,
          timeout: float = 600.0, rate: float | None = None) -> DrainResult:
    """Send `events` distinct deliveries to a fresh `linkcrm serve` (as fast as it answers,
    or at a steady `rate` per second), wait until all are finished, and read the figures
    from its inbox."""
    database = directory / "drain.db"
    env = {"WEBHOOK_SECRET": SECRET, "LINKCRM_DATABASE_URL": f"sqlite:///{database}",
           "LINKCRM_RULES": str(REPO / "rules"), "LINKCRM_LOG_LEVEL": "WARNING",
           "LINKCRM_TARGETS": "local"}
    port = free_port()
    log = directory / "drain-serve.log"
    server = linkcrm(["serve", "--port", str(port)], env, log)
    try:
        wait_ready(port, server, log)
        requests = [(port, webhook_request(webhook_body(n, token=f"tok_{n:07d}"), port))
                    for n in range(events)]
        load = asyncio.run(drive(requests, connections=connections) if rate is None
                           else drive_paced(requests, rate, connections=connections))
        if load.acknowledged != events:
            raise SystemExit(f"only {load.acknowledged} of {events} deliveries acknowledged")
        until = time.monotonic() + timeout
        while _finished(database) < events:
            if time.monotonic() > until or server.poll() is not None:
                raise SystemExit(f"not drained within {timeout:g} s:\n{log.read_text()[-2000:]}")
            time.sleep(0.2)
        rss = _peak_rss_mb(server.pid)
    finally:
        stop([server])
    with sqlite3.connect(database) as connection:
        rows = connection.execute(
            f"SELECT received_at, updated_at, status FROM inbox WHERE status IN {FINISHED}"
        ).fetchall()
    received = [datetime.fromisoformat(r[0]) for r in rows]
    applied = [datetime.fromisoformat(r[1]) for r in rows]
    latencies = sorted((a - r).total_seconds() for r, a in zip(received, applied, strict=True))
    span = (max(applied) - min(received)).total_seconds()
    return DrainResult(
        events=events,
        acknowledged_per_s=load.rate,
        applied_per_s=events / span,
        p50_s=statistics.median(latencies),
        p99_s=latencies[int(len(latencies) * 0.99)],
        dead=sum(r[2] == "dead" for r in rows),
        rss_mb=rss,
        rate=rate,
    )


def _finished(database: Path) -> int:
    with sqlite3.connect(database, timeout=10) as connection:
        return int(connection.execute(
            f"SELECT COUNT(*) FROM inbox WHERE status IN {FINISHED}").fetchone()[0])


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0
