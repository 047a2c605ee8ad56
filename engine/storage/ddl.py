"""Schema statements both backends declare alike, but for the timestamp column type.

They are part of migration 1 on each backend: the text a backend runs must never change, so
each backend's arguments give back exactly the statements its migration was shipped with
(tests/storage/test_ddl.py holds them to that).
"""

from __future__ import annotations


def outcome_tables(*, id_column: str, integer: str, json: str, timestamp: str,
                   unique: str) -> tuple[str, ...]:
    """Action outcomes with their indexes, the identity map and the deal keys."""
    return (
        f"""CREATE TABLE action_outcomes (
            {id_column},
            event_id {integer} NOT NULL REFERENCES inbox (id),
            rule TEXT NOT NULL,
            action_kind TEXT NOT NULL,
            target TEXT NOT NULL,
            idempotency_key TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('ok', 'retrying', 'dead')),
            attempts INTEGER NOT NULL DEFAULT 0,
            request_summary {json},
            response {json},
            error TEXT,
            next_attempt_at {timestamp},
            created_at {timestamp} NOT NULL,
            updated_at {timestamp} NOT NULL,
            {unique}
        )""",
        "CREATE INDEX action_outcomes_event ON action_outcomes (event_id)",
        "CREATE INDEX action_outcomes_status ON action_outcomes (status)",
        f"""CREATE TABLE identity_map (
            target TEXT NOT NULL,
            field TEXT NOT NULL,
            value TEXT NOT NULL,
            record_id TEXT NOT NULL,
            created_at {timestamp} NOT NULL,
            PRIMARY KEY (target, field, value)
        )""",
        f"""CREATE TABLE deal_keys (
            target TEXT NOT NULL,
            deal_key TEXT NOT NULL,
            deal_id TEXT NOT NULL,
            created_at {timestamp} NOT NULL,
            PRIMARY KEY (target, deal_key)
        )""",
    )
