"""The touches migration (PostgreSQL): its statements live here so that renumbering it at a
merge changes one number in `schema.py`, never the pinned text."""

from __future__ import annotations

# One touch per link-level inbox event; an install is claimed by at most one identify event
# (the partial unique index) and an identify event claims at most one install. What an identify
# event was given is kept whole, so a replay sees the same touches.
TOUCHES: tuple[str, ...] = (
    """CREATE TABLE touches (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        event_id BIGINT NOT NULL UNIQUE,
        event_type TEXT NOT NULL,
        token TEXT NOT NULL,
        campaign TEXT,
        prefix TEXT,
        platform TEXT,
        referrer TEXT,
        per_person BOOLEAN NOT NULL,
        occurred_at TIMESTAMPTZ NOT NULL,
        recorded_at TIMESTAMPTZ NOT NULL,
        claimed_by BIGINT
    )""",
    "CREATE INDEX touches_token ON touches (token, occurred_at)",
    "CREATE UNIQUE INDEX touches_claimed_by ON touches (claimed_by)"
    " WHERE claimed_by IS NOT NULL",
    """CREATE TABLE touch_attributions (
        event_id BIGINT PRIMARY KEY,
        token TEXT NOT NULL,
        detail JSONB NOT NULL,
        created_at TIMESTAMPTZ NOT NULL
    )""",
)
