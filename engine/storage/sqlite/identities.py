"""The identity map and deal keys on SQLite: one writer job per call."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from engine.actions import IdentityKey
from engine.storage import checks, records
from engine.storage.protocols import IdentityMap
from engine.storage.sqlite.database import SQLitePart

_LOOKUP = "SELECT record_id FROM identity_map WHERE target = ? AND field = ? AND value = ?"
_BIND = (
    "INSERT INTO identity_map (target, field, value, record_id, created_at) VALUES (?, ?, ?, ?, ?)"
    " ON CONFLICT (target, field, value) DO NOTHING"
)
_LOOKUP_DEAL = "SELECT deal_id FROM deal_keys WHERE target = ? AND deal_key = ?"
_BIND_DEAL = (
    "INSERT INTO deal_keys (target, deal_key, deal_id, created_at) VALUES (?, ?, ?, ?)"
    " ON CONFLICT (target, deal_key) DO NOTHING"
)


class SQLiteIdentityMap(SQLitePart, IdentityMap):
    """Writes run in the writer one job at a time, so the first bind of a key wins and every
    later one reads it back. A lookup probes one key at a time, in priority order, and stops at
    the first that is mapped."""

    async def lookup_identity(self, target: str, keys: records.Keys) -> str | None:
        checks.identity_keys(keys)

        def run(connection: sqlite3.Connection) -> str | None:
            for key in keys:
                row = connection.execute(_LOOKUP, (target, key.field, key.value)).fetchone()
                if row is not None:
                    return str(row[0])
            return None

        return await self._db.read(run, "look up the identity")

    async def bind_identity(self, target: str, key: IdentityKey, record_id: str) -> str:
        return (await self.bind_identities(target, [(key, record_id)]))[0]

    async def bind_identities(self, target: str, bindings: Sequence[tuple[IdentityKey, str]]
                              ) -> list[str]:
        checks.identity_bindings(bindings)
        return await self._winners(_BIND, _LOOKUP, [
            ((target, key.field, key.value), record_id) for key, record_id in bindings],
            "bind the identities" if len(bindings) > 1 else "bind the identity")

    async def rebind_identity(self, target: str, key: IdentityKey, record_id: str) -> None:
        checks.identity_binding(key, record_id)
        await self._db.execute(
            "rebind the identity",
            "INSERT INTO identity_map (target, field, value, record_id, created_at)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT (target, field, value) DO UPDATE SET"
            " record_id = excluded.record_id, created_at = excluded.created_at"
            " WHERE identity_map.record_id <> excluded.record_id",
            (target, key.field, key.value, record_id, self._db.now()),
        )

    async def unbind_identity(self, target: str, key: IdentityKey,
                              record_id: str | None = None) -> None:
        checks.identity_binding(key, record_id)
        await self._db.execute(
            "unbind the identity",
            "DELETE FROM identity_map WHERE target = ? AND field = ? AND value = ?"
            " AND (? IS NULL OR record_id = ?)",
            (target, key.field, key.value, record_id, record_id),
        )

    async def lookup_deal(self, target: str, deal_key: str) -> str | None:
        checks.deal_key(deal_key)
        return await self._db.row("look up the deal", _LOOKUP_DEAL, (target, deal_key),
                                  lambda row: str(row[0]))

    async def bind_deal(self, target: str, deal_key: str, deal_id: str) -> str:
        return (await self.bind_deals(target, [(deal_key, deal_id)]))[0]

    async def bind_deals(self, target: str, bindings: Sequence[tuple[str, str]]) -> list[str]:
        checks.deal_bindings(bindings)
        return await self._winners(_BIND_DEAL, _LOOKUP_DEAL, [
            ((target, deal_key), deal_id) for deal_key, deal_id in bindings],
            "bind the deals" if len(bindings) > 1 else "bind the deal")

    async def _winners(self, insert: str, lookup: str,
                       bindings: Sequence[tuple[tuple[str, ...], str]], doing: str) -> list[str]:
        """`_winner` for each (key columns, value), in order, in one writer job."""
        if not bindings:
            return []
        now = self._db.now()
        return await self._db.write(
            lambda c: [_winner(c, insert, lookup, where, value, now) for where, value in bindings],
            doing)


def _winner(connection: sqlite3.Connection, insert: str, lookup: str, where: tuple[str, ...],
            value: str, now: str) -> str:
    """Bind the key `where` to `value` unless it is mapped already; what it maps to now. One
    writer job: nothing writes in between, so that is the first bind's value."""
    if connection.execute(insert, (*where, value, now)).rowcount == 1:
        return value  # this bind is the first
    return str(connection.execute(lookup, where).fetchone()[0])
