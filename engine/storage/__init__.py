"""Durable state: one protocol per concern (`protocols`), the records that go in and out
(`records`), the checks every backend makes (`checks`), and `open_storage(url)` to pick a
backend (`sqlite/`, `postgres/`, independent of each other)."""

from __future__ import annotations

import importlib

from engine.errors import StorageError
from engine.storage.protocols import (
    PLANNING_WAIT,
    PROBE_BYTES,
    Clock,
    IdentityMap,
    Inbox,
    LocalCRMStore,
    Outcomes,
    RateLimits,
    RuleVersions,
    ShadowResults,
    Storage,
    Touches,
    utc_now,
)
from engine.storage.records import (
    EVENT_STATUSES,
    OUTCOME_STATUSES,
    PENDING_STATUSES,
    RULE_VERSION_STATUSES,
    SHADOW_OUTCOMES,
    ActionOutcome,
    ActivityCount,
    ContactResult,
    DeadLetter,
    DealResult,
    EventFilter,
    EventStatus,
    FinalStatus,
    Finish,
    InboxEvent,
    InboxStats,
    LocalContact,
    LocalDeal,
    NewEvent,
    NewOutcome,
    NewRuleVersion,
    NewShadowResult,
    OutcomeStatus,
    PublishResult,
    RuleVersion,
    RuleVersionStatus,
    ShadowCounts,
    ShadowOutcome,
    ShadowResult,
    StageChange,
    StageResult,
    StoreResult,
)

__all__ = [
    "EVENT_STATUSES",
    "OUTCOME_STATUSES",
    "PENDING_STATUSES",
    "PLANNING_WAIT",
    "PROBE_BYTES",
    "ActionOutcome",
    "ActivityCount",
    "Clock",
    "ContactResult",
    "DeadLetter",
    "DealResult",
    "EventFilter",
    "EventStatus",
    "FinalStatus",
    "Finish",
    "IdentityMap",
    "Inbox",
    "InboxEvent",
    "InboxStats",
    "LocalCRMStore",
    "LocalContact",
    "LocalDeal",
    "NewEvent",
    "NewOutcome",
    "NewRuleVersion",
    "NewShadowResult",
    "OutcomeStatus",
    "Outcomes",
    "PublishResult",
    "RuleVersion",
    "RULE_VERSION_STATUSES",
    "RateLimits",
    "RuleVersions",
    "RuleVersionStatus",
    "SHADOW_OUTCOMES",
    "ShadowCounts",
    "ShadowOutcome",
    "ShadowResult",
    "ShadowResults",
    "StageChange",
    "StageResult",
    "Storage",
    "StorageError",
    "StoreResult",
    "Touches",
    "open_storage",
    "utc_now",
]


def open_storage(url: str, *, clock: Clock = utc_now, create: bool = True) -> Storage:
    """Open the backend that `url` names (`sqlite:///path` or `postgresql://...`).

    Call `migrate()` before first use. Raises StorageError for an unknown scheme, and for a
    SQLite file that cannot be: in a folder that does not exist, or (with `create=False`, for
    commands that only read or change existing data) missing, rather than a new empty one.
    """
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme == "sqlite":
        from engine.storage.sqlite.store import SQLiteStorage

        return SQLiteStorage.from_url(url, clock=clock, create=create)
    if scheme in ("postgresql", "postgres"):
        try:
            module = importlib.import_module("engine.storage.postgres.store")
        except ImportError as error:
            raise StorageError(
                f"the PostgreSQL backend is not available ({error}); "
                "install linkcrm with psycopg 3 or use LINKCRM_DATABASE_URL=sqlite:///linkcrm.db"
            ) from None
        storage: Storage = module.PostgresStorage.from_url(url, clock=clock)
        return storage
    # Only the scheme is shown: the rest of a URL may hold a password.
    raise StorageError(
        f"unknown database URL scheme {scheme or '(none)'!r} in LINKCRM_DATABASE_URL; "
        "use sqlite:///path/to/linkcrm.db or postgresql://user@host/dbname"
    )
