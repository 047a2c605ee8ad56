"""Claims in the identity map: one execution finds-or-creates a record, the others wait for it."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TypeVar

from engine.errors import RetryableCRMError
from engine.targets.pacing import Sleep

T = TypeVar("T")


@dataclass(frozen=True)
class Slots:
    """Where one record's claims live in the identity map: slot `<generation>` holds the
    claim (`<owner>@<start time>`), `<generation>.done` marks it finished. `bind` must return
    the value that won, as `IdentityStore.bind_identity` and `bind_deal` do."""

    lookup: Callable[[str], Awaitable[str | None]]
    bind: Callable[[str, str], Awaitable[str]]


@dataclass(frozen=True)
class Claim:
    """The right to find-or-create one record; `finish` it once the record is bound."""

    generation: int
    recover_since: float | None  # an earlier attempt may have created the record since then

    async def finish(self, slots: Slots) -> None:
        await slots.bind(f"{self.generation}.done", "done")


@dataclass(frozen=True)
class Claims:
    """`timeout`: a claim older than this belongs to a crashed execution; `wait`: how long a
    waiter polls before giving up with RetryableCRMError."""

    timeout: float
    wait: float
    sleep: Sleep
    clock: Callable[[], float]

    async def claim(self, what: str, idempotency_key: str, slots: Slots,
                    mapped: Callable[[], Awaitable[T | None]]) -> T | Claim:
        """A claim to find-or-create the record, or the record (as `mapped` returns it) that
        another execution bound while this one waited."""
        owner = hashlib.sha256(idempotency_key.encode()).hexdigest()[:16]
        deadline, delay = self.clock() + self.wait, 0.02
        while True:
            claim = await self.try_claim(owner, slots)
            if claim is not None:
                return claim
            await self.sleep(delay)
            delay = min(delay * 2, 0.5)
            found = await mapped()
            if found is not None:
                return found
            if self.clock() > deadline:
                raise RetryableCRMError(f"pipedrive: another worker is creating this {what}",
                                        retry_after=1.0)

    async def try_claim(self, owner: str, slots: Slots) -> Claim | None:
        """Claim the first free generation; None while another execution's claim is live.
        The owner's own claim (a retry of the same action) is returned to it, to recover."""
        now, since, generation = self.clock(), None, 0
        while True:
            holder = await slots.lookup(str(generation))
            if holder is None:
                mine = f"{owner}@{now:.3f}"
                holder = await slots.bind(str(generation), mine)
                if holder == mine:
                    return Claim(generation, since)
            if await slots.lookup(f"{generation}.done") is None:
                held_by, _, at = holder.partition("@")
                started = float(at) if at.replace(".", "", 1).isdigit() else 0.0
                if held_by == owner:  # an earlier attempt of this very action
                    return Claim(generation, started if since is None else min(since, started))
                if now - started < self.timeout:
                    return None
                since = started if since is None else min(since, started)  # holder crashed
            generation += 1  # finished or abandoned: the next generation is free to claim


@dataclass
class Unanswered:
    """Creates that must be waited out before their record is found-or-created again.

    A create whose answer timed out may still be committed by Pipedrive, as late as the
    timeout again (`engine.targets.http.send`: the RetryableCRMError carries that wait); until
    then neither search nor a list shows the record, so a second create would duplicate it.
    The worker's retry waits for it, but a batch can apply the create again sooner (another
    call's error in the batch replaces its answer, and the actions after a retried one are
    applied again at once), so the target itself refuses: `check` raises RetryableCRMError
    with what is left of the wait. Kept in this process: another worker takes an action over
    only once its lease has run out.

        unanswered.check("deal:referral-tok_1", "deal")    # before the search and the create
        deal = await unanswered.send("deal:referral-tok_1", lambda: api.post("/deals", body))
    """

    clock: Callable[[], float]
    until: dict[str, float] = field(default_factory=dict)

    def check(self, key: str, what: str) -> None:
        wait = self.until.get(key, 0.0) - self.clock()
        if wait > 0:
            raise RetryableCRMError(f"pipedrive: an earlier create of this {what} got no "
                                    "answer and may still land", retry_after=wait)
        self.until.pop(key, None)

    async def send(self, key: str, create: Callable[[], Awaitable[T]]) -> T:
        """`create()`; when it fails with a wait, the next `check` of `key` waits it out too."""
        try:
            return await create()
        except RetryableCRMError as error:
            if error.retry_after is not None:
                now = self.clock()
                self.until = {k: t for k, t in self.until.items() if t > now}  # waits over
                self.until[key] = max(self.until.get(key, 0.0), now + error.retry_after)
            raise


class KeyedLocks:
    """One asyncio lock per key, dropped when nobody holds or awaits it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)
