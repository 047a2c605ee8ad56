"""The one interface every CRM target implements, shaped like httpx's BaseTransport.

A target receives planned actions (`engine.actions`) with their `CallContext` (the idempotency
key, the inbox event, the rule) and either returns an `Outcome` or raises one of the two errors
the worker understands:

    RetryableCRMError  timeouts, 5xx, 429, Salesforce 403 REQUEST_LIMIT_EXCEEDED, expired
                       tokens: the worker backs off (honouring `retry_after`) and tries again
    PermanentCRMError  a missing property, a validation error: the action is dead-lettered with
                       the CRM's own message until someone fixes the cause and replays it

Vendor exceptions, status codes and field names never cross this boundary: each adapter maps
httpx errors and CRM responses to these two, and canonical field names to its CRM's own through
the field map. Adapters take an injected `httpx.AsyncClient` and never build their own transport.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, TypeGuard, runtime_checkable

from engine.actions import Action
from engine.errors import PermanentCRMError
from engine.storage import IdentityMap, RateLimits


@dataclass(frozen=True)
class CallContext:
    """What a target is told beside the action: `idempotency_key`, the same on every attempt
    of this action (what a retry after a lost response finds its first attempt by); the inbox
    event the action was planned for (`event_id`, None outside the worker) and the `rule`
    that planned it, for a target that records where a change came from (the local CRM's
    stage history)."""

    idempotency_key: str
    event_id: int | None = None
    rule: str = ""


@dataclass(frozen=True)
class Outcome:
    """What a target did. `record_id` is the CRM's id of the contact or deal; `summary` is a
    short account for operators, never carrying field values (they may be personal data)."""

    record_id: str | None
    summary: str
    created: bool = False


# The stores a target may be given, as the storage declares them (the identity map and deal
# keys; the shared token buckets): a target never sees the storage behind them.
IdentityStore = IdentityMap
RateLimitStore = RateLimits


class CredentialsRefused(PermanentCRMError):
    """The CRM refused linkcrm's credentials (a wrong token, secret or key, a missing scope):
    nothing works until a person fixes them. The message names the variables to check."""


class Target(Protocol):
    """A CRM target: `local`, `hubspot`, `salesforce` or `pipedrive`."""

    name: str

    async def execute(self, action: Action, context: CallContext) -> Outcome:
        """Apply one planned action. Must be idempotent for the same idempotency key: a retry
        after a lost response finds what the first attempt made instead of making it again."""
        ...

    async def aclose(self) -> None:
        """Release what the target holds (not the injected client, which the caller owns)."""
        ...


@runtime_checkable
class StartableTarget(Target, Protocol):
    """A target with start-up work (Pipedrive resolves field labels to keys, Salesforce gets
    a token): run once before the first action. CredentialsRefused means the credentials are
    wrong, another PermanentCRMError that the CRM is not set up for the field map, and a
    RetryableCRMError that the CRM cannot be reached right now."""

    async def start(self) -> object: ...


@runtime_checkable
class BatchTarget(Target, Protocol):
    """A target that applies several queued actions in fewer requests (HubSpot batch upsert,
    Salesforce sObject Collections). One result per item, in order: its Outcome or the
    RetryableCRMError/PermanentCRMError that item alone would have raised, never another's.
    Items are applied in order, so a later action on an identity never overtakes an earlier
    one that failed."""

    async def execute_many(self, items: Sequence[tuple[Action, CallContext]]
                           ) -> list[Outcome | Exception]: ...


@runtime_checkable
class AllAtOnceTarget(Target, Protocol):
    """A target that applies one event's actions in one write (the embedded CRM: one job of
    SQLite's group commit). One result per item, in order: its Outcome or the
    PermanentCRMError its own data raised (the later items still run); any other failure
    raises for the whole call, and then none of it is kept or each item is idempotent.

    A target whose `claims_at_once` attribute is true takes the actions of many events in one
    call as well (the worker's claim at once: `claims_at_once`)."""

    async def execute_all(self, items: Sequence[tuple[Action, CallContext]]
                          ) -> list[Outcome | Exception]: ...


def claims_at_once(target: Target) -> TypeGuard[AllAtOnceTarget]:
    """Whether `target` writes many events' actions in one `execute_all` call."""
    return all_at_once(target) and getattr(target, "claims_at_once", False) is True


# How many events a worker applies to one target at once when `--concurrency` is not given:
# a remote CRM's rate limit is shared, so a few in flight keep it busy; a target may say how
# many it takes (`concurrency` attribute), as the embedded CRM does, whose writes share one
# commit the more of them arrive together.
DEFAULT_CONCURRENCY = 4


def concurrency_of(target: Target) -> int:
    """The events `target` takes at once unless the operator says otherwise."""
    wanted = getattr(target, "concurrency", DEFAULT_CONCURRENCY)
    return wanted if isinstance(wanted, int) and wanted > 0 else DEFAULT_CONCURRENCY


def startable(target: Target) -> TypeGuard[StartableTarget]:
    return isinstance(target, StartableTarget)


def batches(target: Target) -> TypeGuard[BatchTarget]:
    return isinstance(target, BatchTarget)


def all_at_once(target: Target) -> TypeGuard[AllAtOnceTarget]:
    return isinstance(target, AllAtOnceTarget)
