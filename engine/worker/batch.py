"""Queued actions for one target sent together through its `execute_many` (batch endpoints)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from engine.actions import Action
from engine.errors import RetryableCRMError
from engine.targets.base import BatchTarget, CallContext, Outcome

log = logging.getLogger("engine.worker.loop")


@dataclass
class _Call:
    action: Action
    context: CallContext
    answer: asyncio.Future[Outcome] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())


class Batcher:
    """A `Target` in front of a `BatchTarget`: calls that arrive while a batch is in flight
    wait and go out together in the next one (at most `size`).

    One call alone goes out at once, so batching costs no latency when the CRM keeps up; when
    it does not (rate limits, slow answers), the queue grows and one request carries many
    actions. Per-identity order holds without any work here: the worker never has two calls in
    flight for one identity on a target (an event's actions go one after another, and a later
    event of the same identity waits for the earlier one), so a batch never holds two actions
    of one identity.

        target = Batcher(hubspot_target, size=100)
        outcome = await target.execute(action, context)
    """

    def __init__(self, target: BatchTarget, size: int = 100) -> None:
        self.target = target
        self.name = target.name
        self.size = max(1, size)
        self._queue: list[_Call] = []
        self._flushing: asyncio.Task[None] | None = None
        self.batches: list[int] = []  # the size of each batch sent, for tests and metrics

    async def execute(self, action: Action, context: CallContext) -> Outcome:
        call = _Call(action, context)
        self._queue.append(call)
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.create_task(self._flush(), name=f"linkcrm-batch-{self.name}")
        # A cancelled caller (the worker stopping) leaves its call to finish in the batch; the
        # outcome is lost but the action is idempotent, so the next attempt finds its record.
        return await asyncio.shield(call.answer)

    async def _flush(self) -> None:
        # One tick, so calls that became ready together (a claim of many events) share a batch.
        await asyncio.sleep(0)
        while self._queue:
            batch, self._queue = self._queue[:self.size], self._queue[self.size:]
            self.batches.append(len(batch))
            try:
                results = await self.target.execute_many([(c.action, c.context) for c in batch])
            except Exception as error:  # a bug must fail these calls, not the flusher
                log.exception("execute_many raised", extra={"target": self.name})
                results = [error] * len(batch)
            for position, call in enumerate(batch):
                result: Outcome | Exception = results[position] if position < len(results) \
                    else RetryableCRMError(f"{self.name}: no result for this action")
                if call.answer.done():
                    continue
                if isinstance(result, Exception):
                    call.answer.set_exception(result)
                else:
                    call.answer.set_result(result)

    async def aclose(self) -> None:
        """Stop a batch still in flight once its callers are gone (the worker stopped; the
        actions are idempotent, so their next attempt finds what it did). The wrapped target
        is its owner's to close."""
        if self._flushing is not None and not self._flushing.done():
            self._flushing.cancel()
            await asyncio.gather(self._flushing, return_exceptions=True)
