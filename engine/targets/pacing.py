"""Pace requests to a CRM's rate limit, shared by every worker through the database.

A `Pacer` takes tokens from a bucket in the shared `RateLimitStore` before each request, so
N workers together stay under the limit instead of multiplying it. It also learns from the
CRM's answers: remaining-request headers that reach zero and a 429's Retry-After pause the bucket
for everyone in this process until the window resets.
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
    """`capacity` requests per `window` seconds, as a token bucket named `bucket`."""

    store: RateLimitStore
    bucket: str
    capacity: float
    window: float
    sleep: Sleep = asyncio.sleep
    clock: Callable[[], float] = time.monotonic
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
                wait = await self.store.take_tokens(self.bucket, cost, self.capacity,
                                                    self.capacity / self.window)
                if wait <= 0:
                    return
                await self.sleep(wait)
        finally:
            if first:
                self._first -= 1
                if not self._first:
                    self._none_first.set()

    def pause(self, seconds: float) -> None:
        """Hold every request of this pacer for `seconds` (a 429's Retry-After, an exhausted
        remaining-requests header)."""
        self._paused_until = max(self._paused_until, self.clock() + max(0.0, seconds))


def pacer_shape(limit: float, window: float) -> tuple[float, float]:
    """(capacity, refill window) for a `Pacer` that lets at most `limit` requests through ANY
    `window` seconds, as a CRM counts them. A bucket of `limit` tokens refilled at `limit` per
    window lets twice the limit through one window (the full bucket, then a window of refill);
    the most a bucket lets through a window is capacity + refill * window, so the burst stays
    small and the refill is what is left below the limit, less a margin for jitter: a request
    reaches the CRM some time after it took its token (the store's write, the event loop, the
    network), so two of them may arrive closer together than they were paced. The margin is a
    tenth of a second's worth of requests (a tenth of the limit for windows under a second),
    and never under half of one. A limit of 20 per 2 s paces at 9/s, 10 per 2 s at 4.25/s,
    100 per 10 s at 9.4/s."""
    burst = max(1.0, float(int(limit) // 20))
    margin = max(0.5, min(JITTER / window, 0.1) * limit)
    rate = max(limit - burst - margin, 0.5) / window
    return burst, burst / rate


def window_pacer(store: RateLimitStore, bucket: str, limit: float, window: float,
                 sleep: Sleep = asyncio.sleep, clock: Callable[[], float] = time.monotonic
                 ) -> Pacer:
    """A `Pacer` for a CRM limit of `limit` requests in any rolling `window` seconds."""
    capacity, refill_window = pacer_shape(limit, window)
    return Pacer(store, bucket, capacity, refill_window, sleep=sleep, clock=clock)
