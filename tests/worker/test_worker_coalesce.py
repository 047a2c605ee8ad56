"""A backlog waiting for a batching CRM is coalesced through the real worker: every event of an
identity shares one write, in arrival order, and an earlier event that must be retried is
applied again before the later one is."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from pathlib import Path

import httpx
import pytest

from engine.actions import Action, IdentityKey, UpsertContact
from engine.errors import PermanentCRMError, RetryableCRMError
from engine.storage import Storage
from engine.targets.base import CallContext, Outcome
from engine.targets.hubspot.target import HubSpotTarget
from engine.worker.batch import Batcher
from engine.worker.loop import Worker, WorkerOptions
from engine.worker.retrying import RetryPolicy
from tests.emulators.hubspot import create_hubspot_emulator
from tests.support.crm_stack import HUBSPOT_TOKEN, provision_hubspot_app
from tests.support.worker_helpers import new_event, shipped_rules, store, write_rules

pytestmark = pytest.mark.anyio
RULES = shipped_rules()


def story(token: str) -> list[tuple[str, dict[str, str]]]:
    return [
        ("install.tracked", {"token": token, "prefix": "invite", "campaign": "spring",
                             "platform": "iOS"}),
        ("referral.created", {"token": token, "referrer_token": "tok_ref"}),
        ("referral.completed", {"token": token, "referrer_token": "tok_ref"}),
        ("app.user_identified", {"token": token, "email": f"{token}@example.com",
                                 "first_name": "Ada", "last_name": "L", "user_id": token}),
    ]


async def test_a_backlog_for_a_rate_limited_hubspot_goes_out_in_the_one_batch_floor(
        storage: Storage) -> None:
    """200 people's stories, each step of everyone before the next step of anyone (the order
    that makes one-event-at-a-time the costliest): 800 events, 2,000 actions. The floor is a
    batch read and a batch write per 100 contacts and per 100 deals: 8 requests."""
    app, state = create_hubspot_emulator(HUBSPOT_TOKEN, rate_limit=100, window_seconds=10.0)
    await provision_hubspot_app(app, state, RULES.field_map)
    people = [f"tok_{n:03}" for n in range(200)]
    for step in range(4):
        for token in people:
            event_type, data = story(token)[step]
            await storage.inbox.store(new_event(event_type, data))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app)) as client:
        target = HubSpotTarget(client, HUBSPOT_TOKEN, RULES.field_map, storage.identities,
                               storage.rate_limits, base_url="http://hubspot")
        await Worker(storage, RULES, [target]).run_until_idle()
    assert (await storage.inbox.stats()).by_status.get("processed") == 800
    assert sum(state.requests.values()) <= 8 * 1.5, state.requests
    assert state.throttled == 0
    contacts = {r.properties["deep_link_token"]: r.properties
                for r in state.contacts.records.values()}
    assert set(contacts) == set(people)
    for token, properties in contacts.items():  # every step applied, in order
        assert properties["lifecyclestage"] == "customer"
        assert properties["email"] == f"{token}@example.com"
        assert properties["first_touch_campaign"] == "spring"
    assert len(state.deals.records) == 200


class Flaky:
    """A batching target that refuses the first call carrying `refuse` (retryably, or
    permanently when `dead`) and records what it applied, in order."""

    name = "flaky"

    def __init__(self, refuse: str, dead: bool = False) -> None:
        self.refuse, self.dead = refuse, dead
        self.applied: list[tuple[str, str]] = []  # (token, prefix) of each upsert applied
        self.batches: list[list[str]] = []

    async def execute(self, action: Action, context: CallContext) -> Outcome:
        raise AssertionError("the worker must use execute_many")

    async def execute_many(self, items: Sequence[tuple[Action, CallContext]]
                           ) -> list[Outcome | Exception]:
        await asyncio.sleep(0.01)
        results: list[Outcome | Exception] = []
        self.batches.append([str(a.payload().get("set")) for a, _ in items])
        for action, _ in items:
            prefix = str(action.payload().get("set", {}).get("deep_link_prefix", ""))
            if prefix and prefix == self.refuse:
                if not self.dead:
                    self.refuse = "(refused once)"
                error = PermanentCRMError if self.dead else RetryableCRMError
                results.append(error(f"refused {prefix}"))
                continue
            if isinstance(action, UpsertContact):
                self.applied.append((action.identity[0].value, prefix))
            results.append(Outcome(action.identity[0].value, "ok"))
        return results

    async def aclose(self) -> None:
        return None


async def drain(worker: Worker, storage: Storage, events: int) -> None:
    """Run until every event is finished (a deferred part comes back a second later)."""
    async with asyncio.timeout(30):
        while True:
            await worker.run_until_idle()
            by_status = (await storage.inbox.stats()).by_status
            if by_status.get("processed", 0) + by_status.get("dead", 0) >= events:
                return
            await asyncio.sleep(0.1)


async def test_an_earlier_event_retried_is_applied_again_before_the_later_one(
        storage: Storage, tmp_path: Path) -> None:
    """The later event rode in the same batch as the earlier one, whose action failed: its
    answer is dropped and it is applied again once the earlier one is, so the identity ends
    with the later event's values, and its outcome is recorded after the earlier one's."""
    rules = write_rules(tmp_path / "rules")
    first = await store(storage, "install.tracked", token="t0", prefix="one")
    second = await store(storage, "install.tracked", token="t0", prefix="two")
    target = Flaky(refuse="one")
    worker = Worker(storage, rules, [target], options=WorkerOptions(
        policy=RetryPolicy(base=0.01, cap=0.02)))
    await drain(worker, storage, 2)
    assert [p for _, p in target.applied] == ["two", "one", "two"]
    assert (await storage.inbox.stats()).by_status.get("processed") == 2
    assert any(len(batch) > 2 for batch in target.batches)  # both events shared a batch
    ok = {o.event_id: o for event in (first, second)
          for o in await storage.outcomes.of_event(event)
          if o.status == "ok" and o.action_kind == "upsert_contact"}
    assert ok[first].updated_at <= ok[second].updated_at


async def test_a_permanent_error_in_a_merged_write_dead_letters_only_its_own_action(
        storage: Storage, tmp_path: Path) -> None:
    rules = write_rules(tmp_path / "rules")
    await store(storage, "install.tracked", token="t0", prefix="bad")
    await store(storage, "install.tracked", token="t0", prefix="fine")
    target = Flaky(refuse="bad", dead=True)
    await drain(Worker(storage, rules, [target]), storage, 2)
    dead = await storage.inbox.list_events(status="dead", limit=10)
    assert len(dead) == 1 and "refused bad" in (dead[0].last_error or "")
    assert target.applied[-1] == ("t0", "fine")


def call(token: str, *more: str) -> UpsertContact:
    keys = (IdentityKey("deep_link_token", token), *(IdentityKey("email", m) for m in more))
    return UpsertContact("r", keys)


class Recorder:
    name = "recorder"

    def __init__(self) -> None:
        self.batches: list[list[str]] = []

    async def execute(self, action: Action, context: CallContext) -> Outcome:
        raise AssertionError("execute_many only")

    async def execute_many(self, items: Sequence[tuple[Action, CallContext]]
                           ) -> list[Outcome | Exception]:
        self.batches.append([context.idempotency_key for _, context in items])
        await asyncio.sleep(0.01)
        return [Outcome(None, "ok") for _ in items]

    async def aclose(self) -> None:
        return None


async def test_a_batch_counts_records_and_takes_every_queued_call_on_them() -> None:
    """`size` counts records (first identity keys): an identify's email does not count again,
    a record's later calls join its batch, and a call whose earlier call on one of its keys
    was left behind waits for the next batch."""
    target = Recorder()
    batcher = Batcher(target, size=2)
    answers = [batcher.submit(call("a"), CallContext("a1")),
               batcher.submit(call("b", "b@x"), CallContext("b1")),
               batcher.submit(call("c", "c@x"), CallContext("c1")),
               batcher.submit(call("a", "a@x"), CallContext("a2")),
               batcher.submit(call("b", "c@x"), CallContext("b2")),
               batcher.submit(call("c"), CallContext("c2"))]
    await asyncio.gather(*answers)
    assert target.batches == [["a1", "b1", "a2"], ["c1", "b2", "c2"]]
    await batcher.aclose()


async def test_a_record_waits_for_its_calls_still_coming_at_most_hold_seconds() -> None:
    target = Recorder()
    coming = {IdentityKey("deep_link_token", "a")}
    batcher = Batcher(target, size=10, coming=lambda key: key in coming, hold=0.5)
    first = batcher.submit(call("a"), CallContext("a1"))
    other = batcher.submit(call("b"), CallContext("b1"))
    await other
    assert target.batches == [["b1"]]  # b is complete: it goes; a waits for its next event
    later = batcher.submit(call("a"), CallContext("a2"))
    coming.clear()
    await asyncio.gather(first, later)
    assert target.batches == [["b1"], ["a1", "a2"]]
    coming.add(IdentityKey("deep_link_token", "z"))
    loop = asyncio.get_running_loop()
    started = loop.time()
    await batcher.submit(call("z"), CallContext("z1"))  # never completed: goes after `hold`
    assert loop.time() - started >= 0.5
    await batcher.aclose()


class Gated:
    """Holds each batch until the test opens its gate, to see what goes while one is out."""

    name = "gated"

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.gates: list[asyncio.Event] = []

    async def execute(self, action: Action, context: CallContext) -> Outcome:
        raise AssertionError("execute_many only")

    async def execute_many(self, items: Sequence[tuple[Action, CallContext]]
                           ) -> list[Outcome | Exception]:
        self.batches.append([context.idempotency_key for _, context in items])
        gate = asyncio.Event()
        self.gates.append(gate)
        await gate.wait()
        return [Outcome(None, "ok") for _ in items]

    async def aclose(self) -> None:
        return None


async def until(condition: Callable[[], bool]) -> None:
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.002)
    raise AssertionError("timed out")


async def test_full_batches_overlap_one_in_flight_but_never_share_an_identity_with_it() -> None:
    """A backlog's full batches go while another is out (up to `in_flight`); a partial one
    waits for the batches in flight, and a call on an identity in flight waits for its
    answer, so an identity's calls still go one batch after another."""
    target = Gated()
    batcher = Batcher(target, size=2, in_flight=2)
    a1 = batcher.submit(call("a"), CallContext("a1"))
    await until(lambda: len(target.batches) == 1)  # alone: it goes at once
    rest = [batcher.submit(call(token), CallContext(key)) for token, key in
            [("b", "b1"), ("a", "a2"), ("c", "c1"), ("d", "d1"), ("e", "e1")]]
    await until(lambda: len(target.batches) == 2)
    # b and c fill a batch beside a1's; a2 waits for a1's answer; d, e would be a third
    # batch in flight, one more than `in_flight`.
    assert target.batches == [["a1"], ["b1", "c1"]]
    await asyncio.sleep(0.05)
    assert len(target.batches) == 2
    target.gates[0].set()
    await a1
    await until(lambda: len(target.batches) == 3)
    assert target.batches[2] == ["a2", "d1"]  # full again: goes beside b1/c1's
    await asyncio.sleep(0.05)
    assert len(target.batches) == 3  # e alone is partial: it waits for the pipe to empty
    target.gates[1].set()
    target.gates[2].set()
    await until(lambda: len(target.batches) == 4)
    assert target.batches[3] == ["e1"]
    target.gates[3].set()
    assert all(isinstance(answer, Outcome) for answer in await asyncio.gather(*rest))
    await batcher.aclose()


async def test_closing_stops_the_batches_in_flight() -> None:
    target = Gated()
    batcher = Batcher(target, size=1, in_flight=2)
    answers = [batcher.submit(call(token), CallContext(token)) for token in "ab"]
    await until(lambda: len(target.batches) == 2)
    await batcher.aclose()
    assert all(answer.cancelled() for answer in answers)


async def test_a_batch_that_breaks_fails_its_calls_and_logs_no_event_data(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    batcher = Batcher(Recorder(), size=10)

    async def broken(batch: Sequence[object], results: list[object]) -> None:
        raise RuntimeError("ada@example.com")

    monkeypatch.setattr(batcher, "_alone", broken)
    answers = [batcher.submit(call(token), CallContext(token)) for token in "ab"]
    results = await asyncio.gather(*answers, return_exceptions=True)
    assert all(isinstance(result, RuntimeError) for result in results)
    assert "a batch failed" in caplog.text and "ada@example.com" not in caplog.text
    assert (await batcher.submit(call("c"), CallContext("c"))).summary == "ok"  # still sends
    await batcher.aclose()
