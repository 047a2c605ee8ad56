"""A claim's events queued on a batching target in one pass and finished in one write.

    pipe = ClaimPipeline(lane, target=batcher, chains=chains, busy_wait=2.0, leases=leases,
                         applier=applier, inbox=storage.inbox, worker_id=worker_id,
                         alone=worker._process_pipelined, ...)
    selected = pipe.select(jobs)       # a ClaimPass, in claim order; opens their chain links
    await pipe.process(selected)       # in the one task that holds all their leases

The worker uses this path when its one target has batch endpoints (a `Batcher` in front of
HubSpot or Salesforce). Per event, the one-by-one path costs a task, a lane slot, an order
check, a gather of its calls' answers and two coalesced writes (outcomes, then the finish):
asyncio machinery that, with a backlog waiting for a rate-limited CRM, is most of what the
worker's CPU does and what paces the drain. Here one task queues every selected event's calls
and, each time answers come in, finishes the events they settle whole in one
`Inbox.finish_many` write, their outcomes with it: events leave the pass as their batches
come back, so the worker claims more while the rest wait for the CRM, and the queue in front
of a rate-limited CRM stays full.

An event is selected when it has actions to send, none of them tried before, and nothing
earlier of its identities is pending (`clear`) or every earlier pending event of them
(`earlier`, from the claim's one order check) was selected before it in this pass or is in a
pass still in progress that has queued its calls and not given up: its calls then queue
right behind theirs, as `engine.worker.chain` would have them follow. It is decided once those
earlier events are (their answers may come in a later batch than its own), and it finishes
with them only if each settled whole, in the same write or a later one; otherwise it goes the
one-by-one way from its answers, behind them (`Applier.pipelined`), and so does every event
whose own answers do not settle it whole (a retryable error). Every selected event keeps a
chain link, so an event of a later claim can follow it as before; a link is `clean` once its
event's outcomes are written.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from engine.targets.base import CallContext, Outcome
from engine.worker.apply import PartResult, Queueing
from engine.worker.chain import Chains, Link
from engine.worker.claimwrite import ClaimedJob, ClaimFinishing, log_failures, untried

Replies = Sequence[Outcome | Exception]


class FollowingJob(ClaimedJob, Protocol):
    """A claimed event, with the earlier events its claim's order check found."""

    @property
    def earlier(self) -> list[int] | None: ...


@dataclass(frozen=True)
class Pipelined:
    """What an event selected for its claim's pass brings to the one-by-one way: its link, the
    links of the earlier events it queued behind, and its calls' answers."""

    link: Link
    leaders: tuple[Link, ...]
    replies: Replies


J = TypeVar("J", bound=FollowingJob)
Behind = tuple[tuple[int, ...], tuple[Link, ...]]  # earlier events: of the pass, of others


@dataclass(eq=False)
class ClaimPass(Generic[J]):
    """The events of a claim that go in one pass, in claim order, with each one's chain link
    and the earlier events it goes behind: of this pass, by id, and of passes in progress."""

    jobs: list[J] = field(default_factory=list)
    links: dict[int, Link] = field(default_factory=dict)
    behind: dict[int, Behind] = field(default_factory=dict)


