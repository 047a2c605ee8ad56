"""Writes that concurrent events ask for in one pass of the event loop, made as one.

    finishes = Coalescer(lambda items: inbox.finish_many(worker_id, items))
    finished = await finishes.submit(Finish(event.id, "processed", outcomes=rows))
    await finishes.aclose()   # when the worker stops: the writes still out are waited for

Events the worker applies one by one each end with writes of their own: outcomes recorded,
then a finish (status, outcomes, ordering keys). Made one by one, that is a write per event
(a transaction each on PostgreSQL, a savepoint and a few statements each in SQLite's group
commit). A batch's answers conclude hundreds of events in one pass of the loop; what they ask
for in that pass goes in one call of the store's `..._many` instead, all or none, and each
caller gets its own item's answer. When that call fails on something other than the store
(one item's data, a bug), each item is written alone, so only its own write fails; a store
failure fails them all alike, and each event's task hands its event back, as it would have
alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from engine.worker.retrying import transient

T = TypeVar("T")
R = TypeVar("R")


class Coalescer(Generic[T, R]):
    def __init__(self, write_many: Callable[[list[T]], Awaitable[Sequence[R]]]) -> None:
        self._write_many = write_many
        self._waiting: list[tuple[T, asyncio.Future[R]]] = []
        self._writes: set[asyncio.Task[None]] = set()
        self.calls = 0  # `write_many` calls made, for tests

    async def submit(self, item: T) -> R:
        """`item` written with the others asked for in this pass of the loop; its answer."""
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[R] = loop.create_future()
        self._waiting.append((item, answer))
        if len(self._waiting) == 1:
            loop.call_soon(self._write)
        return await answer

    def _write(self) -> None:
        waiting, self._waiting = self._waiting, []
        if not waiting:  # already handed over (aclose)
            return
        task = asyncio.create_task(self._write_all(waiting), name="linkcrm-coalesced-write")
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _write_all(self, waiting: Sequence[tuple[T, asyncio.Future[R]]]) -> None:
        try:
            done = await self._many([item for item, _ in waiting])
        except Exception as error:
            if len(waiting) == 1 or transient(error):
                _answer(waiting, [error] * len(waiting))
                return
            alone = await asyncio.gather(*(self._many([item]) for item, _ in waiting),
                                         return_exceptions=True)
            _answer(waiting, [found if isinstance(found, BaseException) else found[0]
                              for found in alone])
            return
        _answer(waiting, done)

    async def _many(self, items: list[T]) -> Sequence[R]:
        self.calls += 1
        return await self._write_many(items)

    async def aclose(self) -> None:
        """Write what is still waiting (its callers may have given up), and wait for it."""
        self._write()
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)


def _answer(waiting: Sequence[tuple[T, asyncio.Future[R]]],
            results: Sequence[R | BaseException]) -> None:
    for (_, answer), result in zip(waiting, results, strict=True):
        if answer.done():  # its caller gave up (the worker stopped): the write stands
            continue
        if isinstance(result, BaseException):
            answer.set_exception(result)
        else:
            answer.set_result(result)
