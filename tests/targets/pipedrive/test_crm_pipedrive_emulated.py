"""The Pipedrive target against the Pipedrive emulator over real HTTP on loopback."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine.actions import Action, CreateDeal, IdentityKey, SetStage, UpsertContact
from engine.errors import PermanentCRMError, RetryableCRMError
from engine.rules.evaluator import plan
from engine.rules.files import load_ruleset
from engine.rules.model import RuleSet
from engine.storage import Storage, open_storage
from engine.targets.base import CallContext
from engine.targets.pipedrive.admin import PipedriveAdmin
from engine.targets.pipedrive.fields import PipedriveSetupError
from engine.targets.pipedrive.target import PipedriveTarget
from engine.worker.retrying import RetryPolicy, call_with_retries
from tests.emulators.faults import FaultInjector
from tests.emulators.pipedrive import PipedriveEmulator
from tests.emulators.server import serve
from tests.support.identity_maps import AnotherWorkerRebinds

pytestmark = pytest.mark.anyio
TOKEN = "pd-test-token"
FAST = RetryPolicy(base=0.02, cap=0.3, max_attempts=40, rng=random.Random(3))


@pytest.fixture(scope="module")
def ruleset() -> RuleSet:
    return load_ruleset(["rules"])


async def provisioned(ruleset: RuleSet, **options: Any) -> PipedriveEmulator:
    emulator = PipedriveEmulator(api_token=TOKEN, **options)
    emulator.add_pipeline("Deep Link Referrals", ["Qualified", "Won"])
    limits = emulator.burst_limit, emulator.search_limit
    emulator.burst_limit = emulator.search_limit = 1000  # set-up is not what the tests measure
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=emulator.app)) as client:
        admin = PipedriveAdmin(client, api_token=TOKEN, base_url="http://pipedrive.test")
        await admin.provision(ruleset.field_map)
    emulator.burst_limit, emulator.search_limit = limits
    emulator.reset_usage()
    return emulator


@asynccontextmanager
async def target(url: str, ruleset: RuleSet, storage: Storage, *, timeout: float = 5.0,
                 **options: Any) -> AsyncIterator[PipedriveTarget]:
    async with httpx.AsyncClient(timeout=timeout) as client:
        yield PipedriveTarget(client, api_token=TOKEN, base_url=url,
                              field_map=ruleset.field_map, identities=storage.identities,
                              rate_limits=storage.rate_limits, **options)


def story(token: str, email: str) -> list[dict[str, Any]]:
    """The shipped rules' story for one referred user, as Tolinku and the app send it."""
    return [
        {"event": "install.tracked", "timestamp": "2026-03-01T12:30:00Z",
         "data": {"token": token, "prefix": "invite", "campaign": "spring", "platform": "iOS"}},
        {"event": "referral.created", "timestamp": "2026-03-05T09:00:00Z",
         "data": {"token": token, "referrer_token": "tok_referrer", "referred_user_id": "u-7"}},
        {"event": "referral.completed", "timestamp": "2026-03-20T08:15:00Z",
         "data": {"token": token, "referrer_token": "tok_referrer"}},
        {"event": "app.user_identified", "timestamp": "2026-03-21T10:00:00Z",
         "data": {"token": token, "email": email, "first_name": "Ann", "last_name": "Lee",
                  "user_id": "u-7"}},
    ]


async def run_events(target_: PipedriveTarget, ruleset: RuleSet, events: list[dict[str, Any]],
                     prefix: str, retry: RetryPolicy | None = None) -> int:
    """Apply each event's plan in order (as the worker does for one identity); returns the
    number of actions applied."""
    applied = 0
    for number, event in enumerate(events):
        for index, action in enumerate(plan(event, ruleset).actions):
            key = f"{prefix}:{number}:{action.rule}:{action.kind}:{index}"
            if retry is None:
                await target_.execute(action, CallContext(key))
            else:
                await call_with_retries(
                    lambda a=action, k=key: target_.execute(a, CallContext(k)), retry,
                    sleep=asyncio.sleep)
            applied += 1
    return applied


def custom(emulator: PipedriveEmulator, kind: str, record: dict[str, Any], label: str) -> Any:
    return record["custom_fields"].get(emulator.field_key(kind, label))


