"""What a kind of target declares about itself, in one place: `TargetKind`.

Each target package declares its kind (`engine.targets.hubspot.kind.KIND`, ...): the
credentials that enable it, how to build it from the environment, how to check it at start-up,
how to set its CRM up for the field map (`provision`) and check that set-up (`doctor`), and
the field map dialect its API speaks. `engine.targets.registry` collects them.

Set-up checks come back as `Finding`s (a problem and its fix), never as text to be parsed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

import httpx

from engine.actions import IdentityKey
from engine.config.fieldmap import CANONICAL, Dialect, FieldMap
from engine.errors import PermanentCRMError
from engine.storage import IdentityMap, LocalCRMStore, RateLimits
from engine.targets.base import Target, startable

Environ = Mapping[str, str]


@dataclass(frozen=True)
class TargetContext:
    """What a factory may use: the environment (credentials, base URL overrides), the stores
    a target may be given (identity map and deal keys, shared rate limits, the embedded CRM),
    the field map and the shared HTTP client."""

    environ: Mapping[str, str]
    identities: IdentityMap
    rate_limits: RateLimits
    local_crm: LocalCRMStore
    field_map: FieldMap
    client: httpx.AsyncClient


@dataclass(frozen=True)
class Finding:
    """One thing a CRM lacks for the field map, and how to fix it."""

    problem: str
    fix: str = ""

    def __str__(self) -> str:
        return f"{self.problem}; fix: {self.fix}" if self.fix else self.problem


class NotSetUp(PermanentCRMError):
    """The CRM is not set up for the field map (a missing field, option or stage): each
    finding says what and how to fix it."""

    def __init__(self, crm: str, findings: Sequence[Finding]) -> None:
        super().__init__(f"{crm} is not set up for this field map:\n"
                         + "\n".join(f"  - {finding}" for finding in findings))
        self.findings = list(findings)


@dataclass(frozen=True)
class Provisioned:
    """What `provision` did (`changes`), what it cannot do through the API and a person must
    (`remaining`, from a doctor run afterwards), or, for Salesforce, the set-up to do by hand
    (`instructions`)."""

    changes: list[str] = field(default_factory=list)
    remaining: list[Finding] = field(default_factory=list)
    instructions: str = ""


Build = Callable[[TargetContext], Target]
# Problems with a target's settings beyond their presence (a malformed URL, an unreadable key).
Check = Callable[[Environ], object]
# A start-up check of a built target: CredentialsRefused, NotSetUp or another CRMError.
StartCheck = Callable[[Target], Awaitable[object]]
Provision = Callable[[Environ, FieldMap, httpx.AsyncClient], Awaitable[Provisioned]]
Doctor = Callable[[Environ, FieldMap, httpx.AsyncClient], Awaitable[list[Finding]]]


async def start_itself(target: Target) -> None:
    """The usual start-up check: the target's own `start()`, when it has one."""
    if startable(target):
        await target.start()


@dataclass(frozen=True)
class TargetKind:
    """One kind of target, as its package declares it.

    `credentials` must all be set to enable it, or all of one of the `alternatives`
    (Salesforce: client credentials or JWT bearer); `check` raises ConfigError for settings
    that are present but wrong, so `linkcrm serve` refuses them before it binds its port.
    `build` makes the target (None: named, but not wired into this build); `start` checks a
    built target once before its first action; `provision` and `doctor` (None: the kind has
    no CRM to set up) back `linkcrm provision` and `linkcrm doctor`; `dialect` is how the
    target reads the field map and writes values.
    """

    credentials: tuple[str, ...]
    build: Build | None
    alternatives: tuple[tuple[str, ...], ...] = ()
    check: Check | None = None
    start: StartCheck = start_itself
    provision: Provision | None = None
    doctor: Doctor | None = None
    dialect: Dialect = CANONICAL

    def credential_sets(self) -> tuple[tuple[str, ...], ...]:
        return (self.credentials, *self.alternatives)

    def configured(self, environ: Environ) -> bool:
        return bool(self.credentials) and any(
            all(_set(environ, v) for v in names) for names in self.credential_sets())

    def touched(self, environ: Environ) -> bool:
        return any(_set(environ, v) for names in self.credential_sets() for v in names)

    def missing(self, environ: Environ) -> list[str]:
        """What the nearest complete set still lacks: the fewest missing, then the set the
        user went furthest with (SF_USERNAME set: JWT bearer), then the first."""
        gaps = [([v for v in names if not _set(environ, v)], len(names))
                for names in self.credential_sets()]
        return min(gaps, key=lambda gap: (len(gap[0]), len(gap[0]) - gap[1]))[0]


def _set(environ: Environ, variable: str) -> bool:
    return bool(environ.get(variable, "").strip())


class Scratch:
    """An in-memory identity map and an unmetered rate limit, for the handful of requests an
    admin command sends (the service's own are in the database, shared by every worker)."""

    def __init__(self) -> None:
        self.identities: dict[tuple[str, str, str], str] = {}
        self.deals: dict[tuple[str, str], str] = {}

    async def lookup_identity(self, target: str, keys: Sequence[IdentityKey]) -> str | None:
        return next((self.identities[(target, k.field, k.value)] for k in keys
                     if (target, k.field, k.value) in self.identities), None)

    async def bind_identity(self, target: str, key: IdentityKey, record_id: str) -> str:
        return self.identities.setdefault((target, key.field, key.value), record_id)

    async def bind_identities(self, target: str, bindings: Sequence[tuple[IdentityKey, str]]
                              ) -> list[str]:
        return [await self.bind_identity(target, key, record_id) for key, record_id in bindings]

    async def rebind_identity(self, target: str, key: IdentityKey, record_id: str) -> None:
        self.identities[(target, key.field, key.value)] = record_id

    async def unbind_identity(self, target: str, key: IdentityKey,
                              record_id: str | None = None) -> None:
        if record_id in (None, self.identities.get((target, key.field, key.value))):
            self.identities.pop((target, key.field, key.value), None)

    async def lookup_deal(self, target: str, deal_key: str) -> str | None:
        return self.deals.get((target, deal_key))

    async def bind_deal(self, target: str, deal_key: str, deal_id: str) -> str:
        return self.deals.setdefault((target, deal_key), deal_id)

    async def bind_deals(self, target: str, bindings: Sequence[tuple[str, str]]) -> list[str]:
        return [self.deals.setdefault((target, key), deal_id) for key, deal_id in bindings]

    async def take_tokens(self, bucket: str, cost: float, capacity: float,
                          refill_per_second: float) -> float:
        return 0.0

    async def take_slots(self, windows: Sequence[tuple[str, int, float]]) -> float:
        return 0.0
