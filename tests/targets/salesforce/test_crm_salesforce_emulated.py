"""The Salesforce adapter over real HTTP against the emulator: the shipped story, auth, faults."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import date
from typing import Any

import httpx
import pytest

from engine.actions import Action, CreateDeal, IdentityKey, UpsertContact
from engine.errors import CRMError, PermanentCRMError, RetryableCRMError
from engine.rules.evaluator import plan
from engine.rules.files import load_ruleset
from engine.storage import Storage
from engine.targets.base import CallContext, Outcome
from engine.targets.salesforce.auth import ClientCredentials, Credentials, JwtBearer
from engine.targets.salesforce.target import SalesforceTarget
from engine.worker.retrying import RetryPolicy, call_with_retries
from tests.emulators.salesforce import SalesforceEmulator
from tests.emulators.salesforce_oauth import new_rsa_key, public_key_of
from tests.emulators.server import serve
from tests.support.identity_maps import InFlight, KeyOverlaps
from tests.support.paths import REPO

pytestmark = pytest.mark.anyio
RULES = load_ruleset([REPO / "rules"])
FAST = RetryPolicy(base=0.002, cap=0.02, max_attempts=40)
PEM = new_rsa_key()


def story(token: str, email: str = "ada@example.com") -> list[dict[str, Any]]:
    """The shipped rules' story for one person: install, referral sign-up, conversion, identify."""
    return [
        {"event": "install.tracked", "timestamp": "2026-03-01T09:30:00Z",
         "data": {"token": token, "prefix": "invite", "campaign": "spring", "platform": "iOS"}},
        {"event": "referral.created", "timestamp": "2026-03-02T10:00:00Z",
         "data": {"token": token, "referrer_token": "ref_grace", "referred_user_id": "u_42"}},
        {"event": "referral.completed", "timestamp": "2026-03-05T12:00:00Z",
         "data": {"token": token, "referrer_token": "ref_grace"}},
        {"event": "app.user_identified", "timestamp": "2026-03-06T08:00:00Z",
         "data": {"token": token, "email": f" {email.upper()} ", "first_name": "Ada",
                  "last_name": "Lovelace", "user_id": "u_42"}},
    ]


def actions_of(event: dict[str, Any]) -> list[tuple[Action, CallContext]]:
    result = plan(event, RULES)
    assert result.failures == ()
    return [(action, CallContext(f"{event['event']}:{action.rule}:{n}"))
            for n, action in enumerate(result.actions)]


@pytest.fixture(scope="module")
def emulator_url() -> Iterator[tuple[SalesforceEmulator, str]]:
    emulator = SalesforceEmulator(jwt_public_key=public_key_of(PEM))
    with serve(emulator.app()) as url:
        yield emulator, url


@pytest.fixture
def emulator(emulator_url: tuple[SalesforceEmulator, str]) -> Iterator[SalesforceEmulator]:
    emulator = emulator_url[0]
    emulator.records = {"Lead": {}, "Opportunity": {}}
    emulator.counters.clear()
    emulator.api_usage, emulator.api_limit, emulator.token_lifetime = 0, 100_000, 7200.0
    emulator.clock = time.monotonic
    yield emulator
    assert emulator.schema_violations == []


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=5.0) as opened:
        yield opened


@pytest.fixture
def make(emulator: SalesforceEmulator, storage: Storage,
         client: httpx.AsyncClient) -> Callable[..., SalesforceTarget]:
    def build(url: str = "", credentials: Credentials | None = None,
              **options: Any) -> SalesforceTarget:
        return SalesforceTarget(
            client, instance_url=url, credentials=credentials or ClientCredentials(
                emulator.client_id, emulator.client_secret),
            field_map=RULES.field_map, identities=storage.identities,
            rate_limits=storage.rate_limits,
            today=lambda: date(2026, 3, 6), requests_per_second=10_000.0,
            limit_backoff=0.01, **options)

    return build


@pytest.fixture
def url(emulator_url: tuple[SalesforceEmulator, str]) -> str:
    return emulator_url[1]


def jwt(emulator: SalesforceEmulator, username: str = "") -> JwtBearer:
    return JwtBearer(emulator.client_id, username or emulator.jwt_username, PEM)


