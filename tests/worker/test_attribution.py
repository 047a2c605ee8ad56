"""The worker keeps touches and attributes identify events before planning: in one claimed
batch, on replay, and with two workers sharing one database (both backends)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from engine.storage import Storage, open_storage
from engine.targets.local.target import LocalTarget
from engine.worker.loop import Worker, WorkerOptions
from tests.support.worker_helpers import new_event, shipped_rules

BACKENDS = ("sqlite", "postgresql")
pytestmark = pytest.mark.anyio
NOW = datetime.now(UTC).replace(microsecond=0)


def ago(minutes: int) -> str:
    return (NOW - timedelta(minutes=minutes)).isoformat().replace("+00:00", "Z")


async def installs(storage: Storage, count: int) -> list[int]:
    return [(await storage.inbox.store(new_event(
        "install.tracked", {"token": "summer-promo", "prefix": "promo",
                            "campaign": "instagram-story-may",
                            "platform": ("iOS", "Android")[n % 2]}, ago(100 - n)))).id
            for n in range(count)]


async def identify(storage: Storage, email: str, **extra: str) -> int:
    return (await storage.inbox.store(new_event(
        "app.user_identified", {"token": "summer-promo", "email": email, **extra}, ago(1),
        source="identify"))).id


async def test_an_install_and_its_registration_claimed_together_pair_up(
    storage: Storage
) -> None:
    ruleset = shipped_rules()
    [install] = await installs(storage, 1)
    person = await identify(storage, "mia@example.com")
    local = LocalTarget(storage.local_crm, ruleset.field_map)
    await Worker(storage, ruleset, [local]).run_until_idle()  # one claim holds both
    attribution = await storage.touches.attribution(person)
    assert attribution is not None and attribution.detail["install"]["event_id"] == install
    [contact] = await storage.local_crm.contacts()
    assert contact.fields["first_touch_campaign"] == "instagram-story-may"
    assert contact.fields["first_touch_platform"] == "ios"
    assert [k.field for k in contact.identities] == ["email"]
    assert (await storage.inbox.get(install)).status == "ignored"  # type: ignore[union-attr]

    # A replay plans with the same touches and claims nothing more, even with a closer
    # unclaimed install there now.
    await storage.inbox.store(new_event("install.tracked", {
        "token": "summer-promo", "prefix": "promo", "campaign": "later", "platform": "iOS"},
        ago(2)))
    assert await storage.inbox.requeue(person)
    await Worker(storage, ruleset, [local]).run_until_idle()
    again = await storage.touches.attribution(person)
    assert again is not None and again.detail == attribution.detail
    [contact] = await storage.local_crm.contacts()
    assert contact.fields["first_touch_campaign"] == "instagram-story-may"


async def test_two_workers_share_out_the_installs_of_one_link(database_url: str) -> None:
    first, second = open_storage(database_url), open_storage(database_url)
    try:
        await first.migrate()
        ruleset = shipped_rules()
        await installs(first, 10)
        people = [await identify(first, f"p{n}@example.com",
                                 **({"platform": "android"} if n % 2 else {}))
                  for n in range(6)]
        workers = [Worker(s, ruleset, [LocalTarget(s.local_crm, ruleset.field_map)],
                          options=WorkerOptions(concurrency=2)) for s in (first, second)]
        await asyncio.gather(*(w.run_until_idle() for w in workers))
        got = [await first.touches.attribution(p) for p in people]
        claimed = [a.detail["install"]["event_id"] for a in got if a is not None]
        assert len(claimed) == 6 and len(set(claimed)) == 6
        contacts = await first.local_crm.contacts()
        assert sorted(c.fields["email"] for c in contacts) == [f"p{n}@example.com"
                                                               for n in range(6)]
        assert all(c.fields["first_touch_campaign"] == "instagram-story-may" for c in contacts)
    finally:
        await first.close()
        await second.close()
