"""Shadow results on SQLite: one upsert per observed event, a writer job like every write."""

from __future__ import annotations

import sqlite3
from datetime import datetime

from engine.storage import checks, records, values
from engine.storage.protocols import ShadowResults
from engine.storage.records import field_names, from_row
from engine.storage.sqlite.database import SQLitePart
from engine.storage.sqlite.rows import dumps, loads, parse_optional_ts, parse_ts, ts

_COLUMNS = ", ".join(field_names(records.ShadowResult))


def _changes(text: str) -> list[object]:
    value = loads(text)
    return value if isinstance(value, list) else []


def _result(row: sqlite3.Row) -> records.ShadowResult:
    return from_row(records.ShadowResult, row, changes=_changes, observed_at=parse_ts)


class SQLiteShadowResults(SQLitePart, ShadowResults):
    """Results in the `shadow_results` table, keyed by (shadow version, event)."""

    async def record(self, result: records.NewShadowResult) -> None:
        checks.shadow_result(result)
        clean = values.storable_shadow_result(result)
        await self._db.execute(
            "record the shadow result",
            "INSERT INTO shadow_results (shadow_version, event_id, active_version, event_type,"
            " outcome, changes, error, observed_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (shadow_version, event_id) DO UPDATE SET"
            " active_version = excluded.active_version, event_type = excluded.event_type,"
            " outcome = excluded.outcome, changes = excluded.changes, error = excluded.error,"
            " observed_at = excluded.observed_at",
            (clean.shadow_version, clean.event_id, clean.active_version, clean.event_type,
             clean.outcome, dumps(list(clean.changes)), clean.error, self._db.now()))

    async def counts(self, shadow_version: str) -> records.ShadowCounts:
        checks.shadow_version(shadow_version)

        def run(connection: sqlite3.Connection) -> records.ShadowCounts:
            by_outcome: dict[str, int] = dict.fromkeys(records.SHADOW_OUTCOMES, 0)
            by_outcome.update((str(outcome), int(n)) for outcome, n in connection.execute(
                "SELECT outcome, COUNT(*) FROM shadow_results WHERE shadow_version = ?"
                " GROUP BY outcome", (shadow_version,)).fetchall())
            active = tuple(row[0] for row in connection.execute(
                "SELECT DISTINCT active_version FROM shadow_results WHERE shadow_version = ?"
                " ORDER BY active_version", (shadow_version,)).fetchall())
            first, last = connection.execute(
                "SELECT MIN(observed_at), MAX(observed_at) FROM shadow_results"
                " WHERE shadow_version = ?", (shadow_version,)).fetchone()
            return records.ShadowCounts(by_outcome["same"], by_outcome["changed"],
                                        by_outcome["uncompared"], active,
                                        parse_optional_ts(first), parse_optional_ts(last))

        return await self._db.read(run, "count the shadow results")

    async def differences(
        self, shadow_version: str, *, after_event_id: int | None = None, limit: int = 1000,
    ) -> list[records.ShadowResult]:
        checks.shadow_version(shadow_version)
        checks.page_limit(limit)
        return await self._db.rows(
            "read the shadow results",
            f"SELECT {_COLUMNS} FROM shadow_results WHERE shadow_version = ?"
            " AND outcome IN ('changed', 'uncompared') AND event_id > ?"
            " ORDER BY event_id LIMIT ?",
            (shadow_version, -1 if after_event_id is None else after_event_id, limit), _result)

    async def purge(self, observed_before: datetime) -> int:
        return await self._db.execute(
            "purge shadow results", "DELETE FROM shadow_results WHERE observed_at < ?",
            (ts(observed_before),))
