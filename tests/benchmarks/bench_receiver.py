"""Receiver speed: the durable receiver next to a bare app that only verifies and answers 200.

    python tests/benchmarks/bench_receiver.py [--seconds 10] [--rounds 2] [--connections 32]
                                              [--drain 20000] [--steady-rate 1000]
                                              [--postgres]

The servers run as separate processes with one uvicorn worker on loopback: `linkcrm serve
--no-worker` on a fresh SQLite file (WAL, synchronous=FULL, group commit), and a bare Starlette
app that checks the signature over the raw body and answers 200 (no parsing, no storage), on
uvicorn's fastest stack, uvloop + httptools: the anchor every ratio is taken against. The same
bare app on h11 + the asyncio loop (uvicorn without its `standard` extra) is measured for
context only. The load generator is `wrk` (with a Lua script cycling through pre-signed,
distinct ~600-byte bodies, so dedupe never short-circuits) or, without wrk, an asyncio HTTP/1.1
keep-alive client. Rounds alternate the servers so all see the same machine; the best round of
each is reported, with the server's CPU time per request, which a busy machine moves far less
than requests/s.
With `--postgres`, `serve --no-worker` on PostgreSQL (127.0.0.1) takes its turn in the same
rounds, and its share of the SQLite figure is printed (target >= 0.8).
Then, unless `--drain 0`, the end-to-end drain (drain.py): N distinct events into one `linkcrm
serve` with its worker and the local CRM, timed from the first receipt to the last applied.
Then, unless `--steady-rate 0`, 20 s of deliveries at a steady 1,000/s into a fresh `serve`,
with the receipt -> applied latency.
Targets (issue 12): durable >= 65% of bare requests/s, durable p99 < 15 ms; drain >= 3,000
events/s applied (printed also as a share of the bare anchor: the issue measured 3,000 against
a bare app at 28,600 req/s, and absolute figures move with the host several times over); at a
steady 1,000/s, receipt -> applied p99 < 1 s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from tests.benchmarks.drain import drain
from tests.support.paths import REPO
from tests.support.postgres import fresh_schema, schema_url, unreachable_reason

ROOT = REPO
SECRET = "whsec_bench_receiver"
# The drain target over the bare anchor of the run that set it (issue 12's table).
ISSUE_DRAIN_SHARE = 3_000 / 28_600
SERVERS = {  # name: what it is; "bare" is the anchor
    "bare": "bare Starlette, uvicorn uvloop + httptools",
    "bare-h11": "bare Starlette, uvicorn h11 + asyncio (context)",
    "durable": "linkcrm serve --no-worker (SQLite FULL)",
    "durable-pg": "linkcrm serve --no-worker (PostgreSQL)",  # with --postgres
}

BARE_SERVER = """
import sys, uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from engine.signing import verify_signature

SECRETS = (sys.argv[2],)

async def webhook(request: Request) -> Response:
    body = await request.body()
    signature = request.headers.get("x-webhook-signature", "").encode()
    if not verify_signature(body, signature, SECRETS):
        return Response(status_code=401)
    return Response(b'{"status":"ok"}', media_type="application/json")

app = Starlette(routes=[Route("/webhooks/tolinku", webhook, methods=["POST"])])
http, loop = sys.argv[3].split("+")
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), http=http, loop=loop, log_config=None,
            access_log=False, server_header=False, lifespan="off")
"""

WRK_SCRIPT = """
local bodies, signatures, n = {}, {}, 0
local counter = 0
function setup(thread)
  thread:set("id", n)
  n = n + 1
