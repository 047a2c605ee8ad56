"""Writes asked for in one pass of the loop are one call; one item's bad data
fails only its own write, a store failure fails them all alike."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from engine.errors import StorageError, UnstorableValueError
from engine.runtime.metrics import Metrics
from engine.storage import Finish, NewOutcome, utc_now
from engine.worker.apply import Applier
from engine.worker.coalesce import Coalescer
from engine.worker.retrying import RetryPolicy

pytestmark = pytest.mark.anyio


class Inbox:
    """finish_many as the stores do it: all or none; `leased` says which events still are."""

    def __init__(self, *, bad: int | None = None, down: bool = False) -> None:
        self.bad = bad
        self.down = down
        self.leased = {1, 2, 3, 4}
        self.writes: list[list[int]] = []
        self.finished: set[int] = set()

    async def finish_many(self, worker_id: str, finishes: Sequence[Finish]) -> list[bool]:
        ids = [finish.event_id for finish in finishes]
        self.writes.append(ids)
        await asyncio.sleep(0)
        if self.down:
            raise StorageError("the database could not commit: disk I/O error")
        if self.bad in ids:
            raise UnstorableValueError("record the outcome: a value cannot be stored")
        done = [event_id in self.leased for event_id in ids]
        self.finished.update(event_id for event_id in ids if event_id in self.leased)
        return done


def finisher(inbox: Inbox) -> Coalescer[Finish, bool]:
    return Coalescer(lambda finishes: inbox.finish_many("w1", finishes))


async def finish_all(finishes: Coalescer[Finish, bool], ids: Sequence[int]
                     ) -> list[bool | BaseException]:
    return await asyncio.gather(*(finishes.submit(Finish(n, "processed")) for n in ids),
                                return_exceptions=True)


async def test_finishes_asked_for_together_are_one_write_and_each_gets_its_own_answer() -> None:
    inbox = Inbox()
    inbox.leased.discard(3)  # its lease was lost: not finished, and told so
    finishes = finisher(inbox)
    assert await finish_all(finishes, [1, 2, 3]) == [True, True, False]
    assert inbox.writes == [[1, 2, 3]]
    assert await finishes.submit(Finish(4, "dead", "boom"))
    assert inbox.writes == [[1, 2, 3], [4]]


async def test_one_events_bad_data_fails_only_its_own_finish() -> None:
    inbox = Inbox(bad=2)
    finishes = finisher(inbox)
    results = await finish_all(finishes, [1, 2, 3])
    assert results[0] is True and results[2] is True
    assert isinstance(results[1], UnstorableValueError)
    assert inbox.writes == [[1, 2, 3], [1], [2], [3]]
    assert inbox.finished == {1, 3}


async def test_a_store_failure_fails_every_finish_of_the_write_without_retrying_alone() -> None:
    inbox = Inbox(down=True)
    finishes = finisher(inbox)
    results = await finish_all(finishes, [1, 2])
    assert all(isinstance(result, StorageError) for result in results)
    assert inbox.writes == [[1, 2]]


async def test_a_caller_that_gives_up_leaves_the_write_standing() -> None:
    inbox = Inbox()
    finishes = finisher(inbox)
    waiting = asyncio.create_task(finishes.submit(Finish(1, "processed")))
    await asyncio.sleep(0)
    waiting.cancel()
    await finishes.aclose()
    assert inbox.finished == {1}


async def test_outcomes_events_record_in_one_pass_of_the_loop_go_in_one_write() -> None:
    class Outcomes:
        def __init__(self) -> None:
            self.writes: list[list[int]] = []

        async def record_many(self, rows: Sequence[NewOutcome]) -> None:
            self.writes.append([row.event_id for row in rows])

    outcomes = Outcomes()
    applier = Applier(outcomes, Metrics(), RetryPolicy(), 1.0, utc_now,  # type: ignore[arg-type]
                      asyncio.sleep)

    def rows(event_id: int, count: int) -> list[NewOutcome]:
        return [NewOutcome(event_id, "r", "upsert_contact", "hubspot", f"k{event_id}-{n}", "ok")
                for n in range(count)]

    await asyncio.gather(applier.record(rows(1, 2)), applier.record(rows(2, 1)),
                         applier.record([]))
    assert outcomes.writes == [[1, 1, 2]]
    await applier.record(rows(3, 1))
    assert outcomes.writes == [[1, 1, 2], [3]]
    await applier.aclose()
