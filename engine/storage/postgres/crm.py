"""The embedded CRM (`local` target) on PostgreSQL: contacts, identities, stage history, deals.

Workers on several machines may upsert the same person at once: with the advisory locks,
"find the contact or create it" happens once per person, never twice in parallel.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import datetime

from engine.actions import IdentityKey
from engine.storage import checks, records
from engine.storage.postgres.database import PostgresPart
from engine.storage.postgres.rows import NOW, Conn, as_json, json_object
from engine.storage.postgres.schema import IDENTITY_LOCK
from engine.storage.protocols import LocalCRMStore


class PostgresLocalCRM(PostgresPart, LocalCRMStore):
    """Each write is one transaction that first takes an advisory lock per identity key, so
    two machines upserting one person at once make one contact. Each caller holds a pooled
    connection: a few at once (more would wait for the pool, whose default is 10)."""

    concurrency = 4

    async def upsert_contact(
        self, identity: records.Keys, set: records.Fields, set_once: records.Fields
    ) -> records.ContactResult:
        checks.upsert(identity, set, set_once)
        now = self._db.now()
        async with self._db.connection("upsert the contact") as connection, \
                connection.transaction():
            result = await _ensure_contact(connection, identity, now)
            cursor = await connection.execute(
                "SELECT fields FROM local_contacts WHERE id = %s FOR UPDATE", (result.contact_id,))
            row = await cursor.fetchone()
            assert row is not None
            fields = json_object(row[0])
            merged = records.merge_contact_fields(fields, set, set_once)
            if merged != fields:
                await connection.execute(
                    f"UPDATE local_contacts SET fields = %(fields)s, updated_at = {NOW}"
                    " WHERE id = %(id)s",
                    {"fields": as_json(merged), "id": result.contact_id, "now": now},
                )
        return result

    async def set_stage(
        self, identity: records.Keys, stage: str, stages: Sequence[str], event_id: int | None = None
    ) -> records.StageResult:
        checks.stage(identity, stage, stages)
        now = self._db.now()
        async with self._db.connection("set the stage") as connection, connection.transaction():
            contact_id = (await _ensure_contact(connection, identity, now)).contact_id
            cursor = await connection.execute(
                "SELECT stage FROM local_contacts WHERE id = %s FOR UPDATE", (contact_id,))
            row = await cursor.fetchone()
            assert row is not None
            current: str | None = row[0]
            if not records.advances(current, stage, stages):
                return records.StageResult(contact_id, current, current, changed=False)
            params = {"stage": stage, "id": contact_id, "from": current, "event": event_id,
                      "now": now}
            await connection.execute(
                f"UPDATE local_contacts SET stage = %(stage)s, updated_at = {NOW}"
                " WHERE id = %(id)s",
                params,
            )
            await connection.execute(
                "INSERT INTO local_stage_history (contact_id, from_stage, to_stage, changed_at,"
                f" event_id) VALUES (%(id)s, %(from)s, %(stage)s, {NOW}, %(event)s)",
                params,
            )
        return records.StageResult(contact_id, from_stage=current, to_stage=stage, changed=True)

    async def create_deal(self, identity: records.Keys, key: str, title: str,
                          stage: str | None, amount: float | None, fields: records.Fields
                          ) -> records.DealResult:
        checks.deal(identity, key, title, stage, amount, fields)
        now = self._db.now()
        async with self._db.connection("create the deal") as connection:
            existing = await _existing_deal(connection, key)
            if existing is not None:
                return existing
            async with connection.transaction():
                contact_id = ((await _ensure_contact(connection, identity, now)).contact_id
                              if identity else None)
                cursor = await connection.execute(
                    "INSERT INTO local_deals"
                    " (deal_key, title, stage, amount, contact_id, fields, created_at,"
                    " updated_at) VALUES (%(key)s, %(title)s, %(stage)s, %(amount)s,"
                    f" %(contact)s, %(fields)s, {NOW}, {NOW})"
                    " ON CONFLICT ON CONSTRAINT local_deals_key DO NOTHING RETURNING id",
                    {"key": key, "title": title, "stage": stage, "amount": amount,
                     "contact": contact_id, "fields": as_json(records.kept_fields(fields)),
                     "now": now},
                )
                row = await cursor.fetchone()
            if row is not None:
                return records.DealResult(deal_id=int(row[0]), contact_id=contact_id, created=True)
            # Another worker made the deal while this one waited on the key: one deal per
            # key, ever.
            raced = await _existing_deal(connection, key)
        assert raced is not None  # deals are never deleted
        return raced

    async def contacts(self, limit: int | None = None) -> list[records.LocalContact]:
        async with self._db.connection("list contacts") as connection:
            cursor = await connection.execute(
                "SELECT id, fields, stage, created_at, updated_at FROM local_contacts"
                " ORDER BY id LIMIT %s",
                (limit,),
            )
            rows = await cursor.fetchall()
            ids = [row[0] for row in rows]
            identities: dict[int, list[IdentityKey]] = {contact_id: [] for contact_id in ids}
            cursor = await connection.execute(
                "SELECT contact_id, field, value FROM local_contact_identities"
                " WHERE contact_id = ANY(%s) ORDER BY attached",
                (ids,),
            )
            for contact_id, field, value in await cursor.fetchall():
                identities[contact_id].append(IdentityKey(field, value))
            history: dict[int, list[records.StageChange]] = {contact_id: [] for contact_id in ids}
            cursor = await connection.execute(
                "SELECT contact_id, changed_at, from_stage, to_stage, event_id"
                " FROM local_stage_history WHERE contact_id = ANY(%s) ORDER BY id",
                (ids,),
            )
            for contact_id, *change in await cursor.fetchall():
                history[contact_id].append(records.StageChange(*change))
        return [
            records.LocalContact(contact_id, tuple(identities[contact_id]), json_object(fields),
                                 stage, created_at, updated_at, tuple(history[contact_id]))
            for contact_id, fields, stage, created_at, updated_at in rows
        ]

    async def deals(self, limit: int | None = None) -> list[records.LocalDeal]:
        rows = await self._db.rows(
            "list deals",
            "SELECT id, deal_key, title, stage, amount, contact_id, fields, created_at,"
            " updated_at FROM local_deals ORDER BY id LIMIT %s",
            (limit,),
        )
        return [records.from_row(records.LocalDeal, row, fields=json_object) for row in rows]


def _lock_id(key: IdentityKey) -> int:
    """A signed 32-bit number for the key; a collision only makes two people wait for each
    other, never merges them."""
    digest = hashlib.sha256(f"{key.field}\0{key.value}".encode()).digest()
    return int.from_bytes(digest[:4], "big", signed=True)


async def _ensure_contact(
    connection: Conn, identity: records.Keys, now: datetime | None
) -> records.ContactResult:
    """Lock the person's keys, find the contact of the first key (priority order) that is
    known or create it, then attach every key not yet owned by another contact. The caller
    holds a transaction, which keeps the locks until it ends."""
    # In ascending order, so two transactions locking overlapping keys cannot deadlock.
    for lock in sorted({_lock_id(key) for key in identity}):
        await connection.execute("SELECT pg_advisory_xact_lock(%s, %s)", (IDENTITY_LOCK, lock))
    fields, values = [key.field for key in identity], [key.value for key in identity]
    cursor = await connection.execute(
        "SELECT i.contact_id FROM local_contact_identities AS i"
        " JOIN unnest(%s::text[], %s::text[]) WITH ORDINALITY AS k (field, value, priority)"
        " ON i.field = k.field AND i.value = k.value ORDER BY k.priority LIMIT 1",
        (fields, values),
    )
    row = await cursor.fetchone()
    created = row is None
    if row is None:
        cursor = await connection.execute(
            "INSERT INTO local_contacts (fields, stage, created_at, updated_at)"
            f" VALUES ('{{}}', NULL, {NOW}, {NOW}) RETURNING id",
            {"now": now},
        )
        row = await cursor.fetchone()
        assert row is not None
    contact_id = int(row[0])
    # A key already owned by another contact stays there: linkcrm never merges contacts itself.
    await connection.execute(
        "INSERT INTO local_contact_identities (field, value, contact_id)"
        " SELECT k.field, k.value, %s"
        " FROM unnest(%s::text[], %s::text[]) WITH ORDINALITY AS k (field, value, priority)"
        " ORDER BY k.priority ON CONFLICT (field, value) DO NOTHING",
        (contact_id, fields, values),
    )
    return records.ContactResult(contact_id=contact_id, created=created)


async def _existing_deal(connection: Conn, key: str) -> records.DealResult | None:
    cursor = await connection.execute(
        "SELECT id, contact_id FROM local_deals WHERE deal_key = %s", (key,))
    row = await cursor.fetchone()
    return None if row is None else records.DealResult(row[0], row[1], created=False)