end
function init(args)
  -- args: data file, threads, first line, line count (each run gets fresh bodies)
  local threads, me = tonumber(args[2]), tonumber(id)
  local first, count = tonumber(args[3]), tonumber(args[4])
  local i = 0
  for line in io.lines(args[1]) do
    if i >= first + count then break end
    if i >= first and i % threads == me then
      local tab = line:find("\\t")
      signatures[#signatures + 1] = line:sub(1, tab - 1)
      bodies[#bodies + 1] = line:sub(tab + 1)
    end
    i = i + 1
  end
end
function request()
  counter = counter % #bodies + 1
  return wrk.format("POST", "/webhooks/tolinku", {
    ["Content-Type"] = "application/json", ["User-Agent"] = "Tolinku/1.0",
    ["X-Webhook-Event"] = "install.tracked", ["X-Webhook-Signature"] = signatures[counter]
  }, bodies[counter])
end
function done(summary, latency, requests)
  io.write(string.format("RESULT %d %.3f %d %d %d\\n", summary.requests,
    summary.duration / 1e6, latency:percentile(50), latency:percentile(99),
    summary.errors.status + summary.errors.connect + summary.errors.read
    + summary.errors.write + summary.errors.timeout))
end
"""


@dataclass
class Result:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_seconds: float = 0.0  # the server process's CPU time (all threads) during the run

    @property
    def rate(self) -> float:
        return self.requests / self.seconds

    @property
    def cpu_us(self) -> float:
        """Server CPU microseconds per request: unlike req/s, barely moved by a busy machine."""
        return self.cpu_seconds / max(self.requests, 1) * 1e6


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bodies(count: int) -> list[tuple[str, bytes]]:
    """Distinct signed ~600-byte install events (a counter inside the JSON), signed one
    millisecond apart as a sender's events are: in the order they happened."""
    from engine.signing import sign

    made = []
    start = datetime(2026, 3, 1, 12, 30, tzinfo=UTC)
    for n in range(count):
        stamp = (start + timedelta(milliseconds=n)).isoformat(timespec="milliseconds")
        document = {
            "event": "install.tracked", "timestamp": stamp.replace("+00:00", "Z"),
            "data": {"token": f"tok_{n:09d}", "prefix": "spring-invite",
                     "campaign": "spring-referrals-2026", "platform": "iOS",
                     "referrer_token": f"ref_{n:09d}", "hostname": "go.example.com",
                     "device_type": "iPhone15,3", "ip": "203.0.113.7",
                     "user_agent": "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X)",
                     "referral_url": f"https://go.example.com/r/{n:09d}?utm_source=sms",
                     "milestone": "signup", "note": "x" * 150},
        }
        body = json.dumps(document, separators=(",", ":")).encode()
        made.append((sign(body, SECRET), body))
    return made


def fsync_ms(directory: Path, count: int = 200) -> float:
    """The median time, in milliseconds, to write 4 KiB to a file in `directory` and fsync it."""
    path = directory / "fsync-probe"
    times = []
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for n in range(count):
            started = time.perf_counter()
            os.pwrite(descriptor, b"x" * 4096, (n % 16) * 4096)
            os.fsync(descriptor)
            times.append(time.perf_counter() - started)
    finally:
        os.close(descriptor)
        path.unlink()
    return statistics.median(times) * 1000


def disk_stalls(directory: Path, seconds: float = 10.0) -> str:
    """How this disk syncs writes the size of a group commit (128 KiB, about 20 events) for
    `seconds`, with nothing else running: whether its own stalls could set the durable
    receiver's p99."""
    path = directory / "stall-probe"
    times = []
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    block = b"x" * 131072
    try:
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            os.pwrite(descriptor, block, (len(times) % 32) * len(block))
            os.fdatasync(descriptor)
            times.append(time.perf_counter() - started)
    finally:
        os.close(descriptor)
        path.unlink()
    times.sort()
    stalls = sum(t > 0.05 for t in times)
    p50, p99 = times[len(times) // 2] * 1000, times[len(times) * 99 // 100] * 1000
    return (f"this disk, {len(times)} syncs of 128 KiB writes in {seconds:g} s: p50 "
            f"{p50:.2f} ms, p99 {p99:.2f} ms, max {times[-1] * 1000:.0f} ms, {stalls} over 50 ms")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_ready(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server on port {port} exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"server on port {port} did not start")


def run_wrk(port: int, data: Path, script: Path, seconds: float, connections: int,
            threads: int, span: range) -> Result:
    out = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency",
         "-s", str(script), f"http://127.0.0.1:{port}", "--", str(data), str(threads),
         str(span.start), str(len(span))],
        capture_output=True, text=True, check=True)
    match = re.search(r"^RESULT (\d+) ([\d.]+) (\d+) (\d+) (\d+)$", out.stdout, re.MULTILINE)
    if match is None:
        raise SystemExit(f"unexpected wrk output:\n{out.stdout}\n{out.stderr}")
    requests, duration, p50, p99, errors = match.groups()
    return Result(int(requests), float(duration), int(p50) / 1000, int(p99) / 1000, int(errors))


async def _asyncio_load(port: int, made: list[tuple[str, bytes]], seconds: float,
                        connections: int, span: range) -> Result:
    """Fallback generator: keep-alive HTTP/1.1 over raw asyncio streams (httpx would be the
    bottleneck at these rates)."""
    latencies: list[float] = []
    errors = 0
    counter = 0
    stop_at = time.monotonic() + seconds

    async def connection() -> None:
        nonlocal counter, errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while time.monotonic() < stop_at:
            signature, body = made[span[counter % len(span)]]
            counter += 1
            request = (b"POST /webhooks/tolinku HTTP/1.1\r\nHost: bench\r\n"
                       b"Content-Type: application/json\r\nX-Webhook-Signature: "
                       + signature.encode() + b"\r\nContent-Length: "
                       + str(len(body)).encode() + b"\r\n\r\n" + body)
            started = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))  # type: ignore[union-attr]
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - started)
            if not head.startswith(b"HTTP/1.1 200"):
                errors += 1
        writer.close()

    began = time.monotonic()
    await asyncio.gather(*(connection() for _ in range(connections)))
    elapsed = time.monotonic() - began
    ordered = sorted(latencies)
    return Result(len(ordered), elapsed, statistics.median(ordered) * 1000,
                  ordered[int(len(ordered) * 0.99)] * 1000, errors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--steady-rate", type=float, default=1000.0,
                        help="then deliveries at this steady rate per second (0: skip)")
    parser.add_argument("--steady-seconds", type=float, default=20.0)
    parser.add_argument("--threads", type=int, default=1, help="wrk threads")
    parser.add_argument("--bodies", type=int, default=150_000)
    parser.add_argument("--no-wrk", action="store_true", help="use the asyncio generator")
    parser.add_argument("--postgres", action="store_true",
                        help="also `serve --no-worker` on PostgreSQL (127.0.0.1), in the same "
                             "rounds: its share of the SQLite figure")
    parser.add_argument("--drain", type=int, default=20_000, metavar="N",
                        help="then the end-to-end drain of N events through `linkcrm serve` "
                             "(receiver and worker, local CRM); 0 skips it")
    parser.add_argument("--disk-seconds", type=float, default=10.0,
                        help="then how this disk syncs group-commit-sized writes, for so long "
                             "(0 skips it)")
    options = parser.parse_args()
    use_wrk = shutil.which("wrk") is not None and not options.no_wrk

    names = [name for name in SERVERS if name != "durable-pg" or options.postgres]
    if options.postgres and unreachable_reason():
        sys.exit(unreachable_reason())
    with tempfile.TemporaryDirectory(prefix="linkcrm-bench-") as scratch, \
            contextlib.ExitStack() as stack:
        directory = Path(scratch)
        made = bodies(options.bodies)
        data = directory / "bodies.tsv"
        data.write_bytes(b"".join(s.encode() + b"\t" + b + b"\n" for s, b in made))
        script = directory / "post.lua"
        script.write_text(WRK_SCRIPT)
        print(f"{len(made)} distinct signed bodies of ~{len(made[0][1])} bytes; "
              f"{options.connections} connections; "
              f"{'wrk -t' + str(options.threads) if use_wrk else 'asyncio generator'}; "
              f"{os.cpu_count()} CPUs")
        # The durable receiver answers once its commit is on disk, the bare app never waits
        # for one: how fast this disk syncs is part of the ratio (it differs between hosts).
        print(f"this disk: fsync of a 4 KiB write p50 {fsync_ms(directory):.2f} ms")
        env = {**os.environ, "WEBHOOK_SECRET": SECRET, "LINKCRM_LOG_LEVEL": "WARNING",
               "LINKCRM_DATABASE_URL": f"sqlite:///{directory / 'bench.db'}"}
        ports = {name: free_port() for name in names}
        commands = {
            "bare": [sys.executable, "-c", BARE_SERVER, str(ports["bare"]), SECRET,
                     "httptools+uvloop"],
            "bare-h11": [sys.executable, "-c", BARE_SERVER, str(ports["bare-h11"]), SECRET,
                         "h11+asyncio"],
            "durable": [sys.executable, "-m", "engine.cli", "serve", "--no-worker",
                        "--port", str(ports["durable"])],
        }
        envs = {name: env for name in names}
        if options.postgres:
            schema = stack.enter_context(fresh_schema("lc_bench_receiver"))
            commands["durable-pg"] = [*commands["durable"][:-1], str(ports["durable-pg"])]
            envs["durable-pg"] = {**env, "LINKCRM_DATABASE_URL": schema_url(schema)}
        servers = {name: subprocess.Popen(commands[name], env=envs[name], cwd=ROOT)
                   for name in names}
        results: dict[str, list[Result]] = {name: [] for name in names}
        try:
            for name, port in ports.items():
                wait_ready(port, servers[name])
            # Each run (warm-up, then every round) sends its own slice of the bodies, so the
            # durable receiver never sees a body twice while there are bodies left.
            runs = options.rounds + 1
            spans = [range(i * len(made) // runs, (i + 1) * len(made) // runs)
                     for i in range(runs)]
            for name in names:  # warm up each (imports, caches, the database)
                _load(use_wrk, ports[name], data, script, made, 2.0, options, spans[0])
            for number in range(1, runs):
                for name in names:
                    before = cpu_seconds(servers[name].pid)
                    result = _load(use_wrk, ports[name], data, script, made, options.seconds,
                                   options, spans[number])
                    result.cpu_seconds = cpu_seconds(servers[name].pid) - before
                    results[name].append(result)
        finally:
            for server in servers.values():
                server.terminate()
                server.wait(timeout=30)
        stored = _stored(directory / "bench.db")
        stalls = disk_stalls(directory, options.disk_seconds) if options.disk_seconds > 0 else ""

    for name in names:
        for number, result in enumerate(results[name], 1):
            print(f"  {name:<10} round {number}: {result.rate:8.0f} req/s  p50 "
                  f"{result.p50_ms:6.2f} ms  p99 {result.p99_ms:6.2f} ms  errors {result.errors}"
                  f"  server CPU {result.cpu_us:5.0f} us/request")
    best = {name: max(rs, key=lambda r: r.rate) for name, rs in results.items()}
    anchor = best["bare"].rate
    print(f"{'server':<48} {'req/s':>8} {'of bare':>8} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'CPU us/req':>10}")
    for name in names:
        result = best[name]
        print(f"{SERVERS[name]:<48} {result.rate:8.0f} {result.rate / anchor:8.0%} "
              f"{result.p50_ms:7.2f} {result.p99_ms:7.2f} {result.cpu_us:10.0f}")
    sent = sum(r.requests for r in results["durable"])
    print(f"durable stored {stored} distinct events (measured rounds sent {sent}, plus the "
          f"warm-up); a body is repeated only when a run outlasts its slice")
    if stalls:
        print(stalls)
    ratio = best["durable"].rate / anchor
    verdict = "met" if ratio >= 0.65 and best["durable"].p99_ms < 15 else "MISSED"
    print(f"durable/bare = {ratio:.0%}  (target >= 65% of bare uvloop + httptools, "
          f"p99 < 15 ms: {verdict})")
    if options.postgres:
        share = best["durable-pg"].rate / best["durable"].rate
        print(f"PostgreSQL/SQLite = {share:.2f}x  (target >= 0.8x: "
              f"{'met' if share >= 0.8 else 'MISSED'})")
    if options.drain:
        with tempfile.TemporaryDirectory(prefix="linkcrm-drain-") as scratch:
            drained = drain(options.drain, Path(scratch), connections=options.connections,
                            use_wrk=use_wrk, wrk_threads=options.threads)
        for line in drained.lines(best["durable"].rate):
            print(line)
        share = drained.applied_per_s / anchor
        print(f"  drain/bare = {share:.1%}; target >= 3,000 events/s applied: "
              f"{'met' if drained.applied_per_s >= 3000 else 'MISSED'}; the same target as a "
              f"share of the issue's bare anchor (3,000 of 28,600 req/s = "
              f"{ISSUE_DRAIN_SHARE:.1%}): {'met' if share >= ISSUE_DRAIN_SHARE else 'MISSED'}")
    if options.steady_rate:
        with tempfile.TemporaryDirectory(prefix="linkcrm-steady-") as scratch:
            steady = drain(round(options.steady_rate * options.steady_seconds), Path(scratch),
                           connections=options.connections, rate=options.steady_rate)
        for line in steady.lines(None):
            print(line)


def _load(use_wrk: bool, port: int, data: Path, script: Path, made: list[tuple[str, bytes]],
          seconds: float, options: argparse.Namespace, span: range) -> Result:
    if use_wrk:
        return run_wrk(port, data, script, seconds, options.connections, options.threads, span)
    return asyncio.run(_asyncio_load(port, made, seconds, options.connections, span))


def _stored(database: Path) -> int:
    import sqlite3

    with sqlite3.connect(database) as connection:
        return int(connection.execute("SELECT COUNT(*) FROM inbox").fetchone()[0])


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
