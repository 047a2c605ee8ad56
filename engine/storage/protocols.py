"""What linkcrm keeps durably: one protocol per concern, and the `Storage` that holds them.

    storage.inbox         deliveries: dedupe, leases, retries, ordering, dead letters, replay
    storage.outcomes      what each action did on each target, by idempotency key
    storage.identities    identity map and deal keys: which CRM record a person or deal is
    storage.rate_limits   token buckets shared by every process
    storage.local_crm     the embedded CRM behind the `local` target
    storage.rule_versions published rule sets: their files, who/when, which one is active
    storage.shadow        shadow mode: per-event plan differences of a candidate rule version
    storage.touches       link-level events kept for attribution, and what identify events got

Each part asks only for what it uses: the worker's applier takes `Outcomes`, a CRM target an
`IdentityMap` and `RateLimits`, the `local` target a `LocalCRMStore`. Every method is a
coroutine and every write is atomic per call: committed durably before the coroutine returns,
or StorageError and nothing of it kept. Arguments are checked the same way on every backend
(`engine.storage.checks`): ValueError for a call that makes no sense, UnstorableValueError for
a value no store can keep. Times come from the `clock` the storage was opened with (UTC).

    async with open_storage("sqlite:///linkcrm.db") as storage:
        await storage.migrate()
        result = await storage.inbox.store(event)
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from types import TracebackType
from typing import Protocol

from engine.actions import IdentityKey
from engine.errors import UnstorableValueError
from engine.storage import records, touchrecords
from engine.storage.records import Fields, Keys

Clock = Callable[[], datetime]

# The size of the test write `check_writable` commits after a failed commit: a large event.
PROBE_BYTES = 64 * 1024

# How long `earlier_unfinished` waits for earlier events that another worker has claimed but
# not planned yet (their ordering keys are milliseconds away) before counting them as blockers.
PLANNING_WAIT = 0.25


def utc_now() -> datetime:
    return datetime.now(UTC)


class Inbox(Protocol):
    """Deliveries from the moment they are acknowledged until a worker is done with them.

    Methods that name a `worker_id` only act while that worker holds the event's lease and
    return False otherwise, so a worker whose lease expired cannot overwrite the next one's.
    """

    async def store(self, event: records.NewEvent) -> records.StoreResult:
        """Insert the event unless its dedupe key exists (the unique constraint decides);
        durable before it returns."""

    async def get(self, event_id: int) -> records.InboxEvent | None:
        """One inbox event, or None."""

    async def list_events(
        self, *, status: records.EventStatus | None = None, limit: int = 100,
        before_id: int | None = None,
    ) -> list[records.InboxEvent]:
        """Newest first; `before_id` pages backwards."""

    async def browse(
        self, where: records.EventFilter, *, limit: int = 50, before_id: int | None = None,
    ) -> list[records.InboxEvent]:
        """Events matching `where`, newest first, at most `limit`; `before_id` pages backwards
        (keyset paging: each page costs the same however deep, and the time bounds become
        id bounds, found by a binary search over the ids)."""

    async def activity(self, since: datetime) -> list[records.ActivityCount]:
        """Events received since `since` (rounded down to its minute), counted per minute and
        current status; the cost grows with the minutes, not with the events."""

    async def claim(
        self, worker_id: str, limit: int, lease_seconds: float
    ) -> list[records.InboxEvent]:
        """Lease up to `limit` due pending events (no live lease, next attempt reached), the
        earliest due first: a new event is due when it was received, a rescheduled one at its
        next attempt; ties in arrival order. So events rescheduled again and again (a CRM that
        hangs) never crowd out the events that arrived since. Each claim counts as an attempt."""

    async def extend_lease(self, event_id: int, worker_id: str, lease_seconds: float) -> bool:
        """Push the lease expiry out for a long-running event."""

    async def extend_leases(
        self, event_ids: Sequence[int], worker_id: str, lease_seconds: float
    ) -> set[int]:
        """`extend_lease` for many events, in one write where the backend can; the ids whose
        lease `worker_id` still held (and now holds for `lease_seconds` more)."""
        return {event_id for event_id in event_ids
                if await self.extend_lease(event_id, worker_id, lease_seconds)}

    async def finish(
        self, event_id: int, worker_id: str, status: records.FinalStatus, error: str | None = None,
        *, ordering_keys: Sequence[str] | None = None,
        outcomes: Sequence[records.NewOutcome] = (),
    ) -> bool:
        """Mark a leased event processed, ignored or dead, and release the lease; with
        `ordering_keys`, replace its ordering keys in the same write (only if it was still
        leased by `worker_id`). `outcomes` (its last actions' outcomes, as
        `Outcomes.record_many` records them) go in the same write, all or none, whether or
        not the lease was still held: they say what the CRM answered."""

    async def finish_many(self, worker_id: str, finishes: Sequence[records.Finish]
                          ) -> list[bool]:
        """`finish` for each, in one write where the backend can (all or none); whether each
        event was still leased by `worker_id` (and so finished)."""
        return [await self.finish(f.event_id, worker_id, f.status, f.error,
                                  ordering_keys=f.ordering_keys, outcomes=f.outcomes)
                for f in finishes]

    async def retry_later(
        self, event_id: int, worker_id: str, next_attempt_at: datetime, error: str | None
    ) -> bool:
        """Mark a leased event failed, due again at `next_attempt_at`, and release the lease."""

    async def set_ordering_keys(self, event_id: int, keys: Sequence[str]) -> None:
        """Record which identities an event touches (replaces earlier keys; none is a valid
        answer) and that they are recorded, so later events can wait for it."""

    async def set_ordering_keys_many(self, keys: Mapping[int, Sequence[str]]) -> None:
        """`set_ordering_keys` for every event in `keys` (event id -> its keys), in one write
        where the backend can: a claim's events record theirs together."""
        for event_id, event_keys in keys.items():
            await self.set_ordering_keys(event_id, event_keys)

    async def earlier_pending(
        self, event_id: int, keys: Sequence[str]
    ) -> tuple[list[int], list[int]]:
        """One read: (pending events before `event_id` sharing one of `keys`, pending events
        before `event_id` whose keys are not recorded yet), each in arrival order."""

    async def earlier_pending_many(
        self, wanted: Mapping[int, Sequence[str]]
    ) -> dict[int, tuple[list[int], list[int]]]:
        """`earlier_pending` for every event in `wanted` (event id -> its keys), in one read
        where the backend can; an event given no keys gets ([], [])."""
        return {event_id: await self.earlier_pending(event_id, keys) if keys else ([], [])
                for event_id, keys in wanted.items()}

    async def earlier_unfinished(self, event_id: int, keys: Sequence[str]) -> list[int]:
        """Ids of pending events that arrived before `event_id` and share one of `keys`; the
        worker applies an event only when this is empty (per-identity order).

        An earlier pending event whose keys are not recorded yet counts too: another worker
        (another process, another machine) may have just claimed it and be about to touch the
        same identity. Such events get up to PLANNING_WAIT seconds to record their keys before
        they count; a requeued event records its keys again the same way."""
        if not keys:
            return []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + PLANNING_WAIT
        while True:
            shared, unplanned = await self.earlier_pending(event_id, keys)
            if shared or not unplanned or loop.time() >= deadline:
                return sorted({*shared, *unplanned})
            await asyncio.sleep(0.005)

    async def dead_letters(self, limit: int = 100) -> list[records.DeadLetter]:
        """Dead events and dead action outcomes, newest first."""

    async def requeue(self, event_id: int, rules_version: str | None = None) -> bool:
        """Make an event pending again (any status) and its dead outcomes retrying; False when
        the event is unknown, leased by a live worker, or its raw body was purged. The event
        is pinned to `rules_version` (a published version the worker plans it with), or
        unpinned with None (the active version plans it)."""

    async def requeue_dead(self, rules_version: str | None = None) -> list[int]:
        """Requeue every dead event and every event with a dead outcome, pinned as `requeue`
        says; returns their ids."""

    async def purge_raw_bodies(self, older_than: datetime) -> int:
        """Drop the raw body of processed and ignored events received before `older_than`;
        dedupe keys and statuses stay, so a late retry is still a duplicate."""

    async def stats(self) -> records.InboxStats:
        """Inbox depth by status and the receipt time of the oldest pending event (the first
        pending one in arrival order); constant time in the inbox size, so /metrics can ask on
        every scrape."""


