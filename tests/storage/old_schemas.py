"""Databases as an earlier release left them: the migrations below a number, applied and
recorded as the migrate command does, for the upgrade tests of each backend."""

from __future__ import annotations

import sqlite3
from typing import Any

import psycopg

from engine.storage.postgres import schema as postgres_schema
from engine.storage.sqlite import schema as sqlite_schema


def sqlite_before(connection: sqlite3.Connection, number: int) -> None:
    """SQLite's schema up to (not including) migration `number`."""
    connection.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY,"
                       " applied_at TEXT NOT NULL)")
    for version, statements in sqlite_schema.MIGRATIONS:
        if version < number:
            for statement in statements:
                connection.execute(statement)
            connection.execute("INSERT INTO schema_version VALUES (?, 'then')", (version,))


def postgres_before(connection: psycopg.Connection[Any], number: int) -> None:
    """PostgreSQL's schema up to (not including) migration `number`."""
    connection.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY,"
                       " applied_at TIMESTAMPTZ NOT NULL DEFAULT now())")
    for version, statements in postgres_schema.MIGRATIONS:
        if version < number:
            for statement in statements:
                connection.execute(statement)
            connection.execute("INSERT INTO schema_version VALUES (%s, now())", (version,))
