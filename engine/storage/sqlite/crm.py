"""The embedded CRM (`local` target) on SQLite: contacts, identities, stage history, deals.

Each function runs inside the caller's transaction, so one call is atomic.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping, Sequence

from engine.actions import JSON, IdentityKey
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
from engine.storage.sqlite.rows import (
    dumps,
    loads_object,
    parse_ts,
    placeholders,
)


def find_contact(connection: sqlite3.Connection, identity: Sequence[IdentityKey]) -> int | None:
    """The contact of the first key, in priority order, that is known."""
    for key in identity:
        row = connection.execute(
            "SELECT contact_id FROM local_contact_identities WHERE field = ? AND value = ?",
            (key.field, key.value),
        ).fetchone()
        if row is not None:
            return int(row[0])
    return None


def ensure_contact(
    connection: sqlite3.Connection, identity: Sequence[IdentityKey], now: str
) -> ContactResult:
    """Find or create the contact, then attach every key not yet owned by another contact."""
    contact_id = find_contact(connection, identity)
    created = contact_id is None
    if contact_id is None:
        row = connection.execute(
            "INSERT INTO local_contacts (fields, stage, created_at, updated_at) "
            "VALUES ('{}', NULL, ?, ?) RETURNING id",
            (now, now),
        ).fetchone()
        contact_id = int(row[0])
    # A key already owned by another contact stays there: linkcrm never merges contacts itself.
    connection.executemany(
        "INSERT INTO local_contact_identities (field, value, contact_id) VALUES (?, ?, ?) "
        "ON CONFLICT (field, value) DO NOTHING",
        [(key.field, key.value, contact_id) for key in identity],
    )
    return ContactResult(contact_id=contact_id, created=created)


def upsert_contact(
    connection: sqlite3.Connection,
    identity: Sequence[IdentityKey],
    set_fields: Mapping[str, JSON],
    set_once: Mapping[str, JSON],
    now: str,
) -> ContactResult:
    result = ensure_contact(connection, identity, now)
    row = connection.execute(
        "SELECT fields FROM local_contacts WHERE id = ?", (result.contact_id,)
    ).fetchone()
    fields = loads_object(row[0])
    merged = merge_contact_fields(fields, set_fields, set_once)
    if merged != fields:
        connection.execute(
            "UPDATE local_contacts SET fields = ?, updated_at = ? WHERE id = ?",
            (dumps(merged), now, result.contact_id),
        )
    return result


def set_stage(
    connection: sqlite3.Connection,
    identity: Sequence[IdentityKey],
    stage: str,
    stages: Sequence[str],
    event_id: int | None,
    now: str,
) -> StageResult:
    if stage not in stages:
        raise ValueError(f"unknown stage {stage!r}; the stages are {', '.join(stages)}")
    contact_id = ensure_contact(connection, identity, now).contact_id
    row = connection.execute(
        "SELECT stage FROM local_contacts WHERE id = ?", (contact_id,)
    ).fetchone()
    current: str | None = row[0]
    # A current stage no longer in the list (renamed in the field map) counts as the start.
    rank = stages.index(current) if current in stages else -1
    if stages.index(stage) <= rank:
        return StageResult(contact_id, from_stage=current, to_stage=current, changed=False)
    connection.execute(
        "UPDATE local_contacts SET stage = ?, updated_at = ? WHERE id = ?",
        (stage, now, contact_id),
    )
    connection.execute(
        "INSERT INTO local_stage_history (contact_id, from_stage, to_stage, changed_at, event_id) "
        "VALUES (?, ?, ?, ?, ?)",
        (contact_id, current, stage, now, event_id),
    )
    return StageResult(contact_id, from_stage=current, to_stage=stage, changed=True)


def create_deal(
    connection: sqlite3.Connection,
    identity: Sequence[IdentityKey],
    key: str,
    title: str,
    stage: str | None,
    amount: float | None,
    fields: Mapping[str, JSON],
    now: str,
) -> DealResult:
    existing = connection.execute(
        "SELECT id, contact_id FROM local_deals WHERE deal_key = ?", (key,)
    ).fetchone()
    if existing is not None:
        return DealResult(deal_id=existing[0], contact_id=existing[1], created=False)
    contact_id = ensure_contact(connection, identity, now).contact_id if identity else None
    kept = kept_fields(fields)
    row = connection.execute(
        "INSERT INTO local_deals "
        "(deal_key, title, stage, amount, contact_id, fields, created_at, updated_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
        (key, title, stage, amount, contact_id, dumps(kept), now, now),
    ).fetchone()
    return DealResult(deal_id=int(row[0]), contact_id=contact_id, created=True)


def list_contacts(connection: sqlite3.Connection, limit: int | None) -> list[LocalContact]:
    rows = connection.execute(
        "SELECT id, fields, stage, created_at, updated_at FROM local_contacts "
        "ORDER BY id LIMIT ?",
        (-1 if limit is None else limit,),
    ).fetchall()
    if not rows:
        return []
    ids = [row["id"] for row in rows]
    identities: dict[int, list[IdentityKey]] = {contact_id: [] for contact_id in ids}
    for row in connection.execute(
        "SELECT contact_id, field, value FROM local_contact_identities "
        f"WHERE contact_id IN ({placeholders(len(ids))}) ORDER BY rowid",
        ids,
    ):
        identities[row["contact_id"]].append(IdentityKey(row["field"], row["value"]))
    history: dict[int, list[StageChange]] = {contact_id: [] for contact_id in ids}
    for row in connection.execute(
        "SELECT contact_id, from_stage, to_stage, changed_at, event_id FROM local_stage_history "
        f"WHERE contact_id IN ({placeholders(len(ids))}) ORDER BY id",
        ids,
    ):
        history[row["contact_id"]].append(
            StageChange(
                at=parse_ts(row["changed_at"]),
                from_stage=row["from_stage"],
                to_stage=row["to_stage"],
                event_id=row["event_id"],
            )
        )
    return [
        LocalContact(
            id=row["id"],
            identities=tuple(identities[row["id"]]),
            fields=loads_object(row["fields"]),
            stage=row["stage"],
            created_at=parse_ts(row["created_at"]),
            updated_at=parse_ts(row["updated_at"]),
            stage_history=tuple(history[row["id"]]),
        )
        for row in rows
    ]


def list_deals(connection: sqlite3.Connection, limit: int | None) -> list[LocalDeal]:
    rows = connection.execute(
        "SELECT id, deal_key, title, stage, amount, contact_id, fields, created_at, updated_at "
        "FROM local_deals ORDER BY id LIMIT ?",
        (-1 if limit is None else limit,),
    ).fetchall()
    return [
        LocalDeal(
            id=row["id"],
            key=row["deal_key"],
            title=row["title"],
            stage=row["stage"],
            amount=row["amount"],
            contact_id=row["contact_id"],
            fields=loads_object(row["fields"]),
            created_at=parse_ts(row["created_at"]),
            updated_at=parse_ts(row["updated_at"]),
        )
        for row in rows
    ]
