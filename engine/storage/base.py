"""The storage interface every backend implements."""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from types import TracebackType

from engine.actions import JSON, IdentityKey
from engine.storage.records import (
    ActionOutcome,
    ContactResult,
    DeadLetter,
    DealResult,
    EventStatus,
    FinalStatus,
    InboxEvent,
    InboxStats,
    LocalContact,
    LocalDeal,
    NewEvent,
    NewOutcome,
    StageResult,
    StoreResult,
)

Clock = Callable[[], datetime]

# The size of the test write `check_writable` commits after a failed commit: a large event.
PROBE_BYTES = 64 * 1024


def utc_now() -> datetime:
    return datetime.now(UTC)


# How long `earlier_unfinished` waits for earlier events that another worker has claimed but
# not planned yet (their ordering keys are milliseconds away) before counting them as blockers.
PLANNING_WAIT = 0.25


class Storage(abc.ABC):
    """Durable state of linkcrm: inbox, outcomes, identity map, dead letters, embedded CRM.

    Every method is a coroutine and every write is atomic per call: it is committed durably
    before the coroutine returns, or it raises StorageError and nothing of it is kept. Methods
    that name a `worker_id` only act while that worker holds the event's lease and return False
    otherwise, so a worker whose lease expired cannot overwrite the next worker's work.
    Times come from the `clock` the backend was opened with (UTC, timezone-aware).

        async with open_storage("sqlite:///linkcrm.db") as storage:
            await storage.migrate()
            result = await storage.store_event(event)
    """

    # -- lifecycle ----------------------------------------------------------------------------

    @abc.abstractmethod
    async def migrate(self) -> int:
        """Create or upgrade the schema; idempotent and safe when two processes race. Returns
        the schema version now in place."""

    @abc.abstractmethod
    async def schema_version(self) -> int:
        """The schema version in place (0 for an empty database)."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise StorageError unless the database answers (for /readyz)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Finish queued writes and release connections; idempotent."""

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

    # -- inbox --------------------------------------------------------------------------------

    @abc.abstractmethod
    async def store_event(self, event: NewEvent) -> StoreResult:
        """Insert the event unless its dedupe key exists (the unique constraint decides);
        durable before it returns."""

    @abc.abstractmethod
    async def get_event(self, event_id: int) -> InboxEvent | None:
        """One inbox event, or None."""

    @abc.abstractmethod
    async def list_events(
        self, *, status: EventStatus | None = None, limit: int = 100, before_id: int | None = None
    ) -> list[InboxEvent]:
        """Newest first; `before_id` pages backwards."""

    @abc.abstractmethod
    async def claim(self, worker_id: str, limit: int, lease_seconds: float) -> list[InboxEvent]:
        """Lease up to `limit` due pending events (no live lease, next attempt reached), the
        earliest due first: a new event is due when it was received, a rescheduled one at its
        next attempt; ties in arrival order. So events rescheduled again and again (a CRM that
        hangs) never crowd out the events that arrived since. Each claim counts as an attempt."""

    @abc.abstractmethod
    async def extend_lease(self, event_id: int, worker_id: str, lease_seconds: float) -> bool:
        """Push the lease expiry out for a long-running event."""

    @abc.abstractmethod
    async def finish(
        self, event_id: int, worker_id: str, status: FinalStatus, error: str | None = None
    ) -> bool:
        """Mark a leased event processed, ignored or dead, and release the lease."""

    @abc.abstractmethod
    async def retry_later(
        self, event_id: int, worker_id: str, next_attempt_at: datetime, error: str | None
    ) -> bool:
        """Mark a leased event failed, due again at `next_attempt_at`, and release the lease."""

    @abc.abstractmethod
    async def set_ordering_keys(self, event_id: int, keys: Sequence[str]) -> None:
        """Record which identities an event touches (replaces earlier keys; none is a valid
        answer) and that they are recorded, so later events can wait for it."""

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

    @abc.abstractmethod
    async def earlier_pending(
        self, event_id: int, keys: Sequence[str]
    ) -> tuple[list[int], list[int]]:
        """One read: (pending events before `event_id` sharing one of `keys`, pending events
        before `event_id` whose keys are not recorded yet), each in arrival order."""

    # -- action outcomes ----------------------------------------------------------------------

    @abc.abstractmethod
    async def get_outcome(self, target: str, idempotency_key: str) -> ActionOutcome | None:
        """The outcome of the action with that key on that target, or None."""

    @abc.abstractmethod
    async def record_outcome(self, outcome: NewOutcome) -> ActionOutcome:
        """Upsert by (target, idempotency key), counting the attempt. An `ok` outcome is never
        overwritten: the stored row is returned unchanged, so a replay cannot undo success."""

    @abc.abstractmethod
    async def list_outcomes(self, event_id: int) -> list[ActionOutcome]:
        """Every action outcome of one event, in recording order."""

    @abc.abstractmethod
    async def outcome_counts(self) -> Mapping[tuple[str, str], int]:
        """(target, status) -> number of actions, for metrics."""

    # -- dead letters and replay --------------------------------------------------------------

    @abc.abstractmethod
    async def list_dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """Dead events and dead action outcomes, newest first."""

    @abc.abstractmethod
    async def requeue(self, event_id: int) -> bool:
        """Make an event pending again (any status) and its dead outcomes retrying; False when
        the event is unknown or its raw body was purged."""

    @abc.abstractmethod
    async def requeue_dead(self) -> list[int]:
        """Requeue every dead event and every event with a dead outcome; returns their ids."""

    # -- identity map and deal keys -----------------------------------------------------------

    @abc.abstractmethod
    async def lookup_identity(self, target: str, keys: Sequence[IdentityKey]) -> str | None:
        """The CRM record id of the first key (priority order) the target knows, or None."""

    @abc.abstractmethod
    async def bind_identity(self, target: str, key: IdentityKey, record_id: str) -> str:
        """Map the key to `record_id` unless it is already mapped; returns the id that won."""

    @abc.abstractmethod
    async def unbind_identity(self, target: str, key: IdentityKey) -> None:
        """Forget a mapping (the CRM record was deleted or merged away)."""

    @abc.abstractmethod
    async def lookup_deal(self, target: str, deal_key: str) -> str | None:
        """The CRM deal id made for `deal_key` on that target, or None."""

    @abc.abstractmethod
    async def bind_deal(self, target: str, deal_key: str, deal_id: str) -> str:
        """Map the deal key unless it is already mapped; returns the id that won."""

    # -- shared rate limits -------------------------------------------------------------------

    @abc.abstractmethod
    async def take_tokens(
        self, bucket: str, cost: float, capacity: float, refill_per_second: float
    ) -> float:
        """Token bucket shared by every process: take `cost` tokens and return 0, or take
        nothing and return the seconds to wait before asking again."""

    # -- the embedded CRM (`local` target) ----------------------------------------------------

    @abc.abstractmethod
    async def local_upsert_contact(
        self,
        identity: Sequence[IdentityKey],
        set: Mapping[str, JSON],
        set_once: Mapping[str, JSON],
    ) -> ContactResult:
        """Find the contact by the first identity key that matches (or create it), attach the
        other keys, write `set`, and write `set_once` only into empty fields. Null and empty
        string values are skipped: nothing is cleared by accident."""

    @abc.abstractmethod
    async def local_set_stage(
        self,
        identity: Sequence[IdentityKey],
        stage: str,
        stages: Sequence[str],
        event_id: int | None = None,
    ) -> StageResult:
        """Move the contact (created if missing) to `stage` only if it is further along
        `stages` (forward order) than its current stage; a change adds a history row.
        Raises ValueError for a stage not in `stages`."""

    @abc.abstractmethod
    async def local_create_deal(
        self,
        identity: Sequence[IdentityKey],
        key: str,
        title: str,
        stage: str | None,
        amount: float | None,
        fields: Mapping[str, JSON],
    ) -> DealResult:
        """Create the deal for `key` linked to the contact (created if missing); one deal per
        key, ever: an existing deal is returned unchanged."""

    @abc.abstractmethod
    async def local_contacts(self, limit: int | None = None) -> list[LocalContact]:
        """Contacts with identities, fields and stage history, oldest first."""

    @abc.abstractmethod
    async def local_deals(self, limit: int | None = None) -> list[LocalDeal]:
        """Deals, oldest first."""

    # -- maintenance and metrics --------------------------------------------------------------

    @abc.abstractmethod
    async def purge_raw_bodies(self, older_than: datetime) -> int:
        """Drop the raw body of processed and ignored events received before `older_than`;
        dedupe keys and statuses stay, so a late retry is still a duplicate."""

    @abc.abstractmethod
    async def inbox_stats(self) -> InboxStats:
        """Inbox depth by status and the receipt time of the oldest pending event (the first
        pending one in arrival order); constant time in the inbox size, so /metrics can ask on
        every scrape."""

    @abc.abstractmethod
    async def check_writable(self) -> None:
        """Raise StorageError when writes fail, for /readyz. Free while this process's last
        commit went through; after a failed one, a probe decides (a row the size of a large
        event, written and deleted in one committed transaction), and its success clears the
        failure."""

    async def durability(self) -> Mapping[str, int]:
        """Durability settings read from the live writing connection, as numbers for
        /metrics (SQLite: `sqlite_synchronous` 2 = FULL, `sqlite_wal` 1 = WAL on); empty
        when the backend has nothing to report."""
        return {}
