"""What the HubSpot adapter puts on the wire and reads back, where HubSpot's front end or its
API versions could differ: event values never travel in a URL path (a deal key of `.` or `..`
would reach another resource), and a create is recognised whichever answer it gets (201 with
the object, or 200 with `{createdResourceId, entity}`). Each uncertain behaviour is an
emulator switch (`path_values`, `create_response`), tested both ways."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine.actions import CreateDeal, IdentityKey, UpsertContact
from engine.config.fieldmap import FieldMap, load_field_map
from engine.errors import PermanentCRMError
from engine.storage import Storage, open_storage
from engine.targets.base import CallContext, Outcome
from engine.targets.hubspot.admin import provision
from engine.targets.hubspot.api import parse_created, record_path
from engine.targets.hubspot.target import HubSpotTarget
from tests.emulators.hubspot import create_hubspot_emulator
from tests.emulators.hubspot_state import HubSpotState
from tests.support.paths import REPO

ROOT = REPO
TOKEN = "pat-na1-wire"
BASE = "http://hubspot.test"
DEALS = "/crm/v3/objects/deals"
# Values a URL path would change: dot segments, a slash, a query and a fragment, what decodes
# to a dot segment, non-ASCII, and a plain one.
AWKWARD = [".", "..", "a/b", "x?y#z", "%2e", "%2E%2E", "../contacts", "ünïcødé ✓", "plain-1"]

pytestmark = pytest.mark.anyio



@pytest.fixture
def field_map() -> FieldMap:
    return load_field_map(ROOT / "rules" / "fields.yaml")


@asynccontextmanager
async def stores(tmp_path: Path, *names: str) -> AsyncIterator[list[Storage]]:
    """One SQLite store per name: separate identity maps, as after a lost map."""
    opened = [open_storage(f"sqlite:///{tmp_path / name}.db") for name in names]
    for store in opened:
        await store.migrate()
    try:
        yield opened
    finally:
        for store in opened:
            await store.close()


@asynccontextmanager
async def emulated(field_map: FieldMap, **options: Any
                   ) -> AsyncIterator[tuple[HubSpotState, httpx.AsyncClient]]:
    app, state = create_hubspot_emulator(TOKEN, **options)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE,
                                 headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        await provision(client, TOKEN, field_map, base_url=BASE)
        yield state, client


def target(client: httpx.AsyncClient, field_map: FieldMap, store: Storage) -> HubSpotTarget:
    return HubSpotTarget(client, TOKEN, field_map, store.identities, store.rate_limits,
                         base_url=BASE)


def outcome(result: Outcome | Exception) -> Outcome:
    assert isinstance(result, Outcome), result
    return result


def deal(key: str, token: str | None = None) -> CreateDeal:
    return CreateDeal("referral-converts", (IdentityKey("deep_link_token", token or key),),
                      key=key, title="Referral", stage="new")


# -- item 13: identity values never form a URL path ------------------------------------------


@pytest.mark.parametrize(("path_values", "taken"), [("decoded", "409"), ("rerouted", "400")])
async def test_any_deal_key_or_token_reaches_its_own_record_however_paths_are_read(
        path_values: str, taken: str, field_map: FieldMap, tmp_path: Path) -> None:
    """Each awkward value, as a deep-link token and a deal key, makes one contact and one deal;
    a worker whose identity map lost them finds the same ones again (by key, in a body), not
    by a create's conflict (a 400 "already has that value" names no deal)."""
    async with (emulated(field_map, path_values=path_values, unique_conflict=taken
                         ) as (state, client),
                stores(tmp_path, "worker", "amnesiac") as (worker, amnesiac)):
        for value in AWKWARD:
            made = await target(client, field_map, worker).execute(
                deal(value), CallContext(f"{value}:1"))
            again = await target(client, field_map, amnesiac).execute(
                deal(value), CallContext(f"{value}:2"))
            assert made.created and not again.created, value
            assert again.record_id == made.record_id, value
            (record,) = [r for r in state.deals.records.values()
                         if r.properties.get("linkcrm_deal_key") == value]
            assert record.id == made.record_id, value
    assert len(state.deals.records) == len(state.contacts.records) == len(AWKWARD)
    tokens = {r.properties["deep_link_token"] for r in state.contacts.records.values()}
    assert tokens == set(AWKWARD)
    assert state.requests["POST " + DEALS] == len(AWKWARD), "never a second create"
    by_path = [kind for kind in state.requests if kind.startswith("GET /crm/v3/objects/")]
    assert by_path == [], "no event value ever went into a URL path"


async def test_emails_that_a_path_would_change_find_their_contact(
        field_map: FieldMap, tmp_path: Path) -> None:
    emails = ["a/b@example.com", "x?y#z@example.com", "%2e@example.com", "..@example.com"]
    async with (emulated(field_map, path_values="rerouted") as (state, client),
                stores(tmp_path, "worker") as (worker,)):
        hubspot = target(client, field_map, worker)
        for email in emails:
            identity = (IdentityKey("email", email),)
            made = await hubspot.execute(UpsertContact(
                "app-identifies-user", identity, set={"email": email}), CallContext(f"{email}:1"))
            named = await hubspot.execute(UpsertContact(
                "app-identifies-user", identity, set={"first_name": "Ada"}),
                CallContext(f"{email}:2"))
            assert made.created and named.record_id == made.record_id, email
    people = {r.properties["email"]: r.properties.get("firstname")
              for r in state.contacts.records.values()}
    assert people == dict.fromkeys(emails, "Ada")


