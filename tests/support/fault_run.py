"""One run of the shipped story for many referred users through the worker into all four
targets while every emulator injects faults; used by `test_targets_faults.py` (a CI-sized run)
and `bench_faults.py` (the full 2,000 events, with figures)."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from engine.rules.model import RuleSet
from engine.runtime.metrics import Metrics
from engine.storage import Storage, open_storage
from engine.targets.registry import build_targets, start_targets
from engine.worker.loop import Worker, WorkerOptions
from engine.worker.retrying import RetryPolicy
from tests.support import crm_readback
from tests.support.crm_readback import Found
from tests.support.crm_stack import CRMS, running
from tests.support.worker_helpers import new_event

CLIENT_TIMEOUT = 0.5  # below the emulators' slow answers, so "slow" means a client timeout
SLOW_SECONDS = 0.7


def story(n: int) -> list[tuple[str, dict[str, Any], str]]:
    """Referred user n: install -> referral sign-up -> conversion -> the app identifies them."""
    token = f"tok_{n:04d}"
    return [
        ("install.tracked", {"token": token, "prefix": "invite", "campaign": "spring",
                             "platform": "Android"}, "2026-03-01T10:00:00Z"),
        ("referral.created", {"token": token, "referrer_token": "tok_ref",
                              "referred_user_id": f"user_{n}"}, "2026-03-02T10:00:00Z"),
        ("referral.completed", {"token": token, "referrer_token": "tok_ref"},
         "2026-03-03T10:00:00Z"),
        ("app.user_identified", {"token": token, "email": f" Person{n}@Example.com ",
                                 "first_name": "Pat", "last_name": f"N{n}",
                                 "user_id": f"user_{n}"}, "2026-03-04T10:00:00Z"),
    ]


def expected_contact(n: int) -> dict[str, Any]:
    return {"deep_link_token": f"tok_{n:04d}", "deep_link_prefix": "invite",
            "first_touch_campaign": "spring", "first_touch_platform": "android",
            "install_date": "2026-03-01", "referral_source": "tok_ref",
            "referral_date": "2026-03-02", "app_user_id": f"user_{n}",
            "conversion_date": "2026-03-03", "email": f"person{n}@example.com",
            "first_name": "Pat", "last_name": f"N{n}", "name": f"Pat N{n}",
            "stage": "customer"}


def expected_deal(n: int) -> dict[str, Any]:
    token = f"tok_{n:04d}"
    return {"key": f"referral-{token}", "title": f"Referral: {token}", "stage": "new",
            "referral_code": token}


@dataclass
class Report:
    people: int
    events: int
    seconds: float = 0.0
    statuses: dict[str, int] = field(default_factory=dict)
    found: dict[str, Found] = field(default_factory=dict)
    injected: dict[str, dict[str, int]] = field(default_factory=dict)
    retried: dict[str, int] = field(default_factory=dict)
    dead_errors: list[str] = field(default_factory=list)


async def _store_backlog(storage: Storage, people: int, seed: int) -> None:
    """Each person's events in order, people interleaved at random (as deliveries arrive)."""
    queues = [story(n) for n in range(people)]
    rng = random.Random(seed)
    while queues:
        queue = rng.choice(queues)
        event_type, data, timestamp = queue.pop(0)
        await storage.inbox.store(new_event(event_type, data, timestamp))
        if not queue:
            queues.remove(queue)