class Outcomes(Protocol):
    """The latest outcome of every action on every target, keyed by idempotency key."""

    async def get(self, target: str, idempotency_key: str) -> records.ActionOutcome | None:
        """The outcome of the action with that key on that target, or None."""

    async def record(self, outcome: records.NewOutcome) -> records.ActionOutcome:
        """Upsert by (target, idempotency key), counting the attempt. An `ok` outcome is never
        overwritten: the stored row is returned unchanged, so a replay cannot undo success.
        Diagnostics (error, summaries) are cleaned, never refused (`values.storable_outcome`)."""

    async def record_many(self, outcomes: Sequence[records.NewOutcome]) -> None:
        """`record` for each, in order, in one write where the backend can (all or none),
        without reading the rows back."""
        for outcome in outcomes:
            await self.record(outcome)

    async def of_event(self, event_id: int) -> list[records.ActionOutcome]:
        """Every action outcome of one event, in recording order."""

    async def of_events(self, event_ids: Sequence[int]) -> dict[int, list[records.ActionOutcome]]:
        """`of_event` for many events in one read where the backend can: every id given is a
        key, with [] for an event without outcomes."""
        return {event_id: await self.of_event(event_id) for event_id in event_ids}

    async def counts(self) -> Mapping[tuple[str, str], int]:
        """(target, status) -> number of actions, for metrics."""

    async def activity(self, since: datetime,
                       limit: int = 20_000) -> list[records.ActivityCount]:
        """Outcomes of the events received since `since`, last recorded since `since`,
        counted per minute (of their latest attempt), target and status; only the outcomes
        of the newest events, at most `limit` of them, so the cost has a bound."""

    async def recent_retries(self, since: datetime, limit: int = 100) -> list[
            records.ActionOutcome]:
        """Outcomes of events received since `since` that wait for a retry, newest first:
        their errors say whether a target is rate-limited or failing."""


