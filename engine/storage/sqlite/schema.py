"""The SQLite schema as numbered migrations, applied once each under the write lock."""

from __future__ import annotations

import sqlite3

from engine.storage.checks import Migrations, migrations_to_apply
from engine.storage.ddl import outcome_tables
from engine.storage.sqlite import inbox_ddl
from engine.storage.sqlite.dedupe_ddl import INBOX_DEDUPE_PREFIX
from engine.storage.sqlite.touches_ddl import TOUCHES

# Append new versions; never edit one that has shipped. Types and constraints stay close to
# what PostgreSQL accepts so the two schemas read alike (times are ISO 8601 UTC text here).
MIGRATIONS: Migrations = (
    (1, (
        """CREATE TABLE inbox (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            dedupe_key TEXT NOT NULL UNIQUE,
            source TEXT NOT NULL,
            event_type TEXT NOT NULL,
            event_timestamp TEXT NOT NULL,
            received_at TEXT NOT NULL,
            headers TEXT NOT NULL,
            body BLOB,
            status TEXT NOT NULL DEFAULT 'received'
                CHECK (status IN ('received', 'processed', 'ignored', 'failed', 'dead')),
            attempts INTEGER NOT NULL DEFAULT 0,
            lease_owner TEXT,
            lease_expires_at TEXT,
            next_attempt_at TEXT,
            last_error TEXT,
            updated_at TEXT NOT NULL
        )""",
        inbox_ddl.PENDING_INDEX,
        inbox_ddl.STATUS_INDEX,
        "CREATE INDEX inbox_received_at ON inbox (received_at)",
        """CREATE TABLE inbox_ordering_keys (
            event_id INTEGER NOT NULL REFERENCES inbox (id),
            ordering_key TEXT NOT NULL,
            PRIMARY KEY (event_id, ordering_key)
        )""",
        "CREATE INDEX inbox_ordering_keys_key ON inbox_ordering_keys (ordering_key, event_id)",
        *outcome_tables(
            id_column="id INTEGER PRIMARY KEY AUTOINCREMENT", integer="INTEGER", json="TEXT",
            timestamp="TEXT", unique="UNIQUE (target, idempotency_key)"),
        """CREATE TABLE rate_buckets (
            bucket TEXT PRIMARY KEY,
            tokens REAL NOT NULL,
            updated_at TEXT NOT NULL
        )""",
        """CREATE TABLE local_contacts (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            fields TEXT NOT NULL,
            stage TEXT,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL
        )""",
        """CREATE TABLE local_contact_identities (
            field TEXT NOT NULL,
            value TEXT NOT NULL,
            contact_id INTEGER NOT NULL REFERENCES local_contacts (id),
            PRIMARY KEY (field, value)
        )""",
        "CREATE INDEX local_contact_identities_contact ON local_contact_identities (contact_id)",
        """CREATE TABLE local_stage_history (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            contact_id INTEGER NOT NULL REFERENCES local_contacts (id),
            from_stage TEXT,
            to_stage TEXT NOT NULL,
            changed_at TEXT NOT NULL,
            event_id INTEGER
        )""",
        "CREATE INDEX local_stage_history_contact ON local_stage_history (contact_id, id)",
        """CREATE TABLE local_deals (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            deal_key TEXT NOT NULL UNIQUE,
            title TEXT NOT NULL,
            stage TEXT,
            amount REAL,
            contact_id INTEGER REFERENCES local_contacts (id),
            fields TEXT NOT NULL,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL
        )""",
    )),
    # Every acknowledged delivery writes each inbox index inside the request's commit; the
    # receipt-time index only served `purge`, a rare maintenance scan that can do without it.
    (2, (
        "DROP INDEX IF EXISTS inbox_received_at",
    )),
    # /metrics and /readyz in constant time: the inbox depth by status is kept by triggers in
    # the same transaction as every insert, status change and delete (a scrape reads five rows,
    # not the inbox), and `write_probe` takes the test write /readyz makes after a failed
    # commit. The triggers exist before the counts are taken, under the write lock.
    (3, (
        """CREATE TABLE inbox_counts (
            status TEXT PRIMARY KEY,
            n INTEGER NOT NULL DEFAULT 0
        )""",
        "INSERT INTO inbox_counts (status) VALUES"
        " ('received'), ('processed'), ('ignored'), ('failed'), ('dead')",
        *inbox_ddl.COUNT_TRIGGERS,
        "UPDATE inbox_counts SET n = (SELECT COUNT(*) FROM inbox"
        " WHERE inbox.status = inbox_counts.status)",
        """CREATE TABLE write_probe (
            id INTEGER PRIMARY KEY,
            payload BLOB NOT NULL
        )""",
    )),
    # Several worker processes on one file: `ordering_recorded` tells "this earlier event
    # touches other identities" from "its keys are not known yet" (another process is planning
    # it), as on PostgreSQL. Pending events that already have keys were planned; every other
    # row starts unplanned, which can only make a later event wait, never run out of order.
    # `inbox_due` serves claims in due order (a new event is due when it was received).
    (4, (
        "ALTER TABLE inbox ADD COLUMN ordering_recorded INTEGER NOT NULL DEFAULT 0"
        " CHECK (ordering_recorded IN (0, 1))",
        "UPDATE inbox SET ordering_recorded = 1 WHERE status IN ('received', 'failed')"
        " AND id IN (SELECT event_id FROM inbox_ordering_keys)",
        inbox_ddl.UNPLANNED_INDEX,
        inbox_ddl.DUE_INDEX,
    )),
    # Published rule sets (`linkcrm rules publish`): their files by name, and a status of
    # which exactly one row is `active` once any is published (the partial unique index);
    # each action outcome names the rule version that planned it.
    (5, (
        """CREATE TABLE rule_versions (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            version TEXT NOT NULL UNIQUE,
            label TEXT,
            files TEXT NOT NULL,
            published_by TEXT NOT NULL,
            published_at TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('active', 'shadow', 'retired')),
            activated_at TEXT
        )""",
        "CREATE UNIQUE INDEX rule_versions_one_active ON rule_versions (status)"
        " WHERE status = 'active'",
        "ALTER TABLE action_outcomes ADD COLUMN rules_version TEXT",
    )),
    # Shadow mode (`linkcrm rules publish --shadow`): how each live event planned under the
    # shadow version next to the active one, one row per (version, event) so a retried event
    # counts once; the version `replay --rules-version` pins a requeued event to; and at most
    # one shadow version (a newer one retires it; the newest of any already there stays).
    (6, (
        """CREATE TABLE shadow_results (
            shadow_version TEXT NOT NULL,
            event_id INTEGER NOT NULL REFERENCES inbox (id),
            active_version TEXT,
            event_type TEXT NOT NULL,
            outcome TEXT NOT NULL CHECK (outcome IN ('same', 'changed', 'uncompared')),
            changes TEXT NOT NULL,
            error TEXT,
            observed_at TEXT NOT NULL,
            PRIMARY KEY (shadow_version, event_id)
        )""",
        "CREATE INDEX shadow_results_outcome ON shadow_results (shadow_version, outcome, event_id)",
        "ALTER TABLE inbox ADD COLUMN rules_version TEXT",
        "UPDATE rule_versions SET status = 'retired' WHERE status = 'shadow'"
        " AND seq < (SELECT MAX(seq) FROM rule_versions WHERE status = 'shadow')",
        "CREATE UNIQUE INDEX rule_versions_one_shadow ON rule_versions (status)"
        " WHERE status = 'shadow'",
    )),
    # The delivery log page filters events by type, newest first, in pages: without this
    # index a rare type (one event in 10,000) read half a million rows a page (0.4 s at
    # 1,000,000 events); with it, 50 index entries.
    (7, (
        inbox_ddl.EVENT_TYPE_INDEX,
    )),
    # Touches and attribution at identify (engine.storage.touchrecords). Numbered after the
    # migrations merged before it; renumbering is changing this number (the text is pinned).
    (8, TOUCHES),
    # Deliveries' dedupe keys stored by arrival rather than at random in their unique index
    # (engine/storage/sqlite/dedupe_ddl.py): the inbox is rebuilt once.
    (9, INBOX_DEDUPE_PREFIX),
)

LATEST = MIGRATIONS[-1][0]


def current_version(connection: sqlite3.Connection) -> int:
    exists = connection.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
    ).fetchone()
    if exists is None:
        return 0
    row = connection.execute("SELECT MAX(version) FROM schema_version").fetchone()
    return int(row[0] or 0)


def migrate(connection: sqlite3.Connection, applied_at: str) -> int:
    """Apply the missing migrations; the caller holds the write lock (BEGIN IMMEDIATE), so a
    second process starting at the same time waits, then finds nothing left to do."""
    connection.execute(
        "CREATE TABLE IF NOT EXISTS schema_version ("
        "version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)"
    )
    for number, statements in migrations_to_apply(MIGRATIONS, current_version(connection)):
        for statement in statements:
            connection.execute(statement)
        connection.execute(
            "INSERT INTO schema_version (version, applied_at) VALUES (?, ?)", (number, applied_at)
        )
    return LATEST