def assert_story_landed(emulator: SalesforceEmulator, token: str,
                        email: str = "ada@example.com") -> None:
    (lead,) = emulator.find("Lead", "Deep_Link_Token__c", token)
    assert {k: lead.get(k) for k in (
        "Deep_Link_Prefix__c", "Deep_Link_Campaign__c", "Deep_Link_Platform__c",
        "Install_Date__c", "Referral_Source__c", "Referral_Date__c", "App_User_Id__c",
        "Conversion_Date__c", "Email", "FirstName", "LastName", "Company", "LeadSource",
        "Status")} == {
        "Deep_Link_Prefix__c": "invite", "Deep_Link_Campaign__c": "spring",
        "Deep_Link_Platform__c": "ios", "Install_Date__c": "2026-03-01",
        "Referral_Source__c": "ref_grace", "Referral_Date__c": "2026-03-02",
        "App_User_Id__c": "u_42", "Conversion_Date__c": "2026-03-05", "Email": email,
        "FirstName": "Ada", "LastName": "Lovelace", "Company": "Unknown",
        "LeadSource": "Deep Link", "Status": "Deep Link Customer"}
    (opportunity,) = emulator.find("Opportunity", "Linkcrm_Deal_Key__c", f"referral-{token}")
    assert (opportunity["Name"], opportunity["StageName"], opportunity["CloseDate"],
            opportunity["Deep_Link_Token__c"]) == (f"Referral: {token}", "Prospecting",
                                                   "2026-04-05", token)


@pytest.mark.parametrize(("flow", "batched"), [("client_credentials", False),
                                               ("jwt_bearer", False),
                                               ("client_credentials", True)])
async def test_the_shipped_story_makes_one_lead_and_one_opportunity(
        emulator: SalesforceEmulator, make: Callable[..., SalesforceTarget], url: str,
        flow: str, batched: bool) -> None:
    target = make(url, jwt(emulator) if flow == "jwt_bearer" else None)
    for event in story("tok_story"):
        items = actions_of(event)
        if batched:
            results = await target.execute_many(items)
            assert all(isinstance(r, Outcome) for r in results), results
        else:
            for action, key in items:
                await target.execute(action, CallContext(key))
    assert_story_landed(emulator, "tok_story")
    assert len(emulator.leads) == len(emulator.opportunities) == 1
    assert emulator.counters["token_issued"] == 1
    if batched:
        assert emulator.counters["PATCH collections"] >= 3


@pytest.mark.parametrize("how", ["expired", "revoked"])
async def test_an_expired_session_mid_run_costs_one_refresh_and_no_failure(
        emulator: SalesforceEmulator, make: Callable[..., SalesforceTarget], url: str,
        how: str) -> None:
    now = [0.0]
    emulator.clock, emulator.token_lifetime = (lambda: now[0]), 900.0
    target = make(url)
    events = story("tok_expiry")
    for action, key in actions_of(events[0]) + actions_of(events[1]):
        await target.execute(action, CallContext(key))
    if how == "expired":
        now[0] += 901  # the org's session timeout passed
    else:
        emulator.revoke_all()  # an admin ended every session
    for event in events[2:]:
        for action, key in actions_of(event):
            await target.execute(action, CallContext(key))
    assert_story_landed(emulator, "tok_expiry")
    assert (emulator.counters["token_issued"], emulator.counters["unauthorized"]) == (2, 1)


async def test_a_jwt_for_a_user_who_has_not_approved_the_app_is_permanent(
        emulator: SalesforceEmulator, make: Callable[..., SalesforceTarget], url: str) -> None:
    action = UpsertContact(rule="r", identity=(IdentityKey("deep_link_token", "t"),))
    with pytest.raises(PermanentCRMError, match="invalid_grant: user hasn't approved"):
        await make(url, jwt(emulator, "someone@else.com")).execute(action, CallContext("k"))


