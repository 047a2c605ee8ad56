"""One CRM that hangs never holds up another: deferred backlogs thin out and queue behind new
events, on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from engine.actions import Action
from engine.rules.model import RuleSet
from engine.storage import InboxEvent, Storage, open_storage
from engine.targets.base import CallContext, Outcome
from engine.worker.loop import Worker, WorkerOptions
from tests.storage.contract import FakeClock
from tests.support.worker_helpers import FakeTarget, store, wait_until, write_rules

pytestmark = pytest.mark.anyio
BACKENDS = ("sqlite", "postgresql")  # every test that uses a database runs on both


@pytest.fixture
def rules(tmp_path: Path) -> RuleSet:
    return write_rules(tmp_path / "rules")


class HangingTarget(FakeTarget):
    """A CRM that accepts connections and never answers, until `recover` is set."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.recover = asyncio.Event()

    async def execute(self, action: Action, context: CallContext) -> Outcome:
        self.started.append(context.event_id)
        self.active += 1
        try:
            await self.recover.wait()
        finally:
            self.active -= 1
        return await super().execute(action, context)


async def test_a_hanging_crm_with_a_backlog_does_not_starve_another(
    storage: Storage, rules: RuleSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    healthy, hanging = FakeTarget("healthy"), HangingTarget("hanging")
    claim = storage.inbox.claim

    async def busy_claim(worker_id: str, limit: int, lease_seconds: float) -> list[InboxEvent]:
        # A busy database: each claim takes 20 ms, so going round a backlog of 200 deferred
        # events takes the worker longer than a second, whatever the machine.
        await asyncio.sleep(0.02)
        return await claim(worker_id, limit, lease_seconds)

    monkeypatch.setattr(storage.inbox, "claim", busy_claim)
    backlog = 200
    for n in range(backlog):
        await store(storage, "install.tracked", token=f"old_{n}")
    worker = Worker(storage, rules, [healthy, hanging],
                    options=WorkerOptions(concurrency=2, busy_wait=0.2))
    running = asyncio.create_task(worker.run())
    try:
        # Every event of the backlog reaches the healthy CRM, although the hanging one's share
        # of each is deferred again and again.
        await wait_until(lambda: len(healthy.calls) == 2 * backlog, timeout=30,
                         what="the backlog on the healthy CRM")
        assert hanging.active == 2  # the hanging CRM holds its own lane, and only that
        # Events that arrive now queue behind the deferred backlog only as far as it fell due
        # before them, and the backlog comes back ever more rarely: they go through promptly.
        latencies = []
        for n in range(10):
            started = time.monotonic()
            event_id = await store(storage, "install.tracked", token=f"new_{n}")
            await wait_until(lambda e=event_id: len(healthy.kinds(e)) == 2,
                             timeout=10, what=f"new event {n} on the healthy CRM")
            latencies.append(time.monotonic() - started)
            await asyncio.sleep(0.2)
        assert max(latencies[5:]) < 2.0, latencies
        assert hanging.calls == []
    finally:
        hanging.recover.set()
        worker.stop()
        await running


@pytest.mark.parametrize(("token", "first_delay", "lease", "cap"),
                         [("tok_b", 1.0, 60.0, 60.0), ("tok_a", 0.5, 60.0, 30.0),
                          ("tok_a", 0.5, 2.0, 1.0)],
                         ids=["busy-lane", "earlier-event", "earlier-event-short-lease"])
async def test_a_deferred_event_backs_off_per_attempt(
    database_url: str, rules: RuleSet, token: str, first_delay: float, lease: float, cap: float
) -> None:
    """Deferred for a full lane, or behind an earlier event of its identity on a CRM that
    hangs: due again after about `first_delay`, then twice as long with every attempt, up to
    `cap` (behind an earlier event: half a lease, so a finished or crashed blocker costs at
    most that)."""
    clock = FakeClock()
    clock.now = datetime.now(UTC)
    storage = open_storage(database_url, clock=clock)
    await storage.migrate()
    hanging = HangingTarget("hanging")
    first = await store(storage, "install.tracked", token="tok_a")
    second = await store(storage, "install.tracked", token=token, prefix="second")
    # order_wait=30: an event behind a hanging CRM must not sit out the order wait in-process.
    # poll_interval=0.05: the worker soon finds the event the fake clock made due, so little
    # real time passes while the CRM hangs (no deferral is shorter than the lane has been stuck).
    worker = Worker(storage, rules, [FakeTarget("healthy"), hanging], clock=clock,
                    options=WorkerOptions(concurrency=1, busy_wait=0.05, order_wait=30,
                                          poll_interval=0.05, lease_seconds=lease))
    running = asyncio.create_task(worker.run())
    delays = []

    async def after_attempt(attempts: int) -> InboxEvent | None:
        event = await storage.inbox.get(deferred)
        assert event is not None
        done = event.attempts == attempts and event.lease_owner is None
        return event if done and event.next_attempt_at is not None else None

    try:
        # Both events are claimed together. Of two identities, either may take the lane first
        # (the worker keeps arrival order per identity only, and its reads race); the one that
        # does hangs there and the other is deferred. Behind tok_a, the second one is deferred.
        await wait_until(lambda: hanging.started, timeout=10, what="a call to the hanging CRM")
        holder = hanging.started[0]
        assert token != "tok_a" or holder == first
        deferred = second if holder == first else first
        for attempts in range(1, 5):
            await wait_until(lambda n=attempts: after_attempt(n),
                             timeout=10, what=f"deferral {attempts}")
            event = await after_attempt(attempts)
            assert event is not None and event.next_attempt_at is not None
            delays.append((event.next_attempt_at - clock()).total_seconds())
            clock.now = event.next_attempt_at  # due now: the worker claims it again
        assert hanging.started == [holder]  # deferred every time, never let into the lane
    finally:
        hanging.recover.set()
        worker.stop()
        await running
        await storage.close()
    for attempt, delay in enumerate(delays):
        full = min(first_delay * 2 ** attempt, cap)
        assert full * 0.5 <= delay <= full, (attempt, delays)
