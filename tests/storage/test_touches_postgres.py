"""Two workers (two processes' pools) attributing people of one shared link at the same time on
PostgreSQL never claim the same install."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from engine.storage.postgres.store import PostgresStorage
from tests.storage.contract.touches import ask, touch
from tests.support.postgres import fresh_schema, require_postgres, schema_url

pytestmark = pytest.mark.anyio


@pytest.fixture
def url() -> Iterator[str]:
    require_postgres()
    with fresh_schema() as schema:
        yield schema_url(schema)


async def test_two_workers_never_claim_the_same_install(url: str) -> None:
    workers = [PostgresStorage.from_url(url) for _ in range(2)]
    try:
        await workers[0].migrate()
        for n in range(30):
            await workers[n % 2].touches.record(touch(n + 1, n, platform=("ios", "android")[n % 2]))
        # 40 people register at once through both workers: 30 installs to share out.
        got = await asyncio.gather(*(workers[n % 2].touches.attribute(
            ask(1000 + n, 120, platform=("ios", "android", None)[n % 3])) for n in range(40)))
    finally:
        await asyncio.gather(*(worker.close() for worker in workers))
    claimed = [a.detail["install"]["event_id"] for a in got if a.detail["install"] is not None]
    assert len(claimed) == 30
    assert sorted(claimed) == list(range(1, 31))
    assert sum(a.detail["install"] is None for a in got) == 10