async def test_shipped_story_makes_one_person_with_fields_stage_and_one_deal(
        ruleset: RuleSet, storage: Storage) -> None:
    emulator = await provisioned(ruleset, search_lag=0.3, burst_window=0.5, search_window=0.5)
    with serve(emulator.app) as url:
        async with target(url, ruleset, storage, burst_window=0.5, search_window=0.5) as pd:
            await run_events(pd, ruleset, story("tok_Ann", " Ann@Example.com"), "story")
    assert len(emulator.persons) == 1
    person = next(iter(emulator.persons.values()))
    assert person["name"] == "Ann Lee"
    assert person["emails"] == [{"label": "work", "primary": True, "value": "ann@example.com"}]
    expected = {"Deep link token": "tok_Ann", "Deep link prefix": "invite",
                "First-touch campaign": "spring", "Install date": "2026-03-01",
                "Referral source": "tok_referrer", "Referral date": "2026-03-05",
                "Conversion date": "2026-03-20", "App user id": "u-7"}
    assert {label: custom(emulator, "person", person, label) for label in expected} == expected
    platform = custom(emulator, "person", person, "First-touch platform")
    assert emulator.option_label("person", "First-touch platform", platform) == "ios"
    stage = custom(emulator, "person", person, "Lifecycle stage")
    assert emulator.option_label("person", "Lifecycle stage", stage) == "Customer"
    assert len(emulator.deals) == 1
    deal = next(iter(emulator.deals.values()))
    pipeline = next(p for p in emulator.pipelines if p["name"] == "Deep Link Referrals")
    qualified = next(s for s in emulator.stages
                     if s["pipeline_id"] == pipeline["id"] and s["name"] == "Qualified")
    assert (deal["person_id"], deal["pipeline_id"], deal["stage_id"]) == (
        person["id"], pipeline["id"], qualified["id"])
    assert deal["title"] == "Referral: tok_Ann"
    assert custom(emulator, "deal", deal, "linkcrm deal key") == "referral-tok_Ann"
    assert custom(emulator, "deal", deal, "Referral code") == "tok_Ann"
    # v1 person and deal endpoints are never used.
    assert not [entry for entry in emulator.log if "/v1/" in entry[2]]


async def test_set_once_and_forward_only_stage_survive_a_replayed_install(
        ruleset: RuleSet, storage: Storage) -> None:
    emulator = await provisioned(ruleset, burst_window=0.5, search_window=0.5)
    events = story("tok_Bo", "bo@example.com")
    later_install = {**events[0], "data": {**events[0]["data"], "campaign": "autumn",
                                           "platform": "android"}}
    with serve(emulator.app) as url:
        async with target(url, ruleset, storage, burst_window=0.5, search_window=0.5) as pd:
            await run_events(pd, ruleset, [*events, later_install], "replay")
    [person] = emulator.persons.values()
    assert custom(emulator, "person", person, "First-touch campaign") == "spring"
    platform = custom(emulator, "person", person, "First-touch platform")
    assert emulator.option_label("person", "First-touch platform", platform) == "ios"
    stage = custom(emulator, "person", person, "Lifecycle stage")
    assert emulator.option_label("person", "Lifecycle stage", stage) == "Customer"


async def test_case_insensitive_search_never_merges_tokens_that_differ_in_case(
        ruleset: RuleSet, tmp_path: Path) -> None:
    emulator = await provisioned(ruleset, burst_window=0.5, search_window=0.5)
    with serve(emulator.app) as url:
        for name, token in (("one", "tok_A"), ("two", "tok_a"), ("three", "tok_A")):
            # A fresh identity map each time, so every upsert must search Pipedrive.
            store = open_storage(f"sqlite:///{tmp_path / name}.db")
            await store.migrate()
            try:
                async with target(url, ruleset, store, burst_window=0.5,
                                  search_window=0.5) as pd:
                    action = UpsertContact("r", (IdentityKey("deep_link_token", token),),
                                           set={"deep_link_token": token})
                    await pd.execute(action, CallContext(f"{name}-key"))
            finally:
                await store.close()
    assert emulator.calls["GET /api/v2/persons/search"] == 3
    assert sorted(custom(emulator, "person", p, "Deep link token")
                  for p in emulator.persons.values()) == ["tok_A", "tok_a"]


