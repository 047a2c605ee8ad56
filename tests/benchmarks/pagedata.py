"""A million recorded events for the page benchmark, written in bulk by SQL on each backend.

Events arrive one every 50 ms over about 14 hours, ending now (so the overview's last 24 hours
hold them all): four event types in turn, and every
10,000th a rare `ecommerce.refund`; every 1,000th is dead, every 37th ignored, the rest
processed; every 100th touched an identity (the digest of `email` `person{n}@example.com`
on any target: `engine.actions.TOUCHED`).
"""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta

import psycopg

from engine.actions import TOUCHED, IdentityKey, identity_digest

STEP = timedelta(milliseconds=50)


def start_for(count: int) -> datetime:
    """When the first of `count` events arrives, so that the last arrives now."""
    return datetime.now(UTC) - count * STEP
TYPES = ("install.tracked", "link.clicked", "referral.created", "referral.completed")
RARE = "ecommerce.refund"


def person(n: int) -> str:
    return identity_digest(TOUCHED, IdentityKey("email", f"person{n}@example.com"))


def _status(n: int) -> str:
    return "dead" if n % 1000 == 0 else "ignored" if n % 37 == 0 else "processed"


def _type(n: int) -> str:
    return RARE if n % 10_000 == 5 else TYPES[n % 4]


def _rows(count: int, start: datetime) -> list[tuple[object, ...]]:
    rows = []
    for n in range(1, count + 1):
        body = (b'{"event":"%s","timestamp":"2026-03-01T00:00:00Z","data":{"token":"tok_%d",'
                b'"campaign":"spring","platform":"ios"}}' % (_type(n).encode(), n))
        rows.append((f"{n:064x}", _type(n), (start + n * STEP), body, _status(n)))
    return rows


def _outcomes(count: int, start: datetime) -> list[tuple[int, str, datetime]]:
    """One action outcome for every processed event: ok, or dead for every 997th."""
    return [(n, "dead" if n % 997 == 0 else "ok", start + n * STEP)
            for n in range(1, count + 1) if _status(n) == "processed"]


def fill_sqlite(path: str, count: int, start: datetime) -> None:
    connection = sqlite3.connect(path)
    with connection:
        connection.executemany(
            "INSERT INTO inbox (dedupe_key, source, event_type, event_timestamp, received_at,"
            " headers, body, status, attempts, updated_at, ordering_recorded)"
            " VALUES (?, 'tolinku', ?, '2026-03-01T00:00:00Z', ?, '{}', ?, ?, 1, ?, 1)",
            ((key, kind, at.isoformat(timespec="microseconds"), body, status,
              at.isoformat(timespec="microseconds"))
             for key, kind, at, body, status in _rows(count, start)))
        connection.executemany(
            "INSERT INTO inbox_ordering_keys (event_id, ordering_key) VALUES (?, ?)",
            ((n, person(n)) for n in range(100, count + 1, 100)))
        connection.executemany(
            "INSERT INTO action_outcomes (event_id, rule, action_kind, target, idempotency_key,"
            " status, attempts, created_at, updated_at)"
            " VALUES (?, 'install-creates-lead', 'upsert_contact', 'local', ?, ?, 1, ?, ?)",
            ((n, f"k{n}", kind, at.isoformat(timespec="microseconds"),
              at.isoformat(timespec="microseconds")) for n, kind, at in _outcomes(count, start)))
    connection.close()


def fill_postgres(url: str, count: int, start: datetime) -> None:
    with psycopg.connect(url) as connection:
        with connection.cursor() as cursor, cursor.copy(
            "COPY inbox (dedupe_key, source, event_type, event_timestamp, received_at, headers,"
            " body, status, attempts, updated_at) FROM STDIN"
        ) as copy:
            for key, kind, at, body, status in _rows(count, start):
                copy.write_row((key, "tolinku", kind, "2026-03-01T00:00:00Z", at, "{}", body,
                                status, 1, at))
        with connection.cursor() as cursor, cursor.copy(
            "COPY inbox_ordering_keys (event_id, ordering_key) FROM STDIN"
        ) as copy:
            for n in range(100, count + 1, 100):
                copy.write_row((n, person(n)))
        with connection.cursor() as cursor, cursor.copy(
            "COPY action_outcomes (event_id, rule, action_kind, target, idempotency_key, status,"
            " attempts, created_at, updated_at) FROM STDIN"
        ) as copy:
            for n, kind, at in _outcomes(count, start):
                copy.write_row((n, "install-creates-lead", "upsert_contact", "local", f"k{n}",
                                kind, 1, at, at))
        connection.commit()
        # The steady state autovacuum keeps: statistics, and pages marked all-visible (which
        # the overview's index-only counts rely on).
        connection.autocommit = True
        for table in ("inbox", "inbox_ordering_keys", "action_outcomes"):
            connection.execute(f"VACUUM ANALYZE {table}")