@dataclass
class ClaimPipeline(ClaimFinishing[J]):
    """Queues a claim's selected events on `target` at once and finishes those it settles
    at once. The worker lends it how an event ends otherwise: `alone(job, pipelined, result)`
    takes an event from its answers (`pipelined`) or its settled part (`result`) to its
    conclusion; with neither, from the start (its link closed)."""

    target: Queueing
    chains: Chains
    alone: Callable[[J, Pipelined | None, PartResult | None], Coroutine[Any, Any, None]]
    # The links of the passes in progress, by event id: what a later claim's event follows.
    # An event that went on alone may be claimed again while its first pass still runs: the
    # newer pass's link is the one kept here.
    _in_progress: dict[int, Link] = field(default_factory=dict, init=False)

    def select(self, jobs: Sequence[J]) -> ClaimPass[J]:
        """The events of a claim, in claim order, that go in its one pass; each gets its
        chain link now, so the claim's other events (and later claims) can follow it."""
        name = self.target.name
        chosen: ClaimPass[J] = ClaimPass()
        for job in jobs:
            if not untried(job, name):
                continue
            behind = self._behind_of(job, chosen.links)
            if behind is None:
                continue
            event_id = job.event.id
            link = self.chains.open(name, event_id, (
                key for keyed in job.work.actions for key in keyed.action.identity))
            chosen.jobs.append(job)
            chosen.links[event_id] = self._in_progress[event_id] = link
            chosen.behind[event_id] = behind
        return chosen

    def _behind_of(self, job: J, chosen: dict[int, Link]) -> Behind | None:
        """The earlier events the event goes behind: of this pass (`chosen`, their calls
        queued in it just before its own) and of passes in progress whose calls are queued
        and not given up; None when one of them is neither."""
        if job.clear:
            return (), ()
        if not job.earlier:
            return None
        inside: list[int] = []
        outside: list[Link] = []
        for event_id in job.earlier:
            link = self._in_progress.get(event_id)
            if event_id in chosen:
                inside.append(event_id)
            elif link is not None and link.queued.done() and link.queued.result() \
                    and (not link.clean.done() or link.clean.result()):
                outside.append(link)
            else:
                return None
        return tuple(inside), tuple(outside)

    def _conclude_alone(self, job: J, result: PartResult) -> Awaitable[None]:
        return self.alone(job, None, result)

    async def process(self, claim: ClaimPass[J]) -> None:
        """Every selected event's calls queued in claim order; then, as their answers come
        in, the events settled whole (behind earlier events settled whole) finish in one write
        per wake-up, and each of the others goes the one-by-one way from its answers; all of
        them from the start when the lane stays full."""
        jobs = claim.jobs
        if not await self.lane.acquire(self.busy_wait):  # each its own way, from the start
            self._close(claim, jobs)
            log_failures(await asyncio.gather(*(self.alone(job, None, None) for job in jobs),
                                              return_exceptions=True))
            return
        answers = _Answers(jobs)
        alone: list[asyncio.Task[None]] = []
        try:
            for index, job in enumerate(jobs):
                event = job.event
                for keyed in job.work.actions:
                    answers.expect(index, self.target.submit(
                        keyed.action, CallContext(keyed.key, event.id, keyed.action.rule)))
                claim.links[event.id].settle(queued=True)
            while answers.undecided:
                settled, apart = self._decide(claim, await answers.next(), answers)
                alone += [asyncio.create_task(self.alone(job, pipelined, None),
                                              name=f"linkcrm-event-{job.event.id}")
                          for job, pipelined in apart]
                # One write at a time, in claim order: an event settled behind an earlier
                # one finishes in the same write or a later one, never ahead of it.
                if await self._finish_settled(claim, settled):
                    answers.written.update(job.event.id for job, _ in settled)
        except BaseException as error:  # stopped, a lease lost, a bug: the rest handed back
            for task in alone:
                task.cancel()
            undecided = [job for job in jobs if job.event.id in answers.undecided]
            self._close(claim, undecided)
            await self._hand_back_all(undecided)
            if isinstance(error, asyncio.CancelledError):
                raise
            log_failures([error])  # type and place only: the message may quote event data
        finally:
            self.lane.release()
            log_failures(await asyncio.gather(*alone, return_exceptions=True))
            self._close(claim, jobs)

    def _decide(self, claim: ClaimPass[J], ready: list[int], answers: _Answers[J]
                ) -> tuple[list[tuple[J, PartResult]], list[tuple[J, Pipelined]]]:
        """The answered events (by claim position) whose earlier events are decided: those
        settled whole behind earlier events settled whole, to finish together, and the others,
        each to go on alone behind its earlier events' links. The rest wait for theirs."""
        settled: list[tuple[J, PartResult]] = []
        apart: list[tuple[J, Pipelined]] = []
        whole = set(answers.written)
        for index in ready:
            job = answers.jobs[index]
            inside, outside = claim.behind[job.event.id]
            unwritten = [link for link in outside if not link.clean.done()]
            if unwritten or not answers.undecided.isdisjoint(inside):
                answers.park(index, unwritten)  # an earlier event is still undecided
                continue
            replies = answers.replies(index)
            result = self.applier.answered(job.event, self.target, job.work.actions, replies)
            answers.decided(index)
            if len(result.unrecorded) == len(job.work.actions) \
                    and all(e in whole for e in inside) \
                    and all(link.clean.result() for link in outside):
                settled.append((job, result))
                whole.add(job.event.id)
            else:
                leaders = tuple(claim.links[e] for e in inside) + outside
                apart.append((job, Pipelined(claim.links[job.event.id], leaders, replies)))
        return settled, apart

    async def _finish_settled(self, claim: ClaimPass[J],
                              settled: list[tuple[J, PartResult]]) -> bool:
        """`_finish`, then each link says whether its event's outcomes are written."""
        written = False
        try:
            written = await self._finish(settled)
        finally:
            for job, _ in settled:
                claim.links[job.event.id].settle(clean=written)
        return written

    def _close(self, claim: ClaimPass[J], jobs: Sequence[J]) -> None:
        for job in jobs:
            link = claim.links.get(job.event.id)
            if link is None:
                continue
            if self._in_progress.get(job.event.id) is link:
                del self._in_progress[job.event.id]
            self.chains.close(self.target.name, link)


