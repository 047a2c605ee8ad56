"""HubSpot target, fast cases: in-process through httpx.ASGITransport to the emulator, and
httpx.MockTransport where a precise sequence of answers is the point."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest

from engine.actions import CreateDeal, IdentityKey, SetStage, UpsertContact
from engine.config.fieldmap import FieldMap, load_field_map
from engine.errors import PermanentCRMError, RetryableCRMError
from engine.storage import Storage
from engine.targets.base import CallContext
from engine.targets.hubspot.admin import doctor, provision
from engine.targets.hubspot.api import HubSpotAPI, existing_id, hubspot_message
from engine.targets.hubspot.target import HubSpotTarget
from engine.targets.pacing import Pacer, window_pacer
from tests.emulators.hubspot import create_hubspot_emulator, too_many
from tests.emulators.hubspot_state import HubSpotState
from tests.support.identity_maps import Recording
from tests.support.paths import REPO

ROOT = REPO
TOKEN = "pat-na1-test"
BASE = "http://hubspot.test"
TOK = (IdentityKey("deep_link_token", "tok_ada"),)

pytestmark = pytest.mark.anyio



@pytest.fixture
def field_map() -> FieldMap:
    return load_field_map(ROOT / "rules" / "fields.yaml")


Emulator = tuple[Any, HubSpotState, httpx.AsyncClient]


@pytest.fixture
async def emulator(field_map: FieldMap) -> AsyncIterator[Emulator]:
    app, state = create_hubspot_emulator(TOKEN)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE) as client:
        await provision(client, TOKEN, field_map, base_url=BASE)
        yield app, state, client


def make_target(client: httpx.AsyncClient, field_map: FieldMap, storage: Storage,
                **options: Any) -> HubSpotTarget:
    return HubSpotTarget(client, TOKEN, field_map, storage.identities, storage.rate_limits,
                         base_url=BASE, **options)


def only_contact(state: HubSpotState) -> dict[str, str]:
    assert len(state.contacts.records) == 1
    return next(iter(state.contacts.records.values())).properties


# -- pure pieces ----------------------------------------------------------------------------


def test_existing_id_reads_both_409_formats() -> None:
    legacy = {"status": "error", "message": "Contact already exists. Existing ID: 37765128953",
              "correlationId": "c", "category": "CONFLICT"}
    newer = {"message": "Contact already exists. Existing ID: 2926551",
             "identityProfile": {"vid": 2926551}, "category": "OBJECT_ALREADY_EXISTS",
             "errors": [{"message": "A contact with email a@b.co already exists. Existing ID: "
                                    "2926551", "in": "email"}], "error": "CONTACT_EXISTS"}
    assert existing_id(legacy) == "37765128953"
    assert existing_id(newer) == "2926551"
    assert existing_id({"identityProfile": {"vid": 7}, "message": "exists"}) == "7"
    assert existing_id({"message": "Property values were not valid"}) is None


def test_hubspot_message_keeps_category_message_and_correlation_id() -> None:
    text = hubspot_message({"category": "VALIDATION_ERROR", "message": "bad", "correlationId": "x",
                            "errors": [{"message": "Property \"foo\" does not exist"}]})
    assert text == 'VALIDATION_ERROR: bad: Property "foo" does not exist (correlationId x)'


def test_hubspot_message_masks_email_addresses() -> None:
    text = hubspot_message({"message": "Contact already exists. Existing ID: 7", "errors": [
        {"message": "A contact with email ada.l@example.co.uk already exists. Existing ID: 7"}]})
    assert "example" not in text and "<email>" in text and "Existing ID: 7" in text


# -- the emulator's own strictness ----------------------------------------------------------


async def test_emulator_refuses_a_wrong_token_with_hubspots_body(emulator: Emulator) -> None:
    _, state, client = emulator
    response = await client.get("/crm/v3/properties/contacts",
                                headers={"Authorization": "Bearer wrong"})
    assert response.status_code == 401
    assert response.json()["category"] == "INVALID_AUTHENTICATION"


async def test_emulator_validates_every_body_against_the_request_schema(
        emulator: Emulator) -> None:
    _, state, client = emulator
    auth = {"Authorization": f"Bearer {TOKEN}"}
    response = await client.post("/crm/v3/objects/contacts/batch/upsert", headers=auth, json={
        "inputs": [{"id": "t", "idProperty": "deep_link_token",
                    "properties": {"install_date": 1700000000000}}]})
    assert response.status_code == 400
    assert "is not of type 'string'" in response.json()["message"]
    response = await client.post("/crm/v3/objects/contacts/batch/upsert", headers=auth, json={
        "inputs": [{"id": "t", "idProperty": "firstname", "properties": {}}]})
    assert response.status_code == 400
    assert "non-unique 0-1 property firstname" in response.json()["message"]
    assert not state.contacts.records


async def test_emulator_ignores_a_backwards_lifecycle_stage(emulator: Emulator) -> None:
    _, state, client = emulator
    auth = {"Authorization": f"Bearer {TOKEN}"}
    for stage in ("customer", "lead"):
        response = await client.post("/crm/v3/objects/contacts/batch/upsert", headers=auth,
                                     json={"inputs": [{"id": "t", "idProperty": "deep_link_token",
                                                       "properties": {"lifecyclestage": stage}}]})
        assert response.status_code == 200
    assert only_contact(state)["lifecyclestage"] == "customer"


async def test_emulator_answers_207_for_one_bad_input(emulator: Emulator) -> None:
    _, state, client = emulator
    auth = {"Authorization": f"Bearer {TOKEN}"}
    response = await client.post("/crm/v3/objects/contacts/batch/upsert", headers=auth, json={
        "inputs": [{"id": "a", "idProperty": "deep_link_token", "properties": {}},
                   {"id": "b", "idProperty": "deep_link_token", "properties": {"nope": "x"}}]})
    body = response.json()
    assert response.status_code == 207
    assert body["numErrors"] == 1 and "PROPERTY_DOESNT_EXIST" in body["errors"][0]["message"]
    assert [r["properties"]["deep_link_token"] for r in body["results"]] == ["a"]


# -- contacts -------------------------------------------------------------------------------


async def test_set_once_keeps_the_first_value_and_stages_only_move_forward(
        emulator: Emulator, field_map: FieldMap, storage: Storage) -> None:
    _, state, client = emulator
    target = make_target(client, field_map, storage)
    first = await target.execute(UpsertContact("r", TOK, set_once={
        "first_touch_campaign": "spring", "install_date": "2026-03-01"}), CallContext("k1"))
    assert first.created and first.record_id
    await target.execute(UpsertContact("r", TOK, set_once={
        "first_touch_campaign": "autumn", "install_date": "2026-09-01"}), CallContext("k2"))
    await target.execute(SetStage("r", TOK, stage="customer"), CallContext("k3"))
    writes = state.requests["POST /crm/v3/objects/contacts/batch/upsert"]
    back = await target.execute(SetStage("r", TOK, stage="lead"), CallContext("k4"))
    contact = only_contact(state)
    assert contact["first_touch_campaign"] == "spring"
    assert contact["install_date"] == "2026-03-01"
    assert contact["lifecyclestage"] == "customer"
    assert "stays customer" in back.summary
    # Nothing left to write, so nothing was sent after the read.
    assert state.requests["POST /crm/v3/objects/contacts/batch/upsert"] == writes
    assert await storage.identities.lookup_identity("hubspot", list(TOK)) == first.record_id


async def test_a_stale_mapping_of_the_token_is_replaced_in_one_write(
        emulator: Emulator, field_map: FieldMap, storage: Storage) -> None:
    """The identity map still names a merged-away contact for the token; HubSpot's unique
    property says which contact holds it now, and the map is rebound to that one in one
    atomic write: never unbound first, which would leave a moment with no mapping."""
    _, state, client = emulator
    assert await storage.identities.bind_identity("hubspot", TOK[0], "999") == "999"
    identities = Recording(storage.identities)
    target = HubSpotTarget(client, TOKEN, field_map, identities, storage.rate_limits,
                           base_url=BASE)
    outcome = await target.execute(UpsertContact("r", TOK, set={"deep_link_prefix": "x"}), "k")
    assert outcome.record_id == next(iter(state.contacts.records))
    assert await storage.identities.lookup_identity("hubspot", list(TOK)) == outcome.record_id
    assert identities.calls.count("rebind_identity") == 1
    assert "unbind_identity" not in identities.calls


async def test_a_contact_known_only_by_email_is_upserted_by_email(
        emulator: Emulator, field_map: FieldMap, storage: Storage) -> None:
    _, state, client = emulator
    target = make_target(client, field_map, storage)
    first = await target.execute(UpsertContact(
        "app-identifies-user", (IdentityKey("email", "ada@example.com"),),
        set={"email": "ada@example.com", "first_name": "Ada"}), CallContext("k1"))
    again = await target.execute(UpsertContact(
        "app-identifies-user", (IdentityKey("email", "Ada@Example.com"),),
        set={"last_name": "Lovelace"}), CallContext("k2"))
    assert first.created and again.record_id == first.record_id
    contact = only_contact(state)
    assert (contact["email"], contact["firstname"], contact["lastname"]) == (
        "ada@example.com", "Ada", "Lovelace")


@pytest.mark.parametrize("conflict_format", ["legacy", "identity_profile"])
async def test_a_409_updates_the_contact_that_holds_the_email(
        conflict_format: str, emulator: Emulator, field_map: FieldMap,
        storage: Storage) -> None:
    _, state, client = emulator
    state.conflict_format = conflict_format
    holder = state.create(state.contacts, {"email": "ada@example.com",
                                           "lifecyclestage": "lead"})
    target = make_target(client, field_map, storage)
    identity = (*TOK, IdentityKey("email", "ada@example.com"))
    outcome = await target.execute(UpsertContact("app-identifies-user", identity, set={
        "email": "ada@example.com", "first_name": "Ada"}), CallContext("k"))
    assert outcome.record_id == holder.id
    contact = only_contact(state)
    assert contact["deep_link_token"] == "tok_ada" and contact["firstname"] == "Ada"
    assert await storage.identities.lookup_identity("hubspot", list(TOK)) == holder.id


@pytest.mark.parametrize("conflict_format", ["legacy", "identity_profile"])
async def test_a_409_on_create_by_a_non_unique_key_updates_the_existing_contact(
        conflict_format: str, emulator: Emulator, field_map: FieldMap,
        storage: Storage) -> None:
    _, state, client = emulator
    state.conflict_format = conflict_format
    holder = state.create(state.contacts, {"email": "ada@example.com"})
    target = make_target(client, field_map, storage)
    outcome = await target.execute(UpsertContact(
        "r", (IdentityKey("app_user_id", "user_1"),),
        set={"email": "ada@example.com", "app_user_id": "user_1"}), CallContext("k"))
    assert outcome.record_id == holder.id
    assert only_contact(state)["app_user_id"] == "user_1"
    assert state.requests["POST /crm/v3/objects/contacts/search"] == 1
    assert state.requests["POST /crm/v3/objects/contacts"] == 1
    # Next time the identity map knows the contact: no search, no create.
    await target.execute(UpsertContact("r", (IdentityKey("app_user_id", "user_1"),),
                                       set={"first_name": "Ada"}), CallContext("k2"))
    assert state.requests["POST /crm/v3/objects/contacts/search"] == 1
    assert only_contact(state)["firstname"] == "Ada"


async def test_an_unknown_property_is_permanent_with_hubspots_message_and_alone(
        emulator: Emulator, field_map: FieldMap, storage: Storage) -> None:
    _, state, client = emulator
    del state.contacts.properties["referral_source"]  # mapped, but missing in this account
    target = make_target(client, field_map, storage)
    bob = (IdentityKey("deep_link_token", "tok_bob"),)
    results = await target.execute_many([
        (UpsertContact("r", TOK, set={"deep_link_prefix": "invite"}), CallContext("k1")),
        (UpsertContact("referral-signup", bob, set={"referral_source": "tok_ada"}),
         CallContext("k2")),
    ])
    assert not isinstance(results[0], Exception)
    error = results[1]
    assert isinstance(error, PermanentCRMError)
    assert "PROPERTY_DOESNT_EXIST" in str(error) and "referral_source" in str(error)
    assert [r.properties["deep_link_token"] for r in state.contacts.records.values()] == [
        "tok_ada"]


async def test_a_whole_batch_400_is_split_so_only_the_bad_input_fails(
        field_map: FieldMap, storage: Storage) -> None:
    # Real HubSpot may refuse a whole batch for one bad input: only that one may fail.
    async def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        if request.url.path.endswith("/batch/read"):
            return httpx.Response(207, json={"status": "COMPLETE", "results": [], "errors": [
                {"category": "OBJECT_NOT_FOUND", "message": "not found"}]})
        inputs = body["inputs"]
        if any("nope" in i["properties"] for i in inputs):
            return httpx.Response(400, json={"status": "error", "category": "VALIDATION_ERROR",
                                             "message": 'Property "nope" does not exist'})
        return httpx.Response(200, json={"status": "COMPLETE", "results": [
            {"id": str(n), "properties": i["properties"], "new": True}
            for n, i in enumerate(inputs, 1)]})

    field_map.fields["referral_source"].crm["hubspot"] = type(
        field_map.fields["referral_source"].crm["hubspot"])("nope")
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        target = make_target(client, field_map, storage)
        results = await target.execute_many([
            (UpsertContact("r", (IdentityKey("deep_link_token", f"t{n}"),),
                           set_once={"referral_source": "x"} if n == 2 else {
                               "first_touch_campaign": "c"}), CallContext(f"k{n}"))
        for n in range(4)])
    assert [type(r).__name__ for r in results] == ["Outcome", "Outcome",
                                                   "PermanentCRMError", "Outcome"]
    assert 'Property "nope" does not exist' in str(results[2])


async def test_execute_many_merges_per_contact_and_batches_by_100(
        emulator: Emulator, field_map: FieldMap, storage: Storage) -> None:
    _, state, client = emulator
    target = make_target(client, field_map, storage)
    items: list[tuple[Any, CallContext]] = []
    for n in range(150):
        identity = (IdentityKey("deep_link_token", f"tok_{n}"),)
        items.append((UpsertContact("install", identity, set={"deep_link_token": f"tok_{n}"},
                                    set_once={"first_touch_campaign": "spring"}),
                      CallContext(f"a{n}")))
        items.append((SetStage("install", identity, stage="lead"), CallContext(f"b{n}")))
    results = await target.execute_many(items)
    assert all(not isinstance(r, Exception) for r in results)
    assert len(state.contacts.records) == 150
    assert {r.properties["lifecyclestage"] for r in state.contacts.records.values()} == {"lead"}
    assert state.requests["POST /crm/v3/objects/contacts/batch/read"] == 2
    assert state.requests["POST /crm/v3/objects/contacts/batch/upsert"] == 2


# -- deals ----------------------------------------------------------------------------------


def deal(key: str = "referral-tok_ada") -> CreateDeal:
    return CreateDeal("referral-converts", TOK, key=key, title="Referral: tok_ada", stage="new",
                      set={"referral_code": "tok_ada"})


async def test_a_deal_is_created_once_with_a_contact_stub_and_an_association(
        emulator: Emulator, field_map: FieldMap, storage: Storage) -> None:
    _, state, client = emulator
    target = make_target(client, field_map, storage)
    first = await target.execute(deal(), CallContext("k"))
    again = await target.execute(deal(), CallContext("k"))
    assert first.created and not again.created and first.record_id == again.record_id
    (record,) = state.deals.records.values()
    assert record.properties["linkcrm_deal_key"] == "referral-tok_ada"
    assert record.properties["dealstage"] == "appointmentscheduled"
    contact_id = next(iter(state.contacts.records))
    assert state.associations == {(record.id, contact_id)}


async def test_deals_in_a_batch_are_read_then_created_and_an_existing_one_adopted(
        emulator: Emulator, field_map: FieldMap, storage: Storage) -> None:
    _, state, client = emulator
    target = make_target(client, field_map, storage)
    ada, bob = TOK, (IdentityKey("deep_link_token", "tok_bob"),)
    await target.execute_many([(UpsertContact("r", ada), CallContext("c1")),
                               (UpsertContact("r", bob), CallContext("c2"))])
    # A deal whose create answer was lost earlier: in HubSpot, not in the identity map.
    lost = state.create(state.deals, {"dealname": "Referral: tok_ada",
                                      "linkcrm_deal_key": "referral-tok_ada"})
    results = await target.execute_many([
        (deal(), CallContext("d1")),
        (CreateDeal("referral-converts", bob, key="referral-tok_bob", title="Referral: tok_bob",
                    stage="new"), CallContext("d2")),
        (deal(), CallContext("d1-again"))])
    outcomes = [r for r in results if not isinstance(r, Exception)]
    assert len(outcomes) == 3
    assert outcomes[0].record_id == lost.id == outcomes[2].record_id and not outcomes[0].created
    assert outcomes[1].created
    assert len(state.deals.records) == 2
    contact_of = {r.properties["deep_link_token"]: r.id for r in state.contacts.records.values()}
    new_deal = next(r.id for r in state.deals.records.values() if r.id != lost.id)
    assert state.associations == {(lost.id, contact_of["tok_ada"]),
                                  (new_deal, contact_of["tok_bob"])}
    assert state.requests["POST /crm/v3/objects/deals/batch/read"] == 1
    assert state.requests["POST /crm/v3/objects/deals/batch/create"] == 1


class CommitThenDrop(httpx.AsyncBaseTransport):
    """Forwards to the app; the first request matching `when` is applied, then its answer is
    lost as a network error (or `after` runs before it is answered)."""

    def __init__(self, inner: httpx.AsyncBaseTransport, when: Callable[[httpx.Request], bool],
                 after: Callable[[], Awaitable[None]] | None = None) -> None:
        self.inner, self.when, self.after, self.fired = inner, when, after, False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if not self.fired and self.when(request):
            self.fired = True
            if self.after is None:
                raise httpx.ReadError("connection reset after commit")
            await self.after()
        return response


async def test_a_lost_create_response_is_found_by_the_retry(
        field_map: FieldMap, storage: Storage) -> None:
    app, state = create_hubspot_emulator(TOKEN)
    inner = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=inner, base_url=BASE) as setup:
        await provision(setup, TOKEN, field_map, base_url=BASE)
    transport = CommitThenDrop(inner, lambda r: r.method == "POST"
                               and r.url.path == "/crm/v3/objects/deals")
    async with httpx.AsyncClient(transport=transport) as client:
        target = make_target(client, field_map, storage)
        with pytest.raises(RetryableCRMError):
            await target.execute(deal(), CallContext("k"))
        outcome = await target.execute(deal(), CallContext("k"))
    (record,) = state.deals.records.values()
    assert outcome.record_id == record.id
    assert len(state.associations) == 1


async def test_a_409_on_deal_create_finds_the_racing_workers_deal(
        field_map: FieldMap, storage: Storage) -> None:
    app, state = create_hubspot_emulator(TOKEN)
    inner = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=inner, base_url=BASE) as setup:
        await provision(setup, TOKEN, field_map, base_url=BASE)

    async def another_worker_creates_it() -> None:
        state.create(state.deals, {"dealname": "x", "linkcrm_deal_key": "referral-tok_ada"})

    transport = CommitThenDrop(inner, lambda r: r.url.path.endswith("/deals/batch/read"),
                               after=another_worker_creates_it)
    async with httpx.AsyncClient(transport=transport) as client:
        outcome = await make_target(client, field_map, storage).execute(deal(), CallContext("k"))
    (record,) = state.deals.records.values()
    assert outcome.record_id == record.id and not outcome.created
    assert state.requests["POST /crm/v3/objects/deals"] == 1  # answered 409
    assert state.associations == {(record.id, next(iter(state.contacts.records)))}


# -- rate limits and errors -----------------------------------------------------------------


class Script:
    """A MockTransport handler answering from a list; records what was sent."""

    def __init__(self, *responses: httpx.Response) -> None:
        self.responses = list(responses)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.responses.pop(0)


async def test_a_ten_secondly_429_pauses_the_pacer_and_retries(storage: Storage) -> None:
    app, state = create_hubspot_emulator(TOKEN, rate_limit=100, window_seconds=2.0)
    status, headers, body = too_many(state)
    script = Script(httpx.Response(status, headers=headers, json=body),
                    httpx.Response(200, json={"results": []}))
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        pacer.clock = lambda: now + sum(slept)

    now = 1000.0
    pacer = Pacer(storage.rate_limits, "hs-test", 5, 0.5, sleep=sleep, clock=lambda: now)
    async with httpx.AsyncClient(transport=httpx.MockTransport(script)) as client:
        api = HubSpotAPI(client, TOKEN, base_url=BASE, pacer=pacer, sleep=sleep)
        response = await api.call("GET", "/crm/v3/properties/contacts")
    assert response.status_code == 200 and len(script.requests) == 2
    assert slept and slept[0] == pytest.approx(2.0)  # the Interval-Milliseconds header
    assert script.requests[0].headers["authorization"] == f"Bearer {TOKEN}"


async def test_the_daily_limit_goes_back_to_the_worker_with_a_wait() -> None:
    script = Script(httpx.Response(429, json={
        "status": "error", "message": "You have reached your daily limit.",
        "errorType": "RATE_LIMIT", "policyName": "DAILY"}))
    async with httpx.AsyncClient(transport=httpx.MockTransport(script)) as client:
        with pytest.raises(RetryableCRMError) as caught:
            await HubSpotAPI(client, TOKEN, base_url=BASE).call("GET", "/x")
    assert caught.value.retry_after is not None and caught.value.retry_after >= 60
    assert len(script.requests) == 1


async def test_rate_limit_headers_reshape_the_pacer(storage: Storage) -> None:
    script = Script(httpx.Response(200, json={}, headers={
        "X-HubSpot-RateLimit-Max": "190", "X-HubSpot-RateLimit-Remaining": "180",
        "X-HubSpot-RateLimit-Interval-Milliseconds": "10000"}))
    pacer = window_pacer(storage.rate_limits, "hs-test", 100, 10.0)
    async with httpx.AsyncClient(transport=httpx.MockTransport(script)) as client:
        api = HubSpotAPI(client, TOKEN, base_url=BASE, pacer=pacer)
        await api.call("GET", "/x")
    assert (pacer.capacity, pacer.window, pacer.rolling) == (190, 10.0, True)
    assert api.limit == 190


@pytest.mark.parametrize(("status", "error"), [(503, RetryableCRMError), (502, RetryableCRMError),
                                               (400, PermanentCRMError),
                                               (401, PermanentCRMError)])
async def test_statuses_map_to_the_two_errors_with_hubspots_message(
        status: int, error: type[Exception]) -> None:
    script = Script(httpx.Response(status, json={"status": "error", "message": "said HubSpot",
                                                 "category": "X", "correlationId": "c-1"}))
    async with httpx.AsyncClient(transport=httpx.MockTransport(script)) as client:
        with pytest.raises(error) as caught:
            await HubSpotAPI(client, TOKEN, base_url=BASE).call("GET", "/x")
    assert "said HubSpot" in str(caught.value) and "c-1" in str(caught.value)
    assert TOKEN not in str(caught.value)


async def test_a_wrong_token_is_permanent_and_says_how_to_fix_it(
        emulator: Emulator, field_map: FieldMap, storage: Storage) -> None:
    _, _, client = emulator
    target = HubSpotTarget(client, "wrong", field_map, storage.identities, storage.rate_limits,
                           base_url=BASE)
    with pytest.raises(PermanentCRMError, match="HUBSPOT_ACCESS_TOKEN"):
        await target.execute(UpsertContact("r", TOK, set={"deep_link_prefix": "x"}),
                             CallContext("k"))


# -- provision and doctor -------------------------------------------------------------------


async def test_provision_is_idempotent_and_doctor_then_finds_nothing(
        emulator: Emulator, field_map: FieldMap) -> None:
    _, state, client = emulator  # provisioned once by the fixture
    report = await provision(client, TOKEN, field_map, base_url=BASE)
    assert report and all("already exists" in line for line in report)
    assert state.contacts.properties["deep_link_token"].hasUniqueValue
    assert state.deals.properties["linkcrm_deal_key"].hasUniqueValue
    assert state.contacts.properties["deep_link_token"].groupName == "deep_link_attribution"
    assert await doctor(client, TOKEN, field_map, base_url=BASE) == []


async def test_doctor_names_each_problem_with_its_fix(field_map: FieldMap) -> None:
    app, state = create_hubspot_emulator(TOKEN)
    state.define_property("contacts", "deep_link_token")  # not unique
    state.define_property("contacts", "install_date", "number")  # wrong type
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE) as client:
        problems = [str(f) for f in await doctor(client, TOKEN, field_map, base_url=BASE)]
        wrong_token = [str(f) for f in await doctor(client, "wrong", field_map, base_url=BASE)]
    text = "\n".join(problems)
    assert "'deep_link_token' is not unique" in text
    assert "'install_date' has type number" in text
    assert "'first_touch_campaign' does not exist; fix: run `linkcrm provision hubspot`" in text
    assert "'linkcrm_deal_key' does not exist" in text
    assert all("fix:" in p for p in problems)
    assert len(wrong_token) == 1 and "HUBSPOT_ACCESS_TOKEN" in wrong_token[0]


async def test_doctor_checks_stage_values(field_map: FieldMap) -> None:
    app, state = create_hubspot_emulator(TOKEN)
    state.contacts.properties["lifecyclestage"].options = [{"label": "Lead", "value": "lead"}]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE) as client:
        await provision(client, TOKEN, field_map, base_url=BASE)
        problems = [str(f) for f in await doctor(client, TOKEN, field_map, base_url=BASE)]
    assert len(problems) == 1 and "contact stage 'customer'" in problems[0]
