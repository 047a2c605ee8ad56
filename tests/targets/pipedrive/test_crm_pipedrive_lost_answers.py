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
from engine.rules.evaluator import plan
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


async def drain(storage: Storage, app: Any, events: list[tuple[str, dict[str, Any]]]) -> None:
    """Store `events` one at a time, each applied through the worker before the next."""
    with serve(app) as url:
        async with httpx.AsyncClient(timeout=TIMEOUT) as client:
            worker = Worker(storage, RULES, [target(client, url, storage)],
                            options=WorkerOptions(policy=RetryPolicy(
                                base=0.01, cap=0.02, rng=random.Random(1))))
            for done, (event_type, data) in enumerate(events, 1):
                await storage.inbox.store(new_event(event_type, data))
                async with asyncio.timeout(60):
                    while (await storage.inbox.stats()).by_status.get("processed", 0) < done:
                        await worker.run_until_idle()
                        await asyncio.sleep(0.1)
        await asyncio.sleep(LATE)  # a create still sleeping in the emulator lands too


async def test_a_deal_create_that_commits_late_is_not_made_again_when_the_batch_is_retried(
        storage: Storage) -> None:
    """A sign-up makes the person; then its conversion in one batch: the stage waits for the
    merged PATCH at the end of the batch, and the deal create commits after the timeout. The
    PATCH then fails (503): the worker retries the stage and applies the deal again at once,
    its first answer dropped. Without the target's own wait the deal's retry searches and
    lists before the late create has landed, and makes a second deal."""
    emulator = await provisioned()
    slow = FaultInjector(cast(Any, emulator.app), rate=1.0, kinds=("slow",), slow_seconds=LATE,
                         exempt=first("POST", "/api/v2/deals"))
    failing = FaultInjector(cast(Any, slow), rate=1.0, kinds=("server_error",),
                            exempt=first("PATCH", "/api/v2/persons/",
                                         after=lambda: bool(slow.injected)))
    await drain(storage, failing, [
        ("referral.created", {"token": "tok_late", "referrer_token": "tok_ref"}),
        ("referral.completed", {"token": "tok_late", "referrer_token": "tok_ref"})])
    assert slow.injected == {"slow": 1} and failing.injected == {"server_error": 1}
    [person] = emulator.live("person")
    assert [d["person_id"] for d in emulator.live("deal")] == [person["id"]]


async def test_a_new_persons_deal_that_commits_late_is_made_once(storage: Storage) -> None:
    """A conversion for someone Pipedrive has never seen: the person is created at the end of
    the batch with its stage in the create, then its deal, whose create commits after the
    timeout. The retry waits it out and finds it: one person, one deal, no PATCH."""
    emulator = await provisioned()
    slow = FaultInjector(cast(Any, emulator.app), rate=1.0, kinds=("slow",), slow_seconds=LATE,
                         exempt=first("POST", "/api/v2/deals"))
    await drain(storage, slow, [
        ("referral.completed", {"token": "tok_late", "referrer_token": "tok_ref"})])
    assert slow.injected == {"slow": 1}
    [person] = emulator.live("person")
    assert [d["person_id"] for d in emulator.live("deal")] == [person["id"]]
    assert emulator.calls["POST /api/v2/persons"] == 1
    assert emulator.calls["PATCH /api/v2/persons/{id}"] == 0
    stage = person["custom_fields"][emulator.field_key("person", "Lifecycle stage")]
    assert stage is not None


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


async def test_a_new_persons_create_that_loses_its_answer_fails_every_item_that_waited_for_it(
        storage: Storage) -> None:
    """A batch's new person is created at its end, with the changes of every later action of
    the batch; its deal waits for it. The create commits and its answer is lost: every item
    that named the person, and the deal, gets the error (the deal is never sent without its
    person). Applied again, the batch finds the person it made and makes the deal: one of
    each, with every field."""
    emulator = await provisioned()
    dropped = FaultInjector(cast(Any, emulator.app), rate=1.0, kinds=("drop_after_commit",),
                            exempt=first("POST", "/api/v2/persons"))
    token = "tok_drop"
    events = [("referral.created", {"token": token, "referrer_token": "tok_ref"}),
              ("referral.completed", {"token": token, "referrer_token": "tok_ref"}),
              ("app.user_identified", {"token": token, "email": "drop@example.com"})]
    items = [(action, CallContext(f"{n}:{i}")) for n, (kind, data) in enumerate(events)
             for i, action in enumerate(plan({"event": kind, "timestamp": "2026-03-01T12:00:00Z",
                                              "data": data}, RULES).actions)]
    with serve(dropped) as url:
        async with httpx.AsyncClient(timeout=TIMEOUT) as client:
            pipedrive = target(client, url, storage)
            failed = await pipedrive.execute_many(items)
            assert dropped.injected == {"drop_after_commit": 1}
            assert all(isinstance(r, RetryableCRMError) for r in failed), failed
            assert emulator.calls["POST /api/v2/deals"] == 0
            wait = max(r.retry_after or 0.0 for r in failed if isinstance(r, Exception))
            await asyncio.sleep(wait)
            again = await pipedrive.execute_many(items)
    assert not any(isinstance(r, Exception) for r in again), again
    [person] = emulator.live("person")
    [deal] = emulator.live("deal")
    assert deal["person_id"] == person["id"]
    assert person["emails"][0]["value"] == "drop@example.com"
    assert emulator.calls["POST /api/v2/persons"] == 1
