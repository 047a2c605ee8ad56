"""HubSpot behaviour that real accounts show one way or another, and what the official client
(`hubspot-api-client`) sends: each is handled by the adapter and shown by the emulator, with a
switch where HubSpot answers either way (`upsert_echo`, `unique_conflict`).

The official client's wire behaviour is mimicked here rather than installed (it is a 24 MB
package): it sends GET `properties` as repeated parameters (collection format "multi"), omits
`associations` from a create unless given, and requires `hidden` in every property option."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine.actions import CreateDeal, IdentityKey, SetStage, UpsertContact
from engine.config.fieldmap import FieldMap, load_field_map
from engine.errors import PermanentCRMError
from engine.storage import Storage
from engine.targets import registry
from engine.targets.base import CallContext, Outcome
from engine.targets.hubspot.admin import doctor, provision, wanted_properties
from engine.targets.hubspot.api import as_list, as_object
from engine.targets.hubspot.target import HubSpotTarget
from tests.emulators.hubspot import create_hubspot_emulator
from tests.emulators.hubspot_state import HubSpotState
from tests.support.paths import REPO
from tests.support.service_process import cli, free_port, service_env

ROOT = REPO
TOKEN = "pat-na1-quirks"
BASE = "http://hubspot.test"
TOK = (IdentityKey("deep_link_token", "tok_ada"),)
UPSERT = "POST /crm/v3/objects/contacts/batch/upsert"

pytestmark = pytest.mark.anyio



@pytest.fixture
def field_map() -> FieldMap:
    return load_field_map(ROOT / "rules" / "fields.yaml")


@asynccontextmanager
async def emulated(field_map: FieldMap, **options: Any
                   ) -> AsyncIterator[tuple[HubSpotState, httpx.AsyncClient]]:
    """A provisioned emulator with `options`, and a client for it that sends the token."""
    app, state = create_hubspot_emulator(TOKEN, **options)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE,
                                 headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        await provision(client, TOKEN, field_map, base_url=BASE)
        yield state, client


def target_for(client: httpx.AsyncClient, field_map: FieldMap,
               storage: Storage) -> HubSpotTarget:
    return HubSpotTarget(client, TOKEN, field_map, storage.identities, storage.rate_limits,
                         base_url=BASE)


def outcome(result: Outcome | Exception) -> Outcome:
    assert isinstance(result, Outcome), result
    return result


# -- 14: batch upsert results echo all properties, or only those written --------------------


@pytest.mark.parametrize("echo", ["all", "written"])
async def test_emulator_upsert_echo_switch(echo: str, field_map: FieldMap) -> None:
    async with emulated(field_map, upsert_echo=echo) as (state, client):
        state.create(state.contacts, {"deep_link_token": "tok_ada", "deep_link_prefix": "a"})
        response = await client.post("/crm/v3/objects/contacts/batch/upsert", json={"inputs": [
            {"id": "tok_ada", "idProperty": "deep_link_token",
             "properties": {"lifecyclestage": "lead"}}]})
    assert response.status_code == 200
    (result,) = response.json()["results"]
    assert result["properties"]["lifecyclestage"] == "lead" and result["new"] is False
    # The id property was not written, so only "all" echoes it (and the untouched prefix).
    echoed = {k for k, v in result["properties"].items() if v is not None}
    assert ("deep_link_token" in echoed) == (echo == "all")
    assert ("deep_link_prefix" in echoed) == (echo == "all")


@pytest.mark.parametrize("echo", ["all", "written"])
async def test_an_upsert_result_finds_its_input_whatever_hubspot_echoes(
        echo: str, field_map: FieldMap, storage: Storage) -> None:
    async with emulated(field_map, upsert_echo=echo) as (state, client):
        target = target_for(client, field_map, storage)
        ada = outcome(await target.execute(
            UpsertContact("install", TOK, set={"deep_link_token": "tok_ada"}), CallContext("k0")))
        bob = (IdentityKey("deep_link_token", "tok_bob"),)
        # The stage needs a read; Ada exists, so only her stage is planned, not her token.
        results = await target.execute_many([
            (SetStage("install", TOK, stage="lead"), CallContext("k1")),
            (UpsertContact("install", bob, set_once={"first_touch_campaign": "spring"}),
             CallContext("k2"))])
    assert outcome(results[0]).record_id == ada.record_id
    assert outcome(results[1]).created
    assert state.requests[UPSERT] == 2, "each batch sent once, never retried as 'no result'"
    stages = {r.properties.get("deep_link_token"): r.properties.get("lifecyclestage")
              for r in state.contacts.records.values()}
    assert stages == {"tok_ada": "lead", "tok_bob": None}


async def test_a_lone_result_echoing_no_properties_is_its_inputs(
        field_map: FieldMap, storage: Storage) -> None:
    sent: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(json.loads(request.content))
        return httpx.Response(200, json={"status": "COMPLETE", "results": [
            {"id": "77", "properties": {}, "new": True, "createdAt": "x", "updatedAt": "x"}],
            "startedAt": "x", "completedAt": "x"})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        result = await target_for(client, field_map, storage).execute(
            UpsertContact("install", TOK, set={"deep_link_prefix": "invite"}), CallContext("k"))
    assert (result.record_id, result.created) == ("77", True)
    (request,) = sent
    assert request["inputs"][0]["properties"]["deep_link_token"] == "tok_ada"


# -- 15: a taken unique value is a 409, or a 400 VALIDATION_ERROR -----------------------------


@pytest.mark.parametrize("mode", ["409", "400"])
async def test_emulator_unique_conflict_switch(mode: str, field_map: FieldMap) -> None:
    async with emulated(field_map, unique_conflict=mode) as (state, client):
        state.create(state.deals, {"dealname": "x", "linkcrm_deal_key": "referral-tok_ada"})
        state.create(state.contacts, {"deep_link_token": "tok_ada"})
        deal = await client.post("/crm/v3/objects/deals", json={"properties": {
            "dealname": "y", "linkcrm_deal_key": "referral-tok_ada"}})
        contact = await client.post("/crm/v3/objects/contacts", json={"properties": {
            "email": "ada@example.com", "deep_link_token": "tok_ada"}})
        email = await client.post("/crm/v3/objects/contacts", json={"properties": {
            "email": "ada@example.com"}})
        again = await client.post("/crm/v3/objects/contacts", json={"properties": {
            "email": "ada@example.com"}})
    for answer in (deal, contact):
        assert answer.status_code == int(mode)
        if mode == "400":
            body = answer.json()
            assert body["category"] == "VALIDATION_ERROR"
            assert "already has that value" in body["message"]
            assert "Existing ID" not in body["message"]
    assert (email.status_code, again.status_code) == (201, 409)  # email: always 409


@pytest.mark.parametrize("mode", ["409", "400"])
async def test_a_taken_deal_key_adopts_the_existing_deal(
        mode: str, field_map: FieldMap, storage: Storage) -> None:
    app, state = create_hubspot_emulator(TOKEN, unique_conflict=mode)
    inner = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=inner, base_url=BASE) as setup:
        await provision(setup, TOKEN, field_map, base_url=BASE)

    class RacingWorker(httpx.AsyncBaseTransport):
        """Another worker creates the deal right after this one looked for it."""

        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            response = await inner.handle_async_request(request)
            looked = request.url.path.endswith("/deals/batch/read")
            if looked and not state.deals.records:
                state.create(state.deals, {"dealname": "x",
                                           "linkcrm_deal_key": "referral-tok_ada"})
            return response

    async with httpx.AsyncClient(transport=RacingWorker()) as client:
        result = await target_for(client, field_map, storage).execute(CreateDeal(
            "referral-converts", TOK, key="referral-tok_ada", title="Referral: tok_ada",
            stage="new"), CallContext("k"))
    (record,) = state.deals.records.values()
    assert result.record_id == record.id and not result.created
    assert state.requests["POST /crm/v3/objects/deals"] == 1  # refused: the key was taken
    assert state.associations == {(record.id, next(iter(state.contacts.records)))}
    assert await storage.identities.lookup_deal("hubspot", "referral-tok_ada") == record.id


@pytest.mark.parametrize("mode", ["409", "400"])
async def test_a_taken_deep_link_token_adopts_the_contact_that_holds_it(
        mode: str, field_map: FieldMap, storage: Storage) -> None:
    async with emulated(field_map, unique_conflict=mode) as (state, client):
        holder = state.create(state.contacts, {"deep_link_token": "tok_ada",
                                               "deep_link_prefix": "invite"})
        # Email first: the token is attached to the contact found (or made) by email.
        identity = (IdentityKey("email", "ada@example.com"), *TOK)
        result = await target_for(client, field_map, storage).execute(UpsertContact(
            "app-identifies-user", identity,
            set={"email": "ada@example.com", "first_name": "Ada"}), CallContext("k"))
    assert result.record_id == holder.id and not result.created
    (contact,) = state.contacts.records.values()
    assert (contact.properties["email"], contact.properties["firstname"],
            contact.properties["deep_link_token"]) == ("ada@example.com", "Ada", "tok_ada")
    assert await storage.identities.lookup_identity("hubspot", list(TOK)) == holder.id


async def test_a_400_that_is_not_a_unique_conflict_still_fails_the_deal(
        field_map: FieldMap, storage: Storage) -> None:
    async with emulated(field_map, unique_conflict="400") as (state, client):
        del state.deals.properties["referral_code"]  # mapped, but missing in this account
        with pytest.raises(PermanentCRMError, match="PROPERTY_DOESNT_EXIST"):
            await target_for(client, field_map, storage).execute(CreateDeal(
                "referral-converts", TOK, key="referral-tok_ada", title="Referral: tok_ada",
                stage="new", set={"referral_code": "tok_ada"}), CallContext("k"))
    assert not state.deals.records
    assert await storage.identities.lookup_deal("hubspot", "referral-tok_ada") is None


# -- 16: no partial batch upserts by email ---------------------------------------------------


async def test_emulator_refuses_a_partial_upsert_by_email(field_map: FieldMap) -> None:
    async with emulated(field_map) as (state, client):
        state.create(state.contacts, {"email": "ada@example.com"})
        update = await client.post("/crm/v3/objects/contacts/batch/upsert", json={"inputs": [
            {"id": "Ada@Example.com", "idProperty": "email",
             "properties": {"firstname": "Ada"}}]})
        create = await client.post("/crm/v3/objects/contacts/batch/upsert", json={"inputs": [
            {"id": "bob@example.com", "idProperty": "email",
             "properties": {"firstname": "Bob"}}]})
    assert update.status_code == 400 and update.json()["category"] == "VALIDATION_ERROR"
    assert "Partial upserts are not supported" in update.json()["message"]
    assert create.status_code == 200
    names = {r.properties.get("email"): r.properties.get("firstname")
             for r in state.contacts.records.values()}
    assert names == {"ada@example.com": None, "bob@example.com": "Bob"}


async def test_contacts_known_only_by_email_are_read_then_updated_by_id_or_created(
        field_map: FieldMap, storage: Storage) -> None:
    async with emulated(field_map) as (state, client):
        ada = state.create(state.contacts, {"email": "ada@example.com", "lifecyclestage": "lead"})

        def by_email(address: str, **values: str) -> UpsertContact:
            return UpsertContact("app-identifies-user", (IdentityKey("email", address),),
                                 set={"email": address.lower(), **values})

        target = target_for(client, field_map, storage)
        results = await target.execute_many([
            (by_email("Ada@Example.com", first_name="Ada"), CallContext("k1")),
            (by_email("bob@example.com", first_name="Bob"), CallContext("k2")),
            (by_email("cy@example.com"), CallContext("k3"))])
        again = await target.execute(by_email("bob@example.com", last_name="Byte"),
                                     CallContext("k4"))
    assert outcome(results[0]).record_id == ada.id and not outcome(results[0]).created
    assert outcome(results[1]).created and outcome(results[2]).created
    assert again.record_id == outcome(results[1]).record_id
    assert state.requests[UPSERT] == 0, "never a batch upsert by email"
    assert state.requests["POST /crm/v3/objects/contacts/batch/read"] == 2
    people = {r.properties["email"]: (r.properties.get("firstname"), r.properties.get("lastname"))
              for r in state.contacts.records.values()}
    assert people == {"ada@example.com": ("Ada", None), "bob@example.com": ("Bob", "Byte"),
                      "cy@example.com": (None, None)}


# -- 17: property options need hidden -------------------------------------------------------


async def test_property_options_need_hidden_and_provision_sends_it(field_map: FieldMap) -> None:
    # Provisioning (which creates enum and bool properties) succeeds: its options have hidden.
    async with emulated(field_map) as (state, client):
        refused = await client.post("/crm/v3/properties/contacts", json={
            "name": "colour", "label": "Colour", "type": "enumeration", "fieldType": "select",
            "groupName": "deep_link_attribution",
            "options": [{"label": "Red", "value": "red", "displayOrder": 0}]})
    assert refused.status_code == 400 and "'hidden' is a required property" in \
        refused.json()["message"]
    platform = state.contacts.properties["first_touch_platform"]
    assert [o["hidden"] for o in platform.options] == [False, False, False]
    sent = [option for bodies in wanted_properties(field_map).values()
            for body in bodies.values() for option in as_list(body.get("options"))]
    assert sent and all(as_object(option)["hidden"] is False for option in sent)


# -- 21: what the official client sends ------------------------------------------------------


async def test_emulator_reads_repeated_properties_parameters(field_map: FieldMap) -> None:
    async with emulated(field_map) as (state, client):
        state.create(state.deals, {"dealname": "Referral", "amount": "12",
                                   "linkcrm_deal_key": "referral-tok_ada"})
        answers = [await client.get("/crm/v3/objects/deals/referral-tok_ada", params=params)
                   for params in (
                       [("idProperty", "linkcrm_deal_key"), ("properties", "dealname"),
                        ("properties", "amount")],  # the official client's "multi" format
                       [("idProperty", "linkcrm_deal_key"), ("properties", "dealname,amount")])]
    for answer in answers:
        assert answer.status_code == 200
        properties = answer.json()["properties"]
        assert (properties["dealname"], properties["amount"]) == ("Referral", "12")


async def test_emulator_creates_without_associations(field_map: FieldMap) -> None:
    async with emulated(field_map) as (state, client):
        one = await client.post("/crm/v3/objects/contacts", json={"properties": {
            "email": "ada@example.com"}})
        batch = await client.post("/crm/v3/objects/deals/batch/create", json={"inputs": [
            {"properties": {"dealname": "Referral", "linkcrm_deal_key": "k1"}}]})
    assert (one.status_code, batch.status_code) == (201, 201)
    assert len(state.contacts.records) == len(state.deals.records) == 1


# -- 28: doctor blames what failed, and says the fix once ------------------------------------


async def test_doctor_says_hubspot_is_unreachable_with_the_url(field_map: FieldMap) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    async with httpx.AsyncClient() as client:
        (finding,) = await doctor(client, TOKEN, field_map, base_url=url)
    problem = str(finding)
    assert f"HubSpot at {url} is unreachable" in problem and "ConnectError" in problem
    assert problem.count("fix:") == 1 and "HUBSPOT_ACCESS_TOKEN" not in problem
    assert "check the network connection" in problem


async def test_doctor_prints_one_fix_for_a_refused_token(field_map: FieldMap) -> None:
    app, _ = create_hubspot_emulator(TOKEN)
    environ = {"HUBSPOT_ACCESS_TOKEN": "pat-wrong", "HUBSPOT_BASE_URL": BASE}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app)) as client:
        (finding,) = await registry.doctor("hubspot", environ, field_map, client)
    assert "HubSpot refused the token" in finding.problem and "401" in finding.problem
    assert "fix:" not in finding.problem + finding.fix
    assert finding.fix.startswith("set HUBSPOT_ACCESS_TOKEN to a private-app token")


def test_doctor_command_names_the_unreachable_url_and_one_fix(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    done = cli("doctor", "hubspot", env=service_env(
        tmp_path, HUBSPOT_ACCESS_TOKEN=TOKEN, HUBSPOT_BASE_URL=url))
    assert done.returncode == 1, done.stderr
    assert f"HubSpot at {url} is unreachable" in done.stdout
    assert done.stdout.count("fix:") == 1 and "HUBSPOT_ACCESS_TOKEN" not in done.stdout
