"""`provision` and `doctor` for each CRM target, with credentials from the environment.

    report = await provision("hubspot", os.environ, field_map, client)
    findings = await doctor("pipedrive", os.environ, field_map, client)   # [] when ready

Neither needs linkcrm's database: the few requests they send are not paced through it.
Missing or malformed credentials raise ConfigError (a usage problem); a CRM that refuses a
change raises CRMError; everything `doctor` finds comes back as a `Finding` with its fix.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

import httpx

from engine.actions import IdentityKey
from engine.config.fieldmap import FieldMap
from engine.targets.credentials import HubSpotSettings, PipedriveSettings, SalesforceEnvironment
from engine.targets.hubspot import admin as hubspot_admin
from engine.targets.pipedrive.admin import PipedriveAdmin
from engine.targets.salesforce import admin as salesforce_admin
from engine.targets.salesforce.target import SalesforceTarget

Environ = Mapping[str, str]


@dataclass(frozen=True)
class Finding:
    """One thing a CRM lacks for the field map, and how to fix it."""

    problem: str
    fix: str

    @classmethod
    def parse(cls, line: str) -> Finding:
        """From the adapters' `<problem>; fix: <fix>` lines."""
        problem, _, fix = line.partition("; fix: ")
        return cls(problem.strip(), fix.strip())


@dataclass(frozen=True)
class Provisioned:
    """What `provision` did (`changes`), what it cannot do through the API and a person must
    (`remaining`, from a doctor run afterwards), or, for Salesforce, the set-up to do by hand
    (`instructions`)."""

    changes: list[str] = field(default_factory=list)
    remaining: list[Finding] = field(default_factory=list)
    instructions: str = ""


async def _hubspot_provision(environ: Environ, field_map: FieldMap,
                             client: httpx.AsyncClient) -> Provisioned:
    settings = HubSpotSettings.from_env(environ)
    changes = await hubspot_admin.provision(client, settings.token, field_map,
                                            base_url=settings.base_url)
    return Provisioned(changes, await _hubspot_doctor(environ, field_map, client))


async def _hubspot_doctor(environ: Environ, field_map: FieldMap,
                          client: httpx.AsyncClient) -> list[Finding]:
    settings = HubSpotSettings.from_env(environ)
    lines = await hubspot_admin.doctor(client, settings.token, field_map,
                                       base_url=settings.base_url)
    return [Finding.parse(line) for line in lines]


def _pipedrive(environ: Environ, client: httpx.AsyncClient) -> PipedriveAdmin:
    settings = PipedriveSettings.from_env(environ)
    return PipedriveAdmin(client, api_token=settings.api_token, domain=settings.domain,
                          base_url=settings.base_url)


async def _pipedrive_provision(environ: Environ, field_map: FieldMap,
                               client: httpx.AsyncClient) -> Provisioned:
    admin = _pipedrive(environ, client)
    changes = await admin.provision(field_map)
    return Provisioned(changes, [Finding.parse(p) for p in await admin.doctor(field_map)])


async def _pipedrive_doctor(environ: Environ, field_map: FieldMap,
                            client: httpx.AsyncClient) -> list[Finding]:
    return [Finding.parse(p) for p in await _pipedrive(environ, client).doctor(field_map)]


async def _salesforce_provision(environ: Environ, field_map: FieldMap,
                                client: httpx.AsyncClient) -> Provisioned:
    # Salesforce has no safe REST call that creates fields: an admin creates them in Setup.
    return Provisioned(instructions=salesforce_admin.provision_instructions(field_map))


async def _salesforce_doctor(environ: Environ, field_map: FieldMap,
                             client: httpx.AsyncClient) -> list[Finding]:
    found = SalesforceEnvironment.from_env(environ)
    scratch = _Scratch()
    target = SalesforceTarget.from_settings(client, found.settings, field_map, scratch, scratch)
    return [Finding.parse(line) for line in await salesforce_admin.doctor(target)]


Provision = Callable[[Environ, FieldMap, httpx.AsyncClient], Awaitable[Provisioned]]
Doctor = Callable[[Environ, FieldMap, httpx.AsyncClient], Awaitable[list[Finding]]]

ADMIN: dict[str, tuple[Provision, Doctor]] = {
    "hubspot": (_hubspot_provision, _hubspot_doctor),
    "pipedrive": (_pipedrive_provision, _pipedrive_doctor),
    "salesforce": (_salesforce_provision, _salesforce_doctor),
}


async def provision(target: str, environ: Environ, field_map: FieldMap,
                    client: httpx.AsyncClient) -> Provisioned:
    """Create what the field map needs in `target`'s CRM (idempotent), then check the rest."""
    return await ADMIN[target][0](environ, field_map, client)


async def doctor(target: str, environ: Environ, field_map: FieldMap,
                 client: httpx.AsyncClient) -> list[Finding]:
    """Everything `target`'s CRM lacks for the field map, each with its fix; [] when ready."""
    return await ADMIN[target][1](environ, field_map, client)


class _Scratch:
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

    async def take_tokens(self, bucket: str, cost: float, capacity: float,
                          refill_per_second: float) -> float:
        return 0.0