async def test_a_person_whose_other_field_holds_the_token_is_not_taken_for_it(
        ruleset: RuleSet, storage: Storage) -> None:
    emulator = await provisioned(ruleset, burst_window=0.5, search_window=0.5)
    with serve(emulator.app) as url:
        async with target(url, ruleset, storage, burst_window=0.5, search_window=0.5) as pd:
            referred = UpsertContact("r", (IdentityKey("deep_link_token", "tok_new"),),
                                     set_once={"referral_source": "tok_ref"})
            await pd.execute(referred, CallContext("k1"))
            referrer = UpsertContact("r", (IdentityKey("deep_link_token", "tok_ref"),))
            outcome = await pd.execute(referrer, CallContext("k2"))
    assert outcome.created
    assert len(emulator.with_value("person", "Deep link token", "tok_ref")) == 1
    assert len(emulator.persons) == 2


@pytest.mark.parametrize("workers", [1, 2])
async def test_concurrent_upserts_of_one_new_token_create_one_person(
        ruleset: RuleSet, storage: Storage, workers: int) -> None:
    # The search index lags by a second: searching cannot prevent duplicates, the claim must.
    emulator = await provisioned(ruleset, search_lag=1.0, latency=0.01, burst_window=0.5,
                                 search_window=0.5)
    action = UpsertContact("r", (IdentityKey("deep_link_token", "tok_race"),),
                           set={"deep_link_token": "tok_race", "deep_link_prefix": "p"})
    with serve(emulator.app) as url:
        async with target(url, ruleset, storage, burst_window=0.5, search_window=0.5) as first, \
                target(url, ruleset, storage, burst_window=0.5, search_window=0.5) as second:
            pool = [first, second][:workers]  # two targets = two workers sharing the database
            outcomes = await asyncio.gather(*(
                call_with_retries(
                    lambda i=i: pool[i % workers].execute(action, CallContext(f"k{i}")), FAST)
                for i in range(10)))
    assert emulator.calls["POST /api/v2/persons"] == 1
    assert len(emulator.persons) == 1
    assert [o.created for o in outcomes].count(True) == 1
    assert {o.record_id for o in outcomes} == {str(next(iter(emulator.persons)))}


def drop_first(count: int, *routes: tuple[str, str]) -> Callable[[dict[str, Any]], bool]:
    """`exempt` for a FaultInjector at rate 1: only the first `count` requests to each route
    are faulted."""
    seen: dict[tuple[str, str], int] = {}

    def exempt(scope: dict[str, Any]) -> bool:
        route = (scope["method"], scope["path"])
        if route not in routes or seen.get(route, 0) >= count:
            return True
        seen[route] = seen.get(route, 0) + 1
        return False

    return exempt


@pytest.mark.parametrize("path", ["/api/v2/persons", "/api/v2/deals"])
async def test_a_lost_create_response_then_a_retry_finds_the_record(
        ruleset: RuleSet, storage: Storage, path: str) -> None:
    # The index lags longer than the retry: only the list read finds what was committed.
    emulator = await provisioned(ruleset, search_lag=30.0)
    faults = FaultInjector(emulator.app, rate=1.0, kinds=("drop_after_commit",),
                           exempt=drop_first(1, ("POST", path)))
    identity = (IdentityKey("deep_link_token", "tok_lost"),)
    deal = CreateDeal("r", identity, key="referral-tok_lost", title="Referral", stage="new")
    with serve(faults) as url:
        async with target(url, ruleset, storage) as pd:
            outcome = await call_with_retries(
                lambda: pd.execute(deal, CallContext("deal-key")), FAST)
    assert faults.injected == {"drop_after_commit": 1}
    assert len(emulator.persons) == 1
    assert len(emulator.deals) == 1
    assert outcome.record_id == str(next(iter(emulator.deals)))


