"""Benchmark: the shipped story for many referred users through the worker into all four targets
while every CRM emulator injects 20% faults; prints the drain time, the faults injected, the
retries, and whether every event reached every CRM exactly once.

    python tests/benchmarks/bench_faults.py                    # 2,000 events (500 people)
    python tests/benchmarks/bench_faults.py --events 400 --fault-rate 0.3

Pipedrive is the slow one by design: each new person and deal needs a search, and its Search
API allows 10 calls per 2 s.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tempfile
from pathlib import Path

from tests.support.paths import REPO

ROOT = REPO
sys.path.insert(0, str(ROOT))

from engine.rules.files import load_ruleset  # noqa: E402
from tests.emulators.faults import DroppedConnection  # noqa: E402
from tests.support import fault_run  # noqa: E402


def _not_a_dropped_connection(record: logging.LogRecord) -> bool:
    return not (record.exc_info and isinstance(record.exc_info[1], DroppedConnection))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=2000, help="events (4 per person)")
    parser.add_argument("--fault-rate", type=float, default=0.2)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--targets", default="local,hubspot,salesforce,pipedrive")
    parser.add_argument("--pipedrive-budget", type=int, default=1_000_000,
                        help="Pipedrive's daily token budget (30,000 on the smallest account)")
    args = parser.parse_args()
    # A dropped connection is the fault asked for, not news: keep uvicorn's tracebacks quiet.
    logging.getLogger("uvicorn.error").addFilter(_not_a_dropped_connection)
    ruleset = load_ruleset([ROOT / "rules"])
    people = max(1, args.events // 4)
    with tempfile.TemporaryDirectory() as directory:
        report = asyncio.run(fault_run.run(ruleset, Path(directory), people,
                                           fault_rate=args.fault_rate,
                                           concurrency=args.concurrency, timeout=args.timeout,
                                           targets=tuple(args.targets.split(",")),
                                           daily_budget=args.pipedrive_budget))
    wrong = fault_run.problems(report, ruleset)
    print(f"{report.events} events ({people} people x 4), {args.fault_rate:.0%} faults, "
          f"worker concurrency {args.concurrency}")
    print(f"drained in {report.seconds:.1f} s ({report.events / report.seconds:.1f} events/s)")
    print(f"event statuses: {report.statuses}")
    for crm, injected in report.injected.items():
        kinds = ", ".join(f"{kind} {count}" for kind, count in sorted(injected.items()))
        print(f"  {crm:<10} faults injected: {sum(injected.values()):>5} ({kinds})")
    print("  action attempts retried: " + ", ".join(f"{t} {n}" for t, n in
                                                    report.retried.items()))
    for target, (contacts, deals) in report.found.items():
        print(f"  {target:<10} {len(contacts)} contacts, {len(deals)} deals")
    for line in report.dead_errors[:5]:
        print(f"dead: {line}")
    for line in wrong[:20]:
        print(f"WRONG: {line}")
    ok = not wrong and report.statuses == {"processed": report.events}
    print("every event reached every CRM exactly once" if ok else
          f"FAILED: {len(wrong)} problem(s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
