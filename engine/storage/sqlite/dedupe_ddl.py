"""Migration 9 (SQLite): the inbox's unique dedupe index led by `dedupe_prefix`.

A dedupe key is a sha256, so every new key used to go to a random leaf of the unique index:
a group commit of 17 deliveries wrote 17 pages of that index to the WAL (45 pages in all per
commit at 100,000 stored events), and each checkpoint copied them all back. Led by a prefix
that the deduplicated bytes fix themselves (`NewEvent.dedupe_prefix`: a webhook's signed
timestamp), new keys land on the same few pages: 25 pages a commit, and the slowest 1% of
commits (those that checkpoint) take 6 ms instead of 18. Two deliveries of the same bytes
have the same prefix, so (prefix, key) is unique exactly where the key is.

SQLite cannot drop a column's UNIQUE, so the inbox is rebuilt, once, inside the migration's
transaction: copied aside, dropped and created again, its rows copied back with their ids.
Foreign keys stay on: `defer_foreign_keys` lets the rows that reference an event wait for it
to be copied back, and the commit fails (undoing everything) unless each finds its event again.
Indexes and triggers are created again with the text they shipped with (inbox_ddl.py); the
inbox's AUTOINCREMENT counter is carried over, so no id is ever handed out twice.
"""

from __future__ import annotations

from engine.storage.records import DEDUPE_PREFIX_CHARACTERS
from engine.storage.sqlite import inbox_ddl

_COLUMNS = (
    "id, dedupe_key, source, event_type, event_timestamp, received_at, headers, body, status,"
    " attempts, lease_owner, lease_expires_at, next_attempt_at, last_error, updated_at,"
    " ordering_recorded, rules_version"
)

INBOX_DEDUPE_PREFIX: tuple[str, ...] = (
    "PRAGMA defer_foreign_keys = ON",
    # The checks that follow look each event's shadow results up by event; so will any
    # future check of an event's references.
    "CREATE INDEX shadow_results_event ON shadow_results (event_id)",
    "CREATE TABLE inbox_before_9 AS SELECT * FROM inbox",
    "CREATE TABLE inbox_sequence_before_9 AS"
    " SELECT seq FROM sqlite_sequence WHERE name = 'inbox'",
    "DROP TRIGGER inbox_counts_insert",
    "DROP TRIGGER inbox_counts_update",
    "DROP TRIGGER inbox_counts_delete",
    "DROP TABLE inbox",
    """CREATE TABLE inbox (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        dedupe_key TEXT NOT NULL,
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
        updated_at TEXT NOT NULL,
        ordering_recorded INTEGER NOT NULL DEFAULT 0 CHECK (ordering_recorded IN (0, 1)),
        rules_version TEXT,
        dedupe_prefix TEXT NOT NULL DEFAULT '',
        CONSTRAINT inbox_dedupe UNIQUE (dedupe_prefix, dedupe_key)
    )""",
    # What the receiver has stored as the prefix of a webhook (its signed timestamp's first
    # characters); identify calls dedupe on their body alone (their timestamp is the call's).
    f"INSERT INTO inbox ({_COLUMNS}, dedupe_prefix) SELECT {_COLUMNS},"
    f" CASE WHEN source = 'tolinku' THEN substr(event_timestamp, 1, {DEDUPE_PREFIX_CHARACTERS})"
    " ELSE '' END FROM inbox_before_9 ORDER BY id",
    "INSERT INTO sqlite_sequence (name, seq) SELECT 'inbox', seq FROM inbox_sequence_before_9"
    " WHERE NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'inbox')",
    "UPDATE sqlite_sequence SET seq = (SELECT MAX(seq) FROM (SELECT seq FROM sqlite_sequence"
    " WHERE name = 'inbox' UNION ALL SELECT seq FROM inbox_sequence_before_9))"
    " WHERE name = 'inbox'",
    "DROP TABLE inbox_before_9",
    "DROP TABLE inbox_sequence_before_9",
    inbox_ddl.PENDING_INDEX,
    inbox_ddl.STATUS_INDEX,
    inbox_ddl.UNPLANNED_INDEX,
    inbox_ddl.DUE_INDEX,
    inbox_ddl.EVENT_TYPE_INDEX,
    *inbox_ddl.COUNT_TRIGGERS,
)
