"""Published rule sets on PostgreSQL: every change is one transaction under an advisory lock,
so two publishers (or a publish and an activate) on two machines take turns and exactly one
version stays active."""

from __future__ import annotations

from engine.storage import checks, records
from engine.storage.postgres.database import PostgresPart
from engine.storage.postgres.notify import channel_name
from engine.storage.postgres.rows import NOW, Conn, Row, as_json
from engine.storage.postgres.schema import RULE_VERSIONS_LOCK
from engine.storage.protocols import RuleVersions
from engine.storage.records import field_names, from_row

_COLUMNS = ", ".join(field_names(records.RuleVersion))
_SELECT = f"SELECT {_COLUMNS} FROM rule_versions"
_CURRENT = ("SELECT version, status FROM rule_versions WHERE status IN ('active', 'shadow')"
            " ORDER BY seq DESC")
# Sent inside the changing transaction, so listeners hear of it exactly when it commits.
_NOTIFY = f"SELECT pg_notify(({channel_name('rules')}), '')"


def _files(value: object) -> dict[str, str]:
    return {str(name): str(body) for name, body in dict(value).items()} if isinstance(
        value, dict) else {}


def _version(row: Row) -> records.RuleVersion:
    return from_row(records.RuleVersion, row, files=_files)


async def _get(connection: Conn, version: str) -> records.RuleVersion | None:
    row = await (await connection.execute(f"{_SELECT} WHERE version = %s", (version,))).fetchone()
    return None if row is None else _version(row)


async def _lock(connection: Conn) -> None:
    await connection.execute(
        "SELECT pg_advisory_xact_lock(%s, hashtext(COALESCE(current_schema(), '')))",
        (RULE_VERSIONS_LOCK,))


async def _activate(connection: Conn, version: str, now: object) -> None:
    """Retire the active version, then activate `version` (a no-op when it is active)."""
    await connection.execute("UPDATE rule_versions SET status = 'retired'"
                             " WHERE status = 'active' AND version <> %(version)s",
                             {"version": version})
    await connection.execute(f"UPDATE rule_versions SET status = 'active', activated_at = {NOW}"
                             " WHERE version = %(version)s AND status <> 'active'",
                             {"version": version, "now": now})


async def _shadow(connection: Conn, version: str) -> None:
    """Make `version` the shadow one, retiring the shadow before; the active one stays as
    it is (publishing it as shadow changes nothing)."""
    stored = await (await connection.execute(
        "SELECT status FROM rule_versions WHERE version = %s", (version,))).fetchone()
    if stored is None or stored[0] != "retired":
        return
    await connection.execute("UPDATE rule_versions SET status = 'retired'"
                             " WHERE status = 'shadow' AND version <> %s", (version,))
    await connection.execute("UPDATE rule_versions SET status = 'shadow' WHERE version = %s",
                             (version,))


class PostgresRuleVersions(PostgresPart, RuleVersions):
    """Versions in the `rule_versions` table; a partial unique index keeps one active."""

    async def publish(
        self, new: records.NewRuleVersion, status: records.RuleVersionStatus = "active"
    ) -> records.PublishResult:
        checks.rule_version(new, status)
        now = self._db.now()
        async with self._db.connection("publish the rule version") as connection, \
                connection.transaction():
            await _lock(connection)
            cursor = await connection.execute(
                "INSERT INTO rule_versions (version, label, files, published_by, published_at,"
                f" status) VALUES (%(version)s, %(label)s, %(files)s, %(by)s, {NOW}, 'retired')"
                " ON CONFLICT (version) DO NOTHING",
                {"version": new.version, "label": new.label, "files": as_json(dict(new.files)),
                 "by": new.published_by, "now": now})
            created = cursor.rowcount == 1
            if status == "active":
                await _activate(connection, new.version, now)
            else:
                await _shadow(connection, new.version)
            stored = await _get(connection, new.version)
            await connection.execute(_NOTIFY)
        assert stored is not None
        return records.PublishResult(stored, created)

    async def list_versions(self) -> list[records.RuleVersion]:
        rows = await self._db.rows("list the rule versions", f"{_SELECT} ORDER BY seq DESC")
        return [_version(row) for row in rows]

    async def get(self, version: str) -> records.RuleVersion | None:
        checks.rule_version_id(version)
        async with self._db.connection("read the rule version") as connection:
            return await _get(connection, version)

    async def activate(self, version: str) -> records.RuleVersion | None:
        checks.rule_version_id(version)
        async with self._db.connection("activate the rule version") as connection, \
                connection.transaction():
            await _lock(connection)
            if await _get(connection, version) is None:
                return None
            await _activate(connection, version, self._db.now())
            await connection.execute(_NOTIFY)
            return await _get(connection, version)

    async def active(self) -> records.RuleVersion | None:
        row = await self._db.row("read the active rule version",
                                 f"{_SELECT} WHERE status = 'active'")
        return None if row is None else _version(row)

    async def active_version(self) -> str | None:
        row = await self._db.row("read the active rule version",
                                 "SELECT version FROM rule_versions WHERE status = 'active'")
        return None if row is None else str(row[0])

    async def current(self) -> tuple[str | None, str | None]:
        rows = await self._db.rows("read the current rule versions", _CURRENT)
        active: str | None = None
        shadow: str | None = None
        for version, status in rows:
            if status == "active":
                active = str(version)
            elif shadow is None:
                shadow = str(version)
        return active, shadow

    async def wait_for_change(self, timeout: float) -> bool:
        return await self._db.rule_changes.wait(timeout)
