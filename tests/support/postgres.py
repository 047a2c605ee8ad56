"""Fresh PostgreSQL schemas for tests and benchmarks: one per test, dropped afterwards.

The server is the one CI starts (127.0.0.1:5432, database `test`, trust auth); set
LINKCRM_TEST_DATABASE_URL to use another. It is never optional: an unreachable server fails the
tests with the command that starts it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import quote

import psycopg
import pytest
from psycopg import sql

BASE_URL = os.environ.get(
    "LINKCRM_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")

HOW_TO_START = (
    "start it with: pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start "
    "(or point LINKCRM_TEST_DATABASE_URL at a server where you may create schemas)"
)


def unreachable_reason() -> str | None:
    """None when the server answers, else a message that says how to start it."""
    try:
        with psycopg.connect(BASE_URL, connect_timeout=5) as connection:
            connection.execute("SELECT 1")
    except psycopg.Error as error:
        return f"PostgreSQL is not reachable at {BASE_URL} ({error}); {HOW_TO_START}"
    return None


def require_postgres() -> None:
    """Fail (never skip) the calling test when the server is down, saying how to start it."""
    reason = unreachable_reason()
    if reason is not None:
        pytest.fail(reason, pytrace=False)


def schema_url(schema: str, *settings: str, **query: str | int) -> str:
    """The base URL with `search_path` set to `schema` and any other server `settings`
    (`"default_transaction_read_only=on"`), plus linkcrm's pool options as `query`."""
    options = quote(" ".join(f"-c{s}" for s in (f"search_path={schema}", *settings)), safe="")
    extra = "".join(f"&{name}={value}" for name, value in query.items())
    separator = "&" if "?" in BASE_URL else "?"
    return f"{BASE_URL}{separator}options={options}{extra}"


@contextmanager
def fresh_schema(prefix: str = "lc_test") -> Iterator[str]:
    """Create a uniquely named schema, yield its name, and drop it with everything in it."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(BASE_URL, autocommit=True) as connection:
        connection.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
    try:
        yield name
    finally:
        with psycopg.connect(BASE_URL, autocommit=True) as connection:
            connection.execute(
                sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))
