"""Leases while events are in flight: kept for as long as an event runs, given up when lost."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from engine.rules.model import RuleSet
from engine.storage import InboxEvent, Storage
from engine.worker.loop import Worker, WorkerOptions
from tests.support.worker_helpers import FakeTarget, store, wait_until, write_rules

pytestmark = pytest.mark.anyio
BACKENDS = ("sqlite", "postgresql")  # every test runs on both

LEASE = 0.6


@pytest.fixture
def rules(tmp_path: Path) -> RuleSet:
    return write_rules(tmp_path / "rules")


async def test_events_running_longer_than_a_lease_keep_it(
    storage: Storage, rules: RuleSet
) -> None:
    target = FakeTarget()
    slow = [await store(storage, "install.tracked", token=f"tok_{n}") for n in range(3)]
    for event_id in slow:
        target.gates[event_id] = asyncio.Event()
    worker = Worker(storage, rules, [target], options=WorkerOptions(lease_seconds=LEASE))
    running = asyncio.create_task(worker.run())
    try:
        await wait_until(lambda: set(target.started) == set(slow), what="all three started")
        # Four lease lengths later another worker still finds every event held.
        for _ in range(8):
            await asyncio.sleep(LEASE / 2)
            assert await storage.inbox.claim("another-worker", 10, LEASE) == []
        for gate in target.gates.values():
            gate.set()
        await wait_until(lambda: _all_processed(storage, slow), what="the events to finish")
    finally:
        worker.stop()
        await running
    assert sorted(event_id for event_id, _, _ in target.calls) == sorted(slow * 2)


async def test_an_event_whose_lease_is_lost_is_abandoned_not_raced(
    storage: Storage, rules: RuleSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = FakeTarget()
    lost = await store(storage, "install.tracked", token="tok_lost")
    kept = await store(storage, "install.tracked", token="tok_kept")
    target.gates[lost] = asyncio.Event()
    target.gates[kept] = asyncio.Event()
    extend = storage.inbox.extend_leases

    async def taken_over(event_ids: list[int], worker_id: str, lease_seconds: float) -> set[int]:
        # As if another worker had claimed `lost` after a pause.
        return await extend([e for e in event_ids if e != lost], worker_id, lease_seconds)

    monkeypatch.setattr(storage.inbox, "extend_leases", taken_over)
    worker = Worker(storage, rules, [target], options=WorkerOptions(lease_seconds=LEASE))
    running = asyncio.create_task(worker.run())
    try:
        await wait_until(lambda: {lost, kept} <= set(target.started), what="both started")
        await asyncio.sleep(LEASE)  # the keeper has run at least once
        target.gates[kept].set()
        await wait_until(lambda: _all_processed(storage, [kept]), what="the kept event")
        event = await storage.inbox.get(lost)
        assert event is not None and event.status == "failed"  # handed back, not finished
        assert [e for e, _, _ in target.calls] == [kept, kept]  # the lost one never went on
    finally:
        worker.stop()
        await running


async def _all_processed(storage: Storage, ids: list[int]) -> bool:
    for event_id in ids:
        event = await storage.inbox.get(event_id)
        if event is None or event.status != "processed":
            return False
    return True


async def test_a_claim_keeps_its_leases_while_it_is_being_planned(
    storage: Storage, rules: RuleSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Planning a large claim on a busy machine can take a good part of a lease: the leases
    # are kept from the moment the claim returns, not from when each event starts.
    target = FakeTarget()
    ids = [await store(storage, "install.tracked", token=f"tok_{n}") for n in range(3)]
    worker = Worker(storage, rules, [target], options=WorkerOptions(lease_seconds=LEASE))
    slow_planning = asyncio.Event()
    choose = worker.pinned.ruleset_for

    async def slow(event: InboxEvent, active: RuleSet) -> RuleSet:
        slow_planning.set()
        await asyncio.sleep(LEASE * 2)
        return await choose(event, active)

    monkeypatch.setattr(worker.pinned, "ruleset_for", slow)
    running = asyncio.create_task(worker.run())
    try:
        await slow_planning.wait()
        for _ in range(4):  # two lease lengths of planning: nobody else may take them
            await asyncio.sleep(LEASE / 2)
            assert await storage.inbox.claim("another-worker", 10, LEASE) == []
        await wait_until(lambda: _all_processed(storage, ids), what="the events to finish")
    finally:
        worker.stop()
        await running
    assert sorted(event_id for event_id, _, _ in target.calls) == sorted(ids * 2)


async def test_an_event_lost_while_its_claim_is_planned_is_never_started(
    storage: Storage, rules: RuleSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = FakeTarget()
    lost = await store(storage, "install.tracked", token="tok_lost")
    kept = await store(storage, "install.tracked", token="tok_kept")
    worker = Worker(storage, rules, [target], options=WorkerOptions(lease_seconds=LEASE))
    extend = storage.inbox.extend_leases
    extended = asyncio.Event()

    async def taken_over(event_ids: list[int], worker_id: str, lease_seconds: float) -> set[int]:
        kept_ids = await extend([e for e in event_ids if e != lost], worker_id, lease_seconds)
        extended.set()
        return kept_ids

    choose = worker.pinned.ruleset_for

    async def planned_after_a_renewal(event: InboxEvent, active: RuleSet) -> RuleSet:
        await extended.wait()
        return await choose(event, active)

    monkeypatch.setattr(storage.inbox, "extend_leases", taken_over)
    monkeypatch.setattr(worker.pinned, "ruleset_for", planned_after_a_renewal)
    running = asyncio.create_task(worker.run())
    try:
        await wait_until(lambda: _all_processed(storage, [kept]), what="the kept event")
    finally:
        worker.stop()
        await running
    assert {event_id for event_id, _, _ in target.calls} == {kept}
    event = await storage.inbox.get(lost)
    assert event is not None and event.status == "received"  # left to whoever holds it


async def test_a_worker_that_paused_past_a_lease_does_not_start_its_own_event_twice(
    storage: Storage, rules: RuleSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = FakeTarget()
    event_id = await store(storage, "install.tracked", token="tok_paused")
    target.gates[event_id] = asyncio.Event()

    async def paused(event_ids: list[int], worker_id: str, lease_seconds: float) -> set[int]:
        return set(event_ids)  # the keeper's writes never land: the lease runs out

    monkeypatch.setattr(storage.inbox, "extend_leases", paused)
    worker = Worker(storage, rules, [target],
                    options=WorkerOptions(lease_seconds=LEASE, poll_interval=0.05))
    running = asyncio.create_task(worker.run())
    try:
        await wait_until(lambda: target.started == [event_id], what="the event to start")
        # Past its lease the worker's own claims find the event again, and again.
        reclaimed = await _wait_for_reclaim(storage, event_id)
        assert reclaimed > 1
        assert target.started == [event_id]  # one task at work on it, not two
        target.gates[event_id].set()
        await wait_until(lambda: _all_processed(storage, [event_id]), what="the event")
    finally:
        worker.stop()
        await running
    assert [e for e, _, _ in target.calls] == [event_id, event_id]  # each action once


async def _wait_for_reclaim(storage: Storage, event_id: int) -> int:
    for _ in range(100):
        await asyncio.sleep(LEASE / 2)
        event = await storage.inbox.get(event_id)
        assert event is not None
        if event.attempts > 2:
            return event.attempts - 1
    raise AssertionError("the worker never claimed its own event again")


async def test_an_event_task_failing_on_a_bug_lets_its_leases_run_out(
        storage: Storage, rules: RuleSet, monkeypatch: pytest.MonkeyPatch) -> None:
    """A task that fails without letting go of its events (a bug) is not kept alive in the
    store forever: its leases run out, and the events are claimed again and finished."""
    ids = [await store(storage, "install.tracked", token=f"t{n}", prefix="p") for n in range(2)]
    target = FakeTarget()
    worker = Worker(storage, rules, [target], options=WorkerOptions(
        lease_seconds=LEASE, poll_interval=0.05))
    real = worker._process
    failing, failed = True, 0

    async def buggy(*args: object, **kwargs: object) -> None:
        nonlocal failed
        if failing:
            failed += 1
            raise RuntimeError("a bug before the event's task took its lease")
        await real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(worker, "_process", buggy)
    running = asyncio.create_task(worker.run())
    try:
        await wait_until(lambda: failed >= 2 and worker.leases.held == 0, timeout=5)
        failing = False

        async def all_processed() -> bool:
            events = [await storage.inbox.get(i) for i in ids]
            return all(e is not None and e.status == "processed" for e in events)

        await wait_until(all_processed, timeout=10, what="the events claimed again")
    finally:
        worker.stop()
        await running
    assert len(target.calls) == 4  # each event's two actions, once
