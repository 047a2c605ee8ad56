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
_WINDOW = "token = :token AND occurred_at <= :before AND (:since IS NULL OR occurred_at >= :since)"


def _touch(row: sqlite3.Row) -> Touch:
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


def _count(connection: sqlite3.Connection, query: str, params: dict[str, object]) -> int:
    return int(connection.execute(query, params).fetchone()[0])


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
            first = _one(connection, f"{_SELECT} WHERE {_WINDOW} ORDER BY occurred_at, id"
                                     " LIMIT 1", params)
            last = _one(connection, f"{_SELECT} WHERE {_WINDOW}"
                                    " ORDER BY occurred_at DESC, id DESC LIMIT 1", params)
            count = _count(connection, f"SELECT COUNT(*) FROM touches WHERE {_WINDOW}", params)
            expired = 0 if request.since is None else _count(
                connection, "SELECT COUNT(*) FROM touches WHERE token = :token"
                            " AND occurred_at < :since", params)
            taken = _count(connection, f"SELECT COUNT(*) FROM touches WHERE {_WINDOW}"
                                       " AND event_type = :install AND claimed_by IS NOT NULL",
                           params)
            install = _one(
                connection,
                f"{_SELECT} WHERE {_WINDOW} AND event_type = :install AND claimed_by IS NULL"
                " ORDER BY CASE WHEN :platform IS NOT NULL"
                " AND lower(platform) = lower(:platform) THEN 0 ELSE 1 END,"
                " abs(julianday(occurred_at) - julianday(:anchor)), id LIMIT 1", params)
            if install is not None:
                connection.execute("UPDATE touches SET claimed_by = ? WHERE id = ?",
                                   (request.event_id, install.id))
            latest = _one(connection, f"{_SELECT} WHERE token = :token"
                                      " AND occurred_at <= :before"
                                      " ORDER BY occurred_at DESC, id DESC LIMIT 1", params)
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
