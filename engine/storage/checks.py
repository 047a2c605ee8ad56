"""The argument checks every storage call makes before it touches a database, written once.

Both backends call these first, so a call that makes no sense (ValueError) or a value no store
can keep (UnstorableValueError, from `values`) fails the same way on SQLite and PostgreSQL,
and before it takes a connection or a place in a group commit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from engine.actions import JSON, IdentityKey
from engine.errors import StorageError
from engine.storage import records, values

FINAL_STATUSES = ("processed", "ignored", "dead")

# A backend's schema: numbered versions, each a list of statements, applied in order.
Migrations = tuple[tuple[int, tuple[str, ...]], ...]


def migrations_to_apply(migrations: Migrations, version: int) -> Migrations:
    """The migrations a database at schema `version` still lacks; StorageError for a database
    newer than this linkcrm, which must not be written with an older schema's SQL."""
    latest = migrations[-1][0]
    if version > latest:
        raise StorageError(
            f"the database schema is version {version}, newer than this linkcrm knows "
            f"({latest}); upgrade linkcrm before using this database"
        )
    return tuple((number, statements) for number, statements in migrations if number > version)


def final_status(status: str) -> None:
    if status not in FINAL_STATUSES:
        raise ValueError(f"finish() takes processed, ignored or dead, not {status!r}")


def token_bucket(cost: float, capacity: float, refill_per_second: float) -> None:
    if not 0 < cost <= capacity or refill_per_second <= 0:
        raise ValueError("need 0 < cost <= capacity and refill_per_second > 0")


MAX_WINDOW_SLOTS = 10_000  # `take_slots` names its rows bucket#0000 to bucket#9999


def window_slots(windows: Sequence[tuple[str, int, float]]) -> None:
    """Rolling windows to take one request from: (bucket, limit, window seconds)."""
    if not windows:
        raise ValueError("need at least one window")
    if len({bucket for bucket, _, _ in windows}) != len(windows):
        raise ValueError("need distinct buckets")
    if any("#" in bucket for bucket, _, _ in windows):
        raise ValueError("a bucket name holds no '#' (its rows are named bucket#0000, ...)")
    for _, limit, window in windows:
        if not 1 <= limit <= MAX_WINDOW_SLOTS or not window > 0:
            raise ValueError(f"need 1 <= limit <= {MAX_WINDOW_SLOTS} and window > 0")


def identity_keys(keys: Sequence[IdentityKey]) -> None:
    """Keys to look up in the identity map."""
    values.require_identity(keys)


def identity_binding(key: IdentityKey, record_id: str | None) -> None:
    """A key and the CRM record it names (None: any record, for an unbind)."""
    values.require_identity([key])
    if record_id is not None:
        values.require_key("record id", record_id)


def identity_bindings(bindings: Sequence[tuple[IdentityKey, str]]) -> None:
    """Keys and the CRM records they name, to bind at once: all checked before any write."""
    for key, record_id in bindings:
        identity_binding(key, record_id)


def deal_bindings(bindings: Sequence[tuple[str, str]]) -> None:
    """Deal keys and the CRM deals they name, to bind at once: all checked before any write."""
    for key, deal_id in bindings:
        deal_key(key, deal_id)


def deal_key(key: str, deal_id: str | None = None) -> None:
    """A deal key, and the CRM deal it names when binding one."""
    values.require_key("deal key", key)
    if deal_id is not None:
        values.require_key("deal id", deal_id)


def contact(identity: Sequence[IdentityKey]) -> None:
    """A contact action needs someone to act on."""
    if not identity:
        raise ValueError("a contact action needs at least one identity key")


def upsert(
    identity: Sequence[IdentityKey], set_fields: Mapping[str, JSON], set_once: Mapping[str, JSON]
) -> None:
    contact(identity)
    values.require_identity(identity)
    values.require_fields("set", set_fields)
    values.require_fields("set_once", set_once)


def stage(identity: Sequence[IdentityKey], stage: str, stages: Sequence[str]) -> None:
    """A stage change: storable keys and name first, then a stage the field map knows."""
    contact(identity)
    values.require_identity(identity)
    values.require_name("stage", stage)
    if stage not in stages:
        raise ValueError(f"unknown stage {stage!r}; the stages are {', '.join(stages)}")


def deal(
    identity: Sequence[IdentityKey], key: str, title: str, stage: str | None,
    amount: float | None, fields: Mapping[str, JSON],
) -> None:
    if not key:
        raise ValueError("a deal needs a non-empty key")
    values.require_identity(identity)
    values.require_key("deal key", key)
    values.require_name("title", title)
    values.require_name("stage", stage)
    values.require_amount(amount)
    values.require_fields("set", fields)


def rule_version_id(version: str) -> None:
    if not version.strip():
        raise ValueError("a rule version is the non-empty content hash of a rule set")
    values.require_key("rule version", version)


def rule_version(new: records.NewRuleVersion, status: str) -> None:
    rule_version_id(new.version)
    if status not in ("active", "shadow"):
        raise ValueError(f"publish() stores a version as active or shadow, not {status!r}")
    if not new.files:
        raise ValueError("a rule version needs its files")
    for name, text in new.files.items():
        values.require_key("rule file name", name)
        values.require_name(f"rule file {name}", text)
    values.require_name("publisher", new.published_by)
    values.require_name("rule version label", new.label)


def shadow_version(version: str) -> None:
    rule_version_id(version)


def shadow_result(result: records.NewShadowResult) -> None:
    rule_version_id(result.shadow_version)
    if isinstance(result.event_id, bool) or not isinstance(result.event_id, int):
        raise ValueError(f"a shadow result names its inbox event by id, not {result.event_id!r}")
    if result.outcome not in records.SHADOW_OUTCOMES:
        raise ValueError(f"a shadow result is same, changed or uncompared, not "
                         f"{result.outcome!r}")


def page_limit(limit: int) -> None:
    if limit < 1:
        raise ValueError(f"a page holds at least one row, not {limit}")
