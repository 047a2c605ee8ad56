"""Events that conclude in one pass of the loop finish in one write; one event's bad data
fails only its own finish, a store failure fails them all alike."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from engine.errors import StorageError, UnstorableValueError
from engine.storage import Finish
from engine.worker.finishing import Finisher

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


async def finish_all(finisher: Finisher, ids: Sequence[int]) -> list[bool | BaseException]:
    return await asyncio.gather(*(finisher.finish(Finish(n, "processed")) for n in ids),
                                return_exceptions=True)


async def test_finishes_asked_for_together_are_one_write_and_each_gets_its_own_answer() -> None:
    inbox = Inbox()
    inbox.leased.discard(3)  # its lease was lost: not finished, and told so
    finisher = Finisher(inbox, "w1")  # type: ignore[arg-type]
    assert await finish_all(finisher, [1, 2, 3]) == [True, True, False]
    assert inbox.writes == [[1, 2, 3]]
    assert await finisher.finish(Finish(4, "dead", "boom"))
    assert inbox.writes == [[1, 2, 3], [4]]


async def test_one_events_bad_data_fails_only_its_own_finish() -> None:
    inbox = Inbox(bad=2)
    finisher = Finisher(inbox, "w1")  # type: ignore[arg-type]
    results = await finish_all(finisher, [1, 2, 3])
    assert results[0] is True and results[2] is True
    assert isinstance(results[1], UnstorableValueError)
    assert inbox.writes == [[1, 2, 3], [1], [2], [3]]
    assert inbox.finished == {1, 3}


async def test_a_store_failure_fails_every_finish_of_the_write_without_retrying_alone() -> None:
    inbox = Inbox(down=True)
    finisher = Finisher(inbox, "w1")  # type: ignore[arg-type]
    results = await finish_all(finisher, [1, 2])
    assert all(isinstance(result, StorageError) for result in results)
    assert inbox.writes == [[1, 2]]


async def test_a_caller_that_gives_up_leaves_the_write_standing() -> None:
    inbox = Inbox()
    finisher = Finisher(inbox, "w1")  # type: ignore[arg-type]
    waiting = asyncio.create_task(finisher.finish(Finish(1, "processed")))
    await asyncio.sleep(0)
    waiting.cancel()
    await finisher.aclose()
    assert inbox.finished == {1}
