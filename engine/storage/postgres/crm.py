"""The embedded CRM (`local` target) on PostgreSQL: contacts, identities, stage history, deals.

Each public function runs in one transaction. Workers on several machines may upsert the same
person at once, so a transaction first takes an advisory lock per identity key: "find the
contact or create it" then happens once per person, never twice in parallel.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from datetime import datetime

from engine.actions import JSON, IdentityKey
from engine.storage.postgres.rows import NOW, Conn, as_json, json_object
from engine.storage.postgres.schema import IDENTITY_LOCK
from engine.storage.records import (
    ContactResult,
    DealResult,
    LocalContact,
    LocalDeal,
    StageChange,
    StageResult,
    kept_fields,
    merge_contact_fields,
)


def _lock_id(key: IdentityKey) -> int:
    """A signed 32-bit number for the key; a collision only makes two people wait for each
    other, never merges them."""
    digest = hashlib.sha256(f"{key.field}\0{key.value}".encode()).digest()
    return int.from_bytes(digest[:4], "big", signed=True)


async def _lock_identities(connection: Conn, identity: Sequence[IdentityKey]) -> None:
    # In ascending order, so two transactions locking overlapping keys cannot deadlock.
    for lock in sorted({_lock_id(key) for key in identity}):
        await connection.execute("SELECT pg_advisory_xact_lock(%s, %s)", (IDENTITY_LOCK, lock))


async def find_contact(connection: Conn, identity: Sequence[IdentityKey]) -> int | None:
    """The contact of the first key, in priority order, that is known."""
    if not identity:
        return None
    cursor = await connection.execute(
        "SELECT i.contact_id FROM local_contact_identities AS i"
        " JOIN unnest(%s::text[], %s::text[]) WITH ORDINALITY AS k (field, value, priority)"
        " ON i.field = k.field AND i.value = k.value ORDER BY k.priority LIMIT 1",
        ([key.field for key in identity], [key.value for key in identity]),
    )
    row = await cursor.fetchone()
    return None if row is None else int(row[0])


async def _ensure_contact(
    connection: Conn, identity: Sequence[IdentityKey], now: datetime | None
) -> ContactResult:
    """Find or create the contact, then attach every key not yet owned by another contact.
    The caller holds the identity locks."""
    contact_id = await find_contact(connection, identity)
    created = contact_id is None
    if contact_id is None:
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
        (contact_id, [key.field for key in identity], [key.value for key in identity]),
    )
    return ContactResult(contact_id=contact_id, created=created)


async def upsert_contact(
    connection: Conn,
    identity: Sequence[IdentityKey],
    set_fields: Mapping[str, JSON],
    set_once: Mapping[str, JSON],
    now: datetime | None,
) -> ContactResult:
    async with connection.transaction():
        await _lock_identities(connection, identity)
        result = await _ensure_contact(connection, identity, now)
        cursor = await connection.execute(
            "SELECT fields FROM local_contacts WHERE id = %s FOR UPDATE", (result.contact_id,))
        row = await cursor.fetchone()
        assert row is not None
        fields = json_object(row[0])
        merged = merge_contact_fields(fields, set_fields, set_once)
        if merged != fields:
            await connection.execute(
                f"UPDATE local_contacts SET fields = %(fields)s, updated_at = {NOW}"
                " WHERE id = %(id)s",
                {"fields": as_json(merged), "id": result.contact_id, "now": now},
            )
        return result


async def set_stage(
    connection: Conn,
    identity: Sequence[IdentityKey],
    stage: str,
    stages: Sequence[str],
    event_id: int | None,
    now: datetime | None,
) -> StageResult:
    if stage not in stages:
        raise ValueError(f"unknown stage {stage!r}; the stages are {', '.join(stages)}")
    async with connection.transaction():
        await _lock_identities(connection, identity)
        contact_id = (await _ensure_contact(connection, identity, now)).contact_id
        cursor = await connection.execute(
            "SELECT stage FROM local_contacts WHERE id = %s FOR UPDATE", (contact_id,))
        row = await cursor.fetchone()
        assert row is not None
        current: str | None = row[0]
        # A current stage no longer in the list (renamed in the field map) counts as the start.
        rank = stages.index(current) if current in stages else -1
        if stages.index(stage) <= rank:
            return StageResult(contact_id, from_stage=current, to_stage=current, changed=False)
        params = {"stage": stage, "id": contact_id, "from": current, "event": event_id,
                  "now": now}
        await connection.execute(
            f"UPDATE local_contacts SET stage = %(stage)s, updated_at = {NOW} WHERE id = %(id)s",
            params,
        )
        await connection.execute(
            "INSERT INTO local_stage_history (contact_id, from_stage, to_stage, changed_at,"
            f" event_id) VALUES (%(id)s, %(from)s, %(stage)s, {NOW}, %(event)s)",
            params,
        )
        return StageResult(contact_id, from_stage=current, to_stage=stage, changed=True)


async def _existing_deal(connection: Conn, key: str) -> DealResult | None:
    cursor = await connection.execute(
        "SELECT id, contact_id FROM local_deals WHERE deal_key = %s", (key,))
    row = await cursor.fetchone()
    return None if row is None else DealResult(deal_id=row[0], contact_id=row[1], created=False)


async def create_deal(
    connection: Conn,
    identity: Sequence[IdentityKey],
    key: str,
    title: str,
    stage: str | None,
    amount: float | None,
    fields: Mapping[str, JSON],
    now: datetime | None,
) -> DealResult:
    existing = await _existing_deal(connection, key)
    if existing is not None:
        return existing
    async with connection.transaction():
        contact_id: int | None = None
        if identity:
            await _lock_identities(connection, identity)
            contact_id = (await _ensure_contact(connection, identity, now)).contact_id
        kept = kept_fields(fields)
        cursor = await connection.execute(
            "INSERT INTO local_deals"
            " (deal_key, title, stage, amount, contact_id, fields, created_at, updated_at)"
            " VALUES (%(key)s, %(title)s, %(stage)s, %(amount)s, %(contact)s, %(fields)s,"
            f" {NOW}, {NOW}) ON CONFLICT ON CONSTRAINT local_deals_key DO NOTHING RETURNING id",
            {"key": key, "title": title, "stage": stage, "amount": amount,
             "contact": contact_id, "fields": as_json(kept), "now": now},
        )
        row = await cursor.fetchone()
    if row is not None:
        return DealResult(deal_id=int(row[0]), contact_id=contact_id, created=True)
    # Another worker made the deal while this one waited on the key: one deal per key, ever.
    raced = await _existing_deal(connection, key)
    assert raced is not None  # deals are never deleted
    return raced


async def list_contacts(connection: Conn, limit: int | None) -> list[LocalContact]:
    cursor = await connection.execute(
        "SELECT id, fields, stage, created_at, updated_at FROM local_contacts"
        " ORDER BY id LIMIT %s",
        (limit,),
    )
    rows = await cursor.fetchall()
    if not rows:
        return []
    ids = [row[0] for row in rows]
    identities: dict[int, list[IdentityKey]] = {contact_id: [] for contact_id in ids}
    cursor = await connection.execute(
        "SELECT contact_id, field, value FROM local_contact_identities"
        " WHERE contact_id = ANY(%s) ORDER BY attached",
        (ids,),
    )
    for contact_id, field, value in await cursor.fetchall():
        identities[contact_id].append(IdentityKey(field, value))
    history: dict[int, list[StageChange]] = {contact_id: [] for contact_id in ids}
    cursor = await connection.execute(
        "SELECT contact_id, from_stage, to_stage, changed_at, event_id FROM local_stage_history"
        " WHERE contact_id = ANY(%s) ORDER BY id",
        (ids,),
    )
    for contact_id, from_stage, to_stage, changed_at, event_id in await cursor.fetchall():
        history[contact_id].append(StageChange(
            at=changed_at, from_stage=from_stage, to_stage=to_stage, event_id=event_id))
    return [
        LocalContact(
            id=contact_id,
            identities=tuple(identities[contact_id]),
            fields=json_object(fields),
            stage=stage,
            created_at=created_at,
            updated_at=updated_at,
            stage_history=tuple(history[contact_id]),
        )
        for contact_id, fields, stage, created_at, updated_at in rows
    ]


async def list_deals(connection: Conn, limit: int | None) -> list[LocalDeal]:
    cursor = await connection.execute(
        "SELECT id, deal_key, title, stage, amount, contact_id, fields, created_at, updated_at"
        " FROM local_deals ORDER BY id LIMIT %s",
        (limit,),
    )
    return [
        LocalDeal(
            id=deal_id, key=key, title=title, stage=stage, amount=amount,
            contact_id=contact_id, fields=json_object(fields), created_at=created_at,
            updated_at=updated_at,
        )
        for (deal_id, key, title, stage, amount, contact_id, fields, created_at, updated_at)
        in await cursor.fetchall()
    ]
