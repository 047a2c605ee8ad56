"""The `pipedrive` kind: enabled by PIPEDRIVE_API_TOKEN and PIPEDRIVE_DOMAIN; provision, doctor."""

from __future__ import annotations

import httpx

from engine.config.fieldmap import FieldMap
from engine.targets.base import Target
from engine.targets.kind import Environ, Finding, Provisioned, TargetContext, TargetKind
from engine.targets.pipedrive.admin import PipedriveAdmin
from engine.targets.pipedrive.fields import DIALECT
from engine.targets.pipedrive.settings import PipedriveSettings
from engine.targets.pipedrive.target import PipedriveTarget


def build(context: TargetContext) -> Target:
    settings = PipedriveSettings.from_env(context.environ)
    return PipedriveTarget(context.client, api_token=settings.api_token,
                           domain=settings.domain, base_url=settings.base_url,
                           burst_limit=settings.rate_limit, field_map=context.field_map,
                           identities=context.identities, rate_limits=context.rate_limits)


def _admin(environ: Environ, client: httpx.AsyncClient) -> PipedriveAdmin:
    settings = PipedriveSettings.from_env(environ)
    return PipedriveAdmin(client, api_token=settings.api_token, domain=settings.domain,
                          base_url=settings.base_url)


async def provision(environ: Environ, field_map: FieldMap,
                    client: httpx.AsyncClient) -> Provisioned:
    admin = _admin(environ, client)
    changes = await admin.provision(field_map)
    return Provisioned(changes, await admin.doctor(field_map))


async def doctor(environ: Environ, field_map: FieldMap,
                 client: httpx.AsyncClient) -> list[Finding]:
    return await _admin(environ, client).doctor(field_map)


# Start-up is the target's own start(): it resolves the field labels (NotSetUp names each gap).
KIND = TargetKind(("PIPEDRIVE_API_TOKEN", "PIPEDRIVE_DOMAIN"), build,
                  check=PipedriveSettings.from_env, provision=provision, doctor=doctor,
                  dialect=DIALECT)
