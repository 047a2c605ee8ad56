"""Unit cases for the Pipedrive target: HTTP mapping, pacing, field resolution, claims."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine.actions import CreateDeal, IdentityKey, SetStage, UpsertContact
from engine.config.fieldmap import CoercionError, FieldMap, load_field_map
from engine.errors import PermanentCRMError, RetryableCRMError
from engine.targets.base import CallContext
from engine.targets.pacing import Pacer, window_pacer
from engine.targets.pipedrive.api import PipedriveAPI, PipedriveAuthError
from engine.targets.pipedrive.claims import Claim, Claims, Slots
from engine.targets.pipedrive.fields import (
    Catalog,
    PDField,
    PipedriveSetupError,
    check,
    needs,
    to_wire,
)
from engine.targets.pipedrive.target import PipedriveTarget

pytestmark = pytest.mark.anyio
FIELD_MAP = load_field_map(Path("rules/fields.yaml"))


class Clock:
    """A fake clock that sleeping advances."""

    def __init__(self) -> None:
        self.now = 1_000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class Buckets:
    async def take_tokens(self, bucket: str, cost: float, capacity: float,
                          refill_per_second: float) -> float:
        return 0.0

    async def take_slots(self, windows: Sequence[tuple[str, int, float]]) -> float:
        return 0.0


class Identities:
    def __init__(self) -> None:
        self.map: dict[tuple[str, str], str] = {}
        self.deals: dict[str, str] = {}

    async def lookup_identity(self, target: str, keys: Sequence[IdentityKey]) -> str | None:
        return next((self.map[(k.field, k.value)] for k in keys
                     if (k.field, k.value) in self.map), None)

    async def bind_identity(self, target: str, key: IdentityKey, record_id: str) -> str:
        return self.map.setdefault((key.field, key.value), record_id)

    async def rebind_identity(self, target: str, key: IdentityKey, record_id: str) -> None:
        self.map[(key.field, key.value)] = record_id

    async def unbind_identity(self, target: str, key: IdentityKey,
                              record_id: str | None = None) -> None:
        if record_id in (None, self.map.get((key.field, key.value))):
            self.map.pop((key.field, key.value), None)

    async def lookup_deal(self, target: str, deal_key: str) -> str | None:
        return self.deals.get(deal_key)

    async def bind_deal(self, target: str, deal_key: str, deal_id: str) -> str:
        return self.deals.setdefault(deal_key, deal_id)


def ok(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(status, json={"success": True, "data": data, "additional_data": None},
                          headers=headers)


def fail(status: int, error: str, info: str = "Please check developers.pipedrive.com",
         headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(status, headers=headers, json={
        "success": False, "error": error, "error_info": info, "data": None,
        "additional_data": None})


def catalog(field_map: FieldMap = FIELD_MAP) -> dict[str, list[dict[str, Any]]]:
    """Field definitions, pipelines and stages as a provisioned account lists them."""
    found: dict[str, list[dict[str, Any]]] = {"person": [], "deal": []}
    for number, need in enumerate(needs(field_map)):
        found[need.entity].append({
            "field_code": f"{number:040x}", "field_name": need.label,
            "field_type": need.create_as, "is_custom_field": True,
            "options": [{"id": 100 + i, "label": o} for i, o in enumerate(need.options)]})
    return {"/personFields": found["person"], "/dealFields": found["deal"],
            "/pipelines": [{"id": 1, "name": "Pipeline"}, {"id": 2, "name": "Deep Link Referrals"}],
            "/stages": [{"id": 7, "name": "Qualified", "pipeline_id": 2},
                        {"id": 8, "name": "Won", "pipeline_id": 2},
                        {"id": 3, "name": "Qualified", "pipeline_id": 1}]}


def key_of(label: str, entity: str = "/personFields") -> str:
    return str(next(f["field_code"] for f in catalog()[entity] if f["field_name"] == label))


Handler = Callable[[httpx.Request], httpx.Response]


def make_target(handler: Handler, clock: Clock | None = None, identities: Identities | None = None
                ) -> tuple[PipedriveTarget, list[httpx.Request]]:
    """A target whose account answers the catalog and then `handler`; requests are recorded."""
    seen: list[httpx.Request] = []
    lists = catalog()

    def route(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        path = request.url.path.removeprefix("/api/v2")
        if request.method == "GET" and path in lists:
            return ok(lists[path])
        return handler(request)

    clock = clock or Clock()
    client = httpx.AsyncClient(transport=httpx.MockTransport(route))
    target = PipedriveTarget(client, api_token="secret-token", domain="acme", field_map=FIELD_MAP,
                             identities=identities or Identities(), rate_limits=Buckets(),
                             sleep=clock.sleep, clock=clock)
    return target, seen


def api(handler: Handler, clock: Clock) -> PipedriveAPI:
    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    pacer = Pacer(Buckets(), "b", 10, 2.0, sleep=clock.sleep, clock=clock)
    search = Pacer(Buckets(), "s", 10, 2.0, sleep=clock.sleep, clock=clock)
    return PipedriveAPI(client, api_token="secret-token", base_url="https://acme.pipedrive.com",
                        burst=pacer, search=search, sleep=clock.sleep)


# -- HTTP mapping and pacing ------------------------------------------------------------------


async def test_requests_use_the_token_header_and_the_company_domain() -> None:
    target, seen = make_target(lambda r: ok([]))
    await target.start()
    assert seen[0].url == "https://acme.pipedrive.com/api/v2/personFields?limit=500"
    assert all(r.headers["x-api-token"] == "secret-token" for r in seen)
    assert all("api_token" not in r.url.params for r in seen)


async def test_a_429_waits_for_retry_after_then_sends_again() -> None:
    clock = Clock()
    answers = [fail(429, "Request over limit", headers={"Retry-After": "2"}), ok({"id": 1})]
    client = api(lambda r: answers.pop(0), clock)
    envelope = await client.get("/persons/1")
    assert envelope is not None and envelope["data"] == {"id": 1}
    assert clock.sleeps == [2.0]


async def test_x_ratelimit_reset_stands_in_for_a_missing_retry_after() -> None:
    clock = Clock()
    answers = [fail(429, "Request over limit", headers={"x-ratelimit-reset": "1"}),
               ok({"items": []})]
    client = api(lambda r: answers.pop(0), clock)
    await client.get("/persons/search", {"term": "x"}, search=True)
    assert clock.sleeps == [1.0]


async def test_an_exhausted_daily_budget_is_retryable_later_in_one_request() -> None:
    clock, calls = Clock(), []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return fail(429, "Daily API token budget exhausted", headers={"Retry-After": "5400"})

    with pytest.raises(RetryableCRMError) as caught:
        await api(handler, clock).get("/persons/1")
    assert caught.value.retry_after == 5400.0
    assert len(calls) == 1 and clock.sleeps == []


async def test_a_spent_window_pauses_before_the_next_request() -> None:
    clock = Clock()
    client = api(lambda r: ok({}, headers={"x-ratelimit-remaining": "0",
                                           "x-ratelimit-reset": "2"}), clock)
    await client.get("/persons/1")
    await client.get("/persons/2")
    assert clock.sleeps == [2.0]


@pytest.mark.parametrize(("limit", "sleeps"), [(2, []), (3, [2.0])])
async def test_a_window_spent_by_someone_else_pauses_one_spent_here_does_not(
        limit: int, sleeps: list[float]) -> None:
    """None remaining after this process's own requests filled the rolling window is what its
    pacer knows already: it frees the next slot to the moment, not a whole-second reset later.
    None remaining while they did not fill it: another client shares the token; pause."""
    clock = Clock()
    burst = window_pacer(Buckets(), "b", limit, 2.0, sleep=clock.sleep, clock=clock)
    client = PipedriveAPI(
        httpx.AsyncClient(transport=httpx.MockTransport(lambda r: ok({}, headers={
            "x-ratelimit-remaining": "0" if r.url.path.endswith("/2") else "1",
            "x-ratelimit-reset": "2"}))),
        api_token="secret-token", base_url="https://acme.pipedrive.com", burst=burst,
        search=window_pacer(Buckets(), "s", 10, 2.0, sleep=clock.sleep, clock=clock),
        sleep=clock.sleep)
    await client.get("/persons/1")
    await client.get("/persons/2")
    await client.get("/persons/3")
    assert clock.sleeps == sleeps


async def test_401_is_permanent_names_the_setting_and_never_the_token() -> None:
    with pytest.raises(PipedriveAuthError) as caught:
        await api(lambda r: fail(401, "unauthorized access"), Clock()).get("/persons/1")
    assert "PIPEDRIVE_API_TOKEN" in str(caught.value)
    assert "secret-token" not in str(caught.value)


async def test_400_is_permanent_with_pipedrives_own_words() -> None:
    with pytest.raises(PermanentCRMError) as caught:
        await api(lambda r: fail(400, "Unknown custom field key 'x'", "See the docs"),
                  Clock()).post("/persons", {"name": "n"})
    assert "Unknown custom field key 'x' (See the docs)" in str(caught.value)


@pytest.mark.parametrize("failure", [
    lambda r: fail(503, "Service Unavailable"),
    lambda r: (_ for _ in ()).throw(httpx.RemoteProtocolError("cut", request=r)),
    lambda r: (_ for _ in ()).throw(httpx.ReadTimeout("slow", request=r)),
])
async def test_server_errors_and_broken_connections_are_retryable(failure: Handler) -> None:
    with pytest.raises(RetryableCRMError):
        await api(failure, Clock()).post("/persons", {"name": "n"})


# -- field resolution -------------------------------------------------------------------------


def test_needs_follow_the_field_map() -> None:
    found = {(n.entity, n.label): n for n in needs(FIELD_MAP)}
    token = found[("person", "Deep link token")]
    assert token.searchable and token.allowed <= {"varchar", "varchar_auto", "text"}
    assert found[("person", "Lifecycle stage")].options == ("Lead", "Customer")
    assert found[("person", "First-touch platform")].create_as == "enum"
    assert found[("person", "Install date")].create_as == "date"
    assert found[("person", "Last deep link claimed at")].create_as == "varchar"
    assert found[("deal", "linkcrm deal key")].searchable
    assert ("person", "Email") not in found  # a builtin, not a custom field


def test_check_reports_each_problem_with_its_fix() -> None:
    lists = catalog()
    persons = lists["/personFields"]
    token = next(f for f in persons if f["field_name"] == "Deep link token")
    token["field_name"] = "Deep Link Token"
    prefix = next(f for f in persons if f["field_name"] == "Deep link prefix")
    persons.append({**prefix, "field_code": "f" * 40})
    stage = next(f for f in persons if f["field_name"] == "Lifecycle stage")
    stage["options"] = stage["options"][:1]
    lists["/stages"] = [s for s in lists["/stages"] if s["name"] != "Won"]
    found = Catalog({"person": persons, "deal": lists["/dealFields"]}, lists["/pipelines"],
                    lists["/stages"])
    _, problems = check(FIELD_MAP, found)
    text = [str(p) for p in problems]
    assert text[0] == ("person field 'Deep link token' does not exist in Pipedrive (did you "
                       "mean 'Deep Link Token'?); fix: run `linkcrm provision pipedrive` to "
                       "create it")
    assert "2 person fields are labelled 'Deep link prefix'" in text[1]
    assert "'Lifecycle stage' lacks the option(s) 'Customer'" in text[2]
    assert "pipeline 'Deep Link Referrals' has no stage 'Won'" in text[3]
    assert len(text) == 4


async def test_start_up_fails_naming_the_missing_label_and_the_command() -> None:
    lists = catalog()
    lists["/personFields"] = [f for f in lists["/personFields"]
                              if f["field_name"] != "Referral source"]
    client = httpx.AsyncClient(transport=httpx.MockTransport(
        lambda r: ok(lists[r.url.path.removeprefix("/api/v2")])))
    target = PipedriveTarget(client, api_token="t", field_map=FIELD_MAP,
                             identities=Identities(), rate_limits=Buckets())
    with pytest.raises(PipedriveSetupError) as caught:
        await target.execute(SetStage("r", (IdentityKey("deep_link_token", "x"),),
                                      stage="lead"), CallContext("k"))
    assert "'Referral source' does not exist" in str(caught.value)
    assert "linkcrm provision pipedrive" in str(caught.value)


def test_values_go_on_the_wire_as_the_field_type_takes_them() -> None:
    platform = PDField("k" * 40, "First-touch platform", "enum", {"ios": 4, "android": 5})
    assert to_wire(platform, "first_touch_platform", "ios") == 4
    assert to_wire(platform, "first_touch_platform", "Android") == 5
    with pytest.raises(CoercionError, match="provision"):
        to_wire(platform, "first_touch_platform", "web")
    with pytest.raises(CoercionError):
        to_wire(PDField("k" * 40, "Score", "double"), "score", "12")
    assert to_wire(PDField("k" * 40, "Flag", "varchar"), "flag", True) == "true"


# -- claims and the exact re-check ----------------------------------------------------------


async def test_a_claim_is_won_once_recognised_by_its_owner_and_taken_over_when_stale() -> None:
    clock, store = Clock(), Identities()
    claims = Claims(timeout=120.0, wait=5.0, sleep=clock.sleep, clock=clock)
    slots = Slots(lambda n: store.lookup_identity("pipedrive", [IdentityKey("claim", n)]),
                   lambda n, v: store.bind_identity("pipedrive", IdentityKey("claim", n), v))
    assert await claims.try_claim("me", slots) == Claim(0, None)
    clock.now += 5
    assert await claims.try_claim("me", slots) == Claim(0, 1000.0)  # my retry: recover
    assert await claims.try_claim("other", slots) is None  # live: wait
    clock.now += 200
    assert await claims.try_claim("other", slots) == Claim(1, 1000.0)  # crashed: take over
    await Claim(1, None).finish(slots)
    assert await claims.try_claim("third", slots) == Claim(2, 1000.0)
    assert await claims.try_claim("fourth", slots) is None  # third's claim is live
    for finished in ("0.done", "2.done"):  # every claim finished: nothing to recover
        await slots.bind(finished, "done")
    assert await claims.try_claim("fourth", slots) == Claim(3, None)


async def test_a_waiter_takes_the_record_bound_meanwhile_or_gives_up_retryably() -> None:
    clock = Clock()
    claims = Claims(timeout=120.0, wait=5.0, sleep=clock.sleep, clock=clock)
    checks = iter([None, None, {"id": 9}])

    async def mapped() -> dict[str, int] | None:
        return next(checks)

    async def held(slot: str) -> str | None:
        return None if slot.endswith(".done") else f"someone@{clock.now:.3f}"

    async def never(slot: str, value: str) -> str:
        raise AssertionError("a held claim is not bound again")

    slots = Slots(held, never)
    assert await claims.claim("person", "k", slots, mapped) == {"id": 9}

    async def nothing() -> None:
        return None

    with pytest.raises(RetryableCRMError, match="another worker"):
        await claims.claim("person", "k", slots, nothing)


async def test_a_hit_that_differs_in_case_is_not_the_person() -> None:
    token_key = key_of("Deep link token")
    posted: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/persons/search"):
            assert request.url.params["exact_match"] == "true"
            return ok({"items": [{"result_score": 1, "item": {"id": 7, "custom_fields": []}}]})
        if request.url.path.endswith("/persons/7"):
            return ok({"id": 7, "name": "x", "emails": [],
                       "custom_fields": {token_key: "tok_a"}})
        posted.append(json.loads(request.content))
        return ok({"id": 8, "name": "tok_A", "custom_fields": {}})

    target, _ = make_target(handler)
    outcome = await target.execute(UpsertContact("r", (IdentityKey("deep_link_token", "tok_A"),)),
                                   CallContext("k"))
    assert outcome.created and outcome.record_id == "8"
    assert posted == [{"name": "tok_A", "custom_fields": {token_key: "tok_A"}}]


async def test_a_new_person_by_email_is_named_by_it_and_a_deal_lands_in_its_pipeline() -> None:
    posted: dict[str, dict[str, Any]] = {}

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/search"):
            return ok({"items": []})
        entity = request.url.path.rsplit("/", 1)[-1]
        posted[entity] = json.loads(request.content)
        return ok({"id": 5})

    target, _ = make_target(handler)
    identity = (IdentityKey("email", "ann@example.com"),)
    deal = CreateDeal("r", identity, key="referral-x", title="Referral: x", stage="new",
                      amount=25, set={"referral_code": "x"})
    outcome = await target.execute(deal, CallContext("k"))
    assert outcome.created
    assert posted["persons"] == {"name": "ann@example.com",
                                 "emails": [{"value": "ann@example.com", "primary": True}]}
    assert posted["deals"] == {
        "title": "Referral: x", "person_id": 5, "pipeline_id": 2, "stage_id": 7, "value": 25,
        "custom_fields": {key_of("linkcrm deal key", "/dealFields"): "referral-x",
                          key_of("Referral code", "/dealFields"): "x"}}


async def test_stage_moves_forward_only_and_leaves_foreign_values_alone() -> None:
    stage_key, token_key = key_of("Lifecycle stage"), key_of("Deep link token")
    current: dict[str, Any] = {stage_key: 101, token_key: "t"}  # Customer
    patches: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "PATCH":
            patches.append(json.loads(request.content))
        return ok({"id": 3, "name": "n", "emails": [], "custom_fields": dict(current)})

    store = Identities()
    store.map[("deep_link_token", "t")] = "3"
    target, _ = make_target(handler, identities=store)
    lead = SetStage("r", (IdentityKey("deep_link_token", "t"),), stage="lead")
    customer = SetStage("r", (IdentityKey("deep_link_token", "t"),), stage="customer")
    await target.execute(lead, CallContext("k1"))
    current[stage_key] = 999  # an option someone added by hand
    await target.execute(customer, CallContext("k2"))
    current[stage_key] = 100  # Lead
    await target.execute(customer, CallContext("k3"))
    assert patches == [{"custom_fields": {stage_key: 101}}]


async def test_set_replaces_the_primary_email_and_set_once_fills_only_empty_fields() -> None:
    campaign = key_of("First-touch campaign")
    token_key = key_of("Deep link token")
    patches: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "PATCH":
            patches.append(json.loads(request.content))
        return ok({"id": 3, "name": "Ann", "emails": [
            {"value": "old@example.com", "primary": True, "label": "work"}],
            "custom_fields": {campaign: "spring", token_key: "t"}})

    store = Identities()
    store.map[("deep_link_token", "t")] = "3"
    target, _ = make_target(handler, identities=store)
    action = UpsertContact("r", (IdentityKey("deep_link_token", "t"),),
                           set={"email": "new@example.com", "name": "Ann"},
                           set_once={"first_touch_campaign": "autumn",
                                     "deep_link_prefix": "invite"})
    await target.execute(action, CallContext("k"))
    assert patches == [{
        "custom_fields": {key_of("Deep link prefix"): "invite"},
        "emails": [{"value": "new@example.com", "primary": True},
                   {"value": "old@example.com", "primary": False, "label": "work"}]}]
