"""A claim's events on a lone batching target go in one pass (engine/worker/claimpipe.py):
they finish in one write per wake-up, outcomes included, and every identity's order, every
retry and every stop behaves as on the one-by-one path."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from engine.actions import Action, UpsertContact
from engine.errors import RetryableCRMError
from engine.storage import Storage
from engine.targets.base import CallContext, Outcome
from engine.worker.loop import Worker, WorkerOptions
from engine.worker.retrying import RetryPolicy
from tests.support.worker_helpers import store, write_rules
from tests.worker.test_worker_batch import BatchingTarget

pytestmark = pytest.mark.anyio

FAST = RetryPolicy(base=0.01, cap=0.05)


class Writes:
    """Counts the store's writes of outcomes and finishes."""

    def __init__(self, storage: Storage, monkeypatch: pytest.MonkeyPatch) -> None:
        self.finishes: list[int] = []  # events per finish_many
        self.outcome_writes = 0  # outcomes written apart from a finish
        inbox, outcomes = storage.inbox, storage.outcomes
        finish_many, record_many, record = \
            inbox.finish_many, outcomes.record_many, outcomes.record

        async def counted_finish_many(worker_id: str, finishes: Sequence[Any]) -> list[bool]:
            self.finishes.append(len(finishes))
            return await finish_many(worker_id, finishes)

        async def counted_record_many(rows: Sequence[Any]) -> None:
            self.outcome_writes += 1
            await record_many(rows)

        async def counted_record(row: Any) -> Any:
            self.outcome_writes += 1
            return await record(row)

        monkeypatch.setattr(inbox, "finish_many", counted_finish_many)
        monkeypatch.setattr(outcomes, "record_many", counted_record_many)
        monkeypatch.setattr(outcomes, "record", counted_record)


def applied_prefixes(target: BatchingTarget) -> dict[str, list[str]]:
    """Each token's `deep_link_prefix` values in the order the target applied them."""
    applied: dict[str, list[str]] = {}
    for batch in target.batches:
        for action in batch:
            if isinstance(action, UpsertContact):
                applied.setdefault(action.identity[0].value, []).append(
                    str(action.set["deep_link_prefix"]))
    return applied


async def statuses(storage: Storage) -> dict[str, int]:
    return {k: v for k, v in (await storage.inbox.stats()).by_status.items() if v}


@pytest.mark.parametrize("window", [5000, 3])
async def test_a_claims_events_finish_in_a_few_writes_each_identity_in_arrival_order(
        storage: Storage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        window: int) -> None:
    """Four events for each of six people, in one claim (window 5000) or in claims of three
    whose passes overlap (a later claim's event goes behind an earlier claim's pass in
    progress): every event finishes with its outcomes in one write per wake-up, none of them
    apart, and each person's events reach the CRM in arrival order."""
    rules = write_rules(tmp_path / "rules")
    for round_ in range(4):
        for n in range(6):
            await store(storage, "install.tracked", token=f"t{n}", prefix=f"{round_}-{n}")
    writes = Writes(storage, monkeypatch)
    target = BatchingTarget(latency=0.01)
    worker = Worker(storage, rules, [target], options=WorkerOptions(batch_window=window))
    assert worker.claim_pipeline is not None
    await worker.run_until_idle()
    assert await statuses(storage) == {"processed": 24}
    assert writes.outcome_writes == 0  # every outcome went with its event's finish
    assert sum(writes.finishes) == 24 and len(writes.finishes) <= len(target.batches)
    for token, prefixes in applied_prefixes(target).items():
        rounds = [int(p.split("-")[0]) for p in prefixes]
        assert rounds == sorted(rounds) and set(rounds) == {0, 1, 2, 3}, (token, prefixes)
    for event_id in range(1, 25):
        assert [o.status for o in await storage.outcomes.of_event(event_id)] == ["ok", "ok"]


class FailsFirst(BatchingTarget):
    """Answers the first call on `token` with a retryable error; records every call's
    answer in order."""

    def __init__(self, token: str) -> None:
        super().__init__(latency=0.01)
        self.token = token
        self.failed = False

    async def execute_many(self, items: Sequence[tuple[Action, CallContext]]
                           ) -> list[Outcome | Exception]:
        results = await super().execute_many(items)
        for position, (action, _) in enumerate(items):
            if action.identity[0].value == self.token and not self.failed:
                self.failed = True
                results[position] = RetryableCRMError("try again", retry_after=0.01)
        return results


async def test_a_later_event_waits_for_an_earlier_one_the_crm_asked_to_retry(
        storage: Storage, tmp_path: Path) -> None:
    """The earlier event of t0 is answered "retry" on t0's contact; its later event, answered
    ok in the same batch (the batcher holds back its t0 call), is not kept ahead of it: it
    is applied again after the retry succeeded, so t0 ends with the later event's values."""
    rules = write_rules(tmp_path / "rules")
    await store(storage, "install.tracked", token="t0", prefix="early")
    await store(storage, "install.tracked", token="t1", prefix="other")
    await store(storage, "install.tracked", token="t0", prefix="late")
    target = FailsFirst("t0")
    await settle(Worker(storage, rules, [target], options=WorkerOptions(policy=FAST)),
                 storage, 3)
    assert applied_prefixes(target)["t0"][-1] == "late"