@pytest.mark.parametrize(("setup", "expected"), [
    ("duplicates", "2 Lead records hold the same Deep_Link_Token__c"),
    ("not_external", "404: NOT_FOUND: The requested resource does not exist: "
                     "Deep_Link_Token__c is not an External ID"),
    ("validation", "400: FIELD_CUSTOM_VALIDATION_EXCEPTION: Campaign is closed"),
])
async def test_refusals_are_permanent_and_carry_salesforce_s_message(
        emulator: SalesforceEmulator, make: Callable[..., SalesforceTarget], url: str,
        setup: str, expected: str) -> None:
    lead_fields = emulator.org.objects["Lead"]
    if setup == "duplicates":
        for _ in range(2):
            emulator.seed("Lead", LastName="X", Company="Y", Deep_Link_Token__c="tok_bad")
    elif setup == "not_external":
        lead_fields["Deep_Link_Token__c"].external_id = False
    else:
        emulator.org.validation_rules.append(
            lambda sobject, r: "Campaign is closed"
            if r.get("Deep_Link_Campaign__c") == "spring" else None)
    try:
        with pytest.raises(PermanentCRMError, match=expected):
            for action, key in actions_of(story("tok_bad")[0]):
                await make(url).execute(action, CallContext(key))
    finally:
        lead_fields["Deep_Link_Token__c"].external_id = True
        emulator.org.validation_rules.clear()


async def test_an_exhausted_allocation_backs_off_and_then_goes_through(
        emulator: SalesforceEmulator, make: Callable[..., SalesforceTarget], url: str) -> None:
    emulator.api_limit = emulator.api_usage = 1000
    target = make(url, usage_window=1.0)  # near the end: 1 s / 1000 requests between requests
    (action, key), *_ = actions_of(story("tok_limit")[0])
    with pytest.raises(RetryableCRMError, match="403: REQUEST_LIMIT_EXCEEDED"):
        await target.execute(action, CallContext(key))
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        emulator.api_usage = 0  # the rolling 24 hours moved on

    await call_with_retries(lambda: target.execute(action, CallContext(key)), FAST, sleep)
    assert waits and len(emulator.leads) == 1


@pytest.mark.slow
async def test_with_20_percent_faults_every_event_lands_once(
        emulator: SalesforceEmulator, make: Callable[..., SalesforceTarget]) -> None:
    faulty = emulator.faulty(0.2, seed=11, slow_seconds=0.05)
    people = 50  # x 4 events = 200 events
    with serve(faulty) as faulty_url:
        target = make(faulty_url)

        async def single(items: list[tuple[Action, CallContext]]) -> None:
            for action, context in items:
                await call_with_retries(lambda a=action, c=context: target.execute(a, c), FAST)

        async def batched(items: list[tuple[Action, CallContext]]) -> None:
            pending = items
            for _ in range(FAST.max_attempts):
                results = await target.execute_many(pending)
                assert not any(isinstance(r, PermanentCRMError) for r in results), results
                pending = [item for item, r in zip(pending, results, strict=True)
                           if isinstance(r, CRMError)]
                if not pending:
                    return
                await asyncio.sleep(FAST.delay(1))
            raise AssertionError(f"still failing: {pending}")

        async def person(n: int) -> None:
            for event in story(f"tok_{n:03d}", f"person{n}@example.com"):
                await (batched if n % 2 else single)(actions_of(event))

        await asyncio.gather(*(person(n) for n in range(people)))
    assert set(faulty.injected) == {"server_error", "too_many", "slow", "drop_before",
                                    "drop_after_commit"}
    assert len(emulator.leads) == len(emulator.opportunities) == people
    for n in range(people):
        assert_story_landed(emulator, f"tok_{n:03d}", f"person{n}@example.com")


