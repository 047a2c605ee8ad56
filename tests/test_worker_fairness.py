"""One CRM that hangs never holds up another: deferred backlogs thin out and queue behind new
events, on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from engine.actions import Action
from engine.crm.base import Outcome
from engine.rules import RuleSet
from engine.storage import Storage, open_storage
from engine.worker import Worker, WorkerOptions
from tests.postgres_support import fresh_schema, require_postgres, schema_url
from tests.worker_helpers import FakeTarget, store, wait_until, write_rules

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=["sqlite", "postgresql"])
async def storage(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Storage]:
    if request.param == "sqlite":
        opened = open_storage(f"sqlite:///{tmp_path / 'linkcrm.db'}")
        await opened.migrate()
        yield opened
        await opened.close()
        return
    require_postgres()
    with fresh_schema() as schema:
        opened = open_storage(schema_url(schema))
        await opened.migrate()
        yield opened
        await opened.close()


@pytest.fixture
def rules(tmp_path: Path) -> RuleSet:
    return write_rules(tmp_path / "rules")


class HangingTarget(FakeTarget):
    """A CRM that accepts connections and never answers, until `recover` is set."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.recover = asyncio.Event()

    async def execute(self, action: Action, idempotency_key: str) -> Outcome:
        self.active += 1
        try:
            await self.recover.wait()
        finally:
            self.active -= 1
        return await super().execute(action, idempotency_key)


async def test_a_hanging_crm_with_a_backlog_does_not_starve_another(
    storage: Storage, rules: RuleSet
) -> None:
    healthy, hanging = FakeTarget("healthy"), HangingTarget("hanging")
    backlog = int(os.environ.get("H8_BACKLOG", "200"))
    for n in range(backlog):
        await store(storage, "install.tracked", token=f"old_{n}")
    worker = Worker(storage, rules, [healthy, hanging],
                    options=WorkerOptions(concurrency=2, busy_wait=0.2))
    running = asyncio.create_task(worker.run())
    try:
        t0 = time.monotonic()
        await wait_until(lambda: len(healthy.calls) == 2 * backlog, timeout=60,
                         what="the backlog on the healthy CRM")
        print("first pass", time.monotonic() - t0)
        assert hanging.active == 2  # the hanging CRM holds its own lane, and only that
        latencies = []
        for n in range(10):
            started = time.monotonic()
            event_id = await store(storage, "install.tracked", token=f"new_{n}")
            await wait_until(lambda: len(healthy.kinds(event_id)) == 2, timeout=20,
                             what=f"new event {n} on the healthy CRM")
            latencies.append(time.monotonic() - started)
            await asyncio.sleep(0.2)
        print("latencies", [round(x, 2) for x in latencies])
    finally:
        hanging.recover.set()
        worker.stop()
        await running
