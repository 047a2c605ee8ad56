"""Shadow results on PostgreSQL: one upsert per observed event."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from engine.storage import checks, records, values
from engine.storage.postgres.database import PostgresPart
from engine.storage.postgres.rows import NOW, Row, as_json
from engine.storage.protocols import ShadowResults
from engine.storage.records import field_names, from_row

_COLUMNS = ", ".join(field_names(records.ShadowResult))


def _changes(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _result(row: Row) -> records.ShadowResult:
    return from_row(records.ShadowResult, row, changes=_changes)


class PostgresShadowResults(PostgresPart, ShadowResults):
    """Results in the `shadow_results` table, keyed by (shadow version, event)."""

    async def record(self, result: records.NewShadowResult) -> None:
        checks.shadow_result(result)
        clean = values.storable_shadow_result(result)
        await self._db.execute(
            "record the shadow result",
            "INSERT INTO shadow_results (shadow_version, event_id, active_version, event_type,"
            " outcome, changes, error, observed_at) VALUES (%(shadow)s, %(event)s, %(active)s,"
            f" %(type)s, %(outcome)s, %(changes)s, %(error)s, {NOW})"
            " ON CONFLICT (shadow_version, event_id) DO UPDATE SET"
            " active_version = excluded.active_version, event_type = excluded.event_type,"
            " outcome = excluded.outcome, changes = excluded.changes, error = excluded.error,"
            " observed_at = excluded.observed_at",
            {"shadow": clean.shadow_version, "event": clean.event_id,
             "active": values.nul_free(clean.active_version or "") or None,
             "type": values.nul_free(clean.event_type), "outcome": clean.outcome,
             "changes": as_json(list(clean.changes)),
             "error": None if clean.error is None else values.nul_free(clean.error),
             "now": self._db.now()})

    async def counts(self, shadow_version: str) -> records.ShadowCounts:
        checks.shadow_version(shadow_version)
        by_outcome: dict[str, int] = dict.fromkeys(records.SHADOW_OUTCOMES, 0)
        async with self._db.connection("count the shadow results") as connection, \
                connection.transaction():
            cursor = await connection.execute(
                "SELECT outcome, COUNT(*) FROM shadow_results WHERE shadow_version = %s"
                " GROUP BY outcome", (shadow_version,))
            by_outcome.update((str(outcome), int(n)) for outcome, n in await cursor.fetchall())
            cursor = await connection.execute(
                "SELECT DISTINCT active_version FROM shadow_results WHERE shadow_version = %s"
                " ORDER BY active_version", (shadow_version,))
            active = tuple(row[0] for row in await cursor.fetchall())
            cursor = await connection.execute(
                "SELECT MIN(observed_at), MAX(observed_at) FROM shadow_results"
                " WHERE shadow_version = %s", (shadow_version,))
            span = await cursor.fetchone()
        first, last = span if span is not None else (None, None)
        return records.ShadowCounts(by_outcome["same"], by_outcome["changed"],
                                    by_outcome["uncompared"], active, first, last)

    async def differences(
        self, shadow_version: str, *, after_event_id: int | None = None, limit: int = 1000,
    ) -> list[records.ShadowResult]:
        checks.shadow_version(shadow_version)
        checks.page_limit(limit)
        rows = await self._db.rows(
            "read the shadow results",
            f"SELECT {_COLUMNS} FROM shadow_results WHERE shadow_version = %(version)s"
            " AND outcome IN ('changed', 'uncompared') AND event_id > %(after)s"
            " ORDER BY event_id LIMIT %(limit)s",
            {"version": shadow_version, "after": -1 if after_event_id is None else after_event_id,
             "limit": limit})
        return [_result(row) for row in rows]

    async def purge(self, observed_before: datetime) -> int:
        return await self._db.execute(
            "purge shadow results", "DELETE FROM shadow_results WHERE observed_at < %s",
            (observed_before,))