async def test_the_emulator_answers_as_strictly_as_salesforce(
        emulator: SalesforceEmulator, client: httpx.AsyncClient, url: str) -> None:
    form = {"grant_type": "client_credentials", "client_id": emulator.client_id}
    refused = await client.post(f"{url}/services/oauth2/token",
                                data={**form, "client_secret": "nope"})
    assert (refused.status_code, refused.json()["error"]) == (400, "invalid_client")
    token = (await client.post(f"{url}/services/oauth2/token", data={
        **form, "client_secret": emulator.client_secret})).json()["access_token"]
    api = f"{url}/services/data/v62.0"
    auth = {"Authorization": f"Bearer {token}"}
    checks: list[tuple[str, str, Any, int, str]] = [
        ("GET", "/sobjects/Lead/describe", None, 401, "INVALID_SESSION_ID"),
        ("GET", "/no/such/resource", None, 404, "NOT_FOUND"),
        ("PUT", "/sobjects/Lead/00Q1", {}, 405, "METHOD_NOT_ALLOWED"),
        ("POST", "/sobjects/Opportunity/", {"Amount": 5}, 400, "REQUIRED_FIELD_MISSING"),
        ("PATCH", "/sobjects/Lead/Email/a@b.co", {"Company": "X"}, 404, "NOT_FOUND"),
        ("PATCH", "/sobjects/Lead/Deep_Link_Token__c/t1", {"Bogus__c": "x"}, 400,
         "INVALID_FIELD"),
        ("PATCH", "/sobjects/Lead/Deep_Link_Token__c/t1", {"LastName": "A", "Company": "B",
                                                          "Status": "Closed - Converted"},
         400, "FIELD_INTEGRITY_EXCEPTION"),
        ("PATCH", "/sobjects/Lead/Deep_Link_Token__c/t1", {"LastName": "A", "Company": "B",
                                                          "Install_Date__c": "03/01/2026"},
         400, "JSON_PARSER_ERROR"),
        ("GET", "/query/?q=SELECT Id FROM Lead WHERE Email = 'a\\x'", None, 400,
         "MALFORMED_QUERY"),
        ("GET", "/query/?q=SELECT Id FROM Lead WHERE Email = 'a' OR Email = 'b' AND Id = 'c'",
         None, 400, "MALFORMED_QUERY"),
        ("PATCH", "/composite/sobjects/Lead/Deep_Link_Token__c", {"records": [
            {"attributes": {"type": "Lead"}, "Deep_Link_Token__c": str(n)}
            for n in range(201)]}, 400, "JSON_PARSER_ERROR"),
    ]
    for method, path, body, status, code in checks:
        headers = {} if code == "INVALID_SESSION_ID" else auth
        answer = await client.request(method, api + path, json=body, headers=headers)
        assert (answer.status_code, answer.json()[0]["errorCode"]) == (status, code), path
        if status not in (404, 405):  # routing answers come before the API layer
            assert answer.headers["sforce-limit-info"].startswith("api-usage=")
    assert len(emulator.schema_violations) == 2  # the US date and the 201-record collection
    emulator.schema_violations.clear()
    create = await client.patch(f"{url}/services/data/v45.0/sobjects/Lead/Deep_Link_Token__c/t2",
                                json={"LastName": "A", "Company": "B"}, headers=auth)
    update = await client.patch(f"{url}/services/data/v45.0/sobjects/Lead/Deep_Link_Token__c/t2",
                                json={"Company": "C"}, headers=auth)
    assert (create.status_code, update.status_code, update.content) == (201, 204, b"")


async def test_the_token_endpoint_takes_client_credentials_in_the_form_or_as_http_basic(
        emulator: SalesforceEmulator, client: httpx.AsyncClient, url: str) -> None:
    """RFC 6749 §2.3.1: Salesforce accepts the client's id and secret either in the form body
    (what linkcrm sends) or as HTTP Basic authentication (what other clients send)."""
    token_url = f"{url}/services/oauth2/token"
    grant = {"grant_type": "client_credentials"}
    secret, client_id = emulator.client_secret, emulator.client_id
    in_form = await client.post(token_url, data={**grant, "client_id": client_id,
                                                 "client_secret": secret})
    as_basic = await client.post(token_url, data=grant, auth=(client_id, secret))
    with_id_too = await client.post(token_url, data={**grant, "client_id": client_id},
                                    auth=(client_id, secret))
    for answer in (in_form, as_basic, with_id_too):
        assert answer.status_code == 200, answer.text
        token = answer.json()["access_token"]
        described = await client.get(f"{url}/services/data/v62.0/sobjects/Lead/describe",
                                     headers={"Authorization": f"Bearer {token}"})
        assert described.status_code == 200
    refusals = [
        (await client.post(token_url, data=grant, auth=(client_id, "wrong")), "invalid_client"),
        (await client.post(token_url, data={**grant, "client_id": "other"},
                           auth=(client_id, secret)), "invalid_client"),
        (await client.post(token_url, data={**grant, "client_secret": secret},
                           auth=(client_id, secret)), "invalid_request"),
        (await client.post(token_url, data=grant, headers={"Authorization": "Basic !!"}),
         "invalid_client"),
        (await client.post(token_url, data=grant), "invalid_request"),
    ]
    assert [(r.status_code, r.json()["error"]) for r, _ in refusals] == [
        (400, code) for _, code in refusals]
    emulator.schema_violations.clear()  # the last one lacks the client's credentials


