"""A million recorded events for the page benchmark, written in bulk by SQL on each backend.

Events arrive one every 50 ms over about 14 hours: four event types in turn, and every
10,000th a rare `ecommerce.refund`; every 1,000th is dead, every 37th ignored, the rest
processed; every 100th touched an identity (the digest of `email` `person{n}@example.com`
on any target: `engine.actions.TOUCHED`).
"""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta

import psycopg

from engine.actions import TOUCHED, IdentityKey, identity_digest

START = datetime(2026, 3, 1, tzinfo=UTC)
STEP = timedelta(milliseconds=50)
TYPES = ("install.tracked", "link.clicked", "referral.created", "referral.completed")
RARE = "ecommerce.refund"


def person(n: int) -> str:
    return identity_digest(TOUCHED, IdentityKey("email", f"person{n}@example.com"))


def _status(n: int) -> str:
    return "dead" if n % 1000 == 0 else "ignored" if n % 37 == 0 else "processed"


def _type(n: int) -> str:
    return RARE if n % 10_000 == 5 else TYPES[n % 4]


def _rows(count: int) -> list[tuple[object, ...]]:
    rows = []
    for n in range(1, count + 1):
        body = (b'{"event":"%s","timestamp":"2026-03-01T00:00:00Z","data":{"token":"tok_%d",'
                b'"campaign":"spring","platform":"ios"}}' % (_type(n).encode(), n))
        rows.append((f"{n:064x}", _type(n), (START + n * STEP), body, _status(n)))
    return rows


def fill_sqlite(path: str, count: int) -> None:
    connection = sqlite3.connect(path)
    with connection:
        connection.executemany(
            "INSERT INTO inbox (dedupe_key, source, event_type, event_timestamp, received_at,"
            " headers, body, status, attempts, updated_at, ordering_recorded)"
            " VALUES (?, 'tolinku', ?, '2026-03-01T00:00:00Z', ?, '{}', ?, ?, 1, ?, 1)",
            ((key, kind, at.isoformat(timespec="microseconds"), body, status,
              at.isoformat(timespec="microseconds"))
             for key, kind, at, body, status in _rows(count)))
        connection.executemany(
            "INSERT INTO inbox_ordering_keys (event_id, ordering_key) VALUES (?, ?)",
            ((n, person(n)) for n in range(100, count + 1, 100)))
    connection.close()


def fill_postgres(url: str, count: int) -> None:
    with psycopg.connect(url) as connection:
        with connection.cursor() as cursor, cursor.copy(
            "COPY inbox (dedupe_key, source, event_type, event_timestamp, received_at, headers,"
            " body, status, attempts, updated_at) FROM STDIN"
        ) as copy:
            for key, kind, at, body, status in _rows(count):
                copy.write_row((key, "tolinku", kind, "2026-03-01T00:00:00Z", at, "{}", body,
                                status, 1, at))
        with connection.cursor() as cursor, cursor.copy(
            "COPY inbox_ordering_keys (event_id, ordering_key) FROM STDIN"
        ) as copy:
            for n in range(100, count + 1, 100):
                copy.write_row((n, person(n)))
        connection.execute("ANALYZE inbox")
        connection.execute("ANALYZE inbox_ordering_keys")
