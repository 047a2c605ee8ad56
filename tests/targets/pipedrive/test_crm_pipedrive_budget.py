"""Pipedrive's daily token budget: a spent budget fails calls at once instead of hanging the
target, and a batch spends as few tokens per person as the API allows."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from engine.actions import Action, CreateDeal, IdentityKey, SetStage
from engine.errors import RetryableCRMError
from engine.rules.evaluator import plan
from engine.rules.files import load_ruleset
from engine.storage import open_storage
from engine.targets.base import CallContext, Outcome
from engine.targets.pipedrive.target import PipedriveTarget, by_person
from tests.emulators.pipedrive import PipedriveEmulator
from tests.support.crm_stack import PIPEDRIVE_TOKEN, PIPELINE, provision_pipedrive_app
from tests.support.paths import REPO

pytestmark = pytest.mark.anyio
RULES = load_ruleset([REPO / "rules"])
FIELD_MAP = RULES.field_map



def stage(token: str) -> SetStage:
    return SetStage("r", (IdentityKey("deep_link_token", token),), stage="lead")


async def test_a_spent_budget_fails_every_call_fast_until_it_resets(tmp_path: Path) -> None:
    emulator = PipedriveEmulator(api_token=PIPEDRIVE_TOKEN)
    emulator.add_pipeline(*PIPELINE)
    await provision_pipedrive_app(emulator, FIELD_MAP)
    storage = open_storage(f"sqlite:///{tmp_path / 'linkcrm.db'}")
    await storage.migrate()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=emulator.app)) as client:
            target = PipedriveTarget(client, api_token=PIPEDRIVE_TOKEN,
                                     base_url="http://pipedrive.test", field_map=FIELD_MAP,
                                     identities=storage.identities, rate_limits=storage.rate_limits)
            await target.start()
            emulator.daily_budget = emulator.tokens_used + 1  # spent: a search costs 20
            with pytest.raises(RetryableCRMError) as first:
                await target.execute(stage("tok_1"), CallContext("k1"))
            sent = sum(emulator.calls.values())
            async with asyncio.timeout(1):  # not paced until midnight: refused at once
                # The retry of the first action, and actions for other people.
                for token, key in (("tok_1", "k1"), ("tok_2", "k2"), ("tok_3", "k3")):
                    with pytest.raises(RetryableCRMError, match="budget is spent") as later:
                        await target.execute(stage(token), CallContext(key))
    finally:
        await storage.close()
    assert first.value.retry_after is not None and first.value.retry_after > 30
    assert later.value.retry_after is not None and later.value.retry_after > 30
    assert sum(emulator.calls.values()) == sent  # nothing more was sent


def person_story(token: str) -> list[tuple[Action, CallContext]]:
    events = [
        {"event": "install.tracked", "timestamp": "2026-03-01T09:30:00Z",
         "data": {"token": token, "prefix": "invite", "campaign": "spring", "platform": "iOS"}},
        {"event": "referral.created", "timestamp": "2026-03-02T10:00:00Z",
         "data": {"token": token, "referrer_token": "ref_grace"}},
        {"event": "referral.completed", "timestamp": "2026-03-05T12:00:00Z",
         "data": {"token": token, "referrer_token": "ref_grace"}},
        {"event": "app.user_identified", "timestamp": "2026-03-06T08:00:00Z",
         "data": {"token": token, "email": f"{token}@example.com", "first_name": "Ada",
                  "last_name": "L", "user_id": "u_42"}},
    ]
    return [(action, CallContext(f"{token}:{n}:{i}"))
            for n, event in enumerate(events)
            for i, action in enumerate(plan(event, RULES).actions)]


@asynccontextmanager
async def unthrottled(tmp_path: Path) -> AsyncIterator[tuple[PipedriveEmulator, PipedriveTarget]]:
    """A provisioned emulator and a started target whose limits never bind, its usage counted
    from zero: what a batch costs, and nothing else."""
    emulator = PipedriveEmulator(api_token=PIPEDRIVE_TOKEN)
    emulator.add_pipeline(*PIPELINE)
    await provision_pipedrive_app(emulator, FIELD_MAP)
    async with open_storage(f"sqlite:///{tmp_path / 'linkcrm.db'}") as storage:
        await storage.migrate()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=emulator.app)) as client:
            target = PipedriveTarget(client, api_token=PIPEDRIVE_TOKEN,
                                     base_url="http://pipedrive.test", field_map=FIELD_MAP,
                                     identities=storage.identities,
                                     rate_limits=storage.rate_limits, burst_limit=1000,
                                     search_limit=1000)
            await target.start()
            emulator.reset_usage()
            yield emulator, target


@pytest.mark.parametrize("batched", [False, True])
async def test_a_batch_reads_and_writes_each_person_once(tmp_path: Path, batched: bool) -> None:
    """A new person's whole story (8 actions): one by one, every action after the first reads
    the person again (1 token) and most write it (5 each): 82 tokens. In one batch the person
    is searched (20) and created (5) with every later change in its create, and its deal
    searched (20) and created (5) after it: 50 tokens, the floor, and the same person and deal.
    Every outcome names the real records."""
    async with unthrottled(tmp_path) as (emulator, target):
        items = person_story("tok_1")
        if batched:
            results = await target.execute_many(items)
        else:
            results = [await target.execute(*item) for item in items]
    assert all(isinstance(r, Outcome) for r in results), results
    assert emulator.tokens_used == (50 if batched else 82)
    if batched:
        assert emulator.calls["PATCH /api/v2/persons/{id}"] == 0
    [person] = emulator.live("person")
    [deal] = emulator.live("deal")
    assert deal["person_id"] == person["id"]
    named = {r.record_id for r in results if isinstance(r, Outcome)}
    assert named == {str(person["id"]), str(deal["id"])}
    assert sum(r.created for r in results if isinstance(r, Outcome)) == 2
    assert all(str(person["id"]) in r.summary or str(deal["id"]) in r.summary
               for r in results if isinstance(r, Outcome))
    custom = person["custom_fields"]
    assert person["emails"][0]["value"] == "tok_1@example.com" and person["name"] == "Ada L"
    assert custom[emulator.field_key("person", "Deep link token")] == "tok_1"
    assert custom[emulator.field_key("person", "First-touch campaign")] == "spring"
    assert len(emulator.live("deal")) == 1


async def test_a_deal_twice_in_a_batch_for_a_new_person_is_made_once(tmp_path: Path) -> None:
    """The conversion delivered twice (two deliveries, two idempotency keys) in the batch that
    makes its person: the deal waits for the person, and the second create_deal finds the
    first's deal waiting instead of claiming it again: one deal, named by both outcomes."""
    items = person_story("tok_2")
    again = [(action, CallContext(f"again:{i}")) for i, (action, _) in enumerate(items)
             if isinstance(action, CreateDeal)]
    async with unthrottled(tmp_path) as (emulator, target), asyncio.timeout(10):
        results = await target.execute_many(items + again)  # a second claim would wait, fail
    assert all(isinstance(r, Outcome) for r in results), results
    [deal] = emulator.live("deal")
    deals = [r for (action, _), r in zip(items + again, results, strict=True)
             if isinstance(action, CreateDeal)]
    assert len(deals) == 2
    assert {r.record_id for r in deals if isinstance(r, Outcome)} == {str(deal["id"])}
    assert emulator.calls["POST /api/v2/deals"] == 1


