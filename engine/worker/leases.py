"""The leases of every event a worker has in flight, kept by one task for all of them.

    keeper = LeaseKeeper(storage.inbox, worker_id, lease_seconds=60)
    keeper.claimed(event_ids)       # as soon as a claim returns: kept while being planned
    keeper.running(event_id)        # already at work here (claimed again after a pause)?
    keeper.hold(event_id, task)     # when the event's task starts
    keeper.release(event_id, task)  # when it ends, however it ends (None: it never started)
    keeper.forget(task)             # a task that failed on a bug: its leases run out
    await keeper.aclose()           # when the worker stops

Every third of a lease, one write extends them all (`Inbox.extend_leases`). An event whose
lease another worker has taken (this one paused past its lease) has its task cancelled rather
than raced: its keys and idempotency make that safe, and the other worker finishes it. One
lost before its task started is never started (`lost`).
"""

from __future__ import annotations

import asyncio
import logging

from engine.errors import where
from engine.storage import Inbox

log = logging.getLogger("engine.worker.loop")


class LeaseKeeper:
    """Runs while any event is held; the next `hold` after that starts it again."""

    def __init__(self, inbox: Inbox, worker_id: str, lease_seconds: float) -> None:
        self.inbox = inbox
        self.worker_id = worker_id
        self.lease_seconds = lease_seconds
        # event id -> its task (None: claimed, still being planned)
        self._held: dict[int, asyncio.Task[None] | None] = {}
        self._lost: set[int] = set()  # lost while being planned
        self._keeper: asyncio.Task[None] | None = None

    def claimed(self, event_ids: list[int]) -> None:
        """Keep the leases of a claim from the moment it returns: planning a large claim
        on a busy machine may take a good part of a lease."""
        for event_id in event_ids:
            self._held.setdefault(event_id, None)
        self._start()

    def hold(self, event_id: int, task: asyncio.Task[None]) -> None:
        self._held[event_id] = task
        self._start()

    def release(self, event_id: int, task: asyncio.Task[None] | None) -> None:
        if event_id in self._held and self._held[event_id] is task:
            del self._held[event_id]
        if task is None:
            self._lost.discard(event_id)

    def forget(self, task: asyncio.Task[None]) -> None:
        """Stop keeping the leases of every event `task` still holds: it ended on a bug
        without letting go of them, and kept forever they would never be worked on again.
        They run out in the store, and a later claim (here or elsewhere) takes the events."""
        for event_id in [e for e, holder in self._held.items() if holder is task]:
            del self._held[event_id]

    @property
    def held(self) -> int:
        """How many events are in flight here (claimed, being planned or at work)."""
        return len(self._held)

    def running(self, event_id: int) -> bool:
        """Whether this worker has a task at work on the event: a worker that paused past a
        lease may claim its own event again, and must not start it a second time."""
        task = self._held.get(event_id)
        return task is not None and not task.done()

    def lost(self, event_id: int) -> bool:
        """Whether the event's lease was lost before its task started (asked once)."""
        if event_id in self._lost:
            self._lost.discard(event_id)
            return True
        return False

    def _start(self) -> None:
        if self._held and (self._keeper is None or self._keeper.done()):
            self._keeper = asyncio.create_task(self._keep(), name="linkcrm-lease-keeper")

    async def aclose(self) -> None:
        if self._keeper is not None:
            self._keeper.cancel()
            await asyncio.gather(self._keeper, return_exceptions=True)

    async def _keep(self) -> None:
        while self._held:
            await asyncio.sleep(self.lease_seconds / 3)
            held = dict(self._held)
            try:
                kept = await self.inbox.extend_leases(list(held), self.worker_id,
                                                      self.lease_seconds)
            except Exception as error:  # the store failed (or a bug): the next round tries again
                log.error("leases not extended", extra={
                    "events": len(held), "error_type": type(error).__name__,
                    "where": where(error)})
                continue
            for event_id, task in held.items():
                if event_id not in kept and event_id in self._held \
                        and self._held[event_id] is task:
                    log.warning("lease lost; abandoning the event", extra={"event_id": event_id})
                    if task is None:
                        del self._held[event_id]
                        self._lost.add(event_id)
                    else:
                        task.cancel()
