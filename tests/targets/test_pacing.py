"""The pacer's shape: never more than a CRM's limit through any rolling window, and most of it
used (HubSpot 100 per 10 s, Pipedrive 20 requests and 10 searches per 2 s, and others)."""

from __future__ import annotations

import asyncio
from typing import cast

import pytest

from engine.targets.base import RateLimitStore
from engine.targets.pacing import Pacer, pacer_shape


@pytest.mark.parametrize(("limit", "window", "used"), [
    (100, 10.0, 0.9), (190, 10.0, 0.9), (20, 1.0, 0.85), (20, 2.0, 0.9), (40, 2.0, 0.9),
    (120, 2.0, 0.9), (50, 0.5, 0.85), (10, 2.0, 0.85), (5, 1.0, 0.6), (3, 2.0, 0.3),
    (2, 2.0, 0.2)])
def test_pacer_shape_never_lets_more_than_the_limit_through_any_window(
        limit: int, window: float, used: float) -> None:
    capacity, refill_window = pacer_shape(limit, window)
    rate = capacity / refill_window
    # A greedy client on a simulated clock: take a token whenever one is there.
    tokens, now, step, sent = capacity, 0.0, 0.001, []
    while now < 6 * window:
        tokens = min(capacity, tokens + rate * step)
        if tokens >= 1:
            tokens -= 1
            sent.append(now)
        now += step
    busiest = max(sum(1 for t in sent if start <= t < start + window) for start in sent)
    assert busiest < limit  # one request of margin for jitter between our clock and the CRM's
    assert len(sent) >= used * limit * 6


class _Bucket:
    """A `RateLimitStore` whose one bucket holds what the test puts in it."""

    def __init__(self) -> None:
        self.tokens = 0.0

    async def take_tokens(self, bucket: str, cost: float, capacity: float, rate: float) -> float:
        if self.tokens >= cost:
            self.tokens -= cost
            return 0.0
        return 0.01


@pytest.mark.anyio
async def test_a_first_request_takes_the_next_token_before_plain_ones_waiting_longer() -> None:
    """Pipedrive's searches take the burst token `first`: a write that has waited for the
    burst limit longer still goes after them, so the Search API limit is never left idle."""
    store = _Bucket()
    pacer = Pacer(cast(RateLimitStore, store), "burst", capacity=1.0, window=0.1)
    order: list[str] = []

    async def request(name: str, first: bool) -> None:
        await pacer.acquire(first=first)
        order.append(name)

    plain = [asyncio.create_task(request(f"write {n}", False)) for n in range(3)]
    await asyncio.sleep(0.03)  # the writes are waiting for a token
    search = asyncio.create_task(request("search", True))
    await asyncio.sleep(0)
    for _ in range(4):
        store.tokens += 1
        await asyncio.sleep(0.05)
    await asyncio.gather(search, *plain)
    assert order[0] == "search" and sorted(order[1:]) == ["write 0", "write 1", "write 2"]