async def test_a_new_person_is_created_once_no_later_action_of_the_batch_is_on_it(
        tmp_path: Path) -> None:
    """Two new people's stories, interleaved, in one batch: the batch goes person by person,
    so the first person and its deal are created before the second is searched for (while
    the next search waits for the Search API limit, a create costs no time), each with all of
    its story in its create."""
    items = [item for pair in zip(person_story("tok_a"), person_story("tok_b"), strict=True)
             for item in pair]
    async with unthrottled(tmp_path) as (emulator, target):
        results = await target.execute_many(items)
    assert all(isinstance(r, Outcome) for r in results), results
    for (action, _), result in zip(items, results, strict=True):  # each in its own place
        token = action.identity[0].value
        assert isinstance(result, Outcome) and result.record_id in {
            str(r["id"]) for kind in ("person", "deal") for r in emulator.live(kind)
            if token in str(r)}
    calls = [f"{method} {path}" for _, method, path, _ in emulator.log]
    searches = [i for i, call in enumerate(calls) if call.startswith("GET /api/v2/persons/search")]
    creates = [i for i, call in enumerate(calls) if call.startswith("POST /api/v2/")]
    assert len(searches) == 2 and len(creates) == 4
    assert creates[1] < searches[1]  # tok_a's person and deal, before tok_b is looked for
    assert emulator.tokens_used == 100 and not any(c.startswith("PATCH") for c in calls)
    emails = sorted(p["emails"][0]["value"] for p in emulator.live("person"))
    assert emails == ["tok_a@example.com", "tok_b@example.com"]


async def test_a_deal_key_seen_again_after_its_deal_was_made_names_the_made_deal(
        tmp_path: Path) -> None:
    """The batch makes a person and its deal as soon as its story is over; a later
    create_deal for the same deal key (another person's) gets that deal's real id."""
    items = person_story("tok_c")
    [deal_action] = [action for action, _ in items if isinstance(action, CreateDeal)]
    other = dataclasses.replace(deal_action, identity=(IdentityKey("deep_link_token", "tok_d"),))
    async with unthrottled(tmp_path) as (emulator, target):
        *_, again = await target.execute_many([*items, (other, CallContext("other"))])
    [deal] = emulator.live("deal")
    assert isinstance(again, Outcome) and again.record_id == str(deal["id"])
    assert emulator.calls["POST /api/v2/deals"] == 1


def test_a_batch_goes_person_by_person_keeping_each_persons_order() -> None:
    def key(value: str) -> IdentityKey:
        return IdentityKey("deep_link_token", value)

    email = IdentityKey("email", "a@example.com")
    identities = [(key("a"),), (key("b"),), (key("c"),), (key("a"), email), (key("b"),),
                  (email,), (key("c"),), ()]
    # a's items, and the one by its email only; then b's; then c's; an item without keys alone.
    assert by_person(identities) == [0, 3, 5, 1, 4, 2, 6, 7]
    joined = [(key("x"),), (key("y"),), (key("y"), key("x")), (key("z"),)]
    assert by_person(joined) == [0, 1, 2, 3]  # y joins x through item 2: one person, in order
