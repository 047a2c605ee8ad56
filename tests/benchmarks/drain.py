"""The end-to-end drain for bench_receiver.py: N distinct events into one `linkcrm serve` (receiver
and worker, SQLite, the local CRM), from the first delivery until every one is applied.

    result = drain(20_000, directory)   # a DrainResult: acknowledged/s, applied/s, latencies

As fast as it answers, the deliveries come from wrk when it is installed (each body once; its
Lua script stops once every one is answered), else from the Python generator: on two cores the
generator takes most of one and, at ~2,500 requests/s, was what bounded the drain.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
import statistics
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from engine.signing import sign
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

# Each wrk thread sends its share of the bodies once, then (for the requests still going out
# on its other connections) the first again, a duplicate the receiver answers without storing;
# it stops once each of its bodies was answered. wrk itself runs on until its -d: the caller
# ends it when the inbox holds every event.
WRK_DRAIN_SCRIPT = """
local events, signatures, bodies, n = {}, {}, {}, 0
local sent, answered = 0, 0
function setup(thread)
  thread:set("id", n)
  n = n + 1
end
function init(args)
  local threads, me, i = tonumber(args[2]), tonumber(id), 0
  for line in io.lines(args[1]) do
    if i % threads == me then
      local a = line:find("\\t")
      local b = line:find("\\t", a + 1)
      events[#events + 1] = line:sub(1, a - 1)
      signatures[#signatures + 1] = line:sub(a + 1, b - 1)
      bodies[#bodies + 1] = line:sub(b + 1)
    end
    i = i + 1
  end
end
function request()
  sent = sent + 1
  local k = sent <= #bodies and sent or 1
  return wrk.format("POST", "/webhooks/tolinku", {
    ["Content-Type"] = "application/json", ["User-Agent"] = "Tolinku/1.0",
    ["X-Webhook-Event"] = events[k], ["X-Webhook-Signature"] = signatures[k]
  }, bodies[k])
end
function response(status, headers, body)
  answered = answered + 1
  if answered >= #bodies then wrk.thread:stop() end
end
"""


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
          timeout: float = 600.0, rate: float | None = None, wrk_threads: int = 1,
          use_wrk: bool = True) -> DrainResult:
    """Send `events` distinct deliveries to a fresh `linkcrm serve` (as fast as it answers,
    from wrk unless `use_wrk` is false or it is not installed; or at a steady `rate` per
    second), wait until all are finished, and read the figures from its inbox."""
    database = directory / "drain.db"
    env = {"WEBHOOK_SECRET": SECRET, "LINKCRM_DATABASE_URL": f"sqlite:///{database}",
           "LINKCRM_RULES": str(REPO / "rules"), "LINKCRM_LOG_LEVEL": "WARNING",
           "LINKCRM_TARGETS": "local"}
    port = free_port()
    log = directory / "drain-serve.log"
    server = linkcrm(["serve", "--port", str(port)], env, log)
    try:
        wait_ready(port, server, log)
        bodies = [webhook_body(n, token=f"tok_{n:07d}") for n in range(events)]
        load = None
        if rate is None and use_wrk and shutil.which("wrk"):
            sender = _wrk(bodies, port, directory, connections, wrk_threads, timeout)
            try:
                _wait_finished(database, events, timeout, server, log, sender)
            finally:
                sender.terminate()
                sender.communicate()  # waits, and closes its output
        else:
            requests = [(port, webhook_request(body, port)) for body in bodies]
            load = asyncio.run(drive(requests, connections=connections) if rate is None
                               else drive_paced(requests, rate, connections=connections))
            if load.acknowledged != events:
                raise SystemExit(f"only {load.acknowledged} of {events} deliveries acknowledged")
            _wait_finished(database, events, timeout, server, log)
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
    # With wrk, the receipts' own span (each is stamped as the request is stored).
    acknowledged = load.rate if load is not None else \
        events / max((max(received) - min(received)).total_seconds(), 1e-3)
    return DrainResult(
        events=events,
        acknowledged_per_s=acknowledged,
        applied_per_s=events / span,
        p50_s=statistics.median(latencies),
        p99_s=latencies[int(len(latencies) * 0.99)],
        dead=sum(r[2] == "dead" for r in rows),
        rss_mb=rss,
        rate=rate,
    )


def _wrk(bodies: list[bytes], port: int, directory: Path, connections: int, threads: int,
         timeout: float) -> subprocess.Popen[bytes]:
    data = directory / "drain-bodies.tsv"
    data.write_bytes(b"".join(
        f"{json.loads(body)['event']}\t{sign(body, SECRET)}\t".encode() + body + b"\n"
        for body in bodies))
    script = directory / "drain.lua"
    script.write_text(WRK_DRAIN_SCRIPT)
    return subprocess.Popen(
        ["wrk", f"-t{threads}", f"-c{max(connections, threads)}", f"-d{round(timeout)}s",
         "-s", str(script), f"http://127.0.0.1:{port}", "--", str(data), str(threads)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _wait_finished(database: Path, events: int, timeout: float,
                   server: subprocess.Popen[bytes], log: Path,
                   sender: subprocess.Popen[bytes] | None = None) -> None:
    until = time.monotonic() + timeout
    while _finished(database) < events:
        if sender is not None and sender.poll() is not None:  # it runs until ended
            output = sender.stdout.read().decode(errors="replace") if sender.stdout else ""
            raise SystemExit(f"wrk stopped before every event was stored:\n{output[-2000:]}")
        if time.monotonic() > until or server.poll() is not None:
            raise SystemExit(f"not drained within {timeout:g} s:\n{log.read_text()[-2000:]}")
        time.sleep(0.2)


def _finished(database: Path) -> int:
    with sqlite3.connect(database, timeout=10) as connection:
        return int(connection.execute(
            f"SELECT COUNT(*) FROM inbox WHERE status IN {FINISHED}").fetchone()[0])


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0
