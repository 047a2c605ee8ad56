"""The worker under concurrency: per-identity order, target isolation, leases, graceful stop."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from engine.errors import RetryableCRMError
from engine.rules.model import RuleSet
from engine.storage import Storage
from engine.worker.loop import Worker, WorkerOptions
from tests.support.worker_helpers import FakeTarget, new_event, store, wait_until, write_rules

pytestmark = pytest.mark.anyio


@pytest.fixture
def rules(tmp_path: Path) -> RuleSet:
    return write_rules(tmp_path / "rules")


async def _status(storage: Storage, event_id: int) -> str:
    event = await storage.inbox.get(event_id)
    assert event is not None
    return event.status


async def test_a_slow_event_holds_back_the_next_one_for_its_identity_only(
    storage: Storage, rules: RuleSet
) -> None:
    target = FakeTarget()
    first = await store(storage, "install.tracked", token="tok_a", prefix="one")
    second = await store(storage, "install.tracked", token="tok_a", prefix="two")
    other = await store(storage, "install.tracked", token="tok_b", prefix="one")
    target.gates[first] = asyncio.Event()
    worker = Worker(storage, rules, [target], options=WorkerOptions(order_wait=30))
    running = asyncio.create_task(worker.run())
    try:
        await wait_until(lambda: _status(storage, other), what="the other token")
        await wait_until(lambda: target.kinds(other) == ["upsert_contact", "set_stage"])
        await asyncio.sleep(0.2)
        assert first in target.started and target.kinds(second) == []
        target.gates[first].set()
        await wait_until(lambda: len(target.kinds(second)) == 2, what="the second event")
        order = [e for e in target.events() if e in (first, second)]
        assert order == [first, first, second, second]
        await wait_until(lambda: _status(storage, second), what="finish")
    finally:
        worker.stop()
        await running
    assert [await _status(storage, e) for e in (first, second, other)] == ["processed"] * 3


async def test_two_events_of_one_identity_never_run_at_the_same_time(
    storage: Storage, rules: RuleSet
) -> None:
    target = FakeTarget(delay=0.02)
    ids = [await store(storage, "install.tracked", token="tok_a", prefix=f"p{n}")
           for n in range(6)]
    await Worker(storage, rules, [target],
                 options=WorkerOptions(concurrency=4, order_wait=30)).run_until_idle()
    assert target.max_active == 1
    assert [e for e in target.events()] == [e for e in ids for _ in range(2)]


async def test_a_claim_checks_order_once_and_only_blocked_events_check_again(
    storage: Storage, rules: RuleSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One read checks the whole claim once its keys are recorded; an event that had nothing
    # earlier goes straight on, and only the one behind an earlier event of its identity
    # checks again (and waits for it).
    target = FakeTarget(delay=0.02)
    first = await store(storage, "install.tracked", token="tok_a", prefix="one")
    others = [await store(storage, "install.tracked", token=f"tok_{n}") for n in range(3)]
    second = await store(storage, "install.tracked", token="tok_a", prefix="two")
    claims: list[list[int]] = []
    checked: list[int] = []
    many, one = storage.inbox.earlier_pending_many, storage.inbox.earlier_unfinished

    async def claim_check(wanted: dict[int, list[str]]) -> object:
        claims.append(sorted(wanted))
        return await many(wanted)

    async def own_check(event_id: int, keys: list[str]) -> list[int]:
        checked.append(event_id)
        return await one(event_id, keys)

    monkeypatch.setattr(storage.inbox, "earlier_pending_many", claim_check)
    monkeypatch.setattr(storage.inbox, "earlier_unfinished", own_check)
    await Worker(storage, rules, [target],
                 options=WorkerOptions(concurrency=8, order_wait=30)).run_until_idle()
    assert claims[0] == sorted([first, *others, second])
    assert set(checked) == {second}
    assert [e for e in target.events() if e in (first, second)] == [first] * 2 + [second] * 2


async def test_an_event_never_holds_the_slot_its_earlier_event_needs_to_be_claimed(
    storage: Storage, rules: RuleSet
) -> None:
    # Two receivers' clocks: the second event to commit was received a moment sooner, so
    # claims (earliest due first) take it before the first one, which has no keys recorded
    # yet. With one slot, waiting in-process for an event nobody holds waits for nothing.
    target = FakeTarget()
    now = datetime.now(UTC)
    first, second = [(await storage.inbox.store(replace(
        new_event("install.tracked", {"token": "tok_a", "prefix": prefix}),
        received_at=received))).id
        for prefix, received in (("one", now), ("two", now - timedelta(seconds=1)))]
    worker = Worker(storage, rules, [target],
                    options=WorkerOptions(concurrency=1, order_wait=30))
    running = asyncio.create_task(worker.run())
    try:
        await wait_until(lambda: len(target.kinds(second)) == 2, timeout=10,
                         what="both events, well within the 30 s order wait")
    finally:
        worker.stop()
        await running
    assert target.events() == [first, first, second, second]
    assert [await _status(storage, e) for e in (first, second)] == ["processed"] * 2


async def test_events_of_different_identities_run_in_parallel_up_to_the_concurrency(
    storage: Storage, rules: RuleSet
) -> None:
    target = FakeTarget(delay=0.05)
    for n in range(9):
        await store(storage, "install.tracked", token=f"tok_{n}")
    await Worker(storage, rules, [target],
                 options=WorkerOptions(concurrency=3)).run_until_idle()
    assert target.max_active == 3 and len(target.calls) == 18


async def test_a_failing_target_does_not_hold_back_another(
    storage: Storage, rules: RuleSet
) -> None:
    good = FakeTarget("good")
    down = FakeTarget("down", always=RetryableCRMError("down: 503", retry_after=300))
    a = await store(storage, "install.tracked", token="tok_a", prefix="one")
    b = await store(storage, "install.tracked", token="tok_a", prefix="two")
    c = await store(storage, "install.tracked", token="tok_c")
    await Worker(storage, rules, [good, down],
                 options=WorkerOptions(order_wait=0.1)).run_until_idle()
    # The good target applied everything, in order per identity, although `down` still
    # owes event a and so holds back event b on `down` only.
    assert sorted(good.events()) == [a, a, b, b, c, c]
    assert [e for e in good.events() if e in (a, b)] == [a, a, b, b]
    assert sorted(e for e in down.events()) == [a, c]
    for event_id in (a, b, c):
        assert await _status(storage, event_id) == "failed"
        outcomes = {(o.target, o.action_kind): o.status
                    for o in await storage.outcomes.of_event(event_id)}
        assert outcomes[("good", "upsert_contact")] == outcomes[("good", "set_stage")] == "ok"
    assert ("down", "upsert_contact") not in {
        (o.target, o.action_kind) for o in await storage.outcomes.of_event(b)}


async def test_a_stuck_target_does_not_slow_down_another(
    storage: Storage, rules: RuleSet
) -> None:
    fast = FakeTarget("fast")
    stuck = FakeTarget("stuck")
    ids = [await store(storage, "install.tracked", token=f"tok_{n}") for n in range(10)]
    for event_id in ids:
        stuck.gates[event_id] = asyncio.Event()
    worker = Worker(storage, rules, [fast, stuck],
                    options=WorkerOptions(concurrency=2, busy_wait=0.2))
    running = asyncio.create_task(worker.run())
    try:
        await wait_until(lambda: len(fast.calls) == 20, timeout=5, what="the fast target")
        assert stuck.calls == [] and stuck.active == 2  # its lane is full, and only its lane
        for gate in stuck.gates.values():
            gate.set()
        await wait_until(lambda: len(stuck.calls) == 20, timeout=10, what="the stuck target")
    finally:
        worker.stop()
        await running
    assert len(fast.calls) == 20  # deferred events did not run the fast target twice


async def test_healthy_targets_under_load_defer_nothing(
    storage: Storage, rules: RuleSet
) -> None:
    one, two = FakeTarget("one", delay=0.01), FakeTarget("two", delay=0.02)
    ids = [await store(storage, "install.tracked", token=f"tok_{n}") for n in range(30)]
    await Worker(storage, rules, [one, two],
                 options=WorkerOptions(concurrency=2)).run_until_idle()
    for event_id in ids:
        event = await storage.inbox.get(event_id)
        assert event is not None and (event.status, event.attempts) == ("processed", 1)
    assert one.max_active == two.max_active == 2


async def test_a_lease_is_extended_while_an_event_takes_long(
    storage: Storage, rules: RuleSet
) -> None:
    target = FakeTarget(delay=0.5)
    event_id = await store(storage, "install.tracked", token="tok_a")
    options = WorkerOptions(lease_seconds=0.3)
    first, second = (Worker(storage, rules, [target], options=options) for _ in range(2))
    runs = [asyncio.create_task(first.run())]
    await wait_until(lambda: target.active == 1, what="the first call")
    runs.append(asyncio.create_task(second.run()))  # would steal it if the lease lapsed
    await wait_until(lambda: _status(storage, event_id), what="processing")
    await wait_until(lambda: len(target.calls) == 2, what="both actions")
    await asyncio.sleep(0.4)
    first.stop()
    second.stop()
    await asyncio.gather(*runs)
    assert await _status(storage, event_id) == "processed"
    assert len(target.calls) == 2 and len(target.started) == 2


async def test_stop_releases_in_flight_events_for_the_next_worker(
    storage: Storage, rules: RuleSet
) -> None:
    target = FakeTarget()
    event_id = await store(storage, "install.tracked", token="tok_a")
    target.gates[event_id] = asyncio.Event()
    worker = Worker(storage, rules, [target], options=WorkerOptions(drain_timeout=0.1))
    running = asyncio.create_task(worker.run())
    await wait_until(lambda: target.active == 1, what="the call")
    worker.stop()
    await asyncio.wait_for(running, timeout=5)
    event = await storage.inbox.get(event_id)
    assert event is not None and event.status == "failed" and event.lease_owner is None
    target.gates.clear()
    await Worker(storage, rules, [target]).run_until_idle()  # due at once, not after a lease
    assert await _status(storage, event_id) == "processed"


async def test_cancelling_the_worker_task_stops_it_too(storage: Storage, rules: RuleSet) -> None:
    worker = Worker(storage, rules, [FakeTarget()])
    running = asyncio.create_task(worker.run())
    await asyncio.sleep(0.05)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
