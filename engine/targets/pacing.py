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

    async def acquire(self, cost: float = 1.0) -> None:
        """Wait until `cost` requests may be sent, then take them."""
        while True:
            pause = self._paused_until - self.clock()
            if pause > 0:
                await self.sleep(pause)
                continue
            wait = await self.store.take_tokens(self.bucket, cost, self.capacity,
                                                self.capacity / self.window)
            if wait <= 0:
                return
            await self.sleep(wait)

    def pause(self, seconds: float) -> None:
        """Hold every request of this pacer for `seconds` (a 429's Retry-After, an exhausted
        remaining-requests header)."""
        self._paused_until = max(self._paused_until, self.clock() + max(0.0, seconds))
