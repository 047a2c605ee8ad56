"""20% injected faults on every CRM emulator (5xx, 429 or Salesforce's 403 limit, slow answers
past the client timeout, dropped connections, and writes that commit and then lose their
answer): every event reaches every CRM through the worker, exactly once.

CI runs LINKCRM_FAULT_EVENTS (default 152) events; `python tests/benchmarks/bench_faults.py`
runs 2,000 (Pipedrive's 10 searches per 2 s make thousands of new people slow, so that is a
benchmark).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import httpx
import pytest

from engine.actions import IdentityKey, UpsertContact
from engine.rules.files import load_ruleset
from engine.storage import open_storage
from engine.targets.base import CallContext
from engine.targets.pipedrive.target import PipedriveTarget
from engine.worker.retrying import RetryPolicy, call_with_retries
from tests.emulators.faults import KINDS, FaultInjector
from tests.emulators.pipedrive import PipedriveEmulator
from tests.emulators.server import serve
from tests.support import fault_run
from tests.support.crm_stack import PIPEDRIVE_TOKEN, PIPELINE, provision_pipedrive_app
from tests.support.service_process import ROOT

pytestmark = pytest.mark.anyio
RULES = load_ruleset([ROOT / "rules"])



@pytest.mark.slow
async def test_twenty_percent_faults_everywhere_lose_nothing_and_duplicate_nothing(
        tmp_path: Path) -> None:
    people = max(1, int(os.environ.get("LINKCRM_FAULT_EVENTS", "152")) // 4)
    report = await fault_run.run(RULES, tmp_path, people, timeout=240)
    # Nothing retryable was dead-lettered: every event finished processed.
    assert report.statuses == {"processed": report.events}, report.dead_errors
    for crm, injected in report.injected.items():
        assert set(injected) == set(KINDS), f"{crm} saw only {injected}"
    assert all(report.retried[crm] > 0 for crm in report.injected), report.retried
    assert report.retried["local"] == 0
    assert fault_run.problems(report, RULES) == []


@pytest.mark.slow
@pytest.mark.parametrize("crm", ["hubspot", "salesforce"])
async def test_twenty_percent_faults_on_a_lone_batching_crm_lose_nothing_and_duplicate_nothing(
        tmp_path: Path, crm: str) -> None:
    """A worker with one batching target sends each claim in one pass
    (engine/worker/claimpipe.py): the same faults, the same exactly-once end state."""
    report = await fault_run.run(RULES, tmp_path, 24, timeout=240, targets=(crm,))
    assert report.statuses == {"processed": report.events}, report.dead_errors
    assert set(report.injected[crm]) == set(KINDS), report.injected
    assert report.retried[crm] > 0
    assert fault_run.problems(report, RULES) == []


def only_first(method: str, path: str) -> Callable[[dict[str, Any]], bool]:
    """`exempt` for a FaultInjector at rate 1: only the first `method path` is faulted."""
    seen: list[str] = []

    def exempt(scope: dict[str, Any]) -> bool:
        if (scope["method"], scope["path"]) != (method, path) or seen:
            return True
        seen.append(path)
        return False

    return exempt


async def test_a_create_answered_after_the_client_timeout_is_not_made_twice(
        tmp_path: Path) -> None:
    # Pipedrive cannot make creates idempotent: a POST that outlives the client's timeout
    # commits later, so the retry must wait for it (as long as the timeout) and then find it.
    emulator = PipedriveEmulator(api_token=PIPEDRIVE_TOKEN, search_lag=30.0)
    emulator.add_pipeline(*PIPELINE)
    await provision_pipedrive_app(emulator, RULES.field_map)
    slow = FaultInjector(cast(Any, emulator.app), rate=1.0, kinds=("slow",), slow_seconds=0.5,
                         exempt=only_first("POST", "/api/v2/persons"))
    action = UpsertContact("r", (IdentityKey("deep_link_token", "tok_slow"),))
    storage = open_storage(f"sqlite:///{tmp_path / 'linkcrm.db'}")
    await storage.migrate()
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        await asyncio.sleep(seconds)

    try:
        with serve(slow) as url:
            async with httpx.AsyncClient(timeout=0.3) as client:
                target = PipedriveTarget(client, api_token=PIPEDRIVE_TOKEN, base_url=url,
                                         field_map=RULES.field_map, identities=storage.identities,
                                         rate_limits=storage.rate_limits, search_limit=1000,
                                         burst_limit=1000)
                outcome = await call_with_retries(lambda: target.execute(action, CallContext("k")),
                                                  RetryPolicy(base=0.001, cap=0.01), sleep)
            await asyncio.sleep(0.5)
    finally:
        await storage.close()
    assert slow.injected == {"slow": 1}
    assert waits and waits[0] >= 0.3  # the read timeout, not the policy's 1 ms
    assert [str(p) for p in emulator.persons] == [outcome.record_id]
