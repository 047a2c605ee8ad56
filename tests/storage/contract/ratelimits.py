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
