"""Apply one event's actions to one target: retries with backoff, outcomes, dead letters."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol

from engine.actions import JSON, Action
from engine.errors import PermanentCRMError, RetryableCRMError, UnstorableValueError
from engine.runtime.metrics import Metrics
from engine.storage import ActionOutcome, Clock, InboxEvent, NewOutcome, Outcomes, OutcomeStatus
from engine.targets.base import AllAtOnceTarget, CallContext, Outcome, Target
from engine.worker.chain import Link, all_clean
from engine.worker.coalesce import Coalescer
from engine.worker.plan import KeyedAction
from engine.worker.retrying import RetryPolicy

log = logging.getLogger("engine.worker.loop")

Sleep = Callable[[float], Awaitable[None]]


class Queueing(Target, Protocol):
    """A target that takes calls to send later, in order (`engine.worker.batch.Batcher`)."""

    def submit(self, action: Action, context: CallContext) -> asyncio.Future[Outcome]: ...


@dataclass
class PartResult:
    """How one target's share of one event ended: `done` (every action ok or dead) or due again
    at `retry_at`, with `note` saying why; `dead` holds one line per dead action. `unrecorded`:
    outcomes the CRM answered that are still to be recorded (`Applier.together` leaves them
    to go with the event's conclusion, in the same write)."""

    target: str
    done: bool
    retry_at: datetime | None = None
    note: str = ""
    dead: list[str] = field(default_factory=list)
    unrecorded: list[NewOutcome] = field(default_factory=list)


class Lane:
    """One target's share of the worker: at most `size` of its calls at once.

    An event waits for a place in the lane at most `wait` seconds, then defers this target's
    part durably instead of holding a worker slot. A lane that has made no progress for
    `wait` seconds while full (the CRM hangs) turns events away at once, so a stuck target
    holds only its own `size` slots and the other targets keep going.
    """

    def __init__(self, target: Target, size: int) -> None:
        self.target = target
        self.size = size
        self._semaphore = asyncio.Semaphore(size)
        self._progress = 0.0  # loop time of the last call that started or ended

    def stuck_for(self, wait: float) -> float:
        """Seconds since the last call started or ended when that is longer than `wait` and
        the lane is full (the CRM hangs); 0 otherwise."""
        idle = asyncio.get_running_loop().time() - self._progress
        return idle if self._semaphore.locked() and idle > wait else 0.0

    def stuck(self, wait: float) -> bool:
        return self.stuck_for(wait) > 0

    async def acquire(self, wait: float) -> bool:
        loop = asyncio.get_running_loop()
        if self._semaphore.locked():
            if self.stuck(wait):
                return False
            try:
                async with asyncio.timeout(wait):
                    await self._semaphore.acquire()
            except TimeoutError:
                return False
        else:
            await self._semaphore.acquire()  # a free place: no wait, no timer
        self._progress = loop.time()
        return True

    def release(self) -> None:
        self._progress = asyncio.get_running_loop().time()
        self._semaphore.release()


@dataclass
class Applier:
    """Runs actions against a target and records every attempt's outcome.

    Retryable errors wait in-process when the backoff is short (at most `short_wait` seconds)
    and are rescheduled durably otherwise; a permanent error (or a value the store refuses),
    or a retryable one past the policy's last attempt, makes the action dead with the CRM's
    own message.
    """

    outcomes: Outcomes
    metrics: Metrics
    policy: RetryPolicy
    short_wait: float
    clock: Clock
    sleep: Sleep

    def __post_init__(self) -> None:
        # Outcomes recorded in one pass of the loop (a batch's answers) go in one write.
        self._records: Coalescer[Sequence[NewOutcome], None] = Coalescer(self._record_all)

    async def apply(
        self,
        event: InboxEvent,
        target: Target,
        actions: Sequence[KeyedAction],
        known: Mapping[tuple[str, str], ActionOutcome],
    ) -> PartResult:
        result = PartResult(target.name, done=True)
        for keyed in actions:
            previous = known.get((target.name, keyed.key))
            if previous is not None and previous.status == "ok":
                continue  # never redo a success, whatever happens to the event afterwards
            if previous is not None and previous.status == "dead":
                result.dead.append(_dead_line(target.name, keyed, previous.error))
                continue
            # A first claim (new or replayed event) runs now; a retry keeps the action's time.
            due = previous.next_attempt_at if previous and event.attempts > 1 else None
            if due is not None and (due - self.clock()).total_seconds() > self.short_wait:
                return PartResult(target.name, False, due, f"{target.name}: backing off",
                                  result.dead)
            if due is not None:
                await self.sleep(max(0.0, (due - self.clock()).total_seconds()))
            attempts = previous.attempts if previous else 0
            ended = await self._attempt(event, target, keyed, attempts)
            if isinstance(ended, datetime):
                return PartResult(target.name, False, ended, f"{target.name}: retrying",
                                  result.dead)
            if ended is not None:
                result.dead.append(ended)
        return result

    async def pipeline(
        self,
        event: InboxEvent,
        target: Queueing,
        actions: Sequence[KeyedAction],
        known: Mapping[tuple[str, str], ActionOutcome],
        link: Link,
        leaders: Sequence[Link] = (),
    ) -> PartResult:
        """`apply`, with every action queued in the Batcher at once (behind `leaders`, the
        earlier events of its identities: `engine.worker.chain`), so they share a batch. An
        action retried, or a leader that did not come through clean, ends the pipelining: the
        actions after it go one by one as `apply` sends them, or the whole part is deferred."""
        if any(known.get((target.name, keyed.key)) is not None for keyed in actions):
            link.settle(queued=False)  # a retry keeps its due times: one by one
            return await self.apply(event, target, actions, known)
        answers = [target.submit(keyed.action, CallContext(keyed.key, event.id,
                                                           keyed.action.rule))
                   for keyed in actions]
        link.settle(queued=True)
        results = await asyncio.gather(*answers, return_exceptions=True)
        return await self.pipelined(event, target, actions, known, link, leaders, results)

    async def pipelined(
        self,
        event: InboxEvent,
        target: Target,
        actions: Sequence[KeyedAction],
        known: Mapping[tuple[str, str], ActionOutcome],
        link: Link,
        leaders: Sequence[Link],
        results: Sequence[Outcome | BaseException],
    ) -> PartResult:
        """`pipeline` from the answers (`results`) to the calls it queued: kept once every
        leader came through clean, recorded as far as they settle it, and the rest one by
        one (`engine.worker.claimpipe` queues a claim's calls itself and comes here for the
        events it cannot finish together)."""
        if not await all_clean(leaders):
            # Applied before an earlier event of its identity that is to be applied again:
            # apply it again afterwards, with nothing recorded (the actions are idempotent).
            link.settle(clean=False)
            return PartResult(target.name, False, self.clock() + timedelta(seconds=1.0),
                              f"{target.name}: waiting for an earlier event of the same "
                              "identity")
        replies: list[Outcome | Exception] = []
        for reply in results:
            if isinstance(reply, Exception) or not isinstance(reply, BaseException):
                replies.append(reply)
            else:
                raise reply  # cancelled: the worker is stopping
        # What the batch settled is recorded in one write (before the chain hears whether
        # this event came through clean); from the first answer that is not final, the
        # actions go one by one as `apply` sends them.
        result = self.answered(event, target, actions, replies)
        position = len(result.unrecorded)
        await self.record(result.unrecorded)
        result.unrecorded = []
        if position == len(actions):
            link.settle(clean=True)
            return result
        link.settle(clean=False)
        return await self._one_by_one(event, target, actions[position:], known,
                                      replies[position], result.dead)

    async def together(
        self,
        event: InboxEvent,
        target: AllAtOnceTarget,
        actions: Sequence[KeyedAction],
        known: Mapping[tuple[str, str], ActionOutcome],
        answers: Sequence[Outcome | Exception] | None = None,
    ) -> PartResult:
        """`apply`, with the event's actions written at once (`AllAtOnceTarget`; `answers`:
        that write's answers when it was made already, with other events'). When every
        one was answered, their outcomes are left `unrecorded` for the event's conclusion to
        record with its finish (one write, not two: `record` them if it does not finish);
        otherwise those answered are recorded in one write, and the rest goes the way `apply`
        goes (the write failed counts as the first action's attempt)."""
        if answers is None:
            if not actions or any(known.get((target.name, keyed.key)) is not None
                                  for keyed in actions):
                return await self.apply(event, target, actions, known)
            try:
                answers = await target.execute_all(
                    [(keyed.action, CallContext(keyed.key, event.id, keyed.action.rule))
                     for keyed in actions])
            except Exception as error:  # the whole write: its first action's attempt
                answers = [error]
        result = self.answered(event, target, actions, answers)
        position = len(result.unrecorded)
        if position == len(actions):
            return result
        await self.record(result.unrecorded)
        return await self._one_by_one(event, target, actions[position:], known,
                                      answers[position] if position < len(answers) else None,
                                      result.dead)

    def answered(self, event: InboxEvent, target: Target, actions: Sequence[KeyedAction],
                 answers: Sequence[Outcome | Exception]) -> PartResult:
        """The part as far as an all-at-once write's `answers` settle it: an `unrecorded`
        row for each action answered with its Outcome or a PermanentCRMError (dead), in
        order, up to the first other answer. Settled whole when there is a row per action."""
        result = PartResult(target.name, done=True)
        for keyed, answer in zip(actions, answers, strict=False):
            if isinstance(answer, Outcome):
                result.unrecorded.append(self._row(event, target, keyed, "ok", outcome=answer))
            elif isinstance(answer, PermanentCRMError | UnstorableValueError):
                # As `_attempt` words them: an unstorable value names the target it was for.
                message = str(answer) if isinstance(answer, PermanentCRMError) \
                    else f"{target.name}: {answer}"
                result.unrecorded.append(self._row(event, target, keyed, "dead",
                                                   error=message))
                result.dead.append(_dead_line(target.name, keyed, message))
            else:
                break
        return result

    async def _one_by_one(
        self, event: InboxEvent, target: Target, actions: Sequence[KeyedAction],
        known: Mapping[tuple[str, str], ActionOutcome], first: Outcome | Exception | None,
        dead: list[str],
    ) -> PartResult:
        """The rest of a part the way `apply` sends it, from `actions[0]`, whose first
        attempt already got `first` (None: not sent); `dead` holds the earlier dead lines."""
        ended = await self._attempt(event, target, actions[0], 0, first=first)
        if isinstance(ended, datetime):
            return PartResult(target.name, False, ended, f"{target.name}: retrying", dead)
        if ended is not None:
            dead.append(ended)
        later = await self.apply(event, target, actions[1:], known)
        later.dead[:0] = dead
        return later

    async def _attempt(
        self, event: InboxEvent, target: Target, keyed: KeyedAction, attempts: int,
        first: Outcome | Exception | None = None,
    ) -> datetime | str | None:
        """Run until ok (None), dead (its line) or rescheduled (the time it is due again);
        `first` is the answer to a first attempt already sent (pipelined)."""
        while True:
            attempt = attempts + 1
            retry_after: float | None = None
            try:
                if first is not None:
                    answer, first = first, None
                    if isinstance(answer, Exception):
                        raise answer
                    outcome = answer
                else:
                    outcome = await target.execute(
                        keyed.action, CallContext(keyed.key, event.id, keyed.action.rule))
            except RetryableCRMError as error:
                message, retry_after = str(error), error.retry_after
            except PermanentCRMError as error:
                await self._record(self._row(event, target, keyed, "dead", error=str(error)))
                return _dead_line(target.name, keyed, str(error))
            except UnstorableValueError as error:  # from the identity map: never retried
                message = f"{target.name}: {error}"
                await self._record(self._row(event, target, keyed, "dead", error=message))
                return _dead_line(target.name, keyed, message)
            except Exception as error:  # an adapter bug must not stop the worker: retry it
                log.exception("target raised an unexpected error", extra={
                    "event_id": event.id, "target": target.name, "rule": keyed.action.rule,
                    "action": keyed.action.kind})
                message = f"{target.name}: unexpected {type(error).__name__}: {error}"
            else:
                await self._record(self._row(event, target, keyed, "ok", outcome=outcome))
                return None
            if self.policy.exhausted(attempt):
                final = f"gave up after {attempt} attempts: {message}"
                await self._record(self._row(event, target, keyed, "dead", error=final))
                return _dead_line(target.name, keyed, final)
            delay = self.policy.delay(attempt, retry_after)
            due = self.clock() + timedelta(seconds=delay)
            recorded = await self._record(self._row(event, target, keyed, "retrying",
                                                    error=message, next_attempt_at=due))
            attempts = recorded.attempts
            log.info("action will be retried", extra={
                "event_id": event.id, "target": target.name, "rule": keyed.action.rule,
                "action": keyed.action.kind, "attempt": attempt, "delay": round(delay, 3)})
            if delay > self.short_wait:
                return due
            await self.sleep(delay)

    async def record(self, rows: Sequence[NewOutcome]) -> None:
        """Record outcomes left `unrecorded`, in one write (with those other events record in
        this pass of the loop), and count them."""
        if rows:
            await self._records.submit(rows)
        self.count(rows)

    async def _record_all(self, groups: list[Sequence[NewOutcome]]) -> list[None]:
        await self.outcomes.record_many([row for rows in groups for row in rows])
        return [None] * len(groups)

    async def aclose(self) -> None:
        """Wait for the outcomes still being written."""
        await self._records.aclose()

    def count(self, rows: Sequence[NewOutcome]) -> None:
        """Count outcomes recorded elsewhere (with the event's finish)."""
        for row in rows:
            self._count(row)

    async def _record(self, row: NewOutcome) -> ActionOutcome:
        recorded = await self.outcomes.record(row)
        self._count(row)
        return recorded

    @staticmethod
    def _row(
        event: InboxEvent,
        target: Target,
        keyed: KeyedAction,
        status: OutcomeStatus,
        *,
        outcome: Outcome | None = None,
        error: str | None = None,
        next_attempt_at: datetime | None = None,
    ) -> NewOutcome:
        action = keyed.action
        response: JSON = None if outcome is None else {
            "record_id": outcome.record_id, "created": outcome.created,
            "summary": outcome.summary}
        return NewOutcome(
            event_id=event.id,
            rule=action.rule,
            action_kind=action.kind,
            target=target.name,
            idempotency_key=keyed.key,
            status=status,
            request_summary=_summary(keyed),
            response=response,
            error=error,
            next_attempt_at=next_attempt_at,
            rules_version=keyed.rules_version,
        )

    def _count(self, row: NewOutcome) -> None:
        self.metrics.actions.inc(
            target=row.target,
            outcome={"ok": "ok", "retrying": "retried", "dead": "dead"}[row.status])
        if row.status == "dead":
            # The CRM's message may quote field values (personal data): it goes to the dead
            # letter, not to the log.
            log.warning("action dead-lettered", extra={
                "event_id": row.event_id, "target": row.target, "rule": row.rule,
                "action": row.action_kind})


def _summary(keyed: KeyedAction) -> JSON:
    """What was asked, by field name only: values may be personal data.

    Every event of one rule action asks the same, so the summary is one shared dict per
    shape (`_summary_of`); the store encodes it once (engine/storage/sqlite/outcomes.py).
    Nothing changes a summary once made."""
    action = keyed.action
    payload = action.payload()
    fields: list[str] = []
    for part in ("set", "set_once"):
        values = payload.get(part)
        if isinstance(values, dict):
            fields.extend(sorted(values))
    identity = tuple(key.field for key in action.identity)
    stage = payload.get("stage", _NO_STAGE)
    # Shared only when equal means the same JSON: text, not 1 == True == 1.0.
    made = _summary_of if stage is _NO_STAGE or type(stage) is str else _make_summary
    return made(action.kind, keyed.ordinal, identity, tuple(fields), stage)


_NO_STAGE = object()


def _make_summary(kind: str, ordinal: int, identity: tuple[str, ...], fields: tuple[str, ...],
                  stage: object) -> JSON:
    summary: dict[str, JSON] = {"action": kind, "ordinal": ordinal, "identity": list(identity)}
    if fields:
        summary["fields"] = list(fields)
    if stage is not _NO_STAGE:
        summary["stage"] = stage  # type: ignore[assignment]
    return summary


_summary_of = functools.lru_cache(maxsize=1024)(_make_summary)


def _dead_line(target: str, keyed: KeyedAction, error: str | None) -> str:
    return f"{target}: {keyed.describe()}: {error or 'dead'}"
