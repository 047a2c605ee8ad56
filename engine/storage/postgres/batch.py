"""Receiver-side group commit for PostgreSQL: concurrent stores share one INSERT and one commit.

Deliveries that arrive while earlier batches are being written wait together and go in as the
next batch, so a busy receiver sends a few large statements instead of one round trip, one
commit and one WAL flush per delivery. At most `max_in_flight` batches are written at once
(each holds a pooled connection), which leaves the rest of the pool to the other calls. One bad
delivery never fails its neighbours: it gets its own error, and the rest of its batch is stored.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from engine.errors import StorageError, UnstorableEventError

Item = TypeVar("Item")
Result = TypeVar("Result")

log = logging.getLogger(__name__)


class Batcher(Generic[Item, Result]):
    """`await batcher.submit(item)` returns `write`'s result for that item.

    `write(items)` must return one result per item, in order (an Exception in the place of an
    item it refused: that waiter gets it raised), and either commit all of them or raise
    StorageError and keep none: each waiter then gets a StorageError of its own. When it raises
    UnstorableEventError (the data of some item is bad, not the database), every item is written
    again alone, so only the bad one fails. A waiter that is cancelled does not take its item
    back out of a batch already being written (the write may be committed; a retried delivery
    then finds it as a duplicate).
    """

    def __init__(
        self,
        write: Callable[[list[Item]], Awaitable[Sequence[Result | Exception]]],
        max_in_flight: int,
    ) -> None:
        self._write = write
        self._slots = asyncio.Semaphore(max(1, max_in_flight))
        self._staged: list[tuple[Item, asyncio.Future[Result]]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, item: Item) -> Result:
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._staged.append((item, future))
        if len(self._staged) == 1:
            task = asyncio.create_task(self._drain())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await future

    async def _drain(self) -> None:
        # Waiting for a slot is what lets a batch grow: everything submitted meanwhile joins.
        async with self._slots:
            batch, self._staged = self._staged, []
            if not batch:
                return
            try:
                results = await self._write([item for item, _ in batch])
            except UnstorableEventError as error:
                if len(batch) == 1:
                    _fail(batch, error)
                    return
                await self._write_alone(batch)
                return
            except StorageError as error:
                _fail(batch, error)
                return
            except asyncio.CancelledError:
                _fail(batch, StorageError("the store was cancelled while closing"))
                raise
            except Exception as error:  # a bug: no waiter may hang, and the task must not die
                log.exception("storing a batch failed")
                _fail(batch, StorageError(f"the store failed: {error!r}"))
                return
            _settle(batch, results)

    async def _write_alone(self, batch: list[tuple[Item, asyncio.Future[Result]]]) -> None:
        """Each item in a write of its own: one bad item fails only its own waiter."""
        log.warning("a store batch failed on its data; storing its items one by one",
                    extra={"items": len(batch)})
        for item, future in batch:
            try:
                results = await self._write([item])
            except StorageError as error:
                _fail([(item, future)], error)
            except Exception as error:  # a bug: no waiter may hang
                log.exception("storing an item failed")
                _fail([(item, future)], StorageError(f"the store failed: {error!r}"))
            else:
                _settle([(item, future)], results)

    async def close(self) -> None:
        """Wait for the batches already submitted."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def _settle(
    batch: Sequence[tuple[object, asyncio.Future[Result]]], results: Sequence[Result | Exception]
) -> None:
    for (_, future), result in zip(batch, results, strict=True):
        if future.done():
            continue
        if isinstance(result, Exception):
            future.set_exception(result)
        else:
            future.set_result(result)


def _fail(batch: Sequence[tuple[object, asyncio.Future[Result]]], error: StorageError) -> None:
    for _, future in batch:
        if not future.done():
            # One exception object per waiter (of the same kind): each raise adds its own
            # traceback to it.
            future.set_exception(type(error)(str(error)))
