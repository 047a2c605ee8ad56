"""The `salesforce` kind: enabled by client credentials or a JWT bearer key; provision prints
the set-up an admin does in Setup, doctor checks the org."""

from __future__ import annotations

import httpx

from engine.config.fieldmap import FieldMap
from engine.targets.base import Target
from engine.targets.kind import (
    Environ,
    Finding,
    Provisioned,
    Scratch,
    TargetContext,
    TargetKind,
)
from engine.targets.salesforce import admin
from engine.targets.salesforce.records import DIALECT
from engine.targets.salesforce.settings import SalesforceEnvironment
from engine.targets.salesforce.target import SalesforceTarget

_JWT = ("SF_INSTANCE_URL", "SF_CLIENT_ID", "SF_USERNAME")


def build(context: TargetContext) -> Target:
    found = SalesforceEnvironment.from_env(context.environ)
    return SalesforceTarget.from_settings(context.client, found.settings, context.field_map,
                                          context.identities, context.rate_limits,
                                          limit_backoff=found.limit_backoff)


async def provision(environ: Environ, field_map: FieldMap,
                    client: httpx.AsyncClient) -> Provisioned:
    # Salesforce has no safe REST call that creates fields: an admin creates them in Setup.
    return Provisioned(instructions=admin.provision_instructions(field_map))


async def doctor(environ: Environ, field_map: FieldMap,
                 client: httpx.AsyncClient) -> list[Finding]:
    found = SalesforceEnvironment.from_env(environ)
    scratch = Scratch()
    target = SalesforceTarget.from_settings(client, found.settings, field_map, scratch, scratch)
    return await admin.doctor(target)


# Start-up is the target's own start(): it gets a token (CredentialsRefused when refused).
KIND = TargetKind(("SF_INSTANCE_URL", "SF_CLIENT_ID", "SF_CLIENT_SECRET"), build,
                  alternatives=((*_JWT, "SF_PRIVATE_KEY_FILE"), (*_JWT, "SF_PRIVATE_KEY")),
                  check=SalesforceEnvironment.from_env, provision=provision, doctor=doctor,
                  dialect=DIALECT)
