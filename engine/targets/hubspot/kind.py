"""The `hubspot` kind: enabled by HUBSPOT_ACCESS_TOKEN; its start-up check, provision, doctor."""

from __future__ import annotations

import httpx

from engine.config.fieldmap import FieldMap
from engine.targets.base import CredentialsRefused, Target
from engine.targets.http import body_of
from engine.targets.hubspot import admin
from engine.targets.hubspot.api import hubspot_message
from engine.targets.hubspot.plan import DIALECT
from engine.targets.hubspot.settings import HubSpotSettings
from engine.targets.hubspot.target import HubSpotTarget
from engine.targets.kind import Environ, Finding, Provisioned, TargetContext, TargetKind


def build(context: TargetContext) -> Target:
    settings = HubSpotSettings.from_env(context.environ)
    return HubSpotTarget(context.client, settings.token, context.field_map, context.identities,
                         context.rate_limits, base_url=settings.base_url,
                         requests_per_window=settings.rate_limit)


async def start(target: Target) -> None:
    """One read with the token (the contact properties: the scopes linkcrm needs): a 401 or
    403 is CredentialsRefused; an outage is a RetryableCRMError."""
    if not isinstance(target, HubSpotTarget):
        return  # a stand-in under that name has no credentials to check
    response = await target.api.call("GET", "/crm/v3/properties/contacts",
                                     expect=(200, 401, 403))
    words = hubspot_message(body_of(response))
    if response.status_code == 401:
        raise CredentialsRefused(f"hubspot: the access token was refused (401: {words}); set "
                                 "HUBSPOT_ACCESS_TOKEN to a private-app token of this account")
    if response.status_code == 403:
        raise CredentialsRefused(f"hubspot: the access token lacks a scope (403: {words}); "
                                 "give the private app read and write on contacts, deals and "
                                 "their schemas (crm.objects.* and crm.schemas.*)")


async def provision(environ: Environ, field_map: FieldMap,
                    client: httpx.AsyncClient) -> Provisioned:
    settings = HubSpotSettings.from_env(environ)
    changes = await admin.provision(client, settings.token, field_map,
                                    base_url=settings.base_url)
    return Provisioned(changes, await doctor(environ, field_map, client))


async def doctor(environ: Environ, field_map: FieldMap,
                 client: httpx.AsyncClient) -> list[Finding]:
    settings = HubSpotSettings.from_env(environ)
    return await admin.doctor(client, settings.token, field_map, base_url=settings.base_url)


KIND = TargetKind(("HUBSPOT_ACCESS_TOKEN",), build, check=HubSpotSettings.from_env,
                  start=start, provision=provision, doctor=doctor, dialect=DIALECT)
