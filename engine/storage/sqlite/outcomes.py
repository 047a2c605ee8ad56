"""Action outcomes on SQLite: one row per (target, idempotency key), success final."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime

from engine.actions import JSON
from engine.storage import records, values
from engine.storage.protocols import Outcomes
from engine.storage.sqlite import timeline
from engine.storage.sqlite.database import SQLitePart
from engine.storage.sqlite.rows import (
    OUTCOME_COLUMNS,
    dumps_optional,
    insert_rows,
    outcome_from_row,
    placeholders,
    ts,
)

_GET = f"SELECT {OUTCOME_COLUMNS} FROM action_outcomes WHERE target = ? AND idempotency_key = ?"
# The WHERE on the conflict branch keeps an `ok` row as it is: success is final.
_UPSERT_INTO = (
    "INSERT INTO action_outcomes (event_id, rule, action_kind, target, idempotency_key, status,"
    " attempts, request_summary, response, error, next_attempt_at, created_at, updated_at,"
    " rules_version)"
)
_UPSERT_ROW = "(?, ?, ?, ?, ?, ?, 1, ?, ?, ?, ?, ?, ?, ?)"
_UPSERT_ON_CONFLICT = (
    " ON CONFLICT (target, idempotency_key) DO UPDATE SET"
    " status = excluded.status, attempts = action_outcomes.attempts + 1,"
    " request_summary = excluded.request_summary, response = excluded.response,"
    " error = excluded.error, next_attempt_at = excluded.next_attempt_at,"
    " updated_at = excluded.updated_at, rules_version = excluded.rules_version"
    " WHERE action_outcomes.status <> 'ok'"
)
_UPSERT = f"{_UPSERT_INTO} VALUES {_UPSERT_ROW}{_UPSERT_ON_CONFLICT}"


class SQLiteOutcomes(SQLitePart, Outcomes):
    """An upsert that returns the row it wrote, in one writer job; when it wrote none (the `ok`
    row is kept), a read of that row in the same job, so nothing else writes in between.
    `record_many` is one statement for them all, reading nothing back."""

    async def get(self, target: str, idempotency_key: str) -> records.ActionOutcome | None:
        return await self._db.row("read the outcome", _GET, (target, idempotency_key),
                                  outcome_from_row)

    async def record(self, outcome: records.NewOutcome) -> records.ActionOutcome:
        now = self._db.now()
        row = _row(outcome, now)

        def run(connection: sqlite3.Connection) -> records.ActionOutcome:
            written = connection.execute(f"{_UPSERT} RETURNING {OUTCOME_COLUMNS}",
                                         row).fetchone()
            # No row back: the `ok` row was kept as it is; read it.
            return outcome_from_row(written if written is not None else connection.execute(
                _GET, (outcome.target, outcome.idempotency_key)).fetchone())

        return await self._db.write(run, "record the outcome")

    async def record_many(self, outcomes: Sequence[records.NewOutcome]) -> None:
        write = writing_many(outcomes, self._db.now())
        await self._db.write(write, "record the outcomes")

    async def of_event(self, event_id: int) -> list[records.ActionOutcome]:
        return await self._db.rows(
            "list outcomes",
            f"SELECT {OUTCOME_COLUMNS} FROM action_outcomes WHERE event_id = ? ORDER BY id",
            (event_id,), outcome_from_row)

    async def of_events(self, event_ids: Sequence[int]) -> dict[int, list[records.ActionOutcome]]:
        unique = sorted(set(event_ids))

        def run(connection: sqlite3.Connection) -> dict[int, list[records.ActionOutcome]]:
            found: dict[int, list[records.ActionOutcome]] = {event_id: [] for event_id in unique}
            for start in range(0, len(unique), 500):  # well under SQLite's parameter limit
                chunk = unique[start:start + 500]
                for row in connection.execute(
                        f"SELECT {OUTCOME_COLUMNS} FROM action_outcomes"
                        f" WHERE event_id IN ({placeholders(len(chunk))}) ORDER BY id", chunk):
                    outcome = outcome_from_row(row)
                    found[outcome.event_id].append(outcome)
            return found

        return await self._db.read(run, "list outcomes")

    async def counts(self) -> Mapping[tuple[str, str], int]:
        counted = await self._db.rows(
            "count outcomes",
            "SELECT target, status, COUNT(*) FROM action_outcomes GROUP BY target, status", (),
            lambda row: ((str(row[0]), str(row[1])), int(row[2])))
        return dict(counted)

    async def activity(self, since: datetime,
                       limit: int = 20_000) -> list[records.ActivityCount]:
        return await self._db.read(lambda c: timeline.outcome_activity(c, since, limit),
                                   "count recent outcomes")

    async def recent_retries(self, since: datetime, limit: int = 100) -> list[
            records.ActionOutcome]:
        return await self._db.read(lambda c: timeline.recent_retries(c, since, limit),
                                   "read recent retries")



def writing_many(
    outcomes: Sequence[records.NewOutcome], now: str
) -> Callable[[sqlite3.Connection], None]:
    """The writer job of `record_many`, cleaned here (on the caller's thread): the inbox's
    `finish` runs it in its own job too."""
    rows = [_row(outcome, now) for outcome in outcomes]

    def run(connection: sqlite3.Connection) -> None:
        insert_rows(connection, _UPSERT_INTO, _UPSERT_ROW, rows, _UPSERT_ON_CONFLICT)

    return run


def _row(outcome: records.NewOutcome, now: str) -> tuple[object, ...]:
    """The outcome's parameters, its diagnostics cleaned as `values.storable_outcome` cleans
    them (straight into the row: no cleaned copy of the record)."""
    next_at = None if outcome.next_attempt_at is None else ts(outcome.next_attempt_at)
    return (outcome.event_id, outcome.rule, outcome.action_kind, outcome.target,
            outcome.idempotency_key, outcome.status,
            _summary_text(outcome.request_summary),
            dumps_optional(values.storable_json(outcome.response)),
            values.storable_text(outcome.error), next_at, now, now,
            values.storable_text(outcome.rules_version))


# The text of request summaries the worker shares between events (one dict per rule action,
# engine/worker/apply.py): each is cleaned and encoded once. Kept with the dict itself, so an
# id is never reused while its entry lives; emptied now and then, so it stays small.
_SUMMARY_TEXTS: dict[int, tuple[JSON, str | None]] = {}
_SUMMARY_TEXTS_KEPT = 1024


def _summary_text(summary: JSON) -> str | None:
    known = _SUMMARY_TEXTS.get(id(summary))
    if known is not None and known[0] is summary:
        return known[1]
    text = dumps_optional(values.storable_json(summary))
    if len(_SUMMARY_TEXTS) >= _SUMMARY_TEXTS_KEPT:
        _SUMMARY_TEXTS.clear()
    _SUMMARY_TEXTS[id(summary)] = (summary, text)
    return text
