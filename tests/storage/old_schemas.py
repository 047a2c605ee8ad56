"""Databases as an earlier release left them: the migrations below a number, applied and
recorded as the migrate command does, for the upgrade tests of each backend."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from typing import Any

import psycopg

from engine.storage.postgres import schema as postgres_schema
from engine.storage.sqlite import schema as sqlite_schema


def sqlite_before(connection: sqlite3.Connection, number: int) -> None:
    """SQLite's schema up to (not including) migration `number`."""
    _before(connection.execute, sqlite_schema.MIGRATIONS, number,
            "applied_at TEXT NOT NULL", "INSERT INTO schema_version VALUES (?, 'then')")


def postgres_before(connection: psycopg.Connection[Any], number: int) -> None:
    """PostgreSQL's schema up to (not including) migration `number`."""
    _before(connection.execute, postgres_schema.MIGRATIONS, number,
            "applied_at TIMESTAMPTZ NOT NULL DEFAULT now()",
            "INSERT INTO schema_version VALUES (%s, now())")


def _before(execute: Callable[..., Any], migrations: Sequence[tuple[int, Sequence[str]]],
            number: int, applied_at: str, record: str) -> None:
    execute(f"CREATE TABLE schema_version (version INTEGER PRIMARY KEY, {applied_at})")
    for version, statements in migrations:
        if version < number:
            for statement in statements:
                execute(statement)
            execute(record, (version,))