async def test_a_later_event_is_not_recorded_ahead_of_an_earlier_ones_retried_action(
        storage: Storage, tmp_path: Path) -> None:
    """The earlier event touches a@x.com and t0, the later one t0 only; the CRM asks to
    retry the earlier's a@x.com call and answers everything else: the later event's success
    is recorded only after the earlier event's retried action succeeded (a crash in between
    must not leave it on record above an unfinished earlier action)."""
    rules = write_rules(tmp_path / "rules")
    first = await store(storage, "deferred_link.claimed", email="a@x.com", token="t0",
                        prefix="early")
    later = await store(storage, "install.tracked", token="t0", prefix="late")
    await settle(Worker(storage, rules, [FailsFirst("a@x.com")],
                        options=WorkerOptions(policy=FAST)), storage, 2)
    earlier_done = max(o.updated_at for o in await storage.outcomes.of_event(first))
    later_done = min(o.updated_at for o in await storage.outcomes.of_event(later))
    assert later_done >= earlier_done
    for event_id in (first, later):
        assert {o.status for o in await storage.outcomes.of_event(event_id)} == {"ok"}


async def settle(worker: Worker, storage: Storage, events: int) -> None:
    """Run until every event is processed (a deferred event is due again after a second)."""
    for _ in range(50):
        await worker.run_until_idle()
        if await statuses(storage) == {"processed": events}:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(await statuses(storage))


class Hangs(BatchingTarget):
    """Never answers until `opened`."""

    def __init__(self) -> None:
        super().__init__(latency=0.0)
        self.opened = asyncio.Event()
        self.asked = asyncio.Event()

    async def execute_many(self, items: Sequence[tuple[Action, CallContext]]
                           ) -> list[Outcome | Exception]:
        self.asked.set()
        await self.opened.wait()
        return await super().execute_many(items)


async def test_a_worker_stopped_mid_pass_hands_every_event_back_and_loses_none(
        storage: Storage, tmp_path: Path) -> None:
    rules = write_rules(tmp_path / "rules")
    for n in range(8):
        await store(storage, "install.tracked", token=f"t{n % 3}", prefix=f"p{n}")
    hangs = Hangs()
    worker = Worker(storage, rules, [hangs], options=WorkerOptions(drain_timeout=0.05))
    running = asyncio.create_task(worker.run())
    await asyncio.wait_for(hangs.asked.wait(), 5)
    worker.stop()
    await asyncio.wait_for(running, 5)
    events = await storage.inbox.list_events(limit=20)
    assert len(events) == 8
    assert all(e.status in ("received", "failed") and e.lease_owner is None for e in events)
    target = BatchingTarget(latency=0.0)
    await Worker(storage, rules, [target]).run_until_idle()
    assert await statuses(storage) == {"processed": 8}
    for token, prefixes in applied_prefixes(target).items():
        numbers = [int(p[1:]) for p in prefixes]
        assert numbers == sorted(numbers), (token, prefixes)


class Scripted(BatchingTarget):
    """t0's first call is answered "retry"; t1's calls wait for `release_t1`."""

    def __init__(self) -> None:
        super().__init__(latency=0.0)
        self.release_t1 = asyncio.Event()
        self.t0_calls = 0

    async def execute_many(self, items: Sequence[tuple[Action, CallContext]]
                           ) -> list[Outcome | Exception]:
        tokens = {action.identity[0].value for action, _ in items}
        if "t1" in tokens:
            await self.release_t1.wait()
        results = await super().execute_many(items)
        for position, (action, _) in enumerate(items):
            if action.identity[0].value == "t0":
                self.t0_calls += 1
                if self.t0_calls == 1:
                    results[position] = RetryableCRMError("try again", retry_after=0.01)
        return results


async def test_an_event_claimed_again_while_its_first_pass_still_runs_finishes(
        storage: Storage, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Batches of two records: t0 (two events) and t9 go first, t1 and t2 in a second batch
    that hangs. t0's first call is answered "retry": its first event is rescheduled, its
    second, deferred behind it with nothing recorded, is claimed again while the first pass
    still waits for t1; the first pass ending meanwhile leaves the new claim's hold on that
    event alone, and every event finishes, nothing logged as failed."""
    rules = write_rules(tmp_path / "rules")
    await store(storage, "install.tracked", token="t0", prefix="a")
    later = await store(storage, "install.tracked", token="t0", prefix="c")
    for token in ("t9", "t1", "t2"):
        await store(storage, "install.tracked", token=token, prefix="b")
    target = Scripted()
    worker = Worker(storage, rules, [target], options=WorkerOptions(
        policy=FAST, short_wait=0.0, poll_interval=0.02, batch_size=2))
    running = asyncio.create_task(worker.run())
    try:
        async with asyncio.timeout(15):
            while True:  # claimed again: a second attempt, leased
                event = await storage.inbox.get(later)
                if event is not None and event.attempts >= 2 and event.lease_owner:
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)
            target.release_t1.set()
            while await statuses(storage) != {"processed": 5}:
                await asyncio.sleep(0.02)
    finally:
        worker.stop()
        await running
    assert applied_prefixes(target)["t0"][-1] == "c"
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