async def test_a_batch_of_deals_is_one_query_and_one_collections_upsert(
        emulator: SalesforceEmulator, make: Callable[..., SalesforceTarget], url: str) -> None:
    """Opportunities queue like Leads: the missing ones are read with one SOQL query and made
    with one Collections upsert; one that exists is found, not rewritten; one deal key twice
    in a batch is made once."""
    target = make(url)
    existing = emulator.seed("Opportunity", Name="Renamed by sales", StageName="Closed Won",
                             CloseDate="2026-01-01", Linkcrm_Deal_Key__c="referral-tok_0")
    converted = [actions_of(story(f"tok_{n}")[2]) for n in range(4)]
    deals = [item for items in converted for item in items
             if isinstance(item[0], CreateDeal)]
    await target.start()
    emulator.counters.clear()
    results = await target.execute_many([*deals, deals[1]])
    assert all(isinstance(r, Outcome) for r in results), results
    assert emulator.counters["requests"] == 2  # one query, one upsert of the three missing
    assert emulator.counters["collection_records"] == 3
    assert [r.record_id for r in results][0] == existing
    assert results[4] == results[1] and results[1].created
    assert emulator.records["Opportunity"][existing]["Name"] == "Renamed by sales"
    assert len(emulator.opportunities) == 4



async def test_a_batch_binds_its_records_in_the_identity_map_together(
        emulator: SalesforceEmulator, storage: Storage, client: httpx.AsyncClient,
        url: str) -> None:
    """A batch's identity-map binds go in one write, not one call each (each would wait for
    a commit of its own, or be a task of its own: most of a 200-record batch's time), and
    every key is bound."""
    identities = InFlight(storage.identities)
    target = SalesforceTarget(
        client, instance_url=url, credentials=ClientCredentials(emulator.client_id,
                                                                emulator.client_secret),
        field_map=RULES.field_map, identities=identities, rate_limits=storage.rate_limits,
        today=lambda: date(2026, 3, 6), requests_per_second=10_000.0)
    await target.start()
    installs = [item for n in range(20) for item in actions_of(story(f"tok_{n}")[0])]
    results = await target.execute_many(installs)
    assert all(isinstance(r, Outcome) for r in results), results
    assert len({r.record_id for r in results if isinstance(r, Outcome)}) == 20
    assert identities.calls.count("bind_identities") == 1
    assert "bind_identity" not in identities.calls
    deals = [item for n in range(20) for item in actions_of(story(f"tok_{n}")[2])
             if isinstance(item[0], CreateDeal)]
    identities.peak, identities.calls = 0, []
    made = await target.execute_many(deals)
    assert all(isinstance(r, Outcome) and r.created for r in made), made
    assert identities.peak >= 20  # the lookups start together
    assert identities.calls.count("bind_deals") == 1 and "bind_deal" not in identities.calls
    for (action, _), result in zip(installs, results, strict=True):
        assert isinstance(result, Outcome)
        assert await storage.identities.lookup_identity("salesforce", action.identity[:1]) == \
            result.record_id
    for n, deal in enumerate(made):
        assert await storage.identities.lookup_deal("salesforce", f"referral-tok_{n}") == \
            deal.record_id


@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)
async def test_two_leads_sharing_an_email_in_one_batch_map_it_to_the_later(
        emulator: SalesforceEmulator, storage: Storage, client: httpx.AsyncClient,
        url: str) -> None:
    """The batch's bindings go in one write, in order; the email the earlier Lead won is then
    rebound to the later one, so it ends up mapped to the later Lead, as when they went one
    by one (on PostgreSQL, two binds of one key at once could leave either)."""
    identities = KeyOverlaps(storage.identities)
    target = SalesforceTarget(
        client, instance_url=url, credentials=ClientCredentials(emulator.client_id,
                                                                emulator.client_secret),
        field_map=RULES.field_map, identities=identities,
        rate_limits=storage.rate_limits, today=lambda: date(2026, 3, 6),
        requests_per_second=10_000.0)
    await target.start()
    calls = [*actions_of(story("tok_a", "shared@example.com")[3]),
             *actions_of(story("tok_b", "shared@example.com")[3])]
    results = await target.execute_many(calls)
    assert all(isinstance(r, Outcome) for r in results), results
    later = results[-1]
    assert isinstance(later, Outcome)
    email = IdentityKey("email", "shared@example.com")
    assert await storage.identities.lookup_identity("salesforce", [email]) == later.record_id
    assert identities.overlaps == 0
    assert "bind_identity" not in identities.calls
    assert identities.calls.count("rebind_identity") == 1  # the email, to the later Lead
