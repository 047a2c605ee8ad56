"""Pace requests to a CRM's rate limit, shared by every worker through the database.

A `Pacer` takes its turn from the shared `RateLimitStore` before each request, so N workers
together stay under the limit instead of multiplying it: for a CRM limit of N requests in any
rolling window (`window_pacer`: HubSpot, Pipedrive) a slot of that window, as the CRM counts it;
for a steady pace (Salesforce's) a token bucket. It also learns from the CRM's answers:
remaining-request headers that reach zero and a 429's Retry-After pause it for everyone in this
process until the window resets.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from engine.targets.base import RateLimitStore

Sleep = Callable[[float], Awaitable[None]]
JITTER = 0.1  # seconds between a request taking its token and reaching the CRM, at most


@dataclass
class Pacer:
    """`capacity` requests per `window` seconds: with `rolling`, at most that many in any
    `window` seconds (a log of the last `capacity` requests in the store, each window
    stretched by `JITTER` for the time a request takes to reach the CRM); else a token bucket
    named `bucket` that refills `capacity` per `window` (and holds `capacity`)."""

    store: RateLimitStore
    bucket: str
    capacity: float
    window: float
    sleep: Sleep = asyncio.sleep
    clock: Callable[[], float] = time.monotonic
    rolling: bool = False
    _paused_until: float = field(default=0.0, init=False)
    _first: int = field(default=0, init=False)  # `first` acquires waiting in this process
    _none_first: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    _sent: deque[float] = field(default_factory=deque, init=False)  # this process's, rolling

    async def acquire(self, cost: float = 1.0, *, first: bool = False,
                      along: Pacer | None = None) -> None:
        """Wait until `cost` requests may be sent, then take them. `first`: before every
        other request of this process that is waiting too (one that waited for a limit of its
        own already, so that stricter limit is never left idle for the others). `along`:
        another rolling window the request counts against, taken with this one, all or none
        (so neither ages while the request waits for the other)."""
        if along is not None and not (self.rolling and along.rolling):
            raise ValueError("only rolling-window pacers take a request together")
        if first:
            self._first += 1
            self._none_first.clear()
        try:
            while True:
                while not first and self._first:
                    await self._none_first.wait()
                pause = max(self._paused_until, along._paused_until if along else 0.0) \
                    - self.clock()
                if pause > 0:
                    await self.sleep(pause)
                    continue
                wait = await self._take(cost, along)
                if wait <= 0:
                    for pacer in (self, along):
                        if pacer is not None and pacer.rolling:
                            pacer._note_sent()
                    return
                await self.sleep(wait)
        finally:
            if first:
                self._first -= 1
                if not self._first:
                    self._none_first.set()

    async def _take(self, cost: float, along: Pacer | None) -> float:
        if not self.rolling:
            return await self.store.take_tokens(self.bucket, cost, self.capacity,
                                                self.capacity / self.window)
        if cost != 1:
            raise ValueError("a rolling-window pacer takes one request at a time")
        return await self.store.take_slots(
            [pacer._slots() for pacer in (self, along) if pacer is not None])

    def _slots(self) -> tuple[str, int, float]:
        return self.bucket, max(1, int(self.capacity)), self.window + JITTER

    def follow(self, limit: float, window: float) -> None:
        """The CRM states another limit (HubSpot's rate-limit headers): pace to that."""
        self.capacity, self.window = limit, window

    def filled_here(self) -> bool:
        """Whether this process's own requests fill the rolling window: a CRM that then says
        none remain says what this pacer knows, and holds the next request back until the
        oldest ages out anyway, to the moment (the CRM's reset is in whole seconds)."""
        if not self.rolling:
            return False
        self._forget_old()
        return len(self._sent) >= self.capacity

    def _note_sent(self) -> None:
        self._sent.append(self.clock())
        self._forget_old()  # kept to one window's worth, whether asked or not

    def _forget_old(self) -> None:
        since = self.clock() - self.window - JITTER
        while self._sent and self._sent[0] <= since:
            self._sent.popleft()

    def pause(self, seconds: float) -> None:
        """Hold every request of this pacer for `seconds` (a 429's Retry-After, an exhausted
        remaining-requests header)."""
        self._paused_until = max(self._paused_until, self.clock() + max(0.0, seconds))


def window_pacer(store: RateLimitStore, bucket: str, limit: float, window: float,
                 sleep: Sleep = asyncio.sleep, clock: Callable[[], float] = time.monotonic
                 ) -> Pacer:
    """A `Pacer` for a CRM limit of `limit` requests in any rolling `window` seconds."""
    return Pacer(store, bucket, limit, window, sleep=sleep, clock=clock, rolling=True)
