"""HubSpot target over real HTTP against the emulator: the shipped rules' story, 20% injected
faults (including writes that commit and then lose their answer), and the rate limit."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import httpx
import pytest

from engine.actions import Action, IdentityKey, UpsertContact
from engine.config.fieldmap import FieldMap
from engine.errors import RetryableCRMError
from engine.rules.evaluator import plan
from engine.rules.files import load_ruleset
from engine.rules.model import RuleSet
from engine.storage import Storage
from engine.targets.base import CallContext, Outcome
from engine.targets.hubspot.admin import provision
from engine.targets.hubspot.target import HubSpotTarget
from engine.worker.retrying import RetryPolicy, call_with_retries
from tests.emulators.faults import FaultInjector
from tests.emulators.hubspot import create_hubspot_emulator, too_many
from tests.emulators.hubspot_state import HubSpotState
from tests.emulators.server import serve
from tests.support.paths import REPO

ROOT = REPO
TOKEN = "pat-na1-emulated"
FAST = RetryPolicy(base=0.01, cap=0.05, max_attempts=40)

pytestmark = pytest.mark.anyio



@pytest.fixture(scope="module")
def ruleset() -> RuleSet:
    return load_ruleset([ROOT / "rules"])


def story(token: str) -> list[dict[str, Any]]:
    """install -> referral sign-up -> referral conversion -> the app identifies the user."""
    return [
        {"event": "install.tracked", "timestamp": "2026-03-01T12:30:00Z",
         "data": {"token": token, "prefix": "invite", "campaign": "spring-referrals",
                  "platform": "iOS"}},
        {"event": "referral.created", "timestamp": "2026-03-05T09:00:00Z",
         "data": {"token": token, "referrer_token": "tok_alice", "campaign": "other"}},
        {"event": "referral.completed", "timestamp": "2026-03-20T08:15:00Z",
         "data": {"token": token, "referrer_token": "tok_alice"}},
        {"event": "app.user_identified", "timestamp": "2026-03-20T09:00:00Z",
         "data": {"token": token, "email": f" {token.upper()}@Example.com ",
                  "first_name": "Ada", "last_name": "Lovelace", "user_id": f"user_{token}"}},
    ]


def actions(events: list[dict[str, Any]], ruleset: RuleSet
            ) -> list[tuple[Action, CallContext]]:
    planned = []
    for number, event in enumerate(events):
        result = plan(event, ruleset)
        assert not result.failures
        planned += [(a, CallContext(f"{event['event']}:{number}:{i}"))
                    for i, a in enumerate(result.actions)]
    return planned


def assert_story_applied(state: HubSpotState, tokens: list[str]) -> None:
    contacts = Counter(r.properties.get("deep_link_token") for r in state.contacts.records.values())
    assert contacts == Counter(tokens), "one contact per token, no duplicates"
    deals = Counter(r.properties["linkcrm_deal_key"] for r in state.deals.records.values())
    assert deals == Counter(f"referral-{t}" for t in tokens), "one deal per key"
    by_token = {r.properties["deep_link_token"]: r for r in state.contacts.records.values()}
    for record in state.deals.records.values():
        token = record.properties["referral_code"]
        assert record.properties["dealname"] == f"Referral: {token}"
        assert record.properties["dealstage"] == "appointmentscheduled"
        assert (record.id, by_token[token].id) in state.associations
    for token, record in by_token.items():
        assert {k: v for k, v in record.properties.items()
                if k not in ("hs_object_id", "createdate", "lastmodifieddate")} == {
            "deep_link_token": token, "deep_link_prefix": "invite",
            "first_touch_campaign": "spring-referrals", "first_touch_platform": "ios",
            "install_date": "2026-03-01", "referral_source": "tok_alice",
            "referral_date": "2026-03-05", "conversion_date": "2026-03-20",
            "lifecyclestage": "customer", "email": f"{token}@example.com",
            "firstname": "Ada", "lastname": "Lovelace", "app_user_id": f"user_{token}"}
    assert len(state.associations) == len(tokens)


def values(state: HubSpotState) -> dict[str, dict[str, str]]:
    return {r.id: {k: v for k, v in r.properties.items() if k != "lastmodifieddate"}
            for r in [*state.contacts.records.values(), *state.deals.records.values()]}


async def provisioned(field_map: FieldMap, **options: Any) -> tuple[Any, HubSpotState]:
    """An emulator with what `linkcrm provision hubspot` creates, its counters reset."""
    app, state = create_hubspot_emulator(TOKEN, **options)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app)) as client:
        await provision(client, TOKEN, field_map, base_url="http://hubspot")
    state.forget_requests()
    return app, state


@pytest.fixture
async def story_emulator(ruleset: RuleSet) -> AsyncIterator[tuple[str, HubSpotState]]:
    app, state = await provisioned(ruleset.field_map)
    with serve(app) as url:
        yield url, state


async def test_the_shipped_story_makes_one_customer_and_one_deal(
        story_emulator: tuple[str, HubSpotState], ruleset: RuleSet, storage: Storage) -> None:
    url, state = story_emulator
    async with httpx.AsyncClient(timeout=5) as client:
        target = HubSpotTarget(client, TOKEN, ruleset.field_map, storage.identities,
                               storage.rate_limits, base_url=url)
        for action, key in actions(story("tok_ada"), ruleset):
            outcome = await target.execute(action, CallContext(key))
            assert outcome.record_id
        assert_story_applied(state, ["tok_ada"])
        # Replaying the whole story (a redelivery, `linkcrm replay`) changes no value.
        before = values(state)
        for action, key in actions(story("tok_ada"), ruleset):
            await target.execute(action, CallContext(key))
    assert values(state) == before
    assert_story_applied(state, ["tok_ada"])


async def fault_emulator(ruleset: RuleSet) -> tuple[FaultInjector, HubSpotState]:
    # A 0.1 s window keeps TEN_SECONDLY_ROLLING pauses short; the limit itself is not the
    # point here (see the rate-limit test).
    app, state = await provisioned(ruleset.field_map, rate_limit=5000, window_seconds=0.1)
    faults = FaultInjector(app, rate=0.2, seed=11, slow_seconds=0.6,
                           too_many=lambda: too_many(state))
    return faults, state


async def test_twenty_percent_faults_lose_nothing_and_duplicate_nothing(
        ruleset: RuleSet, storage: Storage) -> None:
    faults, state = await fault_emulator(ruleset)
    tokens = [f"tok_{n:03}" for n in range(50)]  # 200 events
    gate = asyncio.Semaphore(10)

    async def deliver(target: HubSpotTarget, token: str) -> None:
        async with gate:  # identities in parallel, each identity's events in order
            for action, key in actions(story(token), ruleset):
                await call_with_retries(partial(target.execute, action, key), FAST)

    with serve(faults) as url:
        async with httpx.AsyncClient(timeout=0.3) as client:
            target = HubSpotTarget(client, TOKEN, ruleset.field_map, storage.identities,
                                   storage.rate_limits,
                                   base_url=url)
            await asyncio.gather(*(deliver(target, t) for t in tokens))
        await asyncio.sleep(faults.slow_seconds)  # let slow, abandoned writes land too
    assert set(faults.injected) == {"server_error", "too_many", "slow", "drop_before",
                                    "drop_after_commit"}
    assert_story_applied(state, tokens)


async def test_batched_delivery_under_faults_applies_everything_once(
        ruleset: RuleSet, storage: Storage) -> None:
    faults, state = await fault_emulator(ruleset)
    tokens = [f"tok_{n:03}" for n in range(50)]
    # Stage by stage, as a backlog would hold them: every install, then every sign-up...
    queue = actions([event for step in range(4) for event in
                     (story(t)[step] for t in tokens)], ruleset)
    with serve(faults) as url:
        async with httpx.AsyncClient(timeout=0.3) as client:
            target = HubSpotTarget(client, TOKEN, ruleset.field_map, storage.identities,
                                   storage.rate_limits,
                                   base_url=url)
            # Small chunks: more requests, so every kind of fault hits a batch call.
            for start in range(0, len(queue), 10):
                pending = queue[start:start + 10]
                for _attempt in range(40):
                    results = await target.execute_many(pending)
                    assert not [r for r in results
                                if isinstance(r, Exception)
                                and not isinstance(r, RetryableCRMError)]
                    pending = [item for item, result in zip(pending, results, strict=True)
                               if isinstance(result, Exception)]
                    if not pending:
                        break
                    await asyncio.sleep(0.02)
                assert not pending
        await asyncio.sleep(faults.slow_seconds)
    assert len(faults.injected) == 5 and sum(faults.injected.values()) >= 20
    assert_story_applied(state, tokens)


async def test_pacing_keeps_429s_to_the_first_window(ruleset: RuleSet,
                                                      storage: Storage) -> None:
    # The account allows 10 per second; the target starts believing 190 per 10 s and must
    # learn the real limit from the headers of its first answers.
    app, state = await provisioned(ruleset.field_map, rate_limit=10, window_seconds=1.0)
    with serve(app) as url:
        async with httpx.AsyncClient(timeout=5) as client:
            target = HubSpotTarget(client, TOKEN, ruleset.field_map, storage.identities,
                                   storage.rate_limits,
                                   base_url=url, requests_per_window=190)

            async def one(n: int) -> Outcome:
                identity = (IdentityKey("deep_link_token", f"tok_{n}"),)
                action = UpsertContact("install", identity, set={"deep_link_prefix": "p"})
                return await call_with_retries(
                    lambda: target.execute(action, CallContext(f"k{n}")), FAST)

            started = time.monotonic()
            await asyncio.gather(*(one(n) for n in range(36)))
            elapsed = time.monotonic() - started
    assert len(state.contacts.records) == 36
    assert state.first_request_at is not None
    late = [t for t in state.throttled_at if t > state.first_request_at + 1.0]
    assert late == [], f"{len(late)} 429s after the first window"
    assert elapsed >= (36 - 10) / 10 * 0.9  # the limit, not the emulator, set the pace


async def test_the_emulator_limit_is_real_without_pacing(ruleset: RuleSet) -> None:
    app, state = await provisioned(ruleset.field_map, rate_limit=10, window_seconds=1.0)
    with serve(app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=5) as client:
            answers = await asyncio.gather(*(client.get(
                "/crm/v3/properties/contacts/groups",
                headers={"Authorization": f"Bearer {TOKEN}"}) for _ in range(15)))
    limited = [a for a in answers if a.status_code == 429]
    assert len(limited) == 5
    assert limited[0].json()["policyName"] == "TEN_SECONDLY_ROLLING"
    assert limited[0].headers["X-HubSpot-RateLimit-Max"] == "10"
    assert limited[0].headers["X-HubSpot-RateLimit-Interval-Milliseconds"] == "1000"
    assert state.throttled == 5
