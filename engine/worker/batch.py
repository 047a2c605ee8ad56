"""Queued actions for one target sent together through its `execute_many` (batch endpoints)."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from engine.actions import Action, IdentityKey
from engine.errors import PermanentCRMError, RetryableCRMError, where
from engine.targets.base import BatchTarget, CallContext, Outcome

log = logging.getLogger("engine.worker.loop")


@dataclass
class _Call:
    action: Action
    context: CallContext
    at: float = field(default_factory=lambda: asyncio.get_running_loop().time())
    answer: asyncio.Future[Outcome] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())
    # Its identity keys as a set, and the record it writes (its first key): read by every
    # batch that considers it, so made once.
    keys: frozenset[IdentityKey] = field(init=False)
    record: IdentityKey | None = field(init=False)
    seq: int = 0  # its place in the order calls were queued

    def __post_init__(self) -> None:
        identity = self.action.identity
        self.keys = frozenset(identity)
        self.record = identity[0] if identity else None


class Batcher:
    """A `Target` in front of a `BatchTarget`: calls that arrive while a batch is in flight
    wait and go out together in a later one, which carries at most `size` records (what a
    batch request writes: HubSpot's 100 inputs) and every queued call on them.

    One call alone goes out at once, so batching costs no latency when the CRM keeps up; when
    it does not (rate limits, slow answers), the queue grows and one request carries many
    actions. Calls on one identity go out in the order they were queued, in one batch (the
    target applies a batch's items in order and merges them into one write) or in successive
    ones, never the later before the earlier: a batch stops taking an identity's calls at the
    first one it leaves behind. The worker queues a later event's calls only after the
    earlier event's (`submit`), so a batch holding both applies them in arrival order.

    Up to `in_flight` batches are sent at once, so a backlog's batches overlap the CRM's
    round trips (and the worker's handling of the answers) instead of taking turns. Only a
    full batch (`size` records) goes while another is in flight, so a queue that is not a
    backlog still waits and coalesces into the next one; and a batch never takes a call on an
    identity of a batch in flight: an identity's next call goes once its last one's answer is
    in, as if batches went one at a time.

    A record whose later calls are still `coming` (an event of its identity is on its way to
    the queue: `engine.worker.chain`) waits for them, at most `hold` seconds after its first
    queued call, so its events share one write instead of one each; a batch goes with the
    records that are complete, or, when none is, once the oldest call has waited `hold`.

        target = Batcher(hubspot_target, size=100)
        outcome = await target.execute(action, context)
        answers = [target.submit(action, context) for action, context in calls]  # in order
    """

    def __init__(self, target: BatchTarget, size: int = 100,
                 coming: Callable[[IdentityKey], bool] | None = None,
                 hold: float = 1.0, in_flight: int = 2) -> None:
        self.target = target
        self.name = target.name
        self.size = max(1, size)
        self.coming = coming or (lambda key: False)
        self.hold = hold
        self.in_flight = max(1, in_flight)
        self._queue: dict[int, _Call] = {}  # by `seq`: oldest first
        # The queued calls holding each identity key, oldest first, and those holding none:
        # a batch takes the later calls on its records from here instead of reading the queue.
        self._by_key: dict[IdentityKey, deque[_Call]] = {}
        self._unkeyed: deque[_Call] = deque()
        self._flushing: asyncio.Task[None] | None = None
        self._sending: dict[asyncio.Task[None], frozenset[IdentityKey]] = {}
        self._arrived = 0  # calls queued so far
        self.batches: list[int] = []  # the number of calls in each batch sent, for tests

    async def execute(self, action: Action, context: CallContext) -> Outcome:
        # A cancelled caller (the worker stopping) leaves its call to finish in the batch; the
        # outcome is lost but the action is idempotent, so the next attempt finds its record.
        return await asyncio.shield(self.submit(action, context))

    def submit(self, action: Action, context: CallContext) -> asyncio.Future[Outcome]:
        """Queue a call now (behind every call queued before it) and return its answer."""
        call = self._enqueue(action, context)
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.create_task(self._flush(), name=f"linkcrm-batch-{self.name}")
        return call.answer

    def _enqueue(self, action: Action, context: CallContext) -> _Call:
        call = _Call(action, context, seq=self._arrived)
        self._queue[call.seq] = call
        for key in call.keys:
            self._by_key.setdefault(key, deque()).append(call)
        if not call.keys:
            self._unkeyed.append(call)
        self._arrived += 1
        return call

    def _take(self, wait: bool, full: bool = False) -> tuple[list[_Call], int]:
        """The next batch: queued calls in order until `size` records are in it (a record is
        the first identity key of a call: the one the target finds and writes it by), then
        the later calls on those records, unless an earlier call on one of their identity
        keys was left behind (it must go first) or is in a batch in flight. With `full`, no
        batch (and the queue as it was) unless it holds `size` records. Also how many records
        the batch lacks of `size`.

        The queue is read in order only until the batch has its records; the later calls on
        them come from the index by key (`_later_calls`), so a backlog of thousands of calls
        is not read again for every batch."""
        taken: list[_Call] = []
        records: set[IdentityKey] = set()
        in_flight: set[IdentityKey] = set().union(*self._sending.values())
        blocked = set(in_flight)
        coming = self.coming
        read_to = -1  # the `seq` of the last call read in order
        for call in self._queue.values():
            if len(records) >= self.size:
                break
            read_to = call.seq
            keys, record = call.keys, call.record
            if not keys.isdisjoint(blocked) or (wait and any(map(coming, keys))):
                blocked |= keys  # left behind: no later call on its keys may pass it
                continue
            taken.append(call)
            if record is not None:
                records.add(record)
        short = self.size - len(records)
        if full and short > 0:
            return [], short
        self._dequeue(taken)
        if short <= 0:
            taken += self._later_calls(records, read_to, in_flight, wait)
        return taken, short

    def _later_calls(self, records: set[IdentityKey], read_to: int,
                     in_flight: set[IdentityKey], wait: bool) -> list[_Call]:
        """The calls after `read_to` that a full batch on `records` takes, in order: a call
        on one of them (or on no identity) whose every key is held by no batch in flight and by
        no earlier queued call, and not still waiting for one `coming`. The calls taken before
        are out of the index, so "no earlier queued call" is "the oldest queued on each key"."""
        candidates = {call.seq: call for record in records
                      for call in self._by_key.get(record, ())
                      if call.seq > read_to and call.record in records}
        candidates.update((call.seq, call) for call in self._unkeyed if call.seq > read_to)
        coming = self.coming
        taken: list[_Call] = []
        for seq in sorted(candidates):
            call = candidates[seq]
            keys = call.keys
            if not keys.isdisjoint(in_flight) or (wait and any(map(coming, keys))) \
                    or any(self._by_key[key][0] is not call for key in keys):
                continue
            taken.append(call)
            self._dequeue((call,))  # out of the index at once: the next candidate may follow it
        return taken

    def _dequeue(self, calls: Iterable[_Call]) -> None:
        for call in calls:
            del self._queue[call.seq]
            for key in call.keys:
                waiting = self._by_key[key]
                if waiting[0] is call:  # nearly always: a call goes after those before it
                    waiting.popleft()
                else:
                    waiting.remove(call)
                if not waiting:
                    del self._by_key[key]
            if not call.keys:
                self._unkeyed.remove(call)

    async def _flush(self) -> None:
        # One tick, so calls that became ready together (a claim of many events) share a batch.
        await asyncio.sleep(0)
        loop = asyncio.get_running_loop()
        # While a batch is in flight, the queue is read again for a full one only when an
        # answer freed identities or enough calls arrived to fill one (reading it is a scan).
        look_again_at = 0
        while self._queue or self._sending:
            if self._queue and len(self._sending) < self.in_flight \
                    and (not self._sending or self._arrived >= look_again_at):
                waited = loop.time() - next(iter(self._queue.values())).at
                batch, short = self._take(wait=waited < self.hold, full=bool(self._sending))
                if batch:
                    self._start(batch)
                    continue
                look_again_at = self._arrived + short
            if self._sending:
                done, _ = await asyncio.wait(self._sending, timeout=min(0.01, self.hold),
                                             return_when=asyncio.FIRST_COMPLETED)
                if done:
                    look_again_at = 0
            else:
                await asyncio.sleep(min(0.01, self.hold))

    def _start(self, batch: list[_Call]) -> None:
        self.batches.append(len(batch))
        task = asyncio.create_task(self._send(batch), name=f"linkcrm-batch-{self.name}-send")
        self._sending[task] = frozenset().union(*(call.keys for call in batch))
        task.add_done_callback(self._sending.pop)

    async def _send(self, batch: Sequence[_Call]) -> None:
        try:
            results = await self._many(batch)
            if len(batch) > 1:
                await self._alone(batch, results)
        except Exception as error:  # a bug must fail these calls, not leave them waiting
            # Type and place only: the message may quote event data.
            log.error("a batch failed", extra={"target": self.name,
                                               "error_type": type(error).__name__,
                                               "where": where(error)})
            results = [error] * len(batch)
        except asyncio.CancelledError:  # stopped (aclose): their callers are gone
            for call in batch:
                call.answer.cancel()
            raise
        for call, result in zip(batch, results, strict=True):
            if call.answer.done():
                continue
            if isinstance(result, Exception):
                call.answer.set_exception(result)
            else:
                call.answer.set_result(result)

    async def _many(self, batch: Sequence[_Call]) -> list[Outcome | Exception]:
        """One result per call: a short answer leaves the rest retryable; a bug fails them."""
        try:
            results = await self.target.execute_many([(c.action, c.context) for c in batch])
        except Exception as error:  # a bug must fail these calls, not the flusher
            log.exception("execute_many raised", extra={"target": self.name})
            return [error] * len(batch)
        missing = RetryableCRMError(f"{self.name}: no result for this action")
        return [results[n] if n < len(results) else missing for n in range(len(batch))]

    async def _alone(self, batch: Sequence[_Call], results: list[Outcome | Exception]) -> None:
        """Calls on one identity are merged into one write, so one call's permanent error
        (a property the CRM lacks, a value it refuses) fails the others with it: send each
        call so refused again alone, in order, for its own answer. A call whose earlier
        call on an identity must be retried is not sent: it gets that error too."""
        shared: dict[IdentityKey, int] = {}
        for call in batch:
            for key in call.action.identity:
                shared[key] = shared.get(key, 0) + 1
        blocked: dict[IdentityKey, Exception] = {}
        for position, call in enumerate(batch):
            keys = call.action.identity
            earlier = next((blocked[k] for k in keys if k in blocked), None)
            if earlier is not None:
                results[position] = earlier
            elif isinstance(results[position], PermanentCRMError) \
                    and any(shared[k] > 1 for k in keys):
                [results[position]] = await self._many([call])
            result = results[position]
            if isinstance(result, Exception) and not isinstance(result, PermanentCRMError):
                blocked.update(dict.fromkeys(keys, result))

    async def aclose(self) -> None:
        """Stop batches still in flight once their callers are gone (the worker stopped; the
        actions are idempotent, so their next attempt finds what they did). The wrapped
        target is its owner's to close."""
        running = [task for task in (self._flushing, *self._sending) if task is not None]
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
