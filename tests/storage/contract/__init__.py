"""The storage contract: behaviour every backend must show, tested through the protocols only,
one part per concern (inbox, outcomes, identity map, rate limits, local CRM, lifecycle,
rule versions, shadow results, touches).

A backend's test module subclasses `StorageContract` and provides three fixtures:

    make_storage     a factory: each call opens a new, not yet migrated Storage on the test's
                     database (two calls = two processes sharing one database), using `clock`
    storage          an open, migrated, empty Storage from make_storage
    failing_storage  an open, migrated Storage whose writes cannot commit (full or read-only)
"""

from __future__ import annotations

import pytest

from tests.storage.contract.browsing import BrowsingContract
from tests.storage.contract.identities import IdentityMapContract
from tests.storage.contract.inbox import InboxContract
from tests.storage.contract.lifecycle import LifecycleContract
from tests.storage.contract.local_crm import LocalCRMContract
from tests.storage.contract.outcomes import OutcomesContract
from tests.storage.contract.ratelimits import RateLimitsContract
from tests.storage.contract.ruleversions import RuleVersionsContract
from tests.storage.contract.shadow import ShadowResultsContract
from tests.storage.contract.support import EMAIL, STAGES, TOKEN, FakeClock, event, outcome
from tests.storage.contract.touches import TouchesContract

__all__ = ["EMAIL", "STAGES", "TOKEN", "FakeClock", "StorageContract", "event", "outcome"]


@pytest.mark.anyio
class StorageContract(InboxContract, OutcomesContract, IdentityMapContract, RateLimitsContract,
                      LocalCRMContract, LifecycleContract, RuleVersionsContract,
                      ShadowResultsContract, BrowsingContract, TouchesContract):
    @pytest.fixture
    def anyio_backend(self) -> str:
        return "asyncio"

    @pytest.fixture
    def clock(self) -> FakeClock:
        return FakeClock()
