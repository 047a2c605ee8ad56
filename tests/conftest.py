"""Fixtures every test folder shares."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from engine.storage import Storage, open_storage
from tests.support.postgres import fresh_schema, require_postgres, schema_url


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    """Async tests (`pytest.mark.anyio`) run on asyncio; `serve` runs uvloop, which keeps
    asyncio's API (tests/service/test_framing.py and test_intake.py run on it)."""
    return "asyncio"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests that use a database (`database_url`, `storage`) in a module that names its
    `BACKENDS` run once on each."""
    backends = getattr(metafunc.module, "BACKENDS", None)
    if backends and "database_url" in metafunc.fixturenames:
        metafunc.parametrize("database_url", backends, indirect=True)


@pytest.fixture
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of an empty database for one test: a SQLite file in the test's folder, or, in a
    module with `BACKENDS = ("sqlite", "postgresql")`, each backend in turn. PostgreSQL gets a
    fresh schema, dropped afterwards, and fails (never skips) when the server is down."""
    backend = getattr(request, "param", "sqlite")
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'linkcrm.db'}"
        return
    require_postgres()
    with fresh_schema() as schema:
        yield schema_url(schema)


@pytest.fixture
async def storage(database_url: str) -> AsyncIterator[Storage]:
    """An open, migrated, empty storage on `database_url`, closed after the test."""
    opened = open_storage(database_url)
    await opened.migrate()
    yield opened
    await opened.close()