class IdentityMap(Protocol):
    """Which CRM record a person (by identity key) or a deal (by deal key) is, per target,
    shared by every worker. Concurrent binds agree: the first one wins and every caller is
    told the winner."""

    async def lookup_identity(self, target: str, keys: Keys) -> str | None:
        """The CRM record id of the first key (priority order) the target knows, or None."""

    async def bind_identity(self, target: str, key: IdentityKey, record_id: str) -> str:
        """Map the key to `record_id` unless it is already mapped; returns the id that won."""

    async def bind_identities(self, target: str, bindings: Sequence[tuple[IdentityKey, str]]
                              ) -> list[str]:
        """`bind_identity` for each (key, record id), in order, in one write: for each, the
        id that won (a key bound twice in the list keeps the first). A bad key or id raises
        before anything is written."""

    async def rebind_identity(self, target: str, key: IdentityKey, record_id: str) -> None:
        """Map the key to `record_id`, replacing whatever it named, in one atomic write: for
        a CRM that is the authority on the record (its unique property, a merged record)."""

    async def unbind_identity(
        self, target: str, key: IdentityKey, record_id: str | None = None
    ) -> None:
        """Forget a mapping (the CRM record was deleted or merged away). With `record_id`,
        only while the key still names that record: a mapping another worker has replaced
        meanwhile stays."""

    async def lookup_deal(self, target: str, deal_key: str) -> str | None:
        """The CRM deal id made for `deal_key` on that target, or None."""

    async def bind_deal(self, target: str, deal_key: str, deal_id: str) -> str:
        """Map the deal key unless it is already mapped; returns the id that won."""

    async def bind_deals(self, target: str, bindings: Sequence[tuple[str, str]]) -> list[str]:
        """`bind_deal` for each (deal key, deal id), in order, in one write: for each, the
        id that won. A bad key or id raises before anything is written."""


class RateLimits(Protocol):
    """Token buckets shared by every process, so N workers do not multiply a CRM's limit."""

    async def take_tokens(
        self, bucket: str, cost: float, capacity: float, refill_per_second: float
    ) -> float:
        """Take `cost` tokens and return 0, or take nothing and return the seconds to wait
        before asking again. Needs 0 < cost <= capacity and refill_per_second > 0."""

    async def take_slots(self, windows: Sequence[tuple[str, int, float]]) -> float:
        """One request in each rolling window (bucket, limit, window seconds), all or none:
        record it in every one and return 0 when each has fewer than `limit` of its recorded
        requests under `window` seconds old; else record nothing and return the seconds until
        the last of them has room. A bucket keeps one row per request of its last `limit`
        (`bucket#0000`, ...): a rolling window exactly as a CRM counts it, where a token bucket
        must pace below the limit to stay under it in every window; taking a request's every
        limit at once keeps one from aging while the request waits for another. Needs distinct
        buckets, 1 <= limit <= 10,000 and window > 0."""


