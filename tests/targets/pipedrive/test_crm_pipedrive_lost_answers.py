"""Pipedrive's batch path through the real worker when a deal create loses its answer: the
create outlives the client's timeout and commits later, and the same batch's merged person
write then fails, so the worker retries the event's earlier actions and applies the deal again.
Exactly one deal, however the retry is scheduled."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import httpx
import pytest

from engine.storage import Storage
from engine.targets.pipedrive.target import PipedriveTarget
from engine.worker.loop import Worker, WorkerOptions
from engine.worker.retrying import RetryPolicy
from tests.emulators.faults import FaultInjector
from tests.emulators.pipedrive import PipedriveEmulator
from tests.emulators.server import serve
from tests.support.crm_stack import PIPEDRIVE_TOKEN, PIPELINE, provision_pipedrive_app
from tests.support.worker_helpers import new_event, shipped_rules

pytestmark = pytest.mark.anyio
RULES = shipped_rules()
TIMEOUT = 1.0  # the client's read timeout
LATE = 1.6  # when the timed-out create commits: after the timeout, before as long again


def story(token: str) -> list[tuple[str, dict[str, str]]]:
    return [
        ("install.tracked", {"token": token, "prefix": "invite", "campaign": "spring",
                             "platform": "iOS"}),
        ("referral.created", {"token": token, "referrer_token": "tok_ref"}),
        ("referral.completed", {"token": token, "referrer_token": "tok_ref"}),
        ("app.user_identified", {"token": token, "email": f"{token}@example.com",
                                 "first_name": "Ada", "last_name": "L", "user_id": token}),
    ]


def first(method: str, path: str, after: Callable[[], bool] = lambda: True
          ) -> Callable[[dict[str, Any]], bool]:
    """`exempt` for a FaultInjector at rate 1: only the first `method path...` once `after()`
    holds is faulted."""
    seen: list[str] = []

    def exempt(scope: dict[str, Any]) -> bool:
        if seen or scope["method"] != method or not scope["path"].startswith(path) \
                or not after():
            return True
        seen.append(scope["path"])
        return False

    return exempt


async def drain(worker: Worker, storage: Storage, events: int) -> None:
    async with asyncio.timeout(60):
        while True:
            await worker.run_until_idle()
            by_status = (await storage.inbox.stats()).by_status
            if by_status.get("processed", 0) + by_status.get("dead", 0) >= events:
                return
            await asyncio.sleep(0.1)


async def test_a_deal_create_that_commits_late_is_not_made_again_when_the_batch_is_retried(
        storage: Storage) -> None:
    emulator = PipedriveEmulator(api_token=PIPEDRIVE_TOKEN, search_lag=30.0,
                                 burst_limit=1000, search_limit=1000)
    emulator.add_pipeline(*PIPELINE)
    await provision_pipedrive_app(emulator, RULES.field_map)
    slow = FaultInjector(cast(Any, emulator.app), rate=1.0, kinds=("slow",), slow_seconds=LATE,
                         exempt=first("POST", "/api/v2/deals"))
    # The person's merged write after the lost deal create fails (retryably): the worker
    # retries the event's upsert, then applies its stage and deal again.
    failing = FaultInjector(cast(Any, slow), rate=1.0, kinds=("server_error",),
                            exempt=first("PATCH", "/api/v2/persons/",
                                         after=lambda: bool(slow.injected)))
    for event_type, data in story("tok_late")[2:3]:
        await storage.inbox.store(new_event(event_type, data))
    with serve(failing) as url:
        async with httpx.AsyncClient(timeout=TIMEOUT) as client:
            target = PipedriveTarget(client, api_token=PIPEDRIVE_TOKEN, base_url=url,
                                     field_map=RULES.field_map, identities=storage.identities,
                                     rate_limits=storage.rate_limits, burst_limit=1000,
                                     search_limit=1000)
            await target.start()
            worker = Worker(storage, RULES, [target], options=WorkerOptions(
                policy=RetryPolicy(base=0.01, cap=0.02, rng=random.Random(1))))
            await drain(worker, storage, 1)
        await asyncio.sleep(LATE)  # a create still sleeping in the emulator lands too
    assert slow.injected == {"slow": 1} and failing.injected == {"server_error": 1}
    statuses = (await storage.inbox.stats()).by_status
    assert {k: v for k, v in statuses.items() if v} == {"processed": 1}
    [person] = emulator.live("person")
    assert [d["person_id"] for d in emulator.live("deal")] == [person["id"]]
