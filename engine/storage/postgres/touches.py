"""Touches on PostgreSQL: an attribution is one transaction under an advisory lock on the
identify event (a second worker holding the same event waits, then finds the stored result),
and the install is picked `FOR UPDATE SKIP LOCKED`, so two workers attributing two people of the
same link at once claim two different installs."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from engine.storage import touchrecords
from engine.storage.postgres.database import PostgresPart
from engine.storage.postgres.rows import NOW, Conn, Row, as_json
from engine.storage.postgres.schema import TOUCHES_LOCK
from engine.storage.protocols import Touches
from engine.storage.records import field_names, from_row
from engine.storage.touchrecords import INSTALL, Attribution, AttributionRequest, Touch

_COLUMNS = ", ".join(field_names(Touch))
_SELECT = f"SELECT {_COLUMNS} FROM touches"
_IN_WINDOW = ("occurred_at <= %(before)s"
              " AND (%(since)s::timestamptz IS NULL OR occurred_at >= %(since)s::timestamptz)")
_WINDOW = f"token = %(token)s AND {_IN_WINDOW}"


# The token's touches in the window, those older than the retention, and the window's installs
# and how many of them are claimed: one pass over the token's touches.
_COUNTS = (
    f"SELECT COUNT(*) FILTER (WHERE {_IN_WINDOW}),"
    " COUNT(*) FILTER (WHERE %(since)s::timestamptz IS NOT NULL"
    " AND occurred_at < %(since)s::timestamptz),"
    f" COUNT(*) FILTER (WHERE {_IN_WINDOW} AND event_type = %(install)s),"
    f" COUNT(*) FILTER (WHERE {_IN_WINDOW} AND event_type = %(install)s"
    " AND claimed_by IS NOT NULL)"
    " FROM touches WHERE token = %(token)s")
_FIRST_AND_LAST = (
    f"(SELECT 0, {_COLUMNS} FROM touches WHERE {_WINDOW} ORDER BY occurred_at, id LIMIT 1)"
    f" UNION ALL (SELECT 1, {_COLUMNS} FROM touches WHERE {_WINDOW}"
    " ORDER BY occurred_at DESC, id DESC LIMIT 1)")
_INSTALL = (
    f"{_SELECT} WHERE {_WINDOW} AND event_type = %(install)s AND claimed_by IS NULL"
    " ORDER BY CASE WHEN %(platform)s::text IS NOT NULL"
    " AND lower(platform) = lower(%(platform)s::text) THEN 0 ELSE 1 END,"
    " abs(extract(epoch FROM occurred_at - %(anchor)s::timestamptz)), id"
    " LIMIT 1 FOR UPDATE SKIP LOCKED")
_LATEST = (f"{_SELECT} WHERE token = %(token)s AND occurred_at <= %(before)s"
           " ORDER BY occurred_at DESC, id DESC LIMIT 1")


def _attribution(row: Row) -> Attribution:
    detail = row[2] if isinstance(row[2], dict) else {}
    return Attribution(int(row[0]), str(row[1]), detail, row[3])


async def _get(connection: Conn, event_id: int) -> Attribution | None:
    row = await (await connection.execute(
        "SELECT event_id, token, detail, created_at FROM touch_attributions"
        " WHERE event_id = %s", (event_id,))).fetchone()
    return None if row is None else _attribution(row)


async def _one(connection: Conn, query: str, params: dict[str, Any]) -> Touch | None:
    row = await (await connection.execute(query, params)).fetchone()
    return None if row is None else from_row(Touch, row)


async def _first_and_last(connection: Conn, params: dict[str, Any], count: int
                          ) -> tuple[Touch, Touch]:
    """The window's first and last touch, in one statement (one row when it holds one)."""
    if count == 1:
        only = await _one(connection, f"{_SELECT} WHERE {_WINDOW} LIMIT 1", params)
        assert only is not None
        return only, only
    rows = await (await connection.execute(_FIRST_AND_LAST, params)).fetchall()
    touches = {int(row[0]): from_row(Touch, row[1:]) for row in rows}
    return touches[0], touches[1]


class PostgresTouches(PostgresPart, Touches):
    async def record(self, touch: touchrecords.NewTouch) -> bool:
        return await self._db.execute("record the touch", _RECORD, _record_params(
            touch, self._db.now())) == 1

    async def record_many(self, touches: Sequence[touchrecords.NewTouch]) -> list[bool]:
        if not touches:
            return []
        now = self._db.now()
        async with self._db.connection("record the touches") as connection, \
                connection.transaction():
            return [(await connection.execute(_RECORD, _record_params(touch, now))).rowcount == 1
                    for touch in touches]

    async def attribute(self, request: AttributionRequest) -> Attribution:
        params: dict[str, Any] = {
            "token": request.token, "before": request.before, "since": request.since,
            "anchor": request.anchor, "platform": request.platform, "install": INSTALL,
            "event": request.event_id, "now": self._db.now()}
        async with self._db.connection("attribute the touches") as connection, \
                connection.transaction():
            await connection.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))",
                                     (TOUCHES_LOCK, str(request.event_id)))
            known = await _get(connection, request.event_id)
            if known is not None:
                return known
            counts = await (await connection.execute(_COUNTS, params)).fetchone()
            count, expired, installs, taken = (int(n) for n in counts) if counts else (0,) * 4
            first = last = install = None
            if count:
                first, last = await _first_and_last(connection, params, count)
            if installs > taken:  # an unclaimed install in the window
                install = await _one(connection, _INSTALL, params)
            if install is not None:
                await connection.execute("UPDATE touches SET claimed_by = %s WHERE id = %s",
                                         (request.event_id, install.id))
            # The latest touch before the identify is the window's last when it has one, and
            # can only be an expired one when it has none.
            latest = last if last is not None else \
                await _one(connection, _LATEST, params) if expired else None
            detail = touchrecords.attribution_detail(request, first, last, install, latest,
                                                     count, expired, taken)
            row = await (await connection.execute(
                "INSERT INTO touch_attributions (event_id, token, detail, created_at)"
                f" VALUES (%(event)s, %(token)s, %(detail)s, {NOW}) RETURNING created_at",
                {**params, "detail": as_json(detail)})).fetchone()
        assert row is not None
        return Attribution(request.event_id, request.token, detail, row[0])

    async def attribution(self, event_id: int) -> Attribution | None:
        async with self._db.connection("read the attribution") as connection:
            return await _get(connection, event_id)

    async def forget(self, older_than: datetime) -> int:
        return await self._db.execute("forget old touches",
                                      "DELETE FROM touches WHERE occurred_at < %s",
                                      (older_than,))


_RECORD = (
    "INSERT INTO touches (event_id, event_type, token, campaign, prefix, platform,"
    " referrer, per_person, occurred_at, recorded_at) VALUES (%(event_id)s,"
    " %(event_type)s, %(token)s, %(campaign)s, %(prefix)s, %(platform)s, %(referrer)s,"
    f" %(per_person)s, %(occurred_at)s, {NOW}) ON CONFLICT (event_id) DO NOTHING"
)


def _record_params(touch: touchrecords.NewTouch, now: datetime | None) -> dict[str, object]:
    return {"event_id": touch.event_id, "event_type": touch.event_type, "token": touch.token,
            "campaign": touch.campaign, "prefix": touch.prefix, "platform": touch.platform,
            "referrer": touch.referrer, "per_person": touch.per_person,
            "occurred_at": touch.occurred_at, "now": now}
