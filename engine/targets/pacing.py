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

    async def acquire(self, cost: float = 1.0, *, first: bool = False) -> None:
        """Wait until `cost` requests may be sent, then take them. `first`: before every
        other request of this process that is waiting too (one that waited for a limit of its
        own already, so that stricter limit is never left idle for the others)."""
        if first:
            self._first += 1
            self._none_first.clear()
        try:
            while True:
                while not first and self._first:
                    await self._none_first.wait()
                pause = self._paused_until - self.clock()
                if pause > 0:
                    await self.sleep(pause)
                    continue
                wait = await self._take(cost)
                if wait <= 0:
                    return
                await self.sleep(wait)
        finally:
            if first:
                self._first -= 1
                if not self._first:
                    self._none_first.set()

    async def _take(self, cost: float) -> float:
        if not self.rolling:
            return await self.store.take_tokens(self.bucket, cost, self.capacity,
                                                self.capacity / self.window)
        if cost != 1:
            raise ValueError("a rolling-window pacer takes one request at a time")
        return await self.store.take_slot(self.bucket, max(1, int(self.capacity)),
                                          self.window + JITTER)

    def follow(self, limit: float, window: float) -> None:
        """The CRM states another limit (HubSpot's rate-limit headers): pace to that."""
        self.capacity, self.window = limit, window

    def pause(self, seconds: float) -> None:
        """Hold every request of this pacer for `seconds` (a 429's Retry-After, an exhausted
        remaining-requests header)."""
        self._paused_until = max(self._paused_until, self.clock() + max(0.0, seconds))


def window_pacer(store: RateLimitStore, bucket: str, limit: float, window: float,
                 sleep: Sleep = asyncio.sleep, clock: Callable[[], float] = time.monotonic
                 ) -> Pacer:
    """A `Pacer` for a CRM limit of `limit` requests in any rolling `window` seconds."""
    return Pacer(store, bucket, limit, window, sleep=sleep, clock=clock, rolling=True)
