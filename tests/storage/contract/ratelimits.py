"""The rate limits part of the storage contract."""

from __future__ import annotations

import pytest

from engine.storage import Storage
from tests.storage.contract.support import FakeClock


class RateLimitsContract:
    """Token buckets shared by every process."""

    async def test_token_bucket_is_shared_and_refills(
        self, storage: Storage, clock: FakeClock
    ) -> None:
        assert await storage.rate_limits.take_tokens("hubspot", 1, 2, 1.0) == 0
        assert await storage.rate_limits.take_tokens("hubspot", 1, 2, 1.0) == 0
        assert await storage.rate_limits.take_tokens("hubspot", 1, 2, 1.0) == pytest.approx(1.0)
        assert await storage.rate_limits.take_tokens("salesforce", 1, 2, 1.0) == 0
        clock.advance(1)
        assert await storage.rate_limits.take_tokens("hubspot", 1, 2, 1.0) == 0

    async def test_a_bucket_that_cannot_grant_is_refused(self, storage: Storage) -> None:
        for cost, capacity, refill in ((0, 2, 1.0), (3, 2, 1.0), (1, 2, 0.0), (1, 2, -1.0)):
            with pytest.raises(ValueError, match="0 < cost <= capacity"):
                await storage.rate_limits.take_tokens("hubspot", cost, capacity, refill)

    async def test_a_rolling_window_lets_limit_requests_through_any_window(
        self, storage: Storage, clock: FakeClock
    ) -> None:
        search = [("pipedrive:search", 3, 2.0)]
        take = storage.rate_limits.take_slots
        for _ in range(3):
            assert await take(search) == 0
            clock.advance(0.5)
        # Three went at 0, 0.5 and 1.0 s; it is 1.5 s: the next may go when the first is 2 s
        # old, and asking again records nothing.
        assert await take(search) == pytest.approx(0.5)
        assert await take(search) == pytest.approx(0.5)
        assert await take([("pipedrive:burst", 3, 2.0)]) == 0  # a bucket of its own
        clock.advance(0.5)
        assert await take(search) == 0  # stamps the oldest
        assert await take(search) == pytest.approx(0.5)
        clock.advance(0.5)
        assert await take(search) == 0

    async def test_a_request_takes_every_window_it_counts_against_or_none(
        self, storage: Storage, clock: FakeClock
    ) -> None:
        """A Pipedrive search counts against the Search API limit and the burst limit: it
        waits for the fuller one, and meanwhile takes nothing from the other."""
        take = storage.rate_limits.take_slots
        search, burst = ("pd:search", 2, 2.0), ("pd:burst", 3, 2.0)
        assert await take([search, burst]) == 0
        clock.advance(0.5)
        assert await take([search, burst]) == 0
        clock.advance(0.5)
        assert await take([burst]) == 0  # a write: the burst window is full now
        assert await take([search, burst]) == pytest.approx(1.0)  # the search window's wait
        clock.advance(0.5)
        assert await take([search, burst]) == pytest.approx(0.5)
        clock.advance(0.5)  # 2 s: the first search and the first burst slot age out together
        assert await take([search, burst]) == 0
        assert await take([burst]) == pytest.approx(0.5)  # the refused ones recorded nothing

    async def test_a_rolling_window_follows_a_limit_that_changes(
        self, storage: Storage, clock: FakeClock
    ) -> None:
        """HubSpot states another limit in its headers: the rows of a larger limit stay, and
        the newest `limit` of them count."""
        take = storage.rate_limits.take_slots
        for _ in range(4):
            assert await take([("hubspot", 4, 10.0)]) == 0
            clock.advance(1)
        assert await take([("hubspot", 2, 10.0)]) == pytest.approx(8.0)  # at 2 s
        assert await take([("hubspot", 6, 10.0)]) == 0
        assert await take([("hubspot", 6, 10.0)]) == 0
        assert await take([("hubspot", 6, 10.0)]) == pytest.approx(6.0)

    async def test_rolling_windows_that_cannot_grant_are_refused(self, storage: Storage) -> None:
        for limit, window in ((0, 1.0), (10_001, 1.0), (1, 0.0), (1, -1.0)):
            with pytest.raises(ValueError, match="1 <= limit <= 10000 and window > 0"):
                await storage.rate_limits.take_slots([("hubspot", limit, window)])
        with pytest.raises(ValueError, match="at least one window"):
            await storage.rate_limits.take_slots([])
        with pytest.raises(ValueError, match="distinct buckets"):
            await storage.rate_limits.take_slots([("hubspot", 1, 1.0), ("hubspot", 2, 1.0)])
        with pytest.raises(ValueError, match="holds no '#'"):
            await storage.rate_limits.take_slots([("hubspot#1", 1, 1.0)])