async def test_twenty_percent_faults_lose_nothing_and_duplicate_nothing(
        ruleset: RuleSet, storage: Storage) -> None:
    # The index lags longer than any retry takes, so a retried create cannot lean on search.
    emulator = await provisioned(ruleset, search_lag=2.0, burst_limit=40, burst_window=0.5,
                                 search_limit=10, search_window=0.5)
    creates = (("POST", "/api/v2/persons"), ("POST", "/api/v2/deals"))
    # Besides 20% random faults of every kind, the first three person and deal creates
    # surely commit and lose their response (random draws may miss the few creates).
    lost = FaultInjector(emulator.app, rate=1.0, kinds=("drop_after_commit",),
                         exempt=drop_first(3, *creates))
    faults = FaultInjector(lost, rate=0.2, seed=11, slow_seconds=0.4, too_many=emulator.too_many)
    tokens = [f"tok_{n:02d}" for n in range(15)]  # 15 identities x 4 events = 60 events
    with serve(faults) as url:
        async with target(url, ruleset, storage, timeout=0.3, burst_limit=40,
                          burst_window=0.5, search_window=0.5) as pd:
            counts = await asyncio.gather(*(
                run_events(pd, ruleset, story(token, f"{token}@example.com"), token, FAST)
                for token in tokens))
    assert sum(counts) == 15 * 8
    assert set(faults.injected) == {"server_error", "too_many", "slow", "drop_before",
                                    "drop_after_commit"}
    assert lost.injected == {"drop_after_commit": 6}
    assert len(emulator.persons) == 15
    assert len(emulator.deals) == 15
    for token in tokens:
        [person] = emulator.with_value("person", "Deep link token", token)
        assert person["emails"][0]["value"] == f"{token}@example.com"
        assert person["name"] == "Ann Lee"
        assert emulator.option_label("person", "Lifecycle stage", custom(
            emulator, "person", person, "Lifecycle stage")) == "Customer"
        [deal] = emulator.with_value("deal", "linkcrm deal key", f"referral-{token}")
        assert deal["person_id"] == person["id"]


async def test_429s_are_honoured_and_every_action_still_lands(
        ruleset: RuleSet, storage: Storage) -> None:
    # The account allows 4 requests a second; the target believes in 400 per 2 s, so its
    # bucket lets all six actions' first requests go at once, before any answer could say
    # that the window is spent.
    emulator = await provisioned(ruleset, burst_limit=4, burst_window=1.0)
    actions: list[Action] = [SetStage("r", (IdentityKey("deep_link_token", f"t{n}"),),
                                      stage="lead") for n in range(6)]
    with serve(emulator.app) as url:
        async with target(url, ruleset, storage, burst_limit=400, search_limit=400) as pd:
            await pd.start()
            emulator.calls.clear()
            await asyncio.gather(*(call_with_retries(
                lambda a=a: pd.execute(a, CallContext(a.identity[0].value)), FAST)
                for a in actions))
    assert len(emulator.persons) == 6
    # Each lane over-sends at most once per window, then waits for the reset instead of
    # hammering (retrying at once would earn a 429 per attempt): the searches, whose answers
    # count down the Search API limit only, and then the creates.
    assert 0 < emulator.rate_limited <= 2 * len(actions)


async def test_an_exhausted_daily_budget_is_retryable_later_without_a_storm(
        ruleset: RuleSet, storage: Storage) -> None:
    emulator = await provisioned(ruleset)
    with serve(emulator.app) as url:
        async with target(url, ruleset, storage) as pd:
            await pd.start()
            emulator.daily_budget = emulator.tokens_used  # nothing left today
            emulator.calls.clear()
            with pytest.raises(RetryableCRMError) as caught:
                await pd.execute(SetStage("r", (IdentityKey("deep_link_token", "t"),),
                                          stage="lead"), CallContext("k"))
    assert caught.value.retry_after is not None and caught.value.retry_after > 60
    assert sum(emulator.calls.values()) == 1


@pytest.mark.parametrize(("deleted_reads", "deleted_in_search"), [
    ("flagged", False), ("flagged", True), ("missing", False), ("missing", True)])
