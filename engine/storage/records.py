"""The plain records that go in and out of a Storage, shared by every backend."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any, Literal, TypeVar

from engine.actions import JSON, IdentityKey
from engine.errors import UnstorableEventError

R = TypeVar("R")

# What the embedded CRM's calls take: identity keys in priority order, and field values.
Keys = Sequence[IdentityKey]
Fields = Mapping[str, JSON]

EventStatus = Literal["received", "processed", "ignored", "failed", "dead"]
EVENT_STATUSES: tuple[EventStatus, ...] = ("received", "processed", "ignored", "failed", "dead")
# Waiting for a worker: new (`received`) or due again after a retryable failure (`failed`).
PENDING_STATUSES: tuple[EventStatus, ...] = ("received", "failed")
FinalStatus = Literal["processed", "ignored", "dead"]

OutcomeStatus = Literal["ok", "retrying", "dead"]
OUTCOME_STATUSES: tuple[OutcomeStatus, ...] = ("ok", "retrying", "dead")

# A published rule set: the one that plans live events (`active`, exactly one once any is
# published), a candidate evaluated beside it (`shadow`), or one no longer used (`retired`).
RuleVersionStatus = Literal["active", "shadow", "retired"]
RULE_VERSION_STATUSES: tuple[RuleVersionStatus, ...] = ("active", "shadow", "retired")


@dataclass(frozen=True, slots=True)
class NewEvent:
    """One delivery as the receiver accepted it, before it has an id.

    `dedupe_key` is computed by the receiver (sha256 hex of the signed raw body for webhooks);
    the storage's unique constraint on it decides what is a duplicate. `dedupe_prefix` leads
    the key in that constraint's index, so that keys arriving together are stored together
    rather than on random pages (engine/storage/sqlite/dedupe_ddl.py): it must be fixed by the
    same bytes as the key, so that two deliveries with one key always have one prefix. The
    receiver gives a webhook the first DEDUPE_PREFIX_CHARACTERS characters of its signed
    timestamp, and an identify call none (its timestamp is the call's, not the body's).
    """

    body: bytes
    event_type: str
    event_timestamp: str
    dedupe_key: str
    received_at: datetime
    source: str = "tolinku"
    headers: Mapping[str, str] = field(default_factory=dict)
    dedupe_prefix: str = ""


# How much of a webhook's signed timestamp leads its dedupe key (`NewEvent.dedupe_prefix`):
# enough to order deliveries by the second, few enough to keep index entries short whatever
# the sender wrote there. The migrations that added the prefix applied the same rule to the
# events already stored, so it can never change.
DEDUPE_PREFIX_CHARACTERS = 32


def lone_surrogate(text: str) -> str | None:
    """Where `text` holds a lone UTF-16 surrogate (JSON's "\\ud800" decodes to one), which
    no UTF-8 text column can take, e.g. "U+D800 at character 2"; None when it holds none."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        return f"U+{ord(text[error.start]):04X} at character {error.start + 1}"
    return None


def describe(error: BaseException) -> str:
    """`TypeName: message`, short, for logs and errors: never the repr, which may hold data
    (a UnicodeEncodeError's repr holds the whole string)."""
    return f"{type(error).__name__}: {error}"[:200]


def unstorable(event: NewEvent) -> UnstorableEventError | None:
    """Why `event` can never be stored, or None. Both backends check every event of a batch
    with this first, so one bad event is refused alone and its neighbours are stored."""
    # Nearly every event is ASCII, which holds no surrogate: one check of all its text at once.
    if "".join([event.event_type, event.event_timestamp, event.source, event.dedupe_key,
                event.dedupe_prefix, *event.headers, *event.headers.values()]).isascii():
        return None
    texts = [("event", event.event_type), ("timestamp", event.event_timestamp),
             ("source", event.source), ("dedupe key", event.dedupe_key),
             ("dedupe prefix", event.dedupe_prefix)]
    for name, value in event.headers.items():
        texts += [("header name", name), ("header value", value)]
    for name, text in texts:
        where = lone_surrogate(text)
        if where is not None:
            return UnstorableEventError(
                f"the event's {name} holds a lone surrogate ({where}), which is not valid "
                "Unicode and cannot be stored; send text as UTF-8 (no unpaired \\ud800-\\udfff "
                "escapes)"
            )
    return None


@dataclass(frozen=True, slots=True)
class StoreResult:
    """`id` of the stored event, or of the earlier one when `duplicate` (a retried delivery:
    the receiver acknowledges it like the first, and nothing new is stored)."""

    id: int
    duplicate: bool


@dataclass(frozen=True, slots=True)
class InboxEvent:
    """An inbox row. `id` grows with arrival order, so it doubles as the arrival sequence.

    `body` is None once `purge_raw_bodies` dropped it; the dedupe key and status stay.
    """

    id: int
    dedupe_key: str
    source: str
    event_type: str
    event_timestamp: str
    received_at: datetime
    headers: Mapping[str, str]
    body: bytes | None
    status: EventStatus
    attempts: int
    lease_owner: str | None
    lease_expires_at: datetime | None
    next_attempt_at: datetime | None
    last_error: str | None
    updated_at: datetime
    # The published rule version `replay --rules-version` pinned the event to (None: the
    # active one plans it).
    rules_version: str | None = None

    @property
    def sequence(self) -> int:
        return self.id


@dataclass(frozen=True, slots=True)
class NewOutcome:
    """What happened when one action ran against one target (recorded after every attempt)."""

    event_id: int
    rule: str
    action_kind: str
    target: str
    idempotency_key: str
    status: OutcomeStatus
    request_summary: JSON = None
    response: JSON = None
    error: str | None = None
    next_attempt_at: datetime | None = None
    # The rule version that planned the action (`linkcrm rules list`), when it is known.
    rules_version: str | None = None


@dataclass(frozen=True, slots=True)
class Finish:
    """One event's `Inbox.finish`, for `Inbox.finish_many`."""

    event_id: int
    status: FinalStatus
    error: str | None = None
    ordering_keys: Sequence[str] | None = None
    outcomes: Sequence[NewOutcome] = ()


@dataclass(frozen=True, slots=True)
class ActionOutcome:
    """The latest outcome of one action on one target, which it is known by (`target`,
    `idempotency_key`); `attempts` counts every recording."""

    id: int
    target: str
    idempotency_key: str
    event_id: int
    rule: str
    action_kind: str
    status: OutcomeStatus
    attempts: int
    request_summary: JSON
    response: JSON
    error: str | None
    next_attempt_at: datetime | None
    created_at: datetime
    updated_at: datetime
    rules_version: str | None = None  # of the latest attempt


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A dead event (`action_kind` None) or a dead action outcome, with the error to read."""

    event_id: int
    event_type: str
    rule: str | None
    action_kind: str | None
    target: str | None
    error: str | None
    attempts: int
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class NewRuleVersion:
    """A rule set to publish: its version (the content hash of `files`, computed by the
    caller), where it came from (`label`: a git commit or the publisher's text), who publishes
    it, and its files by relative name."""

    version: str
    files: Mapping[str, str]
    published_by: str
    label: str | None = None


@dataclass(frozen=True, slots=True)
class RuleVersion:
    """A published rule set as stored."""

    version: str
    label: str | None
    files: Mapping[str, str]
    published_by: str
    published_at: datetime
    status: RuleVersionStatus
    activated_at: datetime | None


@dataclass(frozen=True, slots=True)
class PublishResult:
    """The version as stored after `publish`, and whether this call stored it (False: that
    content was published before, and is kept as it was apart from its status)."""

    version: RuleVersion
    created: bool


ShadowOutcome = Literal["same", "changed", "uncompared"]
SHADOW_OUTCOMES: tuple[ShadowOutcome, ...] = ("same", "changed", "uncompared")


@dataclass(frozen=True, slots=True)
class NewShadowResult:
    """How one live event planned under a shadow rule version next to the active one:
    `same`, `changed` with its `changes` (JSON objects, `engine.rules.diff.FoundChange`), or
    `uncompared` with the `error` that stopped the comparison. `active_version` is None when
    the active rules were never published (a rules folder loaded at start)."""

    event_id: int
    shadow_version: str
    active_version: str | None
    event_type: str
    outcome: ShadowOutcome
    changes: Sequence[JSON] = ()
    error: str | None = None


@dataclass(frozen=True, slots=True)
class ShadowResult:
    """A recorded shadow result (the latest observation of that event for that version)."""

    event_id: int
    shadow_version: str
    active_version: str | None
    event_type: str
    outcome: ShadowOutcome
    changes: list[JSON]
    error: str | None
    observed_at: datetime


@dataclass(frozen=True, slots=True)
class ShadowCounts:
    """What a shadow version's results add up to: events by outcome, the active versions
    they were compared with (None: unpublished rules), and when the first and last were
    observed (None: nothing observed yet)."""

    same: int
    changed: int
    uncompared: int
    active_versions: tuple[str | None, ...]
    first_at: datetime | None
    last_at: datetime | None

    @property
    def events(self) -> int:
        return self.same + self.changed + self.uncompared


@dataclass(frozen=True, slots=True)
class InboxStats:
    """Inbox depth by status (every status present, zero when empty) and the oldest pending."""

    by_status: Mapping[str, int]
    oldest_pending_received_at: datetime | None


@dataclass(frozen=True, slots=True)
class EventFilter:
    """Which events `Inbox.browse` returns; every condition given must hold.

    The received-time bounds follow arrival order (ids): `received_from` starts at the first
    event received at or after it, `received_until` stops before the first event received at
    or after it. `touched` holds identity digests (`engine.actions.identity_digest`, the
    worker's ordering keys): only events whose planned actions touched one of them.
    """

    status: EventStatus | None = None
    event_type: str | None = None
    received_from: datetime | None = None
    received_until: datetime | None = None
    touched: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class ActivityCount:
    """How many events (by `status`) or action outcomes (by `target` and `status`) fall in
    the minute starting at `minute` (UTC)."""

    minute: datetime
    target: str | None
    status: str
    count: int


@dataclass(frozen=True, slots=True)
class StageChange:
    at: datetime
    from_stage: str | None
    to_stage: str
    event_id: int | None


@dataclass(frozen=True, slots=True)
class LocalContact:
    """A contact of the embedded CRM with its identities, fields and stage history."""

    id: int
    identities: tuple[IdentityKey, ...]
    fields: Mapping[str, JSON]
    stage: str | None
    created_at: datetime
    updated_at: datetime
    stage_history: tuple[StageChange, ...] = ()


@dataclass(frozen=True, slots=True)
class LocalDeal:
    id: int
    key: str
    title: str
    stage: str | None
    amount: float | None
    contact_id: int | None
    fields: Mapping[str, JSON]
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class ContactResult:
    """The contact an operation touched; `created` when this call made it."""

    contact_id: int
    created: bool


@dataclass(frozen=True, slots=True)
class StageResult:
    """Where a stage change left the contact: `changed` only when it moved forward, from
    `from_stage` to `to_stage` (else both name the stage it keeps)."""

    contact_id: int
    from_stage: str | None
    to_stage: str | None
    changed: bool


@dataclass(frozen=True, slots=True)
class DealResult:
    """`created` is False when a deal with that key already existed (it is returned unchanged)."""

    deal_id: int
    contact_id: int | None
    created: bool


@dataclass(frozen=True, slots=True)
class UpsertContactOp:
    """`LocalCRMStore.upsert_contact`'s arguments, for `LocalCRMStore.apply_all`."""

    identity: Keys
    set: Fields
    set_once: Fields


@dataclass(frozen=True, slots=True)
class SetStageOp:
    """`LocalCRMStore.set_stage`'s arguments, for `LocalCRMStore.apply_all`."""

    identity: Keys
    stage: str
    stages: Sequence[str]
    event_id: int | None = None


@dataclass(frozen=True, slots=True)
class CreateDealOp:
    """`LocalCRMStore.create_deal`'s arguments, for `LocalCRMStore.apply_all`."""

    identity: Keys
    key: str
    title: str
    stage: str | None
    amount: float | None
    fields: Fields


LocalOp = UpsertContactOp | SetStageOp | CreateDealOp
LocalResult = ContactResult | StageResult | DealResult


def is_blank(value: JSON) -> bool:
    """Null and "" leave a field untouched: the local CRM never clears a value by accident."""
    return value is None or value == ""


def merge_contact_fields(
    current: Mapping[str, JSON], set_fields: Mapping[str, JSON], set_once: Mapping[str, JSON]
) -> dict[str, JSON]:
    """The contact's fields after an upsert: `set` overwrites, `set_once` fills only empty
    fields, blank values are skipped. Shared by every backend so they cannot drift apart."""
    merged = dict(current)
    for name, value in set_fields.items():
        if not is_blank(value):
            merged[name] = value
    for name, value in set_once.items():
        if not is_blank(value) and is_blank(merged.get(name)):
            merged[name] = value
    return merged


def advances(current: str | None, stage: str, stages: Sequence[str]) -> bool:
    """Whether moving to `stage` goes forward along `stages` from `current`. Stages only move
    forward; a current stage no longer in the list (renamed in the field map) counts as the
    start."""
    rank = stages.index(current) if current in stages else -1
    return stages.index(stage) > rank


def kept_fields(fields: Mapping[str, JSON]) -> dict[str, JSON]:
    """`fields` without its blank values."""
    return {name: value for name, value in fields.items() if not is_blank(value)}


# -- rows to records ---------------------------------------------------------------------------


_FIELD_NAMES: dict[type[Any], tuple[str, ...]] = {}


def field_names(record: type[Any]) -> tuple[str, ...]:
    """A record's fields in order: the column list a backend selects to build it (worked out
    once per record type: `from_row` asks for each row)."""
    names = _FIELD_NAMES.get(record)
    if names is None:
        names = _FIELD_NAMES[record] = tuple(item.name for item in fields(record))
    return names


def from_row(record: type[R], row: Sequence[Any], **convert: Callable[[Any], Any]) -> R:
    """The record whose fields are `row`'s columns in field order, each passed through its
    `convert` function if it has one (a backend's time or JSON decoding)."""
    return record(*[convert[name](value) if name in convert else value
                    for name, value in zip(field_names(record), row, strict=True)])
