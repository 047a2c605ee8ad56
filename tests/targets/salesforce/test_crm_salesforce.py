"""The Salesforce adapter against the emulator in-process (ASGITransport) and MockTransport."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator, Callable
from datetime import date
from pathlib import Path
from typing import Any

import httpx
import pytest
from jsonschema import Draft202012Validator

from engine.actions import CreateDeal, IdentityKey, SetStage, UpsertContact
from engine.config.fieldmap import FieldMap, load_field_map
from engine.errors import PermanentCRMError
from engine.storage import Storage, open_storage
from engine.targets.base import CallContext, Outcome
from engine.targets.http import path_segment
from engine.targets.salesforce import soql
from engine.targets.salesforce.auth import ClientCredentials
from engine.targets.salesforce.target import SalesforceTarget
from tests.emulators.salesforce import SalesforceEmulator
from tests.support.identity_maps import Recording
from tests.support.paths import REPO, TESTS

pytestmark = pytest.mark.anyio
FIELD_MAP = load_field_map(REPO / "rules" / "fields.yaml")
INSTANCE = "http://sf.test"
TOKEN = IdentityKey("deep_link_token", "tok_A1")



def upsert(key: IdentityKey = TOKEN, **fields: Any) -> UpsertContact:
    once = {k[5:]: v for k, v in fields.items() if k.startswith("once_")}
    return UpsertContact(rule="r", identity=(key,), set={k: v for k, v in fields.items()
                                                         if not k.startswith("once_")},
                         set_once=once)


def stage(name: str, key: IdentityKey = TOKEN) -> SetStage:
    return SetStage(rule="r", identity=(key,), stage=name)


@pytest.fixture
def emulator() -> SalesforceEmulator:
    return SalesforceEmulator()


@pytest.fixture
async def client(emulator: SalesforceEmulator) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=emulator.app())) as opened:
        yield opened
    assert emulator.schema_violations == []  # every body the adapter sent had its shape


@pytest.fixture
def make(client: httpx.AsyncClient, emulator: SalesforceEmulator,
         storage: Storage) -> Callable[..., SalesforceTarget]:
    def build(field_map: FieldMap = FIELD_MAP, **options: Any) -> SalesforceTarget:
        credentials = options.pop("credentials", ClientCredentials(emulator.client_id,
                                                                   emulator.client_secret))
        return SalesforceTarget(options.pop("client", client), instance_url=INSTANCE,
                                credentials=credentials, field_map=field_map,
                                identities=options.pop("identities", storage.identities),
                                rate_limits=storage.rate_limits,
                                today=lambda: date(2026, 3, 1), **options)

    return build


# -- SOQL through the adapter (the escaping itself: test_crm_soql.py) ----------------------

async def test_interpolation_would_be_injected_but_the_escaped_query_sees_one_literal(
        emulator: SalesforceEmulator, make: Callable[..., SalesforceTarget]) -> None:
    emulator.seed("Lead", LastName="Victim", Company="Acme", Email="victim@example.com")
    target = make()
    attack = "x' OR LastName LIKE '%"
    injected = await target.api.query(f"SELECT Id FROM Lead WHERE Email = '{attack}'")
    assert len(injected) == 1  # what string interpolation would have leaked
    assert await target.api.query(soql.select_where(["Id"], "Lead", "Email", [attack])) == []
    with pytest.raises(PermanentCRMError, match="MALFORMED_QUERY"):
        await target.api.query("SELECT Id FROM Lead WHERE Email = 'ends\\'")


async def test_a_hostile_email_identity_matches_only_itself(
        emulator: SalesforceEmulator, make: Callable[..., SalesforceTarget]) -> None:
    victim = emulator.seed("Lead", LastName="Victim", Company="Acme", Email="v@example.com")
    email = "x'OR(LastName!='')OR'a'='a\\@example.com"
    outcome = await make().execute(upsert(IdentityKey("email", email), email=email),
                                   CallContext("k"))
    assert outcome.created and outcome.record_id not in (None, victim)
    assert emulator.records["Lead"][victim]["LastName"] == "Victim"
    assert emulator.records["Lead"][str(outcome.record_id)]["Email"] == email
    assert emulator.counters["malformed_queries"] == 0


# -- Leads ----------------------------------------------------------------------------------

async def test_a_new_lead_gets_the_defaults_and_a_replay_writes_nothing(
        emulator: SalesforceEmulator, make: Callable[..., SalesforceTarget]) -> None:
    target = make()
    action = upsert(deep_link_token="tok_A1", once_install_date="2026-03-01T10:00:00Z")
    first = await target.execute(action, CallContext("k"))
    assert first.created and first.summary == "lead created"
    (lead,) = emulator.leads
    assert (lead["LastName"], lead["Company"], lead["LeadSource"]) == (
        "Deep Link", "Unknown", "Deep Link")
    assert lead["Install_Date__c"] == "2026-03-01" and lead["Deep_Link_Token__c"] == "tok_A1"
    writes = emulator.counters["PATCH by_external"]
    again = await target.execute(action, CallContext("k"))
    assert (again.record_id, again.summary) == (first.record_id, "lead unchanged")
    assert emulator.counters["PATCH by_external"] == writes


async def test_set_once_fills_only_empty_fields_and_defaults_never_replace_real_values(
        emulator: SalesforceEmulator, make: Callable[..., SalesforceTarget]) -> None:
    emulator.seed("Lead", LastName="Lovelace", Company="Analytical", LeadSource="Web",
                  Deep_Link_Token__c="tok_A1", Deep_Link_Campaign__c="first")
    await make().execute(upsert(deep_link_prefix="p2", once_first_touch_campaign="second",
                                once_first_touch_platform="ios"), CallContext("k"))
    (lead,) = emulator.leads
    assert (lead["Deep_Link_Campaign__c"], lead["Deep_Link_Platform__c"]) == ("first", "ios")
    assert (lead["LastName"], lead["Company"], lead["LeadSource"]) == (
        "Lovelace", "Analytical", "Web")
    assert lead["Deep_Link_Prefix__c"] == "p2"


async def test_status_only_moves_forward(emulator: SalesforceEmulator,
                                         make: Callable[..., SalesforceTarget]) -> None:
    target = make()
    await target.execute(stage("customer"), CallContext("k1"))
    await target.execute(stage("lead"), CallContext("k2"))
    assert emulator.leads[0]["Status"] == "Deep Link Customer"
    emulator.leads[0]["Status"] = "Working - Contacted"  # a person worked the Lead
    await target.execute(stage("lead"), CallContext("k3"))
    assert emulator.leads[0]["Status"] == "Working - Contacted"
    await target.execute(stage("customer"), CallContext("k4"))
    assert emulator.leads[0]["Status"] == "Deep Link Customer"


async def test_several_leads_with_one_token_are_a_permanent_error_naming_them(
        emulator: SalesforceEmulator, make: Callable[..., SalesforceTarget]) -> None:
    ids = [emulator.seed("Lead", LastName="A", Company="B", Deep_Link_Token__c="tok_A1")
           for _ in range(2)]
    with pytest.raises(PermanentCRMError, match="merge") as caught:
        await make().execute(upsert(deep_link_prefix="p"), CallContext("k"))
    assert all(record_id in str(caught.value) for record_id in ids)
    results = await make().execute_many([(upsert(deep_link_prefix="p"), CallContext("k"))])
    assert isinstance(results[0], PermanentCRMError) and ids[0] in str(results[0])


async def test_a_token_field_that_is_not_an_external_id_is_a_permanent_404(
        emulator: SalesforceEmulator, make: Callable[..., SalesforceTarget]) -> None:
    emulator.org.objects["Lead"]["Deep_Link_Token__c"].external_id = False
    with pytest.raises(PermanentCRMError, match="404.*not an External ID"):
        await make().execute(upsert(deep_link_prefix="p"), CallContext("k"))


@pytest.mark.parametrize(("change", "expected"), [
    ("rule", "FIELD_CUSTOM_VALIDATION_EXCEPTION: Prefix must not be 'bad'"),
    ("no_defaults", r"REQUIRED_FIELD_MISSING: Required fields are missing: \[LastName, Company\]"),
    ("missing_field", "INVALID_FIELD: No such column 'Deep_Link_Prefix__c'"),
    ("converted", "FIELD_INTEGRITY_EXCEPTION"),
])
async def test_salesforce_refusals_are_permanent_with_salesforce_s_message(
        emulator: SalesforceEmulator, make: Callable[..., SalesforceTarget], change: str,
        expected: str) -> None:
    field_map, action = FIELD_MAP, upsert(deep_link_prefix="bad")
    if change == "rule":
        emulator.org.validation_rules.append(
            lambda sobject, r: "Prefix must not be 'bad'"
            if r.get("Deep_Link_Prefix__c") == "bad" else None)
    elif change == "no_defaults":
        field_map = dataclasses.replace(FIELD_MAP, targets={"salesforce": {}})
    elif change == "missing_field":
        del emulator.org.objects["Lead"]["Deep_Link_Prefix__c"]
    else:
        lead_stage = dataclasses.replace(FIELD_MAP.contact_stages[1],
                                         values={"salesforce": "Closed - Converted"})
        field_map = dataclasses.replace(FIELD_MAP, contact_stages=(
            FIELD_MAP.contact_stages[0], lead_stage))
        action = stage("customer")  # type: ignore[assignment]
    with pytest.raises(PermanentCRMError, match=expected):
        await make(field_map).execute(action, CallContext("k"))
    assert emulator.leads == []


async def test_an_email_identity_is_found_by_query_then_remembered(
        emulator: SalesforceEmulator, make: Callable[..., SalesforceTarget]) -> None:
    lead = emulator.seed("Lead", LastName="Lovelace", Company="X", Email="ada@example.com")
    target = make()
    email = IdentityKey("email", "ADA@example.com")
    first = await target.execute(upsert(email, first_name="Ada"), CallContext("k"))
    again = await target.execute(upsert(email, first_name="Ada L."), CallContext("k"))
    assert first.record_id == lead and again.record_id == lead
    assert emulator.counters["queries"] == 1  # the identity map answered the second time
    assert emulator.records["Lead"][lead]["FirstName"] == "Ada L."


async def test_identify_attaches_the_token_to_the_lead_found_by_email(
        emulator: SalesforceEmulator, make: Callable[..., SalesforceTarget]) -> None:
    lead = emulator.seed("Lead", LastName="Lovelace", Company="X", Email="ada@example.com")
    action = UpsertContact(rule="r", identity=(TOKEN, IdentityKey("email", "ada@example.com")),
                           set={"first_name": "Ada"})
    for results in (await make().execute_many([(action, CallContext("k"))]),
                    [await make().execute(action, CallContext("k"))]):
        assert [r.record_id for r in results] == [lead]  # type: ignore[union-attr]
    assert emulator.records["Lead"][lead]["Deep_Link_Token__c"] == "tok_A1"
    assert len(emulator.leads) == 1


async def test_a_stale_mapping_is_replaced_in_one_write(
        emulator: SalesforceEmulator, make: Callable[..., SalesforceTarget],
        storage: Storage) -> None:
    """The identity map still names a Lead merged away in Salesforce; Salesforce, the
    authority, names another by the token's external id, and the map is rebound to it in one
    atomic write: never unbound first, which would leave a moment with no mapping."""
    await storage.identities.bind_identity("salesforce", TOKEN, "00Q000000000999AAA")
    identities = Recording(storage.identities)
    outcome = await make(identities=identities).execute(upsert(deep_link_token="tok_A1"), "k")
    assert outcome.record_id == emulator.leads[0]["Id"]
    assert await storage.identities.lookup_identity("salesforce", [TOKEN]) == outcome.record_id
    assert identities.calls.count("rebind_identity") == 1
    assert "unbind_identity" not in identities.calls


async def test_api_versions_before_46_answer_updates_with_204(
        emulator: SalesforceEmulator, make: Callable[..., SalesforceTarget]) -> None:
    target = make(api_version="v45.0")
    created = await target.execute(upsert(deep_link_prefix="a"), CallContext("k"))
    updated = await target.execute(upsert(deep_link_prefix="b"), CallContext("k"))
    assert created.created and (updated.record_id, updated.created) == (created.record_id, False)


async def test_query_pages_are_followed(emulator: SalesforceEmulator,
                                        make: Callable[..., SalesforceTarget]) -> None:
    emulator.query_page_size = 1
    for _ in range(3):
        emulator.seed("Lead", LastName="A", Company="B", Email="dup@example.com")
    with pytest.raises(PermanentCRMError, match="3 Lead records"):
        await make().execute(upsert(IdentityKey("email", "dup@example.com")), CallContext("k"))


# -- batches --------------------------------------------------------------------------------

async def test_queued_actions_become_one_query_and_one_collections_upsert(
        emulator: SalesforceEmulator, make: Callable[..., SalesforceTarget]) -> None:
    keys = [IdentityKey("deep_link_token", f"tok_{n}") for n in range(150)]
    items = [(a, CallContext("k")) for key in keys
             for a in (upsert(key, deep_link_prefix="p"), stage("customer", key))]
    results = await make().execute_many(items)
    assert all(not isinstance(r, Exception) for r in results)
    assert len(emulator.leads) == 150
    assert {lead["Status"] for lead in emulator.leads} == {"Deep Link Customer"}
    assert (emulator.counters["GET query"], emulator.counters["PATCH collections"]) == (1, 1)
    results = await make().execute_many(items)
    assert {r.summary for r in results} == {"lead unchanged"}  # type: ignore[union-attr]
    assert emulator.counters["PATCH collections"] == 1


def identified(token: str, email: str) -> UpsertContact:
    return UpsertContact(rule="r", identity=(IdentityKey("deep_link_token", token),
                                             IdentityKey("email", email)),
                         set={"first_name": "Ada"})


async def test_tokens_and_their_emails_are_read_with_one_or_query(
        emulator: SalesforceEmulator, make: Callable[..., SalesforceTarget]) -> None:
    """The batch query finds the Leads holding its tokens and the Leads holding their emails
    (`Token IN (...) OR Email IN (...)`): a new token whose email an older Lead holds goes
    the single path and lands on that Lead; the rest are one Collections upsert."""
    older = emulator.seed("Lead", LastName="Lee", Company="X", Email="P5@Example.com")
    known = emulator.seed("Lead", LastName="Kay", Company="X", Deep_Link_Token__c="tok_7",
                          Email="someone.else@example.com")
    items = [(identified(f"tok_{n}", f"p{n}@example.com"), CallContext("k")) for n in range(150)]
    results = await make().execute_many(items)
    assert all(not isinstance(r, Exception) for r in results), results
    by_token = {r["Deep_Link_Token__c"]: r["Id"] for r in emulator.leads}
    assert (len(by_token), by_token["tok_5"], by_token["tok_7"]) == (150, older, known)
    assert emulator.records["Lead"][older]["Email"] == "P5@Example.com"  # its own, kept
    # One batch query (150 tokens and their emails) and tok_5's own email query; before the
    # OR, a query per 100 tokens and another per 100 emails asked which emails Leads hold.
    assert emulator.counters["GET query"] == 2
    assert emulator.counters["PATCH collections"] == 1
    assert emulator.counters["malformed_queries"] == emulator.counters["too_long"] == 0
    assert await make().execute_many(items) == [
        Outcome(by_token[f"tok_{n}"], "lead unchanged") for n in range(150)]


async def test_long_values_split_the_batch_query_under_salesforce_s_uri_limit(
        emulator: SalesforceEmulator, make: Callable[..., SalesforceTarget]) -> None:
    """100 tokens of 200 characters with 60-character emails would make a 30 KB query URL,
    which Salesforce (and the emulator) refuses with 414: the batch reads in parts instead."""
    items = [(identified(f"{n:03d}" + "t" * 197, f"{n:03d}" + "e" * 45 + "@example.com"),
              CallContext("k")) for n in range(100)]
    results = await make().execute_many(items)
    assert all(not isinstance(r, Exception) for r in results), results
    assert len(emulator.leads) == 100
    assert 2 <= emulator.counters["GET query"] <= 4
    assert emulator.counters["too_long"] == 0


async def test_the_emulator_refuses_a_query_uri_over_16_384_bytes(
        emulator: SalesforceEmulator, make: Callable[..., SalesforceTarget]) -> None:
    target = make()
    with pytest.raises(PermanentCRMError, match="414"):
        await target.api.query(soql.select_where(["Id"], "Lead", "Email",
                                                 [f"{n}" + "x" * 200 for n in range(100)]))
    assert emulator.counters["too_long"] == 1


async def test_one_refused_record_fails_only_its_own_actions(
        emulator: SalesforceEmulator, make: Callable[..., SalesforceTarget]) -> None:
    emulator.org.validation_rules.append(
        lambda sobject, r: "no" if r.get("Deep_Link_Token__c") == "tok_bad" else None)
    bad = IdentityKey("deep_link_token", "tok_bad")
    deal = CreateDeal(rule="r", identity=(TOKEN,), key="d1", title="Deal", stage="new")
    results = await make().execute_many([
        (upsert(), CallContext("a")), (upsert(bad), CallContext("b")),
        (stage("lead", bad), CallContext("c")), (deal, CallContext("d"))])
    assert [type(r).__name__ for r in results] == [
        "Outcome", "PermanentCRMError", "PermanentCRMError", "Outcome"]
    assert "FIELD_CUSTOM_VALIDATION_EXCEPTION: no" in str(results[1])


async def test_an_unknown_field_in_a_batch_fails_only_the_action_that_names_it(
        emulator: SalesforceEmulator, make: Callable[..., SalesforceTarget]) -> None:
    del emulator.org.objects["Lead"]["App_User_Id__c"]
    other = IdentityKey("deep_link_token", "tok_B2")
    results = await make().execute_many([(upsert(app_user_id="u1"), CallContext("a")),
                                         (upsert(other, deep_link_prefix="p"), CallContext("b"))])
    assert "INVALID_FIELD: No such column 'App_User_Id__c'" in str(results[0])
    assert isinstance(results[0], PermanentCRMError) and not isinstance(results[1], Exception)
    assert [lead["Deep_Link_Token__c"] for lead in emulator.leads] == ["tok_B2"]


async def test_after_a_retryable_failure_later_actions_on_that_person_wait(
        emulator: SalesforceEmulator, make: Callable[..., SalesforceTarget]) -> None:
    app, failed = emulator.app(), []

    async def first_create_fails(scope: Any, receive: Any, send: Any) -> None:
        if scope["method"] == "POST" and scope["path"].endswith("/sobjects/Lead/") \
                and not failed:
            failed.append(scope["path"])
            await send({"type": "http.response.start", "status": 503, "headers": []})
            await send({"type": "http.response.body", "body": b"[]"})
            return
        await app(scope, receive, send)

    email = IdentityKey("email", "ada@example.com")
    items = [(upsert(email, first_name="Ada"), CallContext("a")),
             (stage("customer", email), CallContext("b")),
             (upsert(deep_link_prefix="p"), CallContext("c"))]
    transport = httpx.ASGITransport(app=first_create_fails)
    async with httpx.AsyncClient(transport=transport) as flaky:
        results = await make(client=flaky).execute_many(items)
    assert [type(r).__name__ for r in results] == [
        "RetryableCRMError", "RetryableCRMError", "Outcome"]
    assert [lead.get("Email") for lead in emulator.leads] == [None]  # only the token's Lead


# -- Opportunities --------------------------------------------------------------------------

async def test_a_deal_is_one_opportunity_even_when_linkcrm_forgot_making_it(
        emulator: SalesforceEmulator, make: Callable[..., SalesforceTarget],
        tmp_path: Path, client: httpx.AsyncClient) -> None:
    deal = CreateDeal(rule="r", identity=(TOKEN,), key="referral-tok_A1",
                      title="Referral: tok_A1", stage="new", set={"referral_code": "RC1"})
    first = await make().execute(deal, CallContext("k"))
    assert first.created
    assert (await make().execute(deal, CallContext("k"))).summary == "opportunity exists"
    emulator.opportunities[0]["StageName"] = "Closed Won"  # a person moved it on
    forgetful = open_storage(f"sqlite:///{tmp_path / 'other.db'}")
    await forgetful.migrate()
    target = SalesforceTarget(client, instance_url=INSTANCE, credentials=ClientCredentials(
        emulator.client_id, emulator.client_secret), field_map=FIELD_MAP,
        identities=forgetful.identities, rate_limits=forgetful.rate_limits)
    assert (await target.execute(deal, CallContext("k"))).record_id == first.record_id
    await forgetful.close()
    (opportunity,) = emulator.opportunities
    assert opportunity == {**opportunity, "Name": "Referral: tok_A1", "StageName": "Closed Won",
                           "CloseDate": "2026-03-31", "Deep_Link_Token__c": "tok_A1",
                           "Referral_Code__c": "RC1", "Linkcrm_Deal_Key__c": "referral-tok_A1"}
    assert emulator.counters["PATCH by_external"] == 1


# -- values that a URL path would change ----------------------------------------------------

AWKWARD_VALUES = [".", "..", "a/b", "../Opportunity", "x?y=1#z", "50%25 off", "ünïcødé ✓",
                  "mail@acme.inc", "tok.json", "tok_plain-1"]


@pytest.mark.parametrize("path_values", ["decoded", "rerouted"])
async def test_any_token_or_deal_key_reaches_its_own_record_however_paths_are_read(
        path_values: str, storage: Storage) -> None:
    """A dot segment in a URL reaches another resource (`.`, `..`); how an encoded `/` or
    `%2E` is read depends on the server. So such values never travel in a path: each token
    makes exactly one Lead holding it, found and updated again, and each deal key one
    Opportunity, whichever way the org's front end reads paths."""
    emulator = SalesforceEmulator(path_values=path_values)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=emulator.app())) as client:
        target = SalesforceTarget(client, instance_url=INSTANCE, credentials=ClientCredentials(
            emulator.client_id, emulator.client_secret), field_map=FIELD_MAP,
            identities=storage.identities, rate_limits=storage.rate_limits,
            today=lambda: date(2026, 3, 1))
        for value in AWKWARD_VALUES:
            key = IdentityKey("deep_link_token", value)
            first = await target.execute(upsert(key), CallContext(f"{value}:1"))
            second = await target.execute(upsert(key, first_name="Ada"), CallContext(f"{value}:2"))
            assert first.created and second.record_id == first.record_id, value
            (lead,) = emulator.find("Lead", "Deep_Link_Token__c", value)
            assert (lead["Id"], lead["FirstName"]) == (first.record_id, "Ada"), value
            deal = CreateDeal(rule="r", identity=(key,), key=value, title="Referral")
            made = await target.execute(deal, CallContext(f"{value}:deal"))
            assert made.created, value
            (opportunity,) = emulator.find("Opportunity", "Linkcrm_Deal_Key__c", value)
            assert opportunity["Id"] == made.record_id
    assert len(emulator.leads) == len(emulator.opportunities) == len(AWKWARD_VALUES)
    assert emulator.schema_violations == []
    # Only the plain value went into a path: its Lead's create and update, its Opportunity.
    assert emulator.counters["PATCH by_external"] == 3