async def test_a_person_or_deal_deleted_in_pipedrive_is_gone_not_updated(
        ruleset: RuleSet, storage: Storage, deleted_reads: str, deleted_in_search: bool,
        tmp_path: Path) -> None:
    """Deletes are soft for 30 days; whether a deleted record still answers reads (with
    `is_deleted: true`) or search is not documented. Either way it is gone for linkcrm: the
    identity map entry is dropped, a new person is made and updated, a new deal made."""
    emulator = await provisioned(ruleset, deleted_reads=deleted_reads,
                                 deleted_in_search=deleted_in_search)
    token = IdentityKey("deep_link_token", "tok_gone")
    action = UpsertContact("r", (token,))
    named = UpsertContact("r", (token,), set={"name": "Ann"})
    deal = CreateDeal("r", (token,), key="referral-tok_gone", title="Referral", stage="new")
    with serve(emulator.app) as url:
        async with target(url, ruleset, storage) as pd:
            first = await pd.execute(action, CallContext("k1"))
            first_deal = await pd.execute(deal, CallContext("d1"))
            emulator.delete_person(int(first.record_id or 0))
            emulator.delete_deal(int(first_deal.record_id or 0))
            second = await pd.execute(action, CallContext("k2"))
            updated = await pd.execute(named, CallContext("k3"))
            second_deal = await pd.execute(deal, CallContext("d2"))
            again = await pd.execute(deal, CallContext("d3"))
        # A worker with an empty identity map finds the live records by search, never the
        # deleted ones.
        fresh = open_storage(f"sqlite:///{tmp_path / 'fresh.db'}")
        await fresh.migrate()
        async with target(url, ruleset, fresh) as other:
            found = await other.execute(action, CallContext("k4"))
            found_deal = await other.execute(deal, CallContext("d4"))
        await fresh.close()
    assert second.created and second.record_id != first.record_id
    assert updated.record_id == second.record_id and not updated.created
    assert second_deal.created and second_deal.record_id != first_deal.record_id
    assert (again.record_id, again.created) == (second_deal.record_id, False)
    assert (found.record_id, found.created) == (second.record_id, False)
    assert (found_deal.record_id, found_deal.created) == (second_deal.record_id, False)
    [person] = emulator.live("person")
    assert str(person["id"]) == second.record_id and person["name"] == "Ann"
    assert emulator.persons[int(first.record_id or 0)]["name"] == "tok_gone"  # untouched
    [live_deal] = emulator.live("deal")
    assert str(live_deal["id"]) == second_deal.record_id
    assert live_deal["person_id"] == int(second.record_id or 0)
    # The finished claim lets the re-creation go ahead without a recovery listing.
    assert emulator.calls["GET /api/v2/persons"] == 0


async def test_forgetting_a_deleted_person_keeps_what_another_worker_mapped_meanwhile(
        ruleset: RuleSet, storage: Storage) -> None:
    """The mapped person was deleted in Pipedrive, so its keys are forgotten; another worker
    maps the email anew just as this one gets to it. Forgetting names the deleted person, so
    the newer mapping stays (a lookup, then an unbind, would have removed it)."""
    emulator = await provisioned(ruleset)
    token = IdentityKey("deep_link_token", "tok_race")
    email = IdentityKey("email", "ann@example.com")
    action = UpsertContact("r", (token, email), set={"email": "ann@example.com"})
    identities = AnotherWorkerRebinds(storage.identities, "pipedrive", email, "777")
    with serve(emulator.app) as url:
        async with httpx.AsyncClient(timeout=5.0) as client:
            pd = PipedriveTarget(client, api_token=TOKEN, base_url=url,
                                 field_map=ruleset.field_map, identities=identities,
                                 rate_limits=storage.rate_limits)
            first = await pd.execute(action, CallContext("k1"))
            emulator.delete_person(int(first.record_id or 0))
            identities.armed = True
            second = await pd.execute(action, CallContext("k2"))
    assert not identities.armed  # the other worker did write, in the middle of forgetting
    assert second.created and second.record_id != first.record_id
    assert await storage.identities.lookup_identity("pipedrive", [token]) == second.record_id
    assert await storage.identities.lookup_identity("pipedrive", [email]) == "777"