class LocalCRMStore(Protocol):
    """The embedded CRM's contacts, identities, stage history and deals (`local` target).

    `concurrency` is how many callers at once it serves well: the `local` target's default
    number of events in flight. `one_write`: `apply_all` writes all its ops as one job of the
    store whatever their number, so a worker may hand it a whole claim's at once."""

    concurrency: int
    one_write: bool = False

    async def upsert_contact(
        self, identity: Keys, set: Fields, set_once: Fields
    ) -> records.ContactResult:
        """Find the contact by the first identity key that matches (or create it), attach the
        other keys, write `set`, and write `set_once` only into empty fields. Null and empty
        string values are skipped: nothing is cleared by accident."""

    async def set_stage(
        self, identity: Keys, stage: str, stages: Sequence[str], event_id: int | None = None
    ) -> records.StageResult:
        """Move the contact (created if missing) to `stage` only if it is further along
        `stages` (forward order) than its current stage; a change adds a history row that
        names `event_id`. Raises ValueError for a stage not in `stages`."""

    async def create_deal(
        self, identity: Keys, key: str, title: str, stage: str | None, amount: float | None,
        fields: Fields,
    ) -> records.DealResult:
        """Create the deal for `key` linked to the contact (created if missing); one deal per
        key, ever: an existing deal is returned unchanged."""

    async def apply_all(self, ops: Sequence[records.LocalOp]
                        ) -> list[records.LocalResult | Exception]:
        """Every op in order (an event's actions), as one write where the backend can, with
        one result per op: what its own call returns, or the error its own data raised
        (ValueError, OverflowError, UnstorableValueError), in which case that op is undone
        alone and the next ones still run. Any other failure (the database) raises: a backend
        that writes them together keeps none of them; this default, one call per op, keeps
        those before it (each op is idempotent, so running them all again is harmless)."""
        results: list[records.LocalResult | Exception] = []
        for op in ops:
            try:
                results.append(await self._apply_one(op))
            except (ValueError, OverflowError, UnstorableValueError) as error:
                results.append(error)
        return results

    async def _apply_one(self, op: records.LocalOp) -> records.LocalResult:
        if isinstance(op, records.UpsertContactOp):
            return await self.upsert_contact(op.identity, op.set, op.set_once)
        if isinstance(op, records.SetStageOp):
            return await self.set_stage(op.identity, op.stage, op.stages, op.event_id)
        return await self.create_deal(op.identity, op.key, op.title, op.stage, op.amount,
                                      op.fields)

    async def contacts(self, limit: int | None = None) -> list[records.LocalContact]:
        """Contacts with identities, fields and stage history, oldest first."""

    async def deals(self, limit: int | None = None) -> list[records.LocalDeal]:
        """Deals, oldest first."""


class RuleVersions(Protocol):
    """Published rule sets, known by their version (the content hash of their files): what
    every process runs is the one `active` version, shared through the database."""

    async def publish(
        self, new: records.NewRuleVersion, status: records.RuleVersionStatus = "active"
    ) -> records.PublishResult:
        """Store the version unless it is stored already (idempotent by version: the files,
        label and publisher of the first publish are kept), and give it `status`: `active`
        retires the version active before, in the same transaction; `shadow` leaves it and
        retires the shadow version before (at most one is shadow; the active version
        published as shadow stays active)."""

    async def list_versions(self) -> list[records.RuleVersion]:
        """Every published version, the most recently published first."""

    async def get(self, version: str) -> records.RuleVersion | None:
        """One version with its files, or None."""

    async def activate(self, version: str) -> records.RuleVersion | None:
        """Make `version` the active one and retire the one active before, atomically, so
        exactly one is active; None (and nothing changed) when it is not published."""

    async def active(self) -> records.RuleVersion | None:
        """The active version with its files, or None before the first publish."""

    async def active_version(self) -> str | None:
        """Only the active version's id: one indexed row, cheap enough to poll."""

    async def current(self) -> tuple[str | None, str | None]:
        """The ids of the active version and of the most recently published shadow version
        (None for each that there is not): one small indexed read, cheap enough to poll."""

    async def wait_for_change(self, timeout: float) -> bool:
        """Wait until `current()` may answer otherwise than it last did in this process (a
        publish or an activation, here or in another process) or `timeout` seconds pass; True
        when woken early. A hint: the caller reads `current()` again. PostgreSQL listens for
        the NOTIFY every publish and activation sends on commit; SQLite polls `current()`."""


