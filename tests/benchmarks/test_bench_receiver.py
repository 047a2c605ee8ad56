"""The receiver benchmark runs as the README shows it, briefly: every server answers, the table
and the ratios against the uvloop + httptools anchor are printed, and the drain completes, from
the Python generator and from wrk."""

from __future__ import annotations

import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.benchmarks.drain import drain
from tests.support.paths import REPO

pytestmark = pytest.mark.slow


def test_the_receiver_benchmark_prints_every_figure() -> None:
    done = subprocess.run(
        [sys.executable, "tests/benchmarks/bench_receiver.py", "--seconds", "1", "--rounds", "1",
         "--bodies", "3000", "--connections", "8", "--drain", "300", "--no-wrk",
         "--disk-seconds", "0.5"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    for server in ("bare Starlette, uvicorn uvloop + httptools",
                   "bare Starlette, uvicorn h11 + asyncio (context)",
                   "linkcrm serve --no-worker (SQLite FULL)"):
        row = re.search(re.escape(server) + r"\s+(\d+)\s+(\d+)%", out)
        assert row is not None, out
        assert int(row.group(1)) > 0
    assert re.search(r"bare Starlette, uvicorn uvloop \+ httptools\s+\d+\s+100%", out), out
    assert re.search(r"errors 0", out) and "errors 1" not in out
    assert re.search(r"durable/bare = \d+%", out), out
    assert re.search(r"this disk, \d+ syncs of 128 KiB writes in [\d.]+ s: p50 [\d.]+ ms", out), out
    assert re.search(r"end-to-end drain of 300 distinct events .* all applied at [\d,]+ "
                     r"events/s", out), out
    assert "dead 0" in out


def test_the_drain_sends_each_event_once_from_wrk(tmp_path: Path) -> None:
    """wrk is how the drain is driven when it is installed (the Python generator took a core
    of its own): every distinct event stored once, applied, and the rates read from the inbox."""
    if shutil.which("wrk") is None:
        pytest.fail("wrk is missing: install Debian's with `apt-get install -y wrk` "
                    "(.ci/run does)")
    result = drain(300, tmp_path, connections=8, timeout=120)
    assert (result.events, result.dead) == (300, 0)
    with sqlite3.connect(tmp_path / "drain.db") as connection:
        stored, distinct = connection.execute(
            "SELECT COUNT(*), COUNT(DISTINCT dedupe_key) FROM inbox").fetchone()
    assert stored == distinct == 300
    assert result.acknowledged_per_s > 0 and result.applied_per_s > 0
    assert 0 <= result.p50_s <= result.p99_s
