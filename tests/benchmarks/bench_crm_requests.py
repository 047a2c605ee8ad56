"""Benchmark: CRM requests per event through the real worker, against the one-batch floor.

For each CRM, a fresh SQLite inbox is filled with the shipped story (install -> referral
sign-up -> conversion -> identify per token, each token's steps spread through the backlog as
in bench_hubspot.py), and `linkcrm worker`, in a process of its own as deployed (targets built
from an environment that points at the emulator, served over real HTTP from this process,
limits as CRM_FACTS gives them), drains it. With --in-process the worker runs in this process
instead, where the emulators' work shares its GIL (the figure earlier sessions reported).

    python tests/benchmarks/bench_crm_requests.py                    # ~2.5 min: all three CRMs
    python tests/benchmarks/bench_crm_requests.py --crm hubspot --events 2000 --latency 0.05

Printed per CRM: requests sent, the one-batch floor (every event of the backlog in one call:
HubSpot a batch read and a batch write per 100 contacts and per 100 deals; Salesforce a SOQL
read per 100 and a Collections upsert per 200 Leads and Opportunities, plus the token;
Pipedrive, which has no batch endpoints, a search and a create per person and per deal), their
ratio, the drain time against the rate-limit bound (the requests sent at the limit's rate;
Salesforce has no short-window limit, so its bound is the target's own pacing, 25 requests/s;
Pipedrive's searches also count against the Search API limit, so the slower of the two binds),
429s (Salesforce: 403 REQUEST_LIMIT_EXCEEDED) after the first window, and for Pipedrive the
tokens (`x-token-cost`) spent per new person (the floor: a search at 20 and a create at 5 for the
person and for its deal, 50). Every CRM's records are read back and checked
against the story (one contact per token at stage customer with its email, one deal per token).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import math
import os
import sqlite3
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from tests.support.paths import REPO

sys.path.insert(0, str(REPO))

from engine.rules.files import load_ruleset
from engine.rules.model import RuleSet
from engine.runtime.metrics import Metrics
from engine.runtime.settings import Settings
from engine.storage import NewEvent, open_storage
from engine.worker.assembly import open_worker
from tests.benchmarks.bench_hubspot import backlog
from tests.support import crm_readback
from tests.support.crm_stack import Stack, running
from tests.support.loadgen import linkcrm, stop

HUBSPOT_LIMIT, HUBSPOT_WINDOW = 100, 10.0  # Free/Starter private app
PIPEDRIVE_BURST, PIPEDRIVE_WINDOW, PIPEDRIVE_SEARCH = 20, 2.0, 10  # Essential plan
SALESFORCE_PACE = 25.0  # SalesforceTarget's default requests per second


@dataclass
class Figures:
    crm: str
    events: int
    seconds: float
    sent: int
    floor: int
    rate: float  # requests per second the limit allows
    late_429s: int
    statuses: dict[str, int]
    problems: list[str]
    tokens_per_person: float | None = None
    by_kind: dict[str, int] | None = None
    first_request_s: float | None = None  # from the first claim to the first CRM request
    drain_requests: int = 0  # the requests sent from then on

    searches: tuple[int, float] | None = None  # (searches sent, their own limit per second)
    worker_cpu_s: float | None = None  # the worker process's CPU from first claim to done

    def lines(self) -> list[str]:
        bound, limits = self.sent / self.rate, f"{self.rate:g}/s"
        if self.searches is not None:  # searches count against both limits: the slower binds
            searches, search_rate = self.searches
            bound = max(bound, searches / search_rate)
            limits += f", {searches} searches at {search_rate:g}/s"
        out = [f"{self.crm}: {self.events} events drained in {self.seconds:.1f} s "
               f"({self.events / self.seconds:.0f} events/s); inbox {self.statuses}",
               f"  requests sent {self.sent}, one-batch floor {self.floor}: "
               f"ratio {self.sent / self.floor:.2f}",
               f"  rate-limit bound for those requests {bound:.1f} s ({limits}): "
               f"drain / bound = {self.seconds / bound:.2f}; floor bound "
               f"{self.floor / self.rate:.1f} s",
               f"  429s after the first window: {self.late_429s}"]
        if self.first_request_s is not None:
            paced = self.drain_requests / max(self.seconds - self.first_request_s, 1e-9)
            out.append(f"  first CRM request {self.first_request_s:.2f} s after the first claim "
                       f"(planning it); from then on {paced:.1f} requests/s")
        if self.worker_cpu_s is not None:
            out.append(f"  worker CPU in the drain {self.worker_cpu_s:.1f} s "
                       f"({self.worker_cpu_s / self.events * 1e6:.0f} us per event, "
                       f"{self.worker_cpu_s / self.seconds:.0%} of one core while it ran)")
        if self.tokens_per_person is not None:
            out.append(f"  Pipedrive tokens per new person: {self.tokens_per_person:.1f}")
        if self.by_kind:
            top = sorted(self.by_kind.items(), key=lambda kv: -kv[1])[:8]
            out.append("  emulator counts: " + ", ".join(f"{k} {v}" for k, v in top))
        out.append("  records: " + ("as the story says" if not self.problems
                                    else "WRONG: " + "; ".join(self.problems[:5])))
        return out


async def fill(url: str, events: int) -> int:
    """Store the backlog; returns the number of tokens (people) in it."""
    timeline = backlog(events)
    async with open_storage(url) as storage:
        await storage.migrate()
        now = datetime.now(UTC)
        for event in timeline:
            body = json.dumps(event, separators=(",", ":")).encode()
            await storage.inbox.store(NewEvent(
                body=body, event_type=event["event"], event_timestamp=event["timestamp"],
                dedupe_key=hashlib.sha256(body).hexdigest(), received_at=now))
    return len({e["data"]["token"] for e in timeline})


def check(found: crm_readback.Found, timeline: list[dict[str, object]]) -> list[str]:
    """What the read-back records get wrong about the story (the last step each token
    reached in this backlog decides its stage, email and deal)."""
    steps: dict[str, set[str]] = {}
    for event in timeline:
        data = event["data"]
        assert isinstance(data, dict)
        steps.setdefault(str(data["token"]), set()).add(str(event["event"]))
    contacts, deals = found
    by_token = {str(c.get("deep_link_token")): c for c in contacts}
    problems = []
    if len(contacts) != len(steps):
        problems.append(f"{len(contacts)} contacts for {len(steps)} tokens")
    wanted_deals = sum("referral.completed" in s for s in steps.values())
    if len(deals) != wanted_deals:
        problems.append(f"{len(deals)} deals, {wanted_deals} expected")
    for token, seen in steps.items():
        contact = by_token.get(token)
        if contact is None:
            problems.append(f"{token}: no contact")
            continue
        stage = "customer" if "referral.completed" in seen else "lead"
        if contact.get("stage") != stage:
            problems.append(f"{token}: stage {contact.get('stage')}, not {stage}")
        if "app.user_identified" in seen and contact.get("email") != f"{token}@example.com":
            problems.append(f"{token}: email {contact.get('email')!r}")
    return problems


async def one(crm: str, stack: Stack, ruleset: RuleSet, events: int,
              folder: Path, in_process: bool) -> Figures:
    url = f"sqlite:///{folder / f'{crm}.db'}"
    people = await fill(url, events)
    timeline = backlog(events)
    sf_before = dict(stack.salesforce.counters)
    cpu = None
    if in_process:
        started, seconds, statuses = await _drain_in_process(url, stack, crm, ruleset)
    else:
        started, seconds, statuses, cpu = await _drain_by_process(url, stack, crm, folder)
    field_map = ruleset.field_map
    if crm == "hubspot":
        state = stack.hubspot
        sent = sum(state.requests.values())
        contacts, deals = len(state.contacts.records), len(state.deals.records)
        floor = 2 * math.ceil(contacts / 100) + 2 * math.ceil(deals / 100)
        first = state.first_request_at or 0.0
        late = sum(1 for t in state.throttled_at if t > first + HUBSPOT_WINDOW)
        found = crm_readback.hubspot(state, field_map)
        after = [t - started for t in state.request_times if t >= started]
        return Figures(crm, events, seconds, sent, floor, HUBSPOT_LIMIT / HUBSPOT_WINDOW, late,
                       statuses, check(found, timeline), by_kind=dict(state.requests),
                       first_request_s=min(after, default=None), drain_requests=len(after),
                       worker_cpu_s=cpu)
    if crm == "salesforce":
        sf = stack.salesforce
        counters = {k: v - sf_before.get(k, 0) for k, v in sf.counters.items()}
        sent = counters.get("requests", 0) + counters.get("token_requests", 0)
        leads, opportunities = len(sf.leads), len(sf.opportunities)
        floor = 1 + sum(math.ceil(n / 100) + math.ceil(n / 200) for n in (leads, opportunities))
        found = crm_readback.salesforce(sf, field_map)
        return Figures(crm, events, seconds, sent, floor, SALESFORCE_PACE,
                       counters.get("limit_exceeded", 0), statuses, check(found, timeline),
                       by_kind={k: v for k, v in counters.items() if v}, worker_cpu_s=cpu)
    pd = stack.pipedrive
    sent = sum(pd.calls.values())
    persons, deals = len(pd.live("person")), len(pd.live("deal"))
    floor = 2 * (persons + deals)  # no batch endpoints: a search and a create per record
    first = pd.log[0][0] if pd.log else 0.0
    late = sum(1 for at, _, _, status in pd.log if status == 429 and at > first + PIPEDRIVE_WINDOW)
    found = crm_readback.pipedrive(pd, field_map)
    searches = sum(n for call, n in pd.calls.items() if call.endswith("/search"))
    return Figures(crm, events, seconds, sent, floor, PIPEDRIVE_BURST / PIPEDRIVE_WINDOW, late,
                   statuses, check(found, timeline), pd.tokens_used / max(1, people),
                   dict(pd.calls),
                   searches=(searches, PIPEDRIVE_SEARCH / PIPEDRIVE_WINDOW), worker_cpu_s=cpu)


async def _drain_in_process(url: str, stack: Stack, crm: str, ruleset: RuleSet
                            ) -> tuple[float, float, dict[str, int]]:
    """The worker in this process, beside the emulators (they share its GIL)."""
    async with open_storage(url) as storage, open_worker(
            storage, ruleset, Settings(), stack.environ(crm), metrics=Metrics()) as worker:
        _reset(stack)
        started = time.monotonic()
        await worker.run_until_idle()
        seconds = time.monotonic() - started
        statuses = {k: v for k, v in (await storage.inbox.stats()).by_status.items() if v}
    return started, seconds, statuses


async def _drain_by_process(url: str, stack: Stack, crm: str, folder: Path
                            ) -> tuple[float, float, dict[str, int], float | None]:
    """`linkcrm worker` in a process of its own, as deployed: the CRM's work is not the
    worker's. Timed from its first claim until every event is finished (its start-up
    requests count as sent, its start-up time does not); also the worker's CPU seconds in
    that time (None where /proc does not tell)."""
    _reset(stack)
    database = url.removeprefix("sqlite:///")
    log = folder / f"{crm}-worker.log"
    env = {**stack.environ(crm), "LINKCRM_DATABASE_URL": url,
           "LINKCRM_RULES": str(REPO / "rules"), "LINKCRM_LOG_LEVEL": "WARNING"}
    worker = linkcrm(["worker"], env, log)
    progress = _Progress(database)
    try:
        started = finished = None
        cpu_then = cpu_now = None
        deadline = time.monotonic() + 600
        while finished is None:
            if worker.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the worker stopped or hung:\n{log.read_text()[-2000:]}")
            await asyncio.sleep(0.02)
            if started is None and progress.started():
                started, cpu_then = time.monotonic(), _cpu_seconds(worker.pid)
            if started is not None and progress.finished():
                finished, cpu_now = time.monotonic(), _cpu_seconds(worker.pid)
    finally:
        stop([worker])
        progress.close()
    cpu = None if cpu_then is None or cpu_now is None else cpu_now - cpu_then
    return started, finished - started, _statuses(database), cpu


def _cpu_seconds(pid: int) -> float | None:
    """User and system CPU seconds of process `pid` so far, every thread (Linux's /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after the command name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _Progress:
    """The worker's progress, read beside it every 20 ms. Each read stops at the first row it
    needs, on the inbox's own indexes once the drain runs: a read of the whole inbox each time
    (bodies and all) took half a core on two, CPU the worker and the emulator then lacked."""

    def __init__(self, database: str) -> None:
        self._connection = sqlite3.connect(database, timeout=10)

    def started(self) -> bool:
        """Some event claimed or finished (claims lease the earliest events first)."""
        return bool(self._connection.execute(
            "SELECT EXISTS (SELECT 1 FROM inbox"
            " WHERE lease_owner IS NOT NULL OR status <> 'received')").fetchone()[0])

    def finished(self) -> bool:
        """No event waiting or at work (an event at work is still `received`)."""
        return not self._connection.execute(
            "SELECT EXISTS (SELECT 1 FROM inbox WHERE status IN ('received', 'failed'))"
        ).fetchone()[0]

    def close(self) -> None:
        self._connection.close()


def _statuses(database: str) -> dict[str, int]:
    """The inbox by status."""
    with contextlib.closing(sqlite3.connect(database, timeout=10)) as connection:
        rows = connection.execute("SELECT status, COUNT(*) FROM inbox GROUP BY 1").fetchall()
    return {str(status): int(n) for status, n in rows if n}


def _reset(stack: Stack) -> None:
    """Forget the start-up requests (the property read, the field catalogue, the token)."""
    state = stack.hubspot
    state.forget_requests()
    stack.pipedrive.reset_usage()


async def main(args: argparse.Namespace) -> int:
    ruleset = load_ruleset([REPO / "rules"])
    results = []
    with tempfile.TemporaryDirectory() as directory:
        for crm in args.crm:
            async with running(
                    ruleset.field_map,
                    hubspot={"rate_limit": HUBSPOT_LIMIT, "window_seconds": HUBSPOT_WINDOW,
                             "latency": args.latency},
                    pipedrive={"burst_limit": PIPEDRIVE_BURST, "burst_window": PIPEDRIVE_WINDOW,
                               "search_limit": PIPEDRIVE_SEARCH,
                               "search_window": PIPEDRIVE_WINDOW, "latency": args.latency,
                               "daily_budget": 10_000_000},
                    pipedrive_rate_limit=PIPEDRIVE_BURST) as stack:
                stack.salesforce.latency = args.latency
                events = args.events if crm != "pipedrive" else args.pipedrive_events
                figures = await one(crm, stack, ruleset, events, Path(directory),
                                    args.in_process)
            results.append(figures)
            print("\n".join(figures.lines()), flush=True)
    return 1 if any(f.problems for f in results) else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crm", nargs="+", default=["hubspot", "salesforce", "pipedrive"],
                        choices=["hubspot", "salesforce", "pipedrive"])
    parser.add_argument("--events", type=int, default=10_000,
                        help="events per CRM (HubSpot, Salesforce)")
    parser.add_argument("--pipedrive-events", type=int, default=300,
                        help="events for Pipedrive (no batch endpoints: ~10 requests/s)")
    parser.add_argument("--latency", type=float, default=0.02, help="emulator latency (s)")
    parser.add_argument("--in-process", action="store_true",
                        help="run the worker in this process, beside the emulators (they then "
                             "share one GIL), instead of `linkcrm worker` in its own")
    sys.exit(asyncio.run(main(parser.parse_args())))
