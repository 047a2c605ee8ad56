"""Benchmark: `linkcrm diff` on 100,000 recorded events (the bar: under a minute).

    python tests/benchmarks/bench_diff.py                  # 100,000 events
    python tests/benchmarks/bench_diff.py --events 20000

Not collected by pytest. Records `--events` distinct events (every shipped event type, both
payload shapes) in a fresh SQLite database, then times, each through the real `linkcrm` entry
point: `diff` of the shipped rules against a changed copy reading the database, `events export
--redact`, and `diff --events` on that file. Prints seconds and events/s for each, next to the
rate of planning alone (one rule set), which bounds what a diff of two can do.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engine.rules.bench import sample_events
from engine.rules.evaluator import plan
from engine.rules.files import load_ruleset
from engine.storage import NewEvent
from engine.storage.sqlite.store import SQLiteStorage
from tests.support.diff_story import RULES, edited_rules
from tests.support.paths import REPO

CHANGE = [("first_touch_platform: lower(data.platform || data.device_type)\n"
           "            install_date", "first_touch_platform: data.platform || data.device_type\n"
           "            install_date"),
          ("stage: customer", "stage: lead")]


async def fill(database: Path, events: list[dict[str, object]]) -> None:
    """Store the events as the receiver would, a few hundred at a time (group commit)."""
    storage = SQLiteStorage(database)
    await storage.migrate()
    now = datetime.now(UTC)
    try:
        for start in range(0, len(events), 500):
            bodies = [json.dumps(e, separators=(",", ":")).encode()
                      for e in events[start:start + 500]]
            await asyncio.gather(*(storage.inbox.store(NewEvent(
                body=body, event_type=str(event["event"]), event_timestamp=str(event["timestamp"]),
                dedupe_key=hashlib.sha256(body).hexdigest(), received_at=now))
                for body, event in zip(bodies, events[start:start + 500], strict=True)))
    finally:
        await storage.close()


def timed(args: list[str], env: dict[str, str]) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "engine.cli", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"linkcrm {' '.join(args)} failed:\n{done.stderr}")
    return seconds, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=100_000)
    count = parser.parse_args().events
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        events = sample_events(count)
        started = time.perf_counter()
        asyncio.run(fill(work / "linkcrm.db", events))
        print(f"recorded {count:,} events in {time.perf_counter() - started:.1f} s")
        new = edited_rules(work / "new", CHANGE)
        old_rules = load_ruleset([RULES])
        started = time.perf_counter()
        for event in events:
            plan(event, old_rules)
        alone = time.perf_counter() - started
        print(f"planning alone (one rule set, in process): {count / alone:10,.0f} events/s")
        env = {**os.environ, "LINKCRM_DATABASE_URL": f"sqlite:///{work / 'linkcrm.db'}",
               "LINKCRM_LOG_LEVEL": "WARNING"}
        exported = work / "events.jsonl"
        runs = [
            ("diff from the database", ["diff", str(RULES), str(new), "--since", "1d",
                                        "--format", "json"]),
            ("events export --redact", ["events", "export", "--since", "1d", "--redact",
                                        "--output", str(exported)]),
            ("diff --events (the export)", ["diff", str(RULES), str(new), "--events",
                                            str(exported), "--format", "json"]),
        ]
        for label, args in runs:
            seconds, out = timed(args, env)
            extra = ""
            if args[0] == "diff":
                document = json.loads(out)
                assert document["events"] == count, document["events"]
                extra = f"  ({document['changed_events']:,} plan differently)"
            print(f"{label:<28} {seconds:6.1f} s  {count / seconds:10,.0f} events/s{extra}")


if __name__ == "__main__":
    main()