async def test_the_emulator_deletes_softly_and_purges_after_30_days(ruleset: RuleSet) -> None:
    now = [1_800_000_000.0]
    emulator = await provisioned(ruleset, clock=lambda: now[0])
    headers = {"x-api-token": TOKEN}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=emulator.app),
                                 base_url="http://pipedrive.test/api/v2",
                                 headers=headers) as client:
        made = (await client.post("/persons", json={"name": "Ann"})).json()["data"]
        gone = await client.delete(f"/persons/{made['id']}")
        assert gone.json() == {"success": True, "data": {"id": made["id"]},
                               "additional_data": None}
        read = (await client.get(f"/persons/{made['id']}")).json()["data"]
        assert read["is_deleted"] is True
        assert (await client.get("/persons")).json()["data"] == []
        assert (await client.delete(f"/persons/{made['id']}")).status_code == 404
        now[0] += 30 * 86_400
        assert (await client.get(f"/persons/{made['id']}")).status_code == 404
    emulator.deleted_reads = "missing"
    assert emulator.persons == {}


async def test_start_up_names_every_missing_label_and_the_fix(
        ruleset: RuleSet, storage: Storage) -> None:
    emulator = PipedriveEmulator(api_token=TOKEN)
    with serve(emulator.app) as url:
        async with target(url, ruleset, storage) as pd:
            with pytest.raises(PipedriveSetupError) as caught:
                await pd.start()
    message = str(caught.value)
    assert "person field 'Deep link token' does not exist" in message
    assert "deal field 'linkcrm deal key' does not exist" in message
    assert "linkcrm provision pipedrive" in message
    assert "pipeline 'Deep Link Referrals' does not exist" in message


async def test_provision_is_idempotent_and_doctor_then_finds_nothing(
        ruleset: RuleSet) -> None:
    emulator = PipedriveEmulator(api_token=TOKEN, burst_limit=1000)
    emulator.add_pipeline("Deep Link Referrals", ["Qualified"])
    with serve(emulator.app) as url:
        async with httpx.AsyncClient() as client:
            admin = PipedriveAdmin(client, api_token=TOKEN, base_url=url)
            before = [str(f) for f in await admin.doctor(ruleset.field_map)]
            created = await admin.provision(ruleset.field_map)
            again = await admin.provision(ruleset.field_map)
            after = [str(f) for f in await admin.doctor(ruleset.field_map)]
            wrong = [str(f) for f in await PipedriveAdmin(
                client, api_token="nope", base_url=url).doctor(ruleset.field_map)]
    assert any("'Deep link token' does not exist" in p and "provision" in p for p in before)
    assert any("has no stage 'Won'; fix: run `linkcrm provision pipedrive`" in p
               for p in before)
    assert len(created) == 16 and created[-3:] == [
        "pipeline 'Deep Link Referrals': already exists",
        "stage(s) 'Qualified' of pipeline 'Deep Link Referrals': already exist",
        "created stage(s) 'Won' in pipeline 'Deep Link Referrals'"]
    assert again == ["pipeline 'Deep Link Referrals': already exists",
                     "stage(s) 'Qualified', 'Won' of pipeline 'Deep Link Referrals': "
                     "already exist"]
    assert after == []
    assert len(wrong) == 1 and "PIPEDRIVE_API_TOKEN" in wrong[0] and "nope" not in wrong[0]


@pytest.mark.parametrize("new_pipeline_stages", [(), ("Qualified", "Contact Made")])
async def test_provision_creates_the_pipeline_and_its_stages_once(
        ruleset: RuleSet, new_pipeline_stages: tuple[str, ...]) -> None:
    """Whether Pipedrive gives a pipeline made through the API stages of its own is not
    documented: provision reads what the new pipeline has and adds only what is missing."""
    emulator = PipedriveEmulator(api_token=TOKEN, burst_limit=1000,
                                 new_pipeline_stages=new_pipeline_stages)
    emulator.add_pipeline("Other", ["Won"])  # a stage of another pipeline is no match
    with serve(emulator.app) as url:
        async with httpx.AsyncClient() as client:
            admin = PipedriveAdmin(client, api_token=TOKEN, base_url=url)
            created = await admin.provision(ruleset.field_map)
            again = await admin.provision(ruleset.field_map)
            problems = [str(f) for f in await admin.doctor(ruleset.field_map)]
    pipeline = [line for line in created if "pipeline" in line]
    if new_pipeline_stages:
        assert pipeline == ["created pipeline 'Deep Link Referrals'",
                            "stage(s) 'Qualified' of pipeline 'Deep Link Referrals': already "
                            "exist",
                            "created stage(s) 'Won' in pipeline 'Deep Link Referrals'"]
    else:
        assert pipeline == ["created pipeline 'Deep Link Referrals'",
                            "created stage(s) 'Qualified', 'Won' in pipeline "
                            "'Deep Link Referrals'"]
    assert again == ["pipeline 'Deep Link Referrals': already exists",
                     "stage(s) 'Qualified', 'Won' of pipeline 'Deep Link Referrals': "
                     "already exist"]
    assert problems == []
    assert [p["name"] for p in emulator.pipelines].count("Deep Link Referrals") == 1
    assert emulator.stage_names("Deep Link Referrals") == [
        *new_pipeline_stages, *(s for s in ("Qualified", "Won") if s not in new_pipeline_stages)]
    assert emulator.calls["POST /api/v2/pipelines"] == 1


