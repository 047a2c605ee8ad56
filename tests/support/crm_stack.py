"""The three CRM emulators on loopback, optionally provisioned and faulty, and the environment
that points linkcrm's targets at them (the same variables an operator sets)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import ExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import httpx
from starlette.applications import Starlette

from engine.config.fieldmap import FieldMap
from engine.targets.hubspot.admin import provision as provision_hubspot
from engine.targets.pipedrive.admin import PipedriveAdmin
from tests.emulators.faults import KINDS, FaultInjector
from tests.emulators.hubspot import create_hubspot_emulator, too_many
from tests.emulators.hubspot_state import HubSpotState
from tests.emulators.pipedrive import PipedriveEmulator
from tests.emulators.salesforce import SalesforceEmulator
from tests.emulators.salesforce_oauth import new_rsa_key, public_key_of
from tests.emulators.server import serve

HUBSPOT_TOKEN = "pat-na1-stack"
PIPEDRIVE_TOKEN = "pd-stack-token"
CRMS = ("hubspot", "salesforce", "pipedrive")
PIPELINE = ("Deep Link Referrals", ["Qualified", "Won"])  # the field map's pipeline
_PEM: list[str] = []


def jwt_key() -> str:
    """One RSA key per test session (generating one takes a while)."""
    if not _PEM:
        _PEM.append(new_rsa_key())
    return _PEM[0]


@dataclass
class Stack:
    """The running emulators, their fault injectors, and where they listen."""

    hubspot: HubSpotState
    salesforce: SalesforceEmulator
    pipedrive: PipedriveEmulator
    faults: dict[str, FaultInjector]
    urls: dict[str, str]
    key_file: Path | None = None
    pipedrive_rate_limit: int = 200
    extra: dict[str, str] = field(default_factory=dict)

    def environ(self, *targets: str) -> dict[str, str]:
        """The CRM variables for `targets` (default: local and the three CRMs)."""
        env = {
            "LINKCRM_TARGETS": ",".join(targets or ("local", *CRMS)),
            "HUBSPOT_ACCESS_TOKEN": HUBSPOT_TOKEN,
            "HUBSPOT_BASE_URL": self.urls["hubspot"],
            "SF_INSTANCE_URL": self.urls["salesforce"],
            "SF_CLIENT_ID": self.salesforce.client_id,
            "SF_LIMIT_BACKOFF": "0.5",  # the emulator's exhausted allocation is a fault
            "PIPEDRIVE_API_TOKEN": PIPEDRIVE_TOKEN,
            "PIPEDRIVE_DOMAIN": "acme",
            "PIPEDRIVE_BASE_URL": self.urls["pipedrive"],
            "PIPEDRIVE_RATE_LIMIT": str(self.pipedrive_rate_limit),
        }
        if self.key_file is not None:  # JWT bearer instead of client credentials
            env.update({"SF_USERNAME": self.salesforce.jwt_username,
                        "SF_PRIVATE_KEY_FILE": str(self.key_file)})
        else:
            env["SF_CLIENT_SECRET"] = self.salesforce.client_secret
        return {**env, **self.extra}

    def injected(self) -> dict[str, dict[str, int]]:
        return {crm: dict(faults.injected) for crm, faults in self.faults.items()}


async def provision_hubspot_app(app: Starlette, state: HubSpotState, field_map: FieldMap) -> None:
    """What `linkcrm provision hubspot` creates, without counting it against the limit."""
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app)) as client:
        await provision_hubspot(client, HUBSPOT_TOKEN, field_map, base_url="http://hubspot")
    state.forget_requests()


async def provision_pipedrive_app(emulator: PipedriveEmulator, field_map: FieldMap) -> None:
    limits = emulator.burst_limit, emulator.search_limit
    emulator.burst_limit = emulator.search_limit = 1000
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=emulator.app)) as client:
        admin = PipedriveAdmin(client, api_token=PIPEDRIVE_TOKEN, base_url="http://pipedrive")
        await admin.provision(field_map)
    emulator.burst_limit, emulator.search_limit = limits
    emulator.reset_usage()


@asynccontextmanager
async def running(field_map: FieldMap, *, provision: bool = True, pipeline: bool = True,
                  fault_rate: float = 0.0, slow_seconds: float = 1.0, seed: int = 11,
                  kinds: tuple[str, ...] = KINDS, key_dir: Path | None = None,
                  hubspot: dict[str, Any] | None = None,
                  pipedrive: dict[str, Any] | None = None,
                  pipedrive_rate_limit: int = 200) -> AsyncIterator[Stack]:
    """Start the three emulators (provisioned unless told not to; Pipedrive with the field
    map's pipeline unless `pipeline` is false), each behind a FaultInjector at `fault_rate`.
    With `key_dir`, Salesforce authenticates by JWT bearer with a key file written there."""
    hs_app, hs_state = create_hubspot_emulator(HUBSPOT_TOKEN, **(hubspot or {}))
    pd = PipedriveEmulator(api_token=PIPEDRIVE_TOKEN, **(pipedrive or {}))
    if pipeline:
        pd.add_pipeline(*PIPELINE)
    key_file = None
    sf = SalesforceEmulator()
    if key_dir is not None:
        key_file = key_dir / "salesforce-jwt.pem"
        key_file.write_text(jwt_key(), encoding="ascii")
        sf = SalesforceEmulator(jwt_public_key=public_key_of(jwt_key()))
    if provision:
        await provision_hubspot_app(hs_app, hs_state, field_map)
        await provision_pipedrive_app(pd, field_map)
    options: dict[str, Any] = {"rate": fault_rate, "slow_seconds": slow_seconds, "kinds": kinds}
    faults = {
        "hubspot": FaultInjector(cast(Any, hs_app), seed=seed, too_many=lambda: too_many(hs_state),
                                 **options),
        "salesforce": sf.faulty(seed=seed + 1, **options),
        "pipedrive": FaultInjector(cast(Any, pd.app), seed=seed + 2, too_many=pd.too_many,
                                   **options),
    }
    with ExitStack() as servers:
        urls = {name: servers.enter_context(serve(app)) for name, app in faults.items()}
        yield Stack(hs_state, sf, pd, faults, urls, key_file, pipedrive_rate_limit)