@pytest.mark.parametrize(("path_values", "expected"), [
    ("decoded", {"a%2Fb": (201, "a/b"), "%2E%2E": (201, ".."), "%2E": (201, "."),
                 "x.inc": (404, None)}),
    ("rerouted", {"a%2Fb": (404, None), "%2E%2E": (405, None), "%2E": (404, None),
                  "x.inc": (404, None)}),
])
async def test_the_emulator_reads_encoded_path_values_as_its_switch_says(
        path_values: str, expected: dict[str, tuple[int, str | None]]) -> None:
    emulator = SalesforceEmulator(path_values=path_values)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=emulator.app()),
                                 base_url=INSTANCE) as client:
        token = (await client.post("/services/oauth2/token", data={
            "grant_type": "client_credentials", "client_id": emulator.client_id,
            "client_secret": emulator.client_secret})).json()["access_token"]
        for raw, (status, stored) in expected.items():
            answer = await client.patch(
                f"/services/data/v62.0/sobjects/Lead/Deep_Link_Token__c/{raw}",
                json={"LastName": "A", "Company": "B"},
                headers={"Authorization": f"Bearer {token}"})
            assert answer.status_code == status, (raw, answer.text)
            if stored is not None:
                assert emulator.find("Lead", "Deep_Link_Token__c", stored), raw
    assert len(emulator.leads) == sum(stored is not None for _, stored in expected.values())


def test_a_path_segment_is_encoded_and_dot_segments_are_refused() -> None:
    assert path_segment("a/b?c#d%e f") == "a%2Fb%3Fc%23d%25e%20f"
    assert path_segment("ü") == "%C3%BC"
    assert path_segment("a.b") == "a.b"
    for value in (".", "..", "", "x\ud800"):
        with pytest.raises(ValueError, match="path segment"):
            path_segment(value)


def test_request_schemas_are_valid_draft_2020_12_schemas() -> None:
    paths = sorted((TESTS / "emulators" / "schemas" / "salesforce").glob("*.json"))
    assert {p.stem for p in paths} >= {"lead_write", "opportunity_write", "collections_upsert",
                                       "oauth_client_credentials", "oauth_jwt_bearer"}
    for path in paths:
        schema = json.loads(path.read_text(encoding="utf-8"))
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        Draft202012Validator.check_schema(schema)
