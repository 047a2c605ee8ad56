"""The target registry: which CRMs the environment enables, how they are built, how they start."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import httpx
import pytest

from engine.config.fieldmap import CRMField, FieldMap
from engine.errors import ConfigError
from engine.rules.files import load_ruleset
from engine.storage import Storage
from engine.targets.base import Target
from engine.targets.hubspot.target import HubSpotTarget
from engine.targets.kind import Environ, Finding, NotSetUp, TargetKind
from engine.targets.local.target import LocalTarget
from engine.targets.pipedrive.settings import PipedriveSettings
from engine.targets.pipedrive.target import PipedriveTarget
from engine.targets.registry import (
    REGISTRY,
    admin_targets,
    build_targets,
    doctor,
    select_targets,
    start_targets,
)
from engine.targets.salesforce.auth import ClientCredentials, JwtBearer
from engine.targets.salesforce.target import SalesforceTarget
from tests.emulators.hubspot import create_hubspot_emulator
from tests.emulators.pipedrive import PipedriveEmulator
from tests.emulators.salesforce import SalesforceEmulator
from tests.support.crm_stack import jwt_key
from tests.support.paths import REPO

pytestmark = pytest.mark.anyio
FIELD_MAP = load_ruleset([REPO / "rules"]).field_map
HUBSPOT = {"HUBSPOT_ACCESS_TOKEN": "pat-1"}
SF_SECRET = {"SF_INSTANCE_URL": "https://acme.my.salesforce.com", "SF_CLIENT_ID": "id",
             "SF_CLIENT_SECRET": "secret"}
PIPEDRIVE = {"PIPEDRIVE_API_TOKEN": "pd", "PIPEDRIVE_DOMAIN": "acme"}


def problems(environ: dict[str, str]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        select_targets(environ)
    return [f"{p.code}: {p.message} | {p.hint}" for p in caught.value.problems]


def test_every_crm_is_enabled_by_its_usual_credentials(tmp_path: Path) -> None:
    key = tmp_path / "sf.pem"
    key.write_text(jwt_key(), encoding="ascii")
    jwt = {"SF_INSTANCE_URL": "https://acme.my.salesforce.com", "SF_CLIENT_ID": "consumer",
           "SF_USERNAME": "integration@acme.example", "SF_PRIVATE_KEY_FILE": str(key)}
    assert select_targets({**HUBSPOT, **SF_SECRET, **PIPEDRIVE}) == [
        "hubspot", "salesforce", "pipedrive"]
    assert select_targets(jwt) == ["salesforce"]  # JWT bearer is the other credential set
    assert select_targets({**jwt, "SF_PRIVATE_KEY_FILE": "", "SF_PRIVATE_KEY": jwt_key()}) \
        == ["salesforce"]


def test_incomplete_and_malformed_settings_are_reported_together(tmp_path: Path) -> None:
    found = problems({"SF_INSTANCE_URL": "https://a.my.salesforce.com", "SF_CLIENT_ID": "id",
                      "SF_USERNAME": "me@acme.example"})
    assert found == ["missing-credentials: salesforce credentials are incomplete: "
                     "SF_PRIVATE_KEY_FILE not set | set SF_PRIVATE_KEY_FILE, or unset the "
                     "other salesforce variables"]
    [hint] = problems({"LINKCRM_TARGETS": "salesforce"})
    assert "or set SF_INSTANCE_URL + SF_CLIENT_ID + SF_USERNAME + SF_PRIVATE_KEY_FILE" in hint
    found = problems({**HUBSPOT, "HUBSPOT_RATE_LIMIT": "fast", **PIPEDRIVE,
                      "PIPEDRIVE_BASE_URL": "pipedrive.local", **SF_SECRET,
                      "SF_CLIENT_SECRET": "", "SF_USERNAME": "me",
                      "SF_PRIVATE_KEY_FILE": str(tmp_path / "missing.pem")})
    assert found == [
        "bad-setting: HUBSPOT_RATE_LIMIT must be a whole number of requests, e.g. 100 (Free, "
        "Starter) or 190 (Professional, Enterprise); got 'fast' | fix or unset "
        "HUBSPOT_RATE_LIMIT",
        "bad-setting: SF_PRIVATE_KEY_FILE cannot be read: No such file or directory | point "
        "it at the PEM file of the key whose certificate is uploaded to the connected app",
        "bad-setting: PIPEDRIVE_BASE_URL must be an http(s) URL, got 'pipedrive.local' | fix "
        "or unset PIPEDRIVE_BASE_URL",
    ]
    key = tmp_path / "not-a-key.pem"
    key.write_text("-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
    [bad_key] = problems({**SF_SECRET, "SF_CLIENT_SECRET": "", "SF_USERNAME": "me",
                          "SF_PRIVATE_KEY_FILE": str(key)})
    assert "not an unencrypted PEM key" in bad_key and "nope" not in bad_key


def test_pipedrive_domain_is_taken_in_any_usual_spelling() -> None:
    for spelling in ("acme", "acme.pipedrive.com", "https://acme.pipedrive.com/"):
        settings = PipedriveSettings.from_env({**PIPEDRIVE, "PIPEDRIVE_DOMAIN": spelling})
        assert settings.domain == "acme"
    assert "pd" not in repr(PipedriveSettings.from_env(PIPEDRIVE))  # no token in logs


async def test_the_factories_build_each_adapter_with_its_overrides(
        storage: Storage, tmp_path: Path) -> None:
    environ = {"LINKCRM_TARGETS": "local,hubspot,salesforce,pipedrive", **HUBSPOT,
               "HUBSPOT_BASE_URL": "http://127.0.0.1:9/", "HUBSPOT_RATE_LIMIT": "190",
               **SF_SECRET, "SF_TOKEN_URL": "https://login.example/token",
               "SF_LIMIT_BACKOFF": "60", **PIPEDRIVE, "PIPEDRIVE_RATE_LIMIT": "80"}
    async with httpx.AsyncClient() as client:
        local, hubspot, salesforce, pipedrive = build_targets(environ, storage, FIELD_MAP,
                                                              client)
        key = tmp_path / "sf.pem"
        key.write_text(jwt_key(), encoding="ascii")
        [jwt] = build_targets({"SF_INSTANCE_URL": "https://acme.my.salesforce.com",
                               "SF_CLIENT_ID": "c", "SF_USERNAME": "u",
                               "SF_PRIVATE_KEY_FILE": str(key)}, storage, FIELD_MAP, client)
    assert local.name == "local"
    assert isinstance(hubspot, HubSpotTarget)
    assert (hubspot.api.base_url, hubspot.api.limit) == ("http://127.0.0.1:9", 190)
    assert isinstance(salesforce, SalesforceTarget)
    assert salesforce.api.base.startswith("https://acme.my.salesforce.com/services/data/v")
    assert salesforce.api.limit_backoff == 60.0
    assert isinstance(salesforce.tokens._credentials, ClientCredentials)
    assert salesforce.tokens._token_url == "https://login.example/token"
    assert isinstance(jwt, SalesforceTarget) and isinstance(jwt.tokens._credentials, JwtBearer)
    assert isinstance(pipedrive, PipedriveTarget)
    assert pipedrive._api.base_url == "https://acme.pipedrive.com/api/v2"
    burst = pipedrive._api.burst
    assert burst is not None and (burst.capacity, burst.window, burst.rolling) == (80, 2.0, True)


async def test_start_refuses_an_account_without_the_fields_and_waits_out_an_outage(
        storage: Storage) -> None:
    emulator = PipedriveEmulator(api_token="pd")
    environ = {**PIPEDRIVE, "PIPEDRIVE_BASE_URL": "http://pipedrive.test"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=emulator.app)) as client:
        targets = build_targets(environ, storage, FIELD_MAP, client)
        with pytest.raises(ConfigError) as caught:
            await start_targets(targets)
    found = caught.value.problems
    assert {p.location.file for p in found} == {"pipedrive"}
    assert any(p.message == "person field 'Deep link token' does not exist in Pipedrive"
               and p.hint == "run `linkcrm provision pipedrive` to create it" for p in found)

    def down(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, json={"success": False, "error": "maintenance"})

    async with httpx.AsyncClient(transport=httpx.MockTransport(down)) as client:
        targets = build_targets(environ, storage, FIELD_MAP, client)
        await start_targets(targets)  # an outage is no set-up problem: start at first action
        refused = httpx.MockTransport(lambda r: httpx.Response(
            401, json={"success": False, "error": "unauthorized access"}))
    async with httpx.AsyncClient(transport=refused) as client:
        with pytest.raises(ConfigError) as caught:
            await start_targets(build_targets(environ, storage, FIELD_MAP, client))
    [problem] = caught.value.problems
    assert problem.code == "credentials-refused" and "PIPEDRIVE_API_TOKEN" in problem.message
    assert problem.hint == ("fix the pipedrive credentials, then start again (`linkcrm doctor "
                            "pipedrive` checks them)")


async def test_start_checks_every_crm_s_credentials_and_tells_an_outage_from_a_refusal(
        storage: Storage, caplog: pytest.LogCaptureFixture) -> None:
    """Wrong HubSpot, Salesforce or Pipedrive credentials stop the start with the fix; a CRM
    that cannot be reached is logged as such (its credentials unchecked) and not blamed."""
    hubspot_app, _ = create_hubspot_emulator("pat-right")
    salesforce = SalesforceEmulator()
    pipedrive = PipedriveEmulator(api_token="pd-right")
    apps = {"hubspot.test": hubspot_app, "salesforce.test": salesforce.app(),
            "pipedrive.test": pipedrive.app}

    async def route(request: httpx.Request) -> httpx.Response:
        transport = httpx.ASGITransport(app=apps[request.url.host])
        return await transport.handle_async_request(request)

    environ = {"LINKCRM_TARGETS": "hubspot,salesforce,pipedrive",
               "HUBSPOT_ACCESS_TOKEN": "pat-wrong", "HUBSPOT_BASE_URL": "http://hubspot.test",
               "SF_INSTANCE_URL": "http://salesforce.test", "SF_CLIENT_ID": salesforce.client_id,
               "SF_CLIENT_SECRET": "wrong-secret", **PIPEDRIVE,
               "PIPEDRIVE_API_TOKEN": "pd-wrong", "PIPEDRIVE_BASE_URL": "http://pipedrive.test"}
    async with httpx.AsyncClient(transport=httpx.MockTransport(route)) as client:
        with pytest.raises(ConfigError) as caught:
            await start_targets(build_targets(environ, storage, FIELD_MAP, client))
        refused = {p.location.file: p for p in caught.value.problems}
        right = {**environ, "HUBSPOT_ACCESS_TOKEN": "pat-right",
                 "SF_CLIENT_SECRET": salesforce.client_secret}
        await start_targets(build_targets({**right, "LINKCRM_TARGETS": "hubspot,salesforce"},
                                          storage, FIELD_MAP, client))
    assert {name: p.code for name, p in refused.items()} == dict.fromkeys(
        ("hubspot", "salesforce", "pipedrive"), "credentials-refused")
    assert "HUBSPOT_ACCESS_TOKEN" in refused["hubspot"].message
    assert "invalid_client" in refused["salesforce"].message
    assert "SF_CLIENT_SECRET" in refused["salesforce"].message
    assert all("wrong" not in p.message for p in refused.values())  # no secret in the output

    def unreachable(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    caplog.set_level("WARNING", logger="engine.targets.registry")
    async with httpx.AsyncClient(transport=httpx.MockTransport(unreachable)) as client:
        await start_targets(build_targets(environ, storage, FIELD_MAP, client))
    warned = {r.target: r.getMessage() for r in caplog.records}  # type: ignore[attr-defined]
    assert set(warned) == {"hubspot", "salesforce", "pipedrive"}
    for name, message in warned.items():
        assert message.startswith(f"{name} cannot be reached at start-up, so its credentials "
                                  "are not checked yet (")
        assert "ConnectError" in message and "wrong" not in message


async def test_a_kind_declares_its_own_start_check_and_set_up_findings(
        storage: Storage) -> None:
    """The registry runs whatever start check a kind declares and reports the findings of a
    CRM that is not set up (problem and fix as given), knowing nothing of the CRM itself."""
    started: list[str] = []

    async def start(target: Target) -> None:
        started.append(target.name)
        raise NotSetUp("acme", [Finding("field 'x; fix: y' is missing", "create it")])

    async def doctor(environ: Environ, field_map: FieldMap,
                     client: httpx.AsyncClient) -> list[Finding]:
        return [Finding("nothing", "")]

    acme = TargetKind(("ACME_TOKEN",), lambda context: LocalTarget(context.local_crm,
                                                                   context.field_map),
                      start=start, provision=None, doctor=doctor)
    registry = {**REGISTRY, "local": acme}
    assert "local" not in admin_targets(registry)  # no provision: not a set-up command
    assert admin_targets() == ["hubspot", "pipedrive", "salesforce"]
    async with httpx.AsyncClient() as client:
        targets = build_targets({"ACME_TOKEN": "t"}, storage, FIELD_MAP, client,
                                registry=registry)
        with pytest.raises(ConfigError) as caught:
            await start_targets(targets, registry)
    [problem] = caught.value.problems
    assert started == ["local"] and problem.code == "target-not-set-up"
    assert (problem.message, problem.hint) == ("field 'x; fix: y' is missing", "create it")
    for name in ("hubspot", "salesforce", "pipedrive"):
        kind = REGISTRY[name]
        assert kind.build and kind.provision and kind.doctor and kind.check, name
        assert kind.dialect.target == name


async def test_doctor_findings_keep_a_problem_that_quotes_the_word_fix() -> None:
    """A Pipedrive label (the user's own text) holding "; fix: " stays in the problem: findings
    travel as data, never as text parsed back."""
    spec = FIELD_MAP.fields["deep_link_prefix"]
    odd = dataclasses.replace(spec, crm={**spec.crm, "pipedrive": CRMField(
        "Prefix; fix: none", bare=True)})
    field_map = dataclasses.replace(FIELD_MAP, fields={**FIELD_MAP.fields,
                                                       "deep_link_prefix": odd})
    emulator = PipedriveEmulator(api_token="pd")
    environ = {**PIPEDRIVE, "PIPEDRIVE_BASE_URL": "http://pipedrive.test"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=emulator.app)) as client:
        findings = await doctor("pipedrive", environ, field_map, client)
    assert Finding("person field 'Prefix; fix: none' does not exist in Pipedrive",
                   "run `linkcrm provision pipedrive` to create it") in findings
