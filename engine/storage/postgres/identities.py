"""The identity map and deal keys on PostgreSQL."""

from __future__ import annotations

from collections.abc import Sequence

from engine.actions import IdentityKey
from engine.storage import checks, records
from engine.storage.postgres.database import PostgresPart
from engine.storage.postgres.rows import NOW, Conn
from engine.storage.protocols import IdentityMap


class PostgresIdentityMap(PostgresPart, IdentityMap):
    """The unique constraints decide every race: an insert that conflicts waits for the other
    transaction and then does nothing, and a second statement reads the winner."""

    async def lookup_identity(self, target: str, keys: records.Keys) -> str | None:
        checks.identity_keys(keys)
        async with self._db.connection("look up the identity") as connection:
            return await _lookup(connection, target, keys)

    async def bind_identity(self, target: str, key: IdentityKey, record_id: str) -> str:
        checks.identity_binding(key, record_id)
        params = {"target": target, "field": key.field, "value": key.value,
                  "record": record_id, "now": self._db.now()}
        async with self._db.connection("bind the identity") as connection:
            for _ in range(3):
                cursor = await connection.execute(
                    "INSERT INTO identity_map (target, field, value, record_id, created_at)"
                    f" VALUES (%(target)s, %(field)s, %(value)s, %(record)s, {NOW})"
                    " ON CONFLICT (target, field, value) DO NOTHING RETURNING record_id",
                    params,
                )
                row = await cursor.fetchone()
                winner = str(row[0]) if row else await _lookup(connection, target, [key])
                if winner is not None:  # else unbound between the two statements: again
                    return winner
        raise RuntimeError("the identity kept changing while being bound")

    async def bind_identities(self, target: str, bindings: Sequence[tuple[IdentityKey, str]]
                              ) -> list[str]:
        checks.identity_bindings(bindings)
        if not bindings:
            return []
        fields = [key.field for key, _ in bindings]
        values = [key.value for key, _ in bindings]
        params = {"target": target, "fields": fields, "values": values,
                  "records": [record_id for _, record_id in bindings], "now": self._db.now()}
        async with self._db.connection("bind the identities") as connection:
            # One insert for all (a key twice in the list: the first row is kept), then one
            # read of what each key names now.
            await connection.execute(
                "INSERT INTO identity_map (target, field, value, record_id, created_at)"
                f" SELECT %(target)s, k.field, k.value, k.record, {NOW} FROM unnest("
                "%(fields)s::text[], %(values)s::text[], %(records)s::text[])"
                " WITH ORDINALITY AS k (field, value, record, n) ORDER BY k.n"
                " ON CONFLICT (target, field, value) DO NOTHING", params)
            cursor = await connection.execute(
                "SELECT m.field, m.value, m.record_id FROM identity_map AS m"
                " JOIN unnest(%(fields)s::text[], %(values)s::text[]) AS k (field, value)"
                " ON m.field = k.field AND m.value = k.value WHERE m.target = %(target)s",
                params)
            named = {(str(f), str(v)): str(r) for f, v, r in await cursor.fetchall()}
        # A key unbound between the two statements binds again on its own.
        return [named.get((key.field, key.value)) or await self.bind_identity(target, key, rid)
                for key, rid in bindings]

    async def rebind_identity(self, target: str, key: IdentityKey, record_id: str) -> None:
        # One upsert: the row is locked from the conflict to the commit, so a concurrent bind
        # of the same key waits and then reads this record.
        checks.identity_binding(key, record_id)
        await self._db.execute(
            "rebind the identity",
            "INSERT INTO identity_map AS m (target, field, value, record_id, created_at)"
            f" VALUES (%(target)s, %(field)s, %(value)s, %(record)s, {NOW})"
            " ON CONFLICT (target, field, value) DO UPDATE SET"
            " record_id = excluded.record_id, created_at = excluded.created_at"
            " WHERE m.record_id <> excluded.record_id",
            {"target": target, "field": key.field, "value": key.value, "record": record_id,
             "now": self._db.now()},
        )

    async def unbind_identity(self, target: str, key: IdentityKey,
                              record_id: str | None = None) -> None:
        checks.identity_binding(key, record_id)
        params = {"target": target, "field": key.field, "value": key.value, "record": record_id}
        await self._db.execute(
            "unbind the identity",
            "DELETE FROM identity_map WHERE target = %(target)s AND field = %(field)s"
            " AND value = %(value)s AND (%(record)s::text IS NULL OR record_id = %(record)s)",
            params)

    async def lookup_deal(self, target: str, deal_key: str) -> str | None:
        checks.deal_key(deal_key)
        async with self._db.connection("look up the deal") as connection:
            return await _lookup_deal(connection, target, deal_key)

    async def bind_deal(self, target: str, deal_key: str, deal_id: str) -> str:
        return (await self.bind_deals(target, [(deal_key, deal_id)]))[0]

    async def bind_deals(self, target: str, bindings: Sequence[tuple[str, str]]) -> list[str]:
        checks.deal_bindings(bindings)
        if not bindings:
            return []
        params = {"target": target, "keys": [key for key, _ in bindings],
                  "deals": [deal for _, deal in bindings], "now": self._db.now()}
        doing = "bind the deals" if len(bindings) > 1 else "bind the deal"
        async with self._db.connection(doing) as connection:
            await connection.execute(
                "INSERT INTO deal_keys (target, deal_key, deal_id, created_at)"
                f" SELECT %(target)s, k.deal_key, k.deal_id, {NOW} FROM unnest("
                "%(keys)s::text[], %(deals)s::text[]) WITH ORDINALITY AS k (deal_key, deal_id, n)"
                " ORDER BY k.n ON CONFLICT (target, deal_key) DO NOTHING", params)
            cursor = await connection.execute(
                "SELECT deal_key, deal_id FROM deal_keys"
                " WHERE target = %(target)s AND deal_key = ANY(%(keys)s::text[])", params)
            named = {str(key): str(deal) for key, deal in await cursor.fetchall()}
        return [named[key] for key, _ in bindings]  # deal keys are never deleted


async def _lookup(connection: Conn, target: str, keys: records.Keys) -> str | None:
    """One query for every key; the first key in priority order that is mapped wins."""
    cursor = await connection.execute(
        "SELECT m.record_id FROM identity_map AS m"
        " JOIN unnest(%s::text[], %s::text[]) WITH ORDINALITY AS k (field, value, priority)"
        " ON m.field = k.field AND m.value = k.value"
        " WHERE m.target = %s ORDER BY k.priority LIMIT 1",
        ([key.field for key in keys], [key.value for key in keys], target),
    )
    row = await cursor.fetchone()
    return None if row is None else str(row[0])


async def _lookup_deal(connection: Conn, target: str, deal_key: str) -> str | None:
    cursor = await connection.execute(
        "SELECT deal_id FROM deal_keys WHERE target = %s AND deal_key = %s", (target, deal_key))
    row = await cursor.fetchone()
    return None if row is None else str(row[0])