class ShadowResults(Protocol):
    """Shadow mode's record: how each live event planned under a shadow rule version next
    to the active one. One row per (shadow version, event): observing an event again (a
    retry, a replay) replaces its row, so the counts are counts of events. Values from the
    event (changes, event type, error) are cleaned, never refused (`values.storable_json`)."""

    async def record(self, result: records.NewShadowResult) -> None:
        """Store the result, replacing an earlier one for the same version and event (which
        must be in the inbox)."""

    async def counts(self, shadow_version: str) -> records.ShadowCounts:
        """Events observed for `shadow_version` by outcome (all zero when none)."""

    async def differences(
        self, shadow_version: str, *, after_event_id: int | None = None, limit: int = 1000,
    ) -> list[records.ShadowResult]:
        """Results that are not `same` (changed or uncompared), in event order, starting
        after `after_event_id`, at most `limit`: page through with the last id."""

    async def purge(self, observed_before: datetime) -> int:
        """Drop the results observed before `observed_before` (they quote event values, as
        raw bodies do); returns how many."""


class Touches(Protocol):
    """Touches: what link-level events told linkcrm (token, campaign, prefix, platform,
    referrer, time), and the attribution each identify event got from them. No CRM sees them."""

    async def record(self, touch: touchrecords.NewTouch) -> bool:
        """Keep one touch per inbox event; False when that event's touch exists (a retry)."""

    async def record_many(self, touches: Sequence[touchrecords.NewTouch]) -> list[bool]:
        """`record` for each, in one write where the backend can (all or none: a value one
        of them cannot store fails the write)."""
        return [await self.record(touch) for touch in touches]

    async def attribute(
        self, request: touchrecords.AttributionRequest
    ) -> touchrecords.Attribution:
        """The first and last touch of the token and one unclaimed install, claimed for
        `request.event_id` in the same commit (two workers never claim the same install);
        the event's stored attribution when it has one already."""

    async def attribution(self, event_id: int) -> touchrecords.Attribution | None:
        """What `attribute` gave this event, or None."""

    async def forget(self, older_than: datetime) -> int:
        """Drop touches that happened before `older_than`; how many."""


class Storage(Protocol):
    """One database: its seven concerns, and its lifecycle (schema, health, shutdown)."""

    inbox: Inbox
    outcomes: Outcomes
    identities: IdentityMap
    rate_limits: RateLimits
    local_crm: LocalCRMStore
    rule_versions: RuleVersions
    shadow: ShadowResults
    touches: Touches

    async def migrate(self) -> int:
        """Create or upgrade the schema; idempotent and safe when two processes race. Returns
        the schema version now in place."""

    async def schema_version(self) -> int:
        """The schema version in place (0 for an empty database)."""

    async def ping(self) -> None:
        """Raise StorageError unless the database answers and has a schema (for /readyz)."""

    async def check_writable(self) -> None:
        """Raise StorageError when writes fail, for /readyz. Free while this process's last
        commit went through; after a failed one, a probe decides (a row the size of a large
        event, written and deleted in one committed transaction), and its success clears the
        failure."""

    async def close(self) -> None:
        """Finish queued writes and release connections; idempotent."""

    async def durability(self) -> Mapping[str, int]:
        """Durability settings read from the live writing connection, as numbers for
        /metrics (SQLite: `sqlite_synchronous` 2 = FULL, `sqlite_wal` 1 = WAL on); empty
        when the backend has nothing to report."""
        return {}

    async def wait_for_events(self, timeout: float) -> bool:
        """Wait until new work may be due (an event was stored or requeued, by this process or
        another) or `timeout` seconds pass; True when woken early. A worker calls it after an
        empty claim instead of sleeping. A wake-up is a hint (claim again, maybe find nothing)
        and a missed one costs one timeout, so callers keep the timeout short (a poll
        interval). This default only sleeps; PostgreSQL answers through LISTEN/NOTIFY."""
        await asyncio.sleep(timeout)
        return False

    async def __aenter__(self) -> Storage:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()
