"""The pacer: never more than a CRM's limit through any rolling window, and all of it used
(HubSpot 100 per 10 s, Pipedrive 20 requests and 10 searches per 2 s, and others)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import cast

import pytest

from engine.storage import rolling
from engine.targets.base import RateLimitStore
from engine.targets.pacing import JITTER, Pacer, window_pacer
from engine.targets.session import Lane

EPOCH = datetime(2026, 3, 1, tzinfo=UTC)


class _Window:
    """A `RateLimitStore` keeping rolling windows as the databases do
    (`engine.storage.windows`), on a clock the pacer's sleeps move."""

    def __init__(self) -> None:
        self.now = 0.0
        self.rows: dict[str, datetime] = {}

    async def take_slots(self, windows: list[tuple[str, int, float]]) -> float:
        now = EPOCH + timedelta(seconds=self.now)
        found = [[(name, at) for name, at in self.rows.items()
                  if name.startswith(bucket + "#")] for bucket, _, _ in windows]
        wait, stamps = rolling.decide_all(windows, found, now)
        for stamp in stamps:
            self.rows[stamp] = now
        return wait

    async def sleep(self, seconds: float) -> None:
        self.now += seconds


@pytest.mark.anyio
@pytest.mark.parametrize(("limit", "window"), [
    (100, 10.0), (190, 10.0), (20, 1.0), (20, 2.0), (80, 2.0), (10, 2.0), (4, 1.0), (1, 1.0)])
async def test_a_window_pacer_never_lets_more_than_the_limit_through_any_window(
        limit: int, window: float) -> None:
    """HubSpot (100 or 190 per 10 s, searches 4 per second), Pipedrive (20 to 120 requests
    and 10 searches per 2 s): a greedy caller gets the whole limit, and never more than it
    through any window as the CRM counts it, when each request reaches the CRM up to
    `JITTER` after it was let through."""
    store = _Window()
    pacer = window_pacer(cast(RateLimitStore, store), "crm", limit, window, store.sleep)
    sent = []
    while store.now < 6 * window:
        await pacer.acquire()
        sent.append(store.now)
    span = window + JITTER - 1e-9  # less a rounding error: the pacer waits exactly so long
    for start in sent:  # the requests a CRM window could hold, wherever they arrived
        assert sum(1 for t in sent if start <= t < start + span) <= limit
    assert len(sent) >= limit * 6 * window / (window + JITTER)


@pytest.mark.anyio
async def test_a_window_pacer_takes_one_request_at_a_time() -> None:
    pacer = window_pacer(cast(RateLimitStore, _Window()), "crm", 10, 1.0)
    with pytest.raises(ValueError, match="one request at a time"):
        await pacer.acquire(2)


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


@pytest.mark.anyio
async def test_a_lane_of_two_rolling_windows_takes_both_at_once() -> None:
    """A Pipedrive search counts against the Search API limit and the burst limit: the lane
    takes its slot in both in one store call, so neither ages while it waits for the other,
    and each pacer knows its window is full of this process's requests."""
    store = _Window()
    taken: list[list[str]] = []
    take = store.take_slots

    async def recording(windows: list[tuple[str, int, float]]) -> float:
        taken.append([bucket for bucket, _, _ in windows])
        return await take(windows)

    store.take_slots = recording  # type: ignore[method-assign]
    shared = window_pacer(cast(RateLimitStore, store), "burst", 3, 2.0, store.sleep)
    search = window_pacer(cast(RateLimitStore, store), "search", 2, 2.0, store.sleep)
    lane = Lane(search, shared=shared, name="search")
    await lane.acquire()
    await Lane(shared).acquire()
    await lane.acquire()
    assert taken == [["burst", "search"], ["burst"], ["burst", "search"]]
    assert search.filled_here() and shared.filled_here()
    await lane.acquire()  # waits for the windows to free
    assert store.now == pytest.approx(2.0 + JITTER)
    assert taken[-1] == ["burst", "search"]


@pytest.mark.anyio
async def test_a_window_pacer_remembers_one_window_of_its_own_requests() -> None:
    """What `filled_here` counts is kept to one window, whether anyone asks or not (HubSpot's
    pacer sends for days without asking)."""
    store = _Window()
    pacer = window_pacer(cast(RateLimitStore, store), "crm", 10, 1.0, store.sleep,
                         clock=lambda: store.now)
    while store.now < 60:
        await pacer.acquire()
    assert len(pacer._sent) <= 10
