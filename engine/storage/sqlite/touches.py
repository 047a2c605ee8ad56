"""Touches on SQLite: an attribution is one writer job (the writer serialises every write), so
reading the candidates, claiming one install and keeping the result are atomic together."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from datetime import datetime

from engine.storage import touchrecords
from engine.storage.protocols import Touches
from engine.storage.records import field_names, from_row
from engine.storage.sqlite.database import SQLitePart
from engine.storage.sqlite.rows import dumps, loads_object, parse_ts, ts
from engine.storage.touchrecords import INSTALL, Attribution, AttributionRequest, Touch

_COLUMNS = ", ".join(field_names(Touch))
_SELECT = f"SELECT {_COLUMNS} FROM touches"
# The window: the token's touches from the retention cutoff (NULL: no cutoff) to the identify.
_IN_WINDOW = "occurred_at <= :before AND (:since IS NULL OR occurred_at >= :since)"
_WINDOW = f"token = :token AND {_IN_WINDOW}"


# The token's touches in the window, those older than the retention, and the window's installs
# and how many of them are claimed: one pass over the token's touches.
_COUNTS = (
    f"SELECT COUNT(*) FILTER (WHERE {_IN_WINDOW}),"
    " COUNT(*) FILTER (WHERE :since IS NOT NULL AND occurred_at < :since),"
    f" COUNT(*) FILTER (WHERE {_IN_WINDOW} AND event_type = :install),"
    f" COUNT(*) FILTER (WHERE {_IN_WINDOW} AND event_type = :install AND claimed_by IS NOT NULL)"
    " FROM touches WHERE token = :token")
_FIRST_AND_LAST = (
    f"SELECT * FROM (SELECT 0, {_COLUMNS} FROM touches WHERE {_WINDOW}"
    " ORDER BY occurred_at, id LIMIT 1)"
    f" UNION ALL SELECT * FROM (SELECT 1, {_COLUMNS} FROM touches WHERE {_WINDOW}"
    " ORDER BY occurred_at DESC, id DESC LIMIT 1)")
_INSTALL = (
    f"{_SELECT} WHERE {_WINDOW} AND event_type = :install AND claimed_by IS NULL"
    " ORDER BY CASE WHEN :platform IS NOT NULL"
    " AND lower(platform) = lower(:platform) THEN 0 ELSE 1 END,"
    " abs(julianday(occurred_at) - julianday(:anchor)), id LIMIT 1")
_LATEST = (f"{_SELECT} WHERE token = :token AND occurred_at <= :before"
           " ORDER BY occurred_at DESC, id DESC LIMIT 1")


def _touch(row: Sequence[object]) -> Touch:
    return from_row(Touch, row, per_person=bool, occurred_at=parse_ts)


def _attribution(row: sqlite3.Row) -> Attribution:
    return Attribution(int(row[0]), str(row[1]), loads_object(row[2]), parse_ts(row[3]))


def _get(connection: sqlite3.Connection, event_id: int) -> Attribution | None:
    row = connection.execute("SELECT event_id, token, detail, created_at FROM touch_attributions"
                             " WHERE event_id = ?", (event_id,)).fetchone()
    return None if row is None else _attribution(row)


def _one(connection: sqlite3.Connection, query: str, params: dict[str, object]) -> Touch | None:
    row = connection.execute(query, params).fetchone()
    return None if row is None else _touch(row)


def _first_and_last(connection: sqlite3.Connection, params: dict[str, object], count: int
                    ) -> tuple[Touch, Touch]:
    """The window's first and last touch, in one statement (one row when it holds one)."""
    if count == 1:
        only = _one(connection, f"{_SELECT} WHERE {_WINDOW} LIMIT 1", params)
        assert only is not None
        return only, only
    rows = connection.execute(_FIRST_AND_LAST, params).fetchall()
    touches = {int(row[0]): _touch(tuple(row)[1:]) for row in rows}
    return touches[0], touches[1]


def _record_many(connection: sqlite3.Connection, touches: Sequence[touchrecords.NewTouch],
                 now: str) -> list[bool]:
    """Each touch, unless its event's is kept already: whether it was new."""
    return [connection.execute(
        "INSERT INTO touches (event_id, event_type, token, campaign, prefix, platform,"
        " referrer, per_person, occurred_at, recorded_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (event_id) DO NOTHING",
        (touch.event_id, touch.event_type, touch.token, touch.campaign, touch.prefix,
         touch.platform, touch.referrer, int(touch.per_person), ts(touch.occurred_at), now),
    ).rowcount == 1 for touch in touches]


class SQLiteTouches(SQLitePart, Touches):
    async def record(self, touch: touchrecords.NewTouch) -> bool:
        [recorded] = await self.record_many([touch])
        return recorded

    async def record_many(self, touches: Sequence[touchrecords.NewTouch]) -> list[bool]:
        now = self._db.now()
        return await self._db.write(lambda c: _record_many(c, touches, now),
                                    "record the touch" if len(touches) == 1
                                    else "record the touches")

    async def attribute(self, request: AttributionRequest) -> Attribution:
        now = self._db.now()
        params: dict[str, object] = {
            "token": request.token, "before": ts(request.before),
            "since": None if request.since is None else ts(request.since),
            "anchor": ts(request.anchor), "platform": request.platform, "install": INSTALL,
            "event": request.event_id}

        def run(connection: sqlite3.Connection) -> Attribution:
            known = _get(connection, request.event_id)
            if known is not None:
                return known
            count, expired, installs, taken = connection.execute(_COUNTS, params).fetchone()
            first = last = install = None
            if count:
                first, last = _first_and_last(connection, params, count)
            if installs > taken:  # an unclaimed install in the window
                install = _one(connection, _INSTALL, params)
            if install is not None:
                connection.execute("UPDATE touches SET claimed_by = ? WHERE id = ?",
                                   (request.event_id, install.id))
            # The latest touch before the identify is the window's last when it has one, and
            # can only be an expired one when it has none.
            latest = last if last is not None else \
                _one(connection, _LATEST, params) if expired else None
            detail = touchrecords.attribution_detail(request, first, last, install, latest,
                                                     count, expired, taken)
            connection.execute("INSERT INTO touch_attributions (event_id, token, detail,"
                               " created_at) VALUES (?, ?, ?, ?)",
                               (request.event_id, request.token, dumps(detail), now))
            return Attribution(request.event_id, request.token, detail, parse_ts(now))

        return await self._db.write(run, "attribute the touches")

    async def attribution(self, event_id: int) -> Attribution | None:
        return await self._db.read(lambda c: _get(c, event_id), "read the attribution")

    async def forget(self, older_than: datetime) -> int:
        return await self._db.execute("forget old touches",
                                      "DELETE FROM touches WHERE occurred_at < ?",
                                      (ts(older_than),))
