"""The worker: inbox -> rules -> action plan -> every enabled target, durably and in order.

    worker = Worker(storage, ruleset, targets, metrics=metrics, options=WorkerOptions())
    await worker.run()        # until worker.stop() (or cancellation), then drains

Each claimed event is planned with the rules snapshot current at claim time (`rules()`, which a
`RuleFollower` keeps up to date) and finishes with it, and each target gets its share in
its own task and lane (`engine.worker.apply`), so a slow or failing CRM never holds back the
others. Two events that touch the same identity on a target are applied to that target in
arrival order: an event records one ordering key per (target, identity) before any of its work
starts, drops a target's keys once that target is done with it, and a later event's share for a
target waits while an earlier unfinished event still holds one of its keys; on a target with
batch endpoints, when this worker is applying those earlier events, it queues its calls right
behind theirs instead, so one batch writes them all in order (`engine.worker.chain`). Where
the one target is the embedded CRM on SQLite or a CRM with batch endpoints, most of a claim's
events go in one write or one pass instead of a task each (`engine.worker.claimwrite`,
`engine.worker.claimpipe`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from engine.errors import StorageError, where
from engine.rules.model import RuleSet
from engine.runtime.metrics import Metrics
from engine.storage import (
    PENDING_STATUSES,
    ActionOutcome,
    Clock,
    FinalStatus,
    Finish,
    InboxEvent,
    Storage,
    utc_now,
)
from engine.targets.base import (
    AllAtOnceTarget,
    Outcome,
    Target,
    all_at_once,
    batches,
    claims_at_once,
    concurrency_of,
)
from engine.worker.apply import Applier, Lane, PartResult, Sleep
from engine.worker.attribution import attach_all
from engine.worker.batch import Batcher
from engine.worker.chain import Chains, Link, all_queued
from engine.worker.claimpipe import ClaimPipeline, Pipelined
from engine.worker.claimwrite import ClaimWriter
from engine.worker.coalesce import Coalescer
from engine.worker.leases import LeaseKeeper
from engine.worker.pinning import PinnedRules
from engine.worker.plan import KeyedAction, Work, ordering_keys, prepare, touched_keys
from engine.worker.retrying import RetryPolicy, transient
from engine.worker.snapshot import Rules, ShadowHook

log = logging.getLogger(__name__)


DEFAULT_BATCH = 100  # records per batch for a target that does not say (HubSpot's inputs)


@dataclass(frozen=True)
class WorkerOptions:
    """How hard the worker works and how long it waits in-process before rescheduling.

    `concurrency` is how many events each target handles at once (with one target, the number
    of events in flight); None: each target's own figure (`targets.base.concurrency_of`: 4
    for a remote CRM, 256 for the embedded one on SQLite). A target with batch endpoints gets
    the calls that queue up while a batch is in flight in its next batch, at most `batch_size`
    identities (1: no batching; None: the target's own `batch_records`, else 100, so a
    Salesforce batch fills a 200-record Collections upsert), and room for `batch_window`
    events instead of `concurrency`: a backlog waiting for a rate-limited CRM is then in flight
    together, so a batch carries every event of an identity and each record is read and
    written once (`engine.worker.chain`). Waits longer than `short_wait` (backoff),
    `order_wait` (an earlier event of the same identity) or `busy_wait` (a full lane) are
    rescheduled in the store, so a restart loses nothing and a worker slot is never held for
    long. An event deferred for a full lane or an earlier event comes back after about a
    second, twice as long with every further attempt, at most `defer_cap` seconds (with
    jitter): the backlog of a CRM that hangs thins out instead of being claimed again and
    again, and claims take the earliest due first, so the events that arrive meanwhile go to
    the other targets promptly.
    """

    concurrency: int | None = None
    lease_seconds: float = 60.0
    poll_interval: float = 0.2
    short_wait: float = 2.0
    order_wait: float = 5.0
    busy_wait: float = 2.0
    defer_cap: float = 60.0
    drain_timeout: float = 5.0
    batch_size: int | None = None
    batch_window: int = 5000
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    touch_retention_days: int | None = 90  # touches older than this are not attributed


@dataclass
class _Job:
    event: InboxEvent
    work: Work
    known: Mapping[tuple[str, str], ActionOutcome]
    keys: dict[str, list[str]]  # target -> its ordering keys, while that target is unfinished
    recorded: list[str] = field(default_factory=list)  # the ordering keys last stored
    # No earlier event held any of its keys when the claim recorded them (nor was one still
    # being planned): its first order check is already done.
    clear: bool = False
    # Otherwise the earlier events that check found, when it answers the first order check
    # of its one target's part (None: that check reads them itself).
    earlier: list[int] | None = None
    touched: list[str] = field(default_factory=list)  # `touched_keys` of its actions


class Worker:
    """Claims inbox events with a lease and applies their action plans to `targets`."""

    def __init__(
        self,
        storage: Storage,
        ruleset: RuleSet,
        targets: Sequence[Target],
        *,
        metrics: Metrics | None = None,
        options: WorkerOptions | None = None,
        worker_id: str | None = None,
        clock: Clock = utc_now,
        sleep: Sleep = asyncio.sleep,
        rules: Callable[[], Rules] | None = None,
        shadow: ShadowHook | None = None,
    ) -> None:
        """`rules` gives the snapshot to plan with at each claim (default: `ruleset`, always);
        `shadow` sees each claimed event while the snapshot has a shadow rule set."""
        if not targets:
            raise ValueError("a worker needs at least one target")
        self.storage = storage
        self.ruleset = ruleset
        fixed = Rules(ruleset)
        self.rules: Callable[[], Rules] = rules or (lambda: fixed)
        self.shadow = shadow
        self.pinned = PinnedRules(storage.rule_versions)
        self.targets = list(targets)
        self.metrics = metrics or Metrics()
        self.shadow_failures = self.metrics.counter(
            "linkcrm_shadow_observe_failures_total",
            "Claimed events the shadow observer failed on (the events were not affected).", ())
        self.options = options or WorkerOptions()
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.clock = clock
        sizes = {target.name: max(1, self.options.concurrency or concurrency_of(target))
                 for target in self.targets}
        # Calls go through a Batcher where the target has batch endpoints: concurrent events'
        # actions then share requests, which is what a rate-limited CRM needs.
        self.chains = Chains()
        # Events concluding in one pass of the loop finish in one write.
        self.finishes: Coalescer[Finish, bool] = Coalescer(
            lambda finishes: storage.inbox.finish_many(self.worker_id, finishes))
        batch = {target.name: self._batch_size(target) for target in self.targets}
        self.callers: dict[str, Target] = {
            target.name: Batcher(target, batch[target.name], self.chains.coming(target.name))
            if batches(target) and batch[target.name] > 1 else target
            for target in self.targets}
        # Targets that write an event's actions at once (the embedded CRM), checked once
        # here: a runtime protocol check costs more than the write it chooses.
        self.together = {target.name: target for target in self.targets
                         if not isinstance(self.callers[target.name], Batcher)
                         and all_at_once(target)}
        # With only the embedded CRM on SQLite, a claim's events go in one write together.
        only = self.targets[0]
        self.claim_at_once: AllAtOnceTarget | None = (
            only if len(self.targets) == 1 and only.name in self.together
            and claims_at_once(only) else None)
        self.lanes = {target.name: Lane(target, max(sizes[target.name], self.options.batch_window)
                                        if isinstance(self.callers[target.name], Batcher)
                                        else sizes[target.name]) for target in self.targets}
        # With several targets, room for one more target's worth of events: a stuck target can
        # fill its own lane and queue, and the others still have `n` events to work on (`n`:
        # the smallest lane before batching windows). The batching targets' windows overlap
        # (an event has a part for each target): the widest counts.
        n = min(sizes.values())
        windows = [lane.size for name, lane in self.lanes.items()
                   if isinstance(self.callers[name], Batcher)]
        others = [lane.size for name, lane in self.lanes.items()
                  if not isinstance(self.callers[name], Batcher)]
        self.capacity = max(windows + others) if len(self.lanes) == 1 else \
            max(windows, default=0) + sum(others) + n
        self.applier = Applier(storage.outcomes, self.metrics, self.options.policy,
                               self.options.short_wait, clock, sleep)
        self._tasks: set[asyncio.Task[None]] = set()
        self.leases = LeaseKeeper(storage.inbox, self.worker_id, self.options.lease_seconds)
        # A claim's one write to `claim_at_once` (`engine.worker.claimwrite`); how an event
        # ends otherwise (alone, finished, handed back) stays the worker's, lent to it.
        at_once = self.claim_at_once
        self.claim_writer: ClaimWriter[_Job] | None = None if at_once is None else ClaimWriter(
            self.lanes[at_once.name], target=at_once, alone=self._process,
            busy_wait=self.options.busy_wait, leases=self.leases, applier=self.applier,
            inbox=storage.inbox, worker_id=self.worker_id, finish=self._finish,
            finished=self._finished_event, release=self._release, notify=self._notify,
            transient=transient)
        # With only a batching target, a claim's events go in one pass (`engine.worker.claimpipe`).
        queueing = self.callers[only.name]
        self.claim_pipeline: ClaimPipeline[_Job] | None = ClaimPipeline(
            self.lanes[only.name], target=queueing, chains=self.chains,
            alone=self._process_pipelined, busy_wait=self.options.busy_wait, leases=self.leases,
            applier=self.applier, inbox=storage.inbox, worker_id=self.worker_id,
            finish=self._finish, finished=self._finished_event, release=self._release,
            notify=self._notify, transient=transient) \
            if len(self.targets) == 1 and isinstance(queueing, Batcher) else None
        self._observers: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._signal: asyncio.Event | None = None

    def _batch_size(self, target: Target) -> int:
        own = getattr(target, "batch_records", DEFAULT_BATCH)
        own = own if isinstance(own, int) and own > 0 else DEFAULT_BATCH
        wanted = self.options.batch_size
        return own if wanted is None else min(wanted, own)

    # -- running ----------------------------------------------------------------------------------

    async def run(self) -> None:
        """Work until `stop()`; cancellation stops claiming too. In-flight events get
        `drain_timeout` seconds to finish; the rest are released for the next claim."""
        log.info("worker started", extra={"worker_id": self.worker_id,
                                          "targets": [t.name for t in self.targets],
                                          "concurrency": {name: lane.size for name, lane
                                                          in self.lanes.items()}})
        try:
            await self._loop(until_idle=False)
        finally:
            # Stopped, cancelled or crashed: in-flight events finish or are released, so a
            # restarted worker (or another process) takes them over at once.
            self._stopping = True
            await self._drain()
            log.info("worker stopped", extra={"worker_id": self.worker_id})

    async def run_until_idle(self) -> None:
        """Work until no event is due and none is in flight (tests, one-off runs)."""
        try:
            await self._loop(until_idle=True)
        finally:
            await self._drain()

    def stop(self) -> None:
        """Stop claiming; `run()` returns once in-flight events are done (or released)."""
        self._stopping = True
        self._notify()

    async def _loop(self, *, until_idle: bool) -> None:
        while not self._stopping:
            free = self.capacity - self.leases.held
            claimed: list[InboxEvent] = []
            if free > 0:
                try:
                    claimed = await self.storage.inbox.claim(self.worker_id, free,
                                                       self.options.lease_seconds)
                except StorageError as error:
                    log.error("claim failed", extra={"error": str(error)})
                    await self._wait_for_change(self.options.poll_interval * 5)
                    continue
                # Its own event claimed again (this worker paused past the lease): the task
                # already at work on it goes on, and the claim has renewed its lease.
                claimed = [event for event in claimed if not self.leases.running(event.id)]
            if claimed:
                self.leases.claimed([event.id for event in claimed])
                try:
                    await self._start(claimed)
                finally:  # those that did not start (released, buried) are not kept
                    for event in claimed:
                        self.leases.release(event.id, None)
                continue
            if until_idle and not self._tasks:
                return
            await self._idle(self.options.poll_interval)

    async def _start(self, events: list[InboxEvent]) -> None:
        """Plan each event and record its ordering keys before any of them starts work, so a
        later event of the batch always sees the earlier ones' keys. A transient store failure
        hands the whole batch back; anything else fails only the event it happened to."""
        snapshot = self.rules()  # this batch's rules, kept by each event until it is done
        # An event `replay --rules-version` pinned is planned with that version instead.
        chosen = [await self.pinned.ruleset_for(event, snapshot.active) for event in events]
        try:
            contexts = await attach_all(self.storage.touches, events,
                                        snapshot.active.field_map.links,
                                        self.options.touch_retention_days)
        except StorageError as error:
            log.error("could not read or keep touches", extra={"error": str(error)})
            await asyncio.gather(*(self._release(e, "the store failed at claim time", 1.0)
                                   for e in events))
            return
        jobs = [_Job(event, prepare(event, rules, context), {}, {})
                for event, rules, context in zip(events, chosen, contexts, strict=True)]
        if snapshot.shadow is not None and self.shadow is not None:
            for event, rules in zip(events, chosen, strict=True):
                self._observe(event, rules, snapshot.shadow)
        begun = await self._begin_all(jobs)
        store_failures = [error for error in begun if transient(error)]
        if store_failures:
            log.error("could not start events", extra={"error": str(store_failures[0]),
                                                       "event_ids": [e.id for e in events]})
            await asyncio.gather(*(self._release(e, "the store failed at claim time", 1.0)
                                   for e in events))
            return
        ready: list[_Job] = []
        for job, result in zip(jobs, begun, strict=True):
            if self.leases.lost(job.event.id):
                continue  # another worker has it now
            if isinstance(result, Exception):
                await self._bury(job.event, result)
                continue
            if isinstance(result, BaseException):
                raise result
            ready.append(job)
        together: list[_Job] = []
        claim: Coroutine[Any, Any, None] | None = None
        if (writer := self.claim_writer) is not None:
            together = [job for job in ready if writer.goes_together(job)]
            claim = writer.process(together)
        elif (pipe := self.claim_pipeline) is not None:
            selected = pipe.select(ready)
            together, claim = selected.jobs, pipe.process(selected)
        going = {job.event.id for job in together}
        for job in ready:
            if job.event.id not in going:
                self._spawn(self._process(job), f"linkcrm-event-{job.event.id}", [job])
        if claim is not None and together:
            self._spawn(claim, f"linkcrm-claim-{together[0].event.id}", together)
        elif claim is not None:
            claim.close()  # nothing goes together: the coroutine never runs

    def _spawn(self, work: Coroutine[Any, Any, None], name: str, jobs: list[_Job]) -> None:
        task = asyncio.create_task(work, name=name)
        for job in jobs:
            self.leases.hold(job.event.id, task)
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    async def _begin_all(self, jobs: list[_Job]) -> list[BaseException | None]:
        """Read the claimed events' outcomes and record their ordering keys: one read and one
        write for the whole claim. When the write fails on some event's own data, each event
        begins alone, so only that one fails."""
        try:
            known = await self.storage.outcomes.of_events([job.event.id for job in jobs])
            for job in jobs:
                self._plan_keys(job, known.get(job.event.id, []))
            await self.storage.inbox.set_ordering_keys_many(
                {job.event.id: job.recorded for job in jobs})
        except Exception as error:
            if transient(error) or len(jobs) == 1:
                return [error] * len(jobs)
            return await asyncio.gather(*(self._begin(job) for job in jobs),
                                        return_exceptions=True)
        await self._check_order(jobs)
        return [None] * len(jobs)

    async def _check_order(self, jobs: list[_Job]) -> None:
        """The claim's first order check, in one read now that its keys are recorded: an
        event with nothing earlier is `clear`. Any doubt (a store error) leaves each event
        to check for itself."""
        wanted = {job.event.id: sorted({key for keys in job.keys.values() for key in keys})
                  for job in jobs if job.keys}
        try:
            found = await self.storage.inbox.earlier_pending_many(wanted)
        except StorageError as error:
            log.warning("order check for the claim failed", extra={"error": str(error)})
            return
        for job in jobs:
            shared, unplanned = found.get(job.event.id, ([], []))
            job.clear = job.event.id in wanted and not shared and not unplanned
            # What `earlier_unfinished` would answer now for its one target, unless it would
            # first wait for the unplanned ones to be planned.
            if not job.clear and len(job.keys) == 1 and (shared or not unplanned):
                job.earlier = sorted({*shared, *unplanned})

    async def _begin(self, job: _Job) -> None:
        self._plan_keys(job, await self.storage.outcomes.of_event(job.event.id))
        await self.storage.inbox.set_ordering_keys(job.event.id, job.recorded)

    def _plan_keys(self, job: _Job, outcomes: list[ActionOutcome]) -> None:
        job.known = {(o.target, o.idempotency_key): o for o in outcomes}
        job.keys = {target.name: ordering_keys(target.name, job.work.actions)
                    for target in self.targets if _unfinished(job, target.name)}
        job.touched = touched_keys(job.work.actions)
        job.recorded = _all_keys(job)

    def _observe(self, event: InboxEvent, active: RuleSet, shadow: RuleSet) -> None:
        """Show the event to the shadow observer in a task of its own: the event does not wait
        for it, and whatever it raises is logged and counted."""
        observer = self.shadow
        assert observer is not None

        async def observe() -> None:
            try:
                await observer.observe(event, active, shadow)
            except Exception as error:
                self.shadow_failures.inc()
                # Type and place only: the message may quote event data.
                log.warning("the shadow observer failed on an event", extra={
                    "event_id": event.id, "shadow_version": shadow.version,
                    "error_type": type(error).__name__, "where": where(error)})

        task = asyncio.create_task(observe(), name=f"linkcrm-shadow-{event.id}")
        self._observers.add(task)
        task.add_done_callback(self._observers.discard)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        error = None if task.cancelled() else task.exception()
        if error is not None:
            log.error("event task failed", extra={"error_type": type(error).__name__,
                                                  "where": where(error)})
            self.leases.forget(task)
        self._notify()

    async def _drain(self) -> None:
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=self.options.drain_timeout)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await self.finishes.aclose()
        await self.applier.aclose()
        await self.leases.aclose()
        if self._observers:  # shadow comparisons get what is left of the drain, then go
            _, late = await asyncio.wait(set(self._observers),
                                         timeout=self.options.drain_timeout)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        for caller in self.callers.values():
            if isinstance(caller, Batcher):
                await caller.aclose()

    # -- one event ----------------------------------------------------------------------------

    async def _process(self, job: _Job,
                       answers: Sequence[Outcome | Exception] | None = None,
                       result: PartResult | None = None,
                       pipelined: Pipelined | None = None) -> None:
        """The event from its order check to its conclusion; `answers`: what its claim's one
        write answered for its actions (`ClaimWriter.process`), in their place; `pipelined`:
        its calls as its claim's pass queued and answered them (`ClaimPipeline.process`);
        `result`: its part as either settled it, left to conclude."""
        event = job.event
        me = asyncio.current_task()
        assert me is not None
        self.leases.hold(event.id, me)
        try:
            if result is not None:
                parts = [result]
            elif pipelined is not None:
                parts = [await self._pipelined_part(job, pipelined)]
            elif answers is not None:
                parts = [await self._part(job, self.targets[0], answers)]
            else:
                parts = await self._parts(job)
            await self._conclude(job, parts)
        except asyncio.CancelledError:
            await self._release(event, "interrupted: the worker stopped", 0.0)
            raise
        except Exception as error:
            if not transient(error):
                await self._bury(event, error)
                return
            log.error("event left for a later attempt", extra={"event_id": event.id,
                                                               "error": str(error)})
            await self._release(event, f"storage error: {error}", 5.0)
        finally:
            self.leases.release(event.id, me)

    async def _parts(self, job: _Job) -> list[PartResult]:
        """Every target's share, each in its own task (one target: in this one)."""
        if len(self.targets) == 1:
            return [await self._part(job, self.targets[0])]
        parts = [asyncio.create_task(self._part(job, target)) for target in self.targets]
        try:
            return list(await asyncio.gather(*parts))
        except BaseException:
            for part in parts:
                part.cancel()
            await asyncio.gather(*parts, return_exceptions=True)
            raise

    async def _part(self, job: _Job, target: Target,
                    answers: Sequence[Outcome | Exception] | None = None) -> PartResult:
        """This target's share of the event: wait for order, take a lane, apply (`answers`:
        the all-at-once target's answers to its actions, already written)."""
        if target.name not in job.keys:
            return PartResult(target.name, done=True, dead=_dead_lines(job, target.name))
        caller = self.callers[target.name]
        link = self.chains.open(target.name, job.event.id, (
            key for keyed in job.work.actions for key in keyed.action.identity)) \
            if isinstance(caller, Batcher) else None
        try:
            blocked = await self._wait_for_order(job, target.name)
            if isinstance(blocked, PartResult):
                return blocked
            lane = self.lanes[target.name]
            if not await lane.acquire(self.options.busy_wait):
                # A CRM that has hung for a minute will likely hang a while longer: no sooner.
                hung = lane.stuck_for(self.options.busy_wait)
                return PartResult(target.name, False, self._deferred(job.event, 1.0, hung),
                                  f"{target.name}: busy")
            try:
                if isinstance(caller, Batcher) and link is not None:
                    result = await self.applier.pipeline(job.event, caller, job.work.actions,
                                                         job.known, link, blocked)
                elif (together := self.together.get(target.name)) is not None:
                    result = await self.applier.together(job.event, together,
                                                         job.work.actions, job.known, answers)
                else:
                    result = await self.applier.apply(job.event, caller, job.work.actions,
                                                      job.known)
            finally:
                lane.release()
        finally:
            if link is not None:
                self.chains.close(target.name, link)
        return await self._part_ended(job, result)

    def _process_pipelined(self, job: _Job, pipelined: Pipelined | None,
                           result: PartResult | None) -> Coroutine[Any, Any, None]:
        """How an event of a claim's pass (`ClaimPipeline`) goes on alone."""
        return self._process(job, result=result, pipelined=pipelined)

    async def _pipelined_part(self, job: _Job, pipelined: Pipelined) -> PartResult:
        """The one target's part from the answers its claim's pass got (`Applier.pipelined`)."""
        name = self.targets[0].name
        try:
            result = await self.applier.pipelined(
                job.event, self.callers[name], job.work.actions, job.known, pipelined.link,
                pipelined.leaders, pipelined.replies)
        finally:
            self.chains.close(name, pipelined.link)
        return await self._part_ended(job, result)

    async def _part_ended(self, job: _Job, result: PartResult) -> PartResult:
        if result.done:
            del job.keys[result.target]
            if job.keys:  # later events may go on this target while the others finish
                await self._record_keys(job)
            self._notify()  # the last target's keys go with the event's conclusion
        return result

    async def _record_keys(self, job: _Job) -> None:
        keys = _all_keys(job)
        if keys != job.recorded:
            await self.storage.inbox.set_ordering_keys(job.event.id, keys)
            job.recorded = keys

    async def _wait_for_order(self, job: _Job, target: str) -> PartResult | tuple[Link, ...]:
        """Nothing (go), the links of the earlier events to follow on a batching target
        (`engine.worker.chain`), or this part deferred until an earlier event is done."""
        if job.clear:
            return ()
        keys = job.keys[target]
        lane = self.lanes[target]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.options.order_wait
        first, job.earlier = job.earlier, None  # the claim's check, read a moment ago
        while True:
            earlier = first if first is not None else \
                await self.storage.inbox.earlier_unfinished(job.event.id, keys)
            first = None
            if not earlier:
                return ()
            leaders = self.chains.leaders(target, earlier)
            if leaders is not None and await all_queued(leaders):
                return leaders
            blocker = await self.storage.inbox.get(earlier[0])
            if blocker is None or blocker.status not in PENDING_STATUSES:
                continue  # it finished between the two reads: check again at once
            remaining = deadline - loop.time()
            # No waiting in-process behind a target that hangs (the slot is worth more to the
            # events of the other targets), nor behind an event no worker holds: claims go by
            # due time, not arrival order, so an earlier event may still be waiting for a
            # claim, and this slot may be the one it needs.
            if remaining <= 0 or self._stopping or lane.stuck(self.options.busy_wait) \
                    or not self._held(blocker):
                break
            # Woken when an event of this worker moves on; polled for other processes' events.
            await self._wait_for_change(min(remaining, 0.5))
        # Behind an earlier event of its identity an event checks again at least every half
        # lease: that event may finish (or its crashed worker's lease run out) at any moment,
        # and an identity's events must not drift ever further apart. The doubling is for a
        # CRM that hangs, and half a lease still thins out the backlog waiting behind it.
        due = self._deferred(job.event, 0.5, cap=self.options.lease_seconds / 2)
        if blocker.next_attempt_at is not None and blocker.lease_owner is None \
                and blocker.next_attempt_at > due:
            due = min(blocker.next_attempt_at + timedelta(seconds=0.5),
                      self._after(self.options.policy.cap))
        return PartResult(target, False, due, f"{target}: waiting for earlier event "
                                              f"{earlier[0]} of the same identity")

    async def _conclude(self, job: _Job, results: list[PartResult]) -> None:
        event = job.event
        later = [r for r in results if not r.done and r.retry_at is not None]
        if later:
            due = min(r.retry_at for r in later if r.retry_at is not None)
            note = "; ".join(r.note for r in later)
            await self.applier.record([row for r in results for row in r.unrecorded])
            await self._record_keys(job)
            if not await self.storage.inbox.retry_later(event.id, self.worker_id, due, note):
                log.warning("lease lost before rescheduling", extra={"event_id": event.id})
            return
        finish = self._finish(job, results)
        self._finished_event(job, finish, await self.finishes.submit(finish))

    def _finish(self, job: _Job, results: list[PartResult]) -> Finish:
        """How the event ends, its parts all done: dead with every problem, ignored when no
        rule matched, else processed; with its outcomes left unrecorded."""
        work = job.work
        dead = [line for r in results for line in r.dead]
        problems = ([work.error] if work.error else []) + work.failures + dead
        status: FinalStatus
        if problems:
            status = "dead"
        elif work.plan is not None and not work.plan.matched:
            status = "ignored"
        else:
            status = "processed"
        keys = _all_keys(job)
        return Finish(job.event.id, status, "\n".join(problems) if problems else None,
                      ordering_keys=None if keys == job.recorded else keys,
                      outcomes=[row for r in results for row in r.unrecorded])

    def _finished_event(self, job: _Job, finish: Finish, finished: bool) -> None:
        event = job.event
        self.applier.count(finish.outcomes)  # recorded, finished or not
        if finished:
            self.metrics.processed.inc(status=finish.status)
            log.log(logging.WARNING if finish.status == "dead" else logging.DEBUG,
                    "event finished", extra={"event_id": event.id,
                                             "event_type": event.event_type,
                                             "status": finish.status,
                                             "actions": len(job.work.actions)})
        else:
            log.warning("lease lost before finishing", extra={"event_id": event.id})

    async def _bury(self, event: InboxEvent, error: Exception) -> None:
        """Dead-letter an event after an error that retrying cannot fix (a value the store
        refuses, a bug): the error goes to the dead letter, the worker goes on. Should even
        that fail, the event is handed back for a later attempt."""
        message = f"the worker failed on this event: {type(error).__name__}: {error}"
        # Type and place only: the message may quote event data (emails, tokens).
        log.warning("event dead-lettered after an unexpected error", extra={
            "event_id": event.id, "event_type": event.event_type,
            "error_type": type(error).__name__, "where": where(error)})
        try:
            finished = await self.storage.inbox.finish(event.id, self.worker_id, "dead", message)
        except StorageError as failure:
            log.error("could not dead-letter the event", extra={"event_id": event.id,
                                                                "error": str(failure)})
            await self._release(event, message, 5.0)
            return
        if finished:
            self.metrics.processed.inc(status="dead")
        else:
            log.warning("lease lost before finishing", extra={"event_id": event.id})

    async def _release(self, event: InboxEvent, why: str, delay: float) -> None:
        """Hand a leased event back (due after `delay`); if even that fails, the lease expiry
        hands it back."""
        with contextlib.suppress(StorageError, TimeoutError):
            async with asyncio.timeout(5):
                await asyncio.shield(self.storage.inbox.retry_later(
                    event.id, self.worker_id, self._after(delay), why))

    # -- helpers ------------------------------------------------------------------------------

    def _after(self, seconds: float) -> datetime:
        return self.clock() + timedelta(seconds=seconds)

    def _deferred(self, event: InboxEvent, first: float, floor: float = 0.0,
                  cap: float | None = None) -> datetime:
        """When an event deferred without trying (a full lane, an earlier event of the same
        identity) is due again: `first` seconds on its first attempt, doubling with each
        further attempt, at least `floor`, at most `cap` (default `defer_cap`); jittered so a
        deferred backlog spreads out."""
        doublings = min(max(event.attempts, 1) - 1, 30)
        limit = self.options.defer_cap if cap is None else min(cap, self.options.defer_cap)
        delay = min(limit, max(first * 2.0 ** doublings, floor))
        return self._after(delay * self.options.policy.rng.uniform(0.5, 1.0))

    def _held(self, event: InboxEvent) -> bool:
        """Whether a worker holds a live lease on `event`."""
        expires = event.lease_expires_at
        return event.lease_owner is not None and expires is not None and expires > self.clock()

    def _notify(self) -> None:
        if self._signal is not None:
            self._signal.set()
        self._signal = asyncio.Event()

    async def _idle(self, timeout: float) -> None:
        """After an empty claim: until the storage says new events may be due (another
        process stored or requeued some), an event of this worker moves on, or `timeout`."""
        if self._signal is None:
            self._signal = asyncio.Event()
        waiters = {asyncio.ensure_future(self.storage.wait_for_events(timeout)),
                   asyncio.ensure_future(self._signal.wait())}
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
            for failure in await asyncio.gather(*waiters, return_exceptions=True):
                if isinstance(failure, StorageError):  # a lost LISTEN: the poll still works
                    log.warning("waiting for events failed", extra={"error": str(failure)})

    async def _wait_for_change(self, timeout: float) -> None:
        if self._signal is None:
            self._signal = asyncio.Event()
        signal = self._signal
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await signal.wait()


def _unfinished(job: _Job, target: str) -> bool:
    for keyed in job.work.actions:
        previous = job.known.get((target, keyed.key))
        if previous is None or previous.status == "retrying":
            return True
    return False


def _dead_lines(job: _Job, target: str) -> list[str]:
    lines = []
    for keyed in job.work.actions:
        previous = job.known.get((target, keyed.key))
        if previous is not None and previous.status == "dead":
            lines.append(f"{target}: {keyed.describe()}: {previous.error or 'dead'}")
    return lines


def _all_keys(job: _Job) -> list[str]:
    """The keys to record: each unfinished target's, which later events wait on, and the
    identities the event touched (`touched_keys`), which stay for the delivery log's search
    and which no event ever waits on (no target is named "*")."""
    if not job.keys:
        return job.touched
    return sorted({*job.touched, *(key for keys in job.keys.values() for key in keys)})


__all__ = ["KeyedAction", "Worker", "WorkerOptions"]
