"""Published rule sets on SQLite: every change is one writer job, so it is atomic and
serialised with every other write."""

from __future__ import annotations

import asyncio
import sqlite3

from engine.storage import checks, records
from engine.storage.protocols import RuleVersions
from engine.storage.records import field_names, from_row
from engine.storage.sqlite.database import SQLitePart
from engine.storage.sqlite.rows import dumps, loads, parse_optional_ts, parse_ts

_COLUMNS = ", ".join(field_names(records.RuleVersion))
_SELECT = f"SELECT {_COLUMNS} FROM rule_versions"
_CURRENT = ("SELECT version, status FROM rule_versions WHERE status IN ('active', 'shadow')"
            " ORDER BY seq DESC")
# How often `wait_for_change` reads `current()`: two indexed rows, and a new version is seen
# well within the 2 s every running process has to pick it up.
POLL_SECONDS = 0.25


def _files(text: str) -> dict[str, str]:
    return {str(name): str(body) for name, body in loads(text).items()}


def _version(row: sqlite3.Row) -> records.RuleVersion:
    return from_row(records.RuleVersion, row, files=_files, published_at=parse_ts,
                    activated_at=parse_optional_ts)


def _get(connection: sqlite3.Connection, version: str) -> records.RuleVersion | None:
    row = connection.execute(f"{_SELECT} WHERE version = ?", (version,)).fetchone()
    return None if row is None else _version(row)


def _activate(connection: sqlite3.Connection, version: str, now: str) -> None:
    """Retire the active version, then activate `version` (a no-op when it is active)."""
    connection.execute("UPDATE rule_versions SET status = 'retired'"
                       " WHERE status = 'active' AND version <> ?", (version,))
    connection.execute("UPDATE rule_versions SET status = 'active', activated_at = ?"
                       " WHERE version = ? AND status <> 'active'", (now, version))


def _shadow(connection: sqlite3.Connection, version: str) -> None:
    """Make `version` the shadow one, retiring the shadow before; the active one stays as
    it is (publishing it as shadow changes nothing)."""
    stored = connection.execute("SELECT status FROM rule_versions WHERE version = ?",
                                (version,)).fetchone()
    if stored is None or stored[0] != "retired":
        return
    connection.execute("UPDATE rule_versions SET status = 'retired'"
                       " WHERE status = 'shadow' AND version <> ?", (version,))
    connection.execute("UPDATE rule_versions SET status = 'shadow' WHERE version = ?",
                       (version,))


def _current(connection: sqlite3.Connection) -> tuple[str | None, str | None]:
    active: str | None = None
    shadow: str | None = None
    for version, status in connection.execute(_CURRENT).fetchall():
        if status == "active":
            active = str(version)
        elif shadow is None:
            shadow = str(version)
    return active, shadow


class SQLiteRuleVersions(SQLitePart, RuleVersions):
    """Versions in the `rule_versions` table; a partial unique index keeps one active.
    Other processes' changes are seen by polling `current()` (`wait_for_change`)."""

    _seen: tuple[str | None, str | None] | None = None

    async def publish(
        self, new: records.NewRuleVersion, status: records.RuleVersionStatus = "active"
    ) -> records.PublishResult:
        checks.rule_version(new, status)
        now = self._db.now()

        def run(connection: sqlite3.Connection) -> records.PublishResult:
            created = connection.execute(
                "INSERT INTO rule_versions (version, label, files, published_by, published_at,"
                " status) VALUES (?, ?, ?, ?, ?, 'retired') ON CONFLICT (version) DO NOTHING",
                (new.version, new.label, dumps(dict(new.files)), new.published_by, now),
            ).rowcount == 1
            if status == "active":
                _activate(connection, new.version, now)
            else:
                _shadow(connection, new.version)
            stored = _get(connection, new.version)
            assert stored is not None
            return records.PublishResult(stored, created)

        return await self._db.write(run, "publish the rule version")

    async def list_versions(self) -> list[records.RuleVersion]:
        return await self._db.rows("list the rule versions", f"{_SELECT} ORDER BY seq DESC", (),
                                   _version)

    async def get(self, version: str) -> records.RuleVersion | None:
        checks.rule_version_id(version)
        return await self._db.read(lambda c: _get(c, version), "read the rule version")

    async def activate(self, version: str) -> records.RuleVersion | None:
        checks.rule_version_id(version)
        now = self._db.now()

        def run(connection: sqlite3.Connection) -> records.RuleVersion | None:
            if _get(connection, version) is None:
                return None
            _activate(connection, version, now)
            return _get(connection, version)

        return await self._db.write(run, "activate the rule version")

    async def active(self) -> records.RuleVersion | None:
        return await self._db.row("read the active rule version",
                                  f"{_SELECT} WHERE status = 'active'", (), _version)

    async def active_version(self) -> str | None:
        return await self._db.row("read the active rule version",
                                  "SELECT version FROM rule_versions WHERE status = 'active'",
                                  (), lambda row: str(row[0]))

    async def current(self) -> tuple[str | None, str | None]:
        found = await self._db.read(_current, "read the current rule versions")
        self._seen = found
        return found

    async def wait_for_change(self, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(timeout, 0.0)
        before = self._seen
        while True:
            now = await self.current()
            if before is None:
                before = now
            elif now != before:
                return True
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            await asyncio.sleep(min(POLL_SECONDS, remaining))