async def run(ruleset: RuleSet, directory: Path, people: int, *, fault_rate: float = 0.2,
              concurrency: int = 8, timeout: float = 600.0, seed: int = 11,
              targets: tuple[str, ...] = ("local", *CRMS),
              daily_budget: int = 1_000_000) -> Report:
    """Store `people` stories, run the worker until every event is finished, read back every
    CRM. Raises AssertionError when the events do not finish within `timeout` seconds.

    `daily_budget` is Pipedrive's daily token budget: about 60 tokens per new person (two
    searches at 20), so the smallest account's 30,000 runs out near 500 people; the default
    is a larger account's, since running out is not what this run is about."""
    report = Report(people, people * 4)
    field_map = ruleset.field_map
    storage = open_storage(f"sqlite:///{directory / 'linkcrm.db'}")
    await storage.migrate()
    await _store_backlog(storage, people, seed)
    metrics = Metrics()
    # Short windows keep the emulators' rate-limit pauses short; the limits are not the point.
    async with running(field_map, fault_rate=fault_rate, slow_seconds=SLOW_SECONDS, seed=seed,
                       hubspot={"rate_limit": 5000, "window_seconds": 0.1},
                       pipedrive={"burst_limit": 400, "burst_window": 0.5, "search_limit": 10,
                                  "search_window": 0.5, "search_lag": 1.0,
                                  "daily_budget": daily_budget}) as stack, \
            httpx.AsyncClient(timeout=httpx.Timeout(CLIENT_TIMEOUT, connect=2.0)) as client:
        built = build_targets(stack.environ(*targets), storage, field_map, client)
        await start_targets(built)
        # Batches of a few people in a window of a few events: every CRM still gets enough
        # requests to see each kind of fault (a whole backlog in one batch is a handful), and
        # later events of a person still ride behind earlier ones (engine.worker.chain).
        worker = Worker(storage, ruleset, built, metrics=metrics, options=WorkerOptions(
            concurrency=concurrency, short_wait=3.0, batch_size=4, batch_window=concurrency,
            policy=RetryPolicy(base=0.05, cap=2.0, max_attempts=60, rng=random.Random(seed))))
        started = time.monotonic()
        running_worker = asyncio.create_task(worker.run())
        try:
            async with asyncio.timeout(timeout):
                while True:
                    by_status = (await storage.inbox.stats()).by_status
                    if by_status.get("processed", 0) + by_status.get("dead", 0) \
                            + by_status.get("ignored", 0) >= report.events:
                        break
                    await asyncio.sleep(0.1)
        finally:
            report.seconds = time.monotonic() - started
            worker.stop()
            await running_worker
        await asyncio.sleep(SLOW_SECONDS)  # writes still sleeping in the emulators land too
        report.statuses = {k: v for k, v in (await storage.inbox.stats()).by_status.items() if v}
        report.dead_errors = [e.last_error or "" for e in
                              await storage.inbox.list_events(status="dead", limit=20)]
        found = crm_readback.everywhere(await crm_readback.local(storage), stack, field_map)
        report.found = {target: found[target] for target in targets}
        report.injected = {crm: n for crm, n in stack.injected().items() if crm in targets}
        assert stack.salesforce.schema_violations == []
    report.retried = {t: int(metrics.actions.value(target=t, outcome="retried"))
                      for t in targets}
    await storage.close()
    return report


def problems(report: Report, ruleset: RuleSet) -> list[str]:
    """Everything wrong with the end state, per target: a missing, duplicated or wrong contact
    or deal. Empty when every event reached every CRM exactly once."""
    wrong: list[str] = []
    for target, (contacts, deals) in report.found.items():
        by_token: dict[Any, list[dict[str, Any]]] = {}
        for contact in contacts:
            by_token.setdefault(contact.get("deep_link_token"), []).append(contact)
        deals_by_key: dict[Any, list[dict[str, Any]]] = {}
        for deal in deals:
            deals_by_key.setdefault(deal.get("key"), []).append(deal)
        if len(contacts) != report.people:
            wrong.append(f"{target}: {len(contacts)} contacts for {report.people} people")
        if len(deals) != report.people:
            wrong.append(f"{target}: {len(deals)} deals for {report.people} people")
        for n in range(report.people):
            want = crm_readback.mapped(ruleset.field_map, target, expected_contact(n))
            found = by_token.get(want["deep_link_token"], [])
            if len(found) != 1:
                wrong.append(f"{target}: {len(found)} contacts for person {n}")
                continue
            contact = dict(found[0])
            contact_id = contact.pop("id")
            if contact != want:
                wrong.append(f"{target}: person {n} is {contact}, expected {want}")
            deal_want = {**crm_readback.mapped(ruleset.field_map, target, expected_deal(n)),
                         "contact": contact_id}
            if deals_by_key.get(deal_want["key"]) != [deal_want]:
                wrong.append(f"{target}: deals for person {n}: "
                             f"{deals_by_key.get(deal_want['key'])}, expected [{deal_want}]")
    return wrong
