"""A Pipedrive create that loses its answer (it outlives the client's timeout and commits
later) is not sent again before it could have landed, however soon the create is applied again:
exactly one record."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import Any, cast

import httpx
import pytest

from engine.actions import CreateDeal, IdentityKey
from engine.errors import RetryableCRMError
from engine.storage import Storage
from engine.targets.base import CallContext
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
LATE = 1.4  # when a timed-out create commits: after the timeout, before as long again


def first(method: str, path: str, after: Callable[[], bool] = lambda: True
          ) -> Callable[[dict[str, Any]], bool]:
    """`exempt` for a FaultInjector at rate 1: only the first `method path...` sent once
    `after()` holds is faulted."""
    seen: list[str] = []

    def exempt(scope: dict[str, Any]) -> bool:
        if seen or scope["method"] != method or not scope["path"].startswith(path) \
                or not after():
            return True
        seen.append(scope["path"])
        return False

    return exempt


async def provisioned() -> PipedriveEmulator:
    emulator = PipedriveEmulator(api_token=PIPEDRIVE_TOKEN, search_lag=30.0,
                                 burst_limit=1000, search_limit=1000)
    emulator.add_pipeline(*PIPELINE)
    await provision_pipedrive_app(emulator, RULES.field_map)
    return emulator


def target(client: httpx.AsyncClient, url: str, storage: Storage) -> PipedriveTarget:
    return PipedriveTarget(client, api_token=PIPEDRIVE_TOKEN, base_url=url,
                           field_map=RULES.field_map, identities=storage.identities,
                           rate_limits=storage.rate_limits, burst_limit=1000, search_limit=1000)


async def test_a_deal_create_that_commits_late_is_not_made_again_when_the_batch_is_retried(
        storage: Storage) -> None:
    """One conversion in one batch: the person is created, its stage waits for the merged
    PATCH at the end of the batch, and the deal create commits after the timeout. The PATCH
    then fails (503): the worker retries the stage and applies the deal again at once, its
    first answer dropped. Without the target's own wait the deal's retry searches and lists
    before the late create has landed, and makes a second deal."""
    emulator = await provisioned()
    slow = FaultInjector(cast(Any, emulator.app), rate=1.0, kinds=("slow",), slow_seconds=LATE,
                         exempt=first("POST", "/api/v2/deals"))
    failing = FaultInjector(cast(Any, slow), rate=1.0, kinds=("server_error",),
                            exempt=first("PATCH", "/api/v2/persons/",
                                         after=lambda: bool(slow.injected)))
    await storage.inbox.store(new_event("referral.completed",
                                        {"token": "tok_late", "referrer_token": "tok_ref"}))
    with serve(failing) as url:
        async with httpx.AsyncClient(timeout=TIMEOUT) as client:
            worker = Worker(storage, RULES, [target(client, url, storage)],
                            options=WorkerOptions(policy=RetryPolicy(
                                base=0.01, cap=0.02, rng=random.Random(1))))
            async with asyncio.timeout(60):
                while not (await storage.inbox.stats()).by_status.get("processed"):
                    await worker.run_until_idle()
                    await asyncio.sleep(0.1)
        await asyncio.sleep(LATE)  # a create still sleeping in the emulator lands too
    assert slow.injected == {"slow": 1} and failing.injected == {"server_error": 1}
    [person] = emulator.live("person")
    assert [d["person_id"] for d in emulator.live("deal")] == [person["id"]]


async def test_a_create_without_an_answer_is_waited_out_before_its_record_is_looked_for(
        storage: Storage) -> None:
    emulator = await provisioned()
    slow = FaultInjector(cast(Any, emulator.app), rate=1.0, kinds=("slow",), slow_seconds=LATE,
                         exempt=first("POST", "/api/v2/deals"))
    deal = CreateDeal("r", (IdentityKey("deep_link_token", "tok_late"),), key="referral-late")
    with serve(slow) as url:
        async with httpx.AsyncClient(timeout=TIMEOUT) as client:
            pipedrive = target(client, url, storage)
            [lost] = await pipedrive.execute_many([(deal, CallContext("k"))])
            assert isinstance(lost, RetryableCRMError) and lost.retry_after == TIMEOUT
            [early] = await pipedrive.execute_many([(deal, CallContext("k"))])  # at once
            assert isinstance(early, RetryableCRMError) and "may still land" in str(early)
            assert early.retry_after is not None and 0 < early.retry_after <= TIMEOUT
            assert emulator.calls["GET /api/v2/deals/search"] == 1  # not looked for again
            await asyncio.sleep(early.retry_after)
            [found] = await pipedrive.execute_many([(deal, CallContext("k"))])
    assert not isinstance(found, Exception) and not found.created
    assert emulator.calls["POST /api/v2/deals"] == 1
    assert [str(d["id"]) for d in emulator.live("deal")] == [found.record_id]
