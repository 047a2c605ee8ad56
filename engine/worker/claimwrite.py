"""A claim's events written to the embedded CRM in one write and finished in one.

    writer = ClaimWriter(target, lane, busy_wait=2.0, leases=leases, applier=applier,
                         inbox=storage.inbox, worker_id=worker_id, alone=worker._process, ...)
    together = [job for job in jobs if writer.goes_together(job)]
    await writer.process(together)     # in the one task that holds all their leases

The worker uses this path only when its one target is the embedded CRM on SQLite
(`targets.base.claims_at_once`). An event goes in its claim's write when nothing earlier of
its identities is pending (`clear`: its claim's one order check found none, so a person's
later event claimed with its earlier one is not clear: it waits and goes alone), it has
actions to write, and none of them was tried before. Every such event's actions go in one
`execute_all` call, under one slot of the target's lane. The events that call settles whole
(an Outcome or a permanent error for each action: `Applier.answered`) finish together in one
`Inbox.finish_many` write, their outcomes with them. Each of the others goes its own way (the
worker's one-by-one path, `alone`) from its answers; all of them do when the call fails as a
whole (none of it is kept, or each item is idempotent) or the lane stays full for `busy_wait`.

Leases: the task running `process` holds every event's lease from the start. Cancelled
before the events begin (the worker stopped, or a lease was lost), it lets go of them all and
hands the events back, due at once. From then on the finishing write and each event going
alone hold their own events' leases and end them, however they end (a lost lease cancels only
the one holding that event), and all are waited for. When the finishing write fails in the
store, the events are handed back for a later attempt; when it fails on something else (an
event's own data, a bug), each event concludes alone, to its own end.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass
from typing import Generic, Protocol, TypeVar

from engine.errors import where
from engine.storage import ActionOutcome, Finish, Inbox, InboxEvent
from engine.targets.base import AllAtOnceTarget, CallContext, Outcome
from engine.worker.apply import Applier, Lane, PartResult
from engine.worker.leases import LeaseKeeper
from engine.worker.plan import Work

log = logging.getLogger("engine.worker.loop")  # the worker's log, as before this path moved

Answers = Sequence[Outcome | Exception]


class ClaimedJob(Protocol):
    """An event of the claim as the worker planned it: its actions, the outcomes already
    recorded, each unfinished target's ordering keys, and whether its order check is done."""

    @property
    def event(self) -> InboxEvent: ...
    @property
    def work(self) -> Work: ...
    @property
    def known(self) -> Mapping[tuple[str, str], ActionOutcome]: ...
    @property
    def keys(self) -> dict[str, list[str]]: ...
    @property
    def clear(self) -> bool: ...


J = TypeVar("J", bound=ClaimedJob)


@dataclass
class ClaimFinishing(Generic[J]):
    """What a claim's one write shares with its kind: how the events it settles whole finish
    together in one write (`_finish`), and how events end otherwise, lent by the worker.

    `finish(job, parts)` says how an event whose parts are all done ends; `finished(job,
    finish, finished)` counts and logs that end; `release(event, why, delay)` hands an event
    back; `notify()` wakes what waits for an event of this worker to move on; `transient(error)`
    tells an error that may pass (a store that could not commit) from one that fails the same
    way on every attempt (a value the store refuses, a bug).
    """

    lane: Lane  # the target's: the claim's write takes one slot
    _: KW_ONLY
    busy_wait: float  # how long to wait for that slot before each event goes alone
    leases: LeaseKeeper
    applier: Applier
    inbox: Inbox
    worker_id: str
    finish: Callable[[J, list[PartResult]], Finish]
    finished: Callable[[J, Finish, bool], None]
    release: Callable[[InboxEvent, str, float], Awaitable[None]]
    notify: Callable[[], None]
    transient: Callable[[object], bool]

    def _conclude_alone(self, job: J, result: PartResult) -> Awaitable[None]:
        """The event concludes the worker's one-by-one way from its settled part."""
        raise NotImplementedError

    async def _hand_back_all(self, jobs: Sequence[J]) -> None:
        """Stopped (or a lease lost) before the events began: let go and hand them back."""
        me = asyncio.current_task()
        for job in jobs:
            self.leases.release(job.event.id, me)
        await asyncio.gather(*(self.release(job.event, "interrupted: the worker stopped", 0.0)
                               for job in jobs))

    async def _finish(self, settled: list[tuple[J, PartResult]]) -> bool:
        """Conclude the events their claim's write settled, in one write; when that write
        fails on something other than the store, each event concludes alone, in order.
        Whether their outcomes went in that write (False: handed back, or each alone)."""
        if not settled:
            return True
        me = asyncio.current_task()
        assert me is not None
        finishes = []
        for job, result in settled:
            self.leases.hold(job.event.id, me)  # this task's (gather's) from now on
            del job.keys[result.target]
            finishes.append(self.finish(job, [result]))
        try:
            done = await self.inbox.finish_many(self.worker_id, finishes)
        except asyncio.CancelledError:
            await asyncio.gather(*(self.release(job.event, "interrupted: the worker stopped",
                                                0.0) for job, _ in settled))
            raise
        except Exception as error:
            if self.transient(error):
                log.error("events left for a later attempt", extra={
                    "event_ids": [job.event.id for job, _ in settled], "error": str(error)})
                await asyncio.gather(*(self.release(job.event, f"storage error: {error}",
                                                    5.0) for job, _ in settled))
                return False
            # An event's own data or a bug: each concludes alone, to its own end, in order
            # (an identity's later event records its outcomes after the earlier one's).
            for job, result in settled:
                await self._conclude_alone(job, result)
            return False
        finally:
            for job, _ in settled:
                self.leases.release(job.event.id, me)
        self.notify()
        for (job, _), finish, finished in zip(settled, finishes, done, strict=True):
            self.finished(job, finish, finished)
        return True