@pytest.mark.parametrize(("path_values", "expected"), [
    ("decoded", {"a%2Fb": (200, "a/b"), "%2E%2E": (200, ".."), "%2E": (200, ".")}),
    ("rerouted", {"a%2Fb": (404, None), "%2E%2E": (404, None), "%2E": (404, None)}),
])
async def test_the_emulator_reads_encoded_path_values_as_its_switch_says(
        path_values: str, expected: dict[str, tuple[int, str | None]],
        field_map: FieldMap) -> None:
    async with emulated(field_map, path_values=path_values) as (state, client):
        for value in ("a/b", "..", "."):
            state.create(state.deals, {"dealname": value, "linkcrm_deal_key": value})
        for raw, (status, held) in expected.items():
            answer = await client.get(f"{DEALS}/{raw}", params={
                "idProperty": "linkcrm_deal_key", "properties": "linkcrm_deal_key"})
            assert answer.status_code == status, (raw, answer.text)
            if held is not None:
                assert answer.json()["properties"]["linkcrm_deal_key"] == held, raw
        # A literal dot segment is resolved by the front end either way: `.` names the list.
        dot = await client.get(f"{DEALS}/./x/..", params={"idProperty": "linkcrm_deal_key"})
    assert dot.status_code == 405


def test_a_record_id_is_one_path_segment_or_refused() -> None:
    assert record_path("/crm/v3/objects/contacts", "101") == "/crm/v3/objects/contacts/101"
    assert record_path("/x", "a/b?c") == "/x/a%2Fb%3Fc"
    for bad in ("", ".", ".."):
        with pytest.raises(PermanentCRMError, match="is not a HubSpot record id"):
            record_path("/crm/v3/objects/contacts", bad)


# -- create answers: 201 with the object, or 200 wrapped -------------------------------------


def test_a_created_object_is_read_from_either_answer() -> None:
    plain = parse_created({"id": "7", "properties": {"email": "a@b.co"}})
    wrapped = parse_created({"createdResourceId": "7", "location": "https://x/7",
                             "entity": {"id": "7", "properties": {"email": "a@b.co"}}})
    bare = parse_created({"createdResourceId": "7", "entity": {"properties": {}}})
    assert plain == wrapped and plain is not None and plain.properties == {"email": "a@b.co"}
    assert bare is not None and bare.id == "7"
    assert parse_created({"entity": {}}) is None


@pytest.mark.parametrize("mode", ["201-object", "200-wrapped"])
async def test_emulator_create_response_switch(mode: str, field_map: FieldMap) -> None:
    async with emulated(field_map, create_response=mode) as (state, client):
        one = await client.post("/crm/v3/objects/contacts", json={"properties": {
            "email": "ada@example.com"}})
        batch = await client.post(DEALS + "/batch/create", json={"inputs": [
            {"properties": {"dealname": "Referral", "linkcrm_deal_key": "k1"}}]})
    (contact,) = state.contacts.records.values()
    (made,) = state.deals.records.values()
    if mode == "201-object":
        assert (one.status_code, batch.status_code) == (201, 201)
        assert one.json()["id"] == contact.id and "entity" not in one.json()
    else:
        assert (one.status_code, batch.status_code) == (200, 200)
        body = one.json()
        assert body["createdResourceId"] == body["entity"]["id"] == contact.id
        assert "id" not in body and body["location"].endswith(f"/contacts/{contact.id}")
    assert batch.json()["results"][0]["id"] == made.id


@pytest.mark.parametrize("mode", ["201-object", "200-wrapped"])
async def test_a_create_is_recognised_whatever_hubspot_answers(
        mode: str, field_map: FieldMap, tmp_path: Path) -> None:
    """A contact create, a deal create and a batch of deal creates each find the id HubSpot
    made: the action succeeds once, with no retry and no second record."""
    async with (emulated(field_map, create_response=mode) as (state, client),
                stores(tmp_path, "worker") as (worker,)):
        hubspot = target(client, field_map, worker)
        ada = (IdentityKey("email", "ada@example.com"),)
        contact = await hubspot.execute(UpsertContact(
            "app-identifies-user", ada, set={"email": "ada@example.com"}), CallContext("c"))
        one = await hubspot.execute(deal("referral-1", "tok_1"), CallContext("d1"))
        batch = [outcome(r) for r in await hubspot.execute_many(
            [(deal("referral-2", "tok_2"), CallContext("d2")),
             (deal("referral-3", "tok_3"), CallContext("d3"))])]
        bound = {key: await worker.identities.lookup_deal("hubspot", key)
                 for key in ("referral-1", "referral-2", "referral-3")}
        known = await worker.identities.lookup_identity("hubspot", list(ada))
    (person,) = [r for r in state.contacts.records.values() if r.properties.get("email")]
    assert contact.created and contact.record_id == person.id
    made = {r.properties["linkcrm_deal_key"]: r.id for r in state.deals.records.values()}
    assert one.created and made["referral-1"] == one.record_id
    assert all(result.created for result in batch)
    assert [made["referral-2"], made["referral-3"]] == [r.record_id for r in batch]
    assert state.requests["POST /crm/v3/objects/contacts"] == 1
    assert state.requests["POST " + DEALS] == 1
    assert state.requests["POST " + DEALS + "/batch/create"] == 1
    assert len(made) == 3 and len(state.associations) == 3
    assert bound == made and known == person.id