class _Answers(Generic[J]):
    """The answers to a pass's calls as they come in: which events have all theirs
    (`next`), the events still undecided, and those whose outcomes are written."""

    def __init__(self, jobs: Sequence[J]) -> None:
        self.jobs = jobs
        self._calls: list[list[asyncio.Future[Outcome]]] = [[] for _ in jobs]
        self._left = [0] * len(jobs)
        self._ready: list[int] = []
        self._parked: list[int] = []
        self._wake = asyncio.Event()
        self._nudged = False
        self.undecided = {job.event.id for job in jobs}
        self.written: set[int] = set()  # events finished together, outcomes written

    def expect(self, index: int, call: asyncio.Future[Outcome]) -> None:
        self._calls[index].append(call)
        self._left[index] += 1
        call.add_done_callback(functools.partial(self._answered, index))

    def _answered(self, index: int, _: asyncio.Future[Outcome]) -> None:
        self._left[index] -= 1
        if not self._left[index]:
            self._ready.append(index)
            self._wake.set()

    async def next(self) -> list[int]:
        """The positions of the events with every answer in, and of those parked, in order,
        once some event has its answers in or an earlier pass has written a parked event's
        earlier event."""
        while not self._ready and not self._nudged:
            self._wake.clear()
            await self._wake.wait()
        ready = sorted(self._ready + self._parked)
        self._ready, self._parked, self._nudged = [], [], False
        return ready

    def park(self, index: int, unwritten: Sequence[Link]) -> None:
        """Decide this event again later: with the next answers, or once one of `unwritten`
        (earlier events in other passes) is written or given up."""
        self._parked.append(index)
        for link in unwritten:
            link.clean.add_done_callback(self._nudge)

    def _nudge(self, _: object) -> None:
        self._nudged = True
        self._wake.set()

    def decided(self, index: int) -> None:
        self.undecided.discard(self.jobs[index].event.id)

    def replies(self, index: int) -> list[Outcome | Exception]:
        """Its calls' answers, in order (cancelled: the batcher stopped, so the worker is
        stopping)."""
        replies: list[Outcome | Exception] = []
        for call in self._calls[index]:
            if call.cancelled():
                raise asyncio.CancelledError
            error = call.exception()
            if error is None:
                replies.append(call.result())
            elif isinstance(error, Exception):
                replies.append(error)
            else:
                raise error
        return replies


__all__ = ["ClaimPass", "ClaimPipeline", "FollowingJob", "Pipelined"]
