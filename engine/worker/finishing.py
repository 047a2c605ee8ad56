"""Events that conclude together finish together, in one `Inbox.finish_many` write.

    finisher = Finisher(storage.inbox, worker_id)
    finished = await finisher.finish(Finish(event.id, "processed", outcomes=rows))
    await finisher.aclose()   # when the worker stops: the writes still out are waited for

Every event the worker applies one by one ends with a finish: its status, its outcomes and its
ordering keys. Written one by one, that is a write per event (a transaction each on
PostgreSQL, a savepoint and three key statements each in SQLite's group commit). The finishes
asked for in one pass of the event loop (a batch's answers conclude hundreds of events at once)
go in one `finish_many` instead, all or none; each caller gets its own event's answer. When
that write fails on something other than the store (one event's data, a bug), each event is
written alone, so only its own finish fails; a store failure fails them all alike, and each
event's task hands its event back, as it would have alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from engine.storage import Finish, Inbox
from engine.worker.retrying import transient

_Waiting = tuple[Finish, "asyncio.Future[bool]"]


class Finisher:
    def __init__(self, inbox: Inbox, worker_id: str) -> None:
        self.inbox = inbox
        self.worker_id = worker_id
        self._waiting: list[_Waiting] = []
        self._writes: set[asyncio.Task[None]] = set()
        self.writes = 0  # finish_many calls made, for tests

    async def finish(self, finish: Finish) -> bool:
        """Whether the event finished (False: its lease was lost first)."""
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[bool] = loop.create_future()
        self._waiting.append((finish, answer))
        if len(self._waiting) == 1:
            loop.call_soon(self._write)
        return await answer

    def _write(self) -> None:
        waiting, self._waiting = self._waiting, []
        if not waiting:  # already handed over (aclose)
            return
        task = asyncio.create_task(self._write_all(waiting), name="linkcrm-finish")
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _write_all(self, waiting: Sequence[_Waiting]) -> None:
        try:
            done = await self._finish_many([finish for finish, _ in waiting])
        except Exception as error:
            if len(waiting) == 1 or transient(error):
                _answer(waiting, [error] * len(waiting))
                return
            alone = await asyncio.gather(*(self._finish_many([finish])
                                           for finish, _ in waiting), return_exceptions=True)
            _answer(waiting, [found if isinstance(found, BaseException) else found[0]
                              for found in alone])
            return
        _answer(waiting, done)

    async def _finish_many(self, finishes: list[Finish]) -> list[bool]:
        self.writes += 1
        return await self.inbox.finish_many(self.worker_id, finishes)

    async def aclose(self) -> None:
        """Write what is still waiting (its callers may have given up), and wait for it."""
        self._write()
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)


def _answer(waiting: Sequence[_Waiting], results: Sequence[bool | BaseException]) -> None:
    for (_, answer), result in zip(waiting, results, strict=True):
        if answer.done():  # its caller gave up (the worker stopped): the write stands
            continue
        if isinstance(result, BaseException):
            answer.set_exception(result)
        else:
            answer.set_result(result)