@dataclass
class ClaimWriter(ClaimFinishing[J]):
    """Writes a claim's events to `target` at once and finishes those it settles at once.

    The worker lends it how an event ends otherwise: `alone(job, answers, result)` takes an
    event from its order check to its conclusion (`answers`: what the claim's write answered
    for its actions; `result`: its part as that write settled it, left to conclude).
    """

    target: AllAtOnceTarget
    alone: Callable[[J, Answers | None, PartResult | None], Awaitable[None]]

    def goes_together(self, job: J) -> bool:
        """Whether the event's part goes in its claim's one write: nothing earlier of its
        identities to wait for, actions to write, none of them tried before."""
        return job.clear and untried(job, self.target.name)

    def _conclude_alone(self, job: J, result: PartResult) -> Awaitable[None]:
        return self.alone(job, None, result)

    async def process(self, jobs: list[J]) -> None:
        """The claim's events that go together (`goes_together`): every one's actions in one
        `execute_all` call; the events that call settles whole finish together in one write
        (`_finish`), each of the others goes its own way (`alone`) from its answers, and all
        of them do when the call fails as a whole or the lane stays full."""
        try:
            answers = await self._write(jobs)
        except asyncio.CancelledError:  # stopped (or a lease lost) before the events began
            await self._hand_back_all(jobs)
            raise
        settled: list[tuple[J, PartResult]] = []
        alone: list[tuple[J, Answers | None]] = []
        for job, answered in zip(jobs, answers, strict=True):
            result = None if answered is None else \
                self.applier.answered(job.event, self.target, job.work.actions, answered)
            if result is not None and len(result.unrecorded) == len(job.work.actions):
                settled.append((job, result))
            else:
                alone.append((job, answered))
        # Each of these holds its events' leases from now on and ends them, however it ends
        # (a lost lease cancels only the one holding that event): all are waited for.
        log_failures(await asyncio.gather(
            self._finish(settled),
            *(self.alone(job, answered, None) for job, answered in alone),
            return_exceptions=True))

    async def _write(self, jobs: list[J]) -> list[Answers | None]:
        """Each event's answers from one `execute_all`; None for all when that call failed
        as a whole or the lane stayed full (each event then makes its own)."""
        if not await self.lane.acquire(self.busy_wait):
            return [None] * len(jobs)
        try:
            flat = await self.target.execute_all([
                (keyed.action, CallContext(keyed.key, job.event.id, keyed.action.rule))
                for job in jobs for keyed in job.work.actions])
        except Exception:  # a failure of the whole write: none of it is kept, or idempotent
            return [None] * len(jobs)
        finally:
            self.lane.release()
        answers: list[Answers | None] = []
        start = 0
        for job in jobs:
            answers.append(flat[start:start + len(job.work.actions)])
            start += len(job.work.actions)
        return answers


def untried(job: ClaimedJob, target: str) -> bool:
    """Whether the event has actions for `target` and none of them was tried before: what a
    claim-level write may send for it."""
    return target in job.keys and bool(job.work.actions) \
        and not any((target, keyed.key) in job.known for keyed in job.work.actions)


def log_failures(ended: Sequence[object]) -> None:
    """Log the errors among what the tasks of a claim ended with (a bug: the events they
    held are handed back when their leases run out)."""
    for error in ended:
        if isinstance(error, BaseException) and not isinstance(error, asyncio.CancelledError):
            log.error("event task failed", extra={"error_type": type(error).__name__,
                                                  "where": where(error)})


__all__ = ["ClaimFinishing", "ClaimWriter", "ClaimedJob", "log_failures", "untried"]