async def test_doctor_flags_an_unsearchable_identity_field_and_a_missing_stage_option(
        ruleset: RuleSet) -> None:
    emulator = await provisioned(ruleset)
    token = next(f for f in emulator.fields["person"] if f["field_name"] == "Deep link token")
    token["field_type"] = "date"
    stage = next(f for f in emulator.fields["person"] if f["field_name"] == "Lifecycle stage")
    stage["options"] = [o for o in stage["options"] if o["label"] != "Customer"]
    with serve(emulator.app) as url:
        async with httpx.AsyncClient() as client:
            problems = [str(f) for f in await PipedriveAdmin(
                client, api_token=TOKEN, base_url=url).doctor(ruleset.field_map)]
    assert len(problems) == 2
    assert "'Deep link token' has type date" in problems[0] and "searchable" in problems[0]
    assert "lacks the option(s) 'Customer'" in problems[1] and "provision" in problems[1]


async def test_the_emulator_is_as_strict_as_pipedrive_v2(ruleset: RuleSet) -> None:
    emulator = await provisioned(ruleset, burst_limit=100)
    key = emulator.field_key("person", "Install date")
    with serve(emulator.app) as url:
        async with httpx.AsyncClient(base_url=url, headers={"x-api-token": TOKEN}) as client:
            answers = {
                "v1 persons": await client.get("/v1/persons"),
                "v1 deals": await client.post("/api/v1/deals", json={"title": "x"}),
                "query token": await client.get("/api/v2/persons",
                                                params={"api_token": TOKEN}),
                "no token": await client.get("/api/v2/persons", headers={"x-api-token": ""}),
                "string boolean": await client.post("/api/v2/persons", json={
                    "name": "x", "emails": [{"value": "a@b.co", "primary": "true"}]}),
                "unknown key": await client.post("/api/v2/persons", json={
                    "name": "x", "custom_fields": {"f" * 40: "v"}}),
                "bad date": await client.post("/api/v2/persons", json={
                    "name": "x", "custom_fields": {key: "01/03/2026"}}),
                "no name": await client.post("/api/v2/persons", json={"emails": []}),
                "short term": await client.get("/api/v2/persons/search", params={"term": "a"}),
                "string number": await client.post("/api/v2/deals", json={
                    "title": "x", "value": "10"}),
            }
    statuses = {name: answer.status_code for name, answer in answers.items()}
    assert statuses == {"v1 persons": 410, "v1 deals": 410, "query token": 401,
                        "no token": 401, "string boolean": 400, "unknown key": 400,
                        "bad date": 400, "no name": 400, "short term": 400,
                        "string number": 400}
    for answer in answers.values():
        body = answer.json()
        assert body["success"] is False and body["data"] is None
        assert isinstance(body["error"], str) and "error_info" in body


async def test_a_validation_error_is_permanent_with_pipedrives_message(
        ruleset: RuleSet, storage: Storage) -> None:
    emulator = await provisioned(ruleset)
    app_user = next(f for f in emulator.fields["person"] if f["field_name"] == "App user id")
    action = UpsertContact("r", (IdentityKey("deep_link_token", "tok_v"),),
                           set={"app_user_id": "u-1"})
    with serve(emulator.app) as url:
        async with target(url, ruleset, storage) as pd:
            await pd.start()
            app_user["field_type"] = "double"  # changed in Pipedrive after start-up
            with pytest.raises(PermanentCRMError) as caught:
                await pd.execute(action, CallContext("k"))
    assert "400" in str(caught.value) and "Invalid value for custom field" in str(caught.value)
