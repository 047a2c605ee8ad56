"""The whole story in the embedded CRM: receiver -> inbox -> worker -> local target, in process."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping

import httpx
import pytest

from engine.runtime.settings import Settings
from engine.service.app import create_app
from engine.signing import sign
from engine.storage import Storage
from engine.targets.local.target import LocalTarget
from engine.worker.loop import Worker
from tests.support.worker_helpers import shipped_rules

SETTINGS = Settings(webhook_secrets=("whsec_story",), api_keys=("key_story",))
TOKEN = "ref_story"
STORY: list[dict[str, object]] = [
    {"event": "install.tracked", "timestamp": "2026-03-01T12:30:00Z",
     "data": {"token": TOKEN, "prefix": "invite", "campaign": "spring-referrals",
              "platform": "Android"}},
    {"event": "referral.created", "timestamp": "2026-03-02T09:00:00Z",
     "data": {"token": TOKEN, "referrer_token": "tok_alice", "referred_user_id": "user_7"}},
    {"event": "referral.completed", "timestamp": "2026-03-20T08:15:00Z",
     "data": {"token": TOKEN, "referrer_token": "tok_alice"}},
]
IDENTIFY = {"token": TOKEN, "email": " Ada@Example.com ", "first_name": "Ada",
            "last_name": "Lovelace", "user_id": "user_7"}

pytestmark = pytest.mark.anyio


@pytest.fixture
async def client(storage: Storage) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(storage, SETTINGS)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://linkcrm") as http:
        yield http


async def deliver(client: httpx.AsyncClient, document: Mapping[str, object]) -> httpx.Response:
    body = json.dumps(document).encode()
    return await client.post("/webhooks/tolinku", content=body, headers={
        "content-type": "application/json", "x-webhook-signature": sign(body, "whsec_story")})


async def test_install_referral_conversion_and_identify_make_one_complete_contact(
    storage: Storage, client: httpx.AsyncClient
) -> None:
    for document in STORY:
        assert (await deliver(client, document)).json()["status"] == "stored"
    identified = await client.post("/v1/identify", json=IDENTIFY,
                                   headers={"authorization": "Bearer key_story"})
    assert identified.json()["status"] == "stored"
    ruleset = shipped_rules()
    local = LocalTarget(storage.local_crm, ruleset.field_map)
    await Worker(storage, ruleset, [local]).run_until_idle()

    [contact] = await storage.local_crm.contacts()
    assert contact.fields == {
        "deep_link_token": TOKEN, "deep_link_prefix": "invite",
        "first_touch_campaign": "spring-referrals", "first_touch_platform": "android",
        "install_date": "2026-03-01", "referral_source": "tok_alice",
        "referral_date": "2026-03-02", "app_user_id": "user_7",
        "conversion_date": "2026-03-20", "email": "ada@example.com", "first_name": "Ada",
        "last_name": "Lovelace", "name": "Ada Lovelace",
    }
    assert {(k.field, k.value) for k in contact.identities} == {
        ("deep_link_token", TOKEN), ("email", "ada@example.com")}
    assert contact.stage == "customer"
    assert [(c.from_stage, c.to_stage) for c in contact.stage_history] == [
        (None, "lead"), ("lead", "customer")]
    [deal] = await storage.local_crm.deals()
    assert (deal.key, deal.title, deal.stage, deal.contact_id) == (
        f"referral-{TOKEN}", f"Referral: {TOKEN}", "new", contact.id)
    assert {e.status for e in await storage.inbox.list_events()} == {"processed"}


async def test_five_concurrent_copies_of_one_delivery_make_one_set_of_actions(
    storage: Storage, client: httpx.AsyncClient
) -> None:
    answers = await asyncio.gather(*(deliver(client, STORY[2]) for _ in range(5)))
    assert sorted(a.json()["status"] for a in answers) == ["duplicate"] * 4 + ["stored"]
    ruleset = shipped_rules()
    local = LocalTarget(storage.local_crm, ruleset.field_map)
    await Worker(storage, ruleset, [local]).run_until_idle()
    [event] = await storage.inbox.list_events()
    assert len(await storage.outcomes.of_event(event.id)) == 3
    assert len(await storage.local_crm.contacts()) == len(await storage.local_crm.deals()) == 1
