"""Issue 14, through `linkcrm serve` with the local CRM and the HubSpot emulator: a shared link's
installs create no contact, and each person who registers gets the campaign, platform and
install date of an install of that link of their own; the referral story is unchanged."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine.cli.samples import identify_body, story
from engine.rules.files import load_ruleset
from engine.targets.hubspot.admin import provision
from tests.emulators.hubspot import create_hubspot_emulator
from tests.emulators.hubspot_state import HubSpotState
from tests.emulators.server import serve as serve_app
from tests.support.paths import REPO
from tests.support.service_process import (
    API_KEY,
    Server,
    cli,
    cli_json,
    service_env,
    signed,
    start_server,
    wait_for,
)

TOKEN = "summer-promo"
CAMPAIGN = "instagram-story-may"
PLATFORMS = ["iOS", "Android", "iOS", "web", "Android", "iOS", "Android", "web", "iOS", "Android"]
HUBSPOT_TOKEN = "pat-na1-touches"
NOW = datetime.now(UTC).replace(microsecond=0)


def stamp(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


@pytest.fixture
def hubspot() -> Iterator[tuple[str, HubSpotState]]:
    app, state = create_hubspot_emulator(HUBSPOT_TOKEN, rate_limit=1000)

    async def provisioned() -> None:
        field_map = load_ruleset([REPO / "rules"]).field_map
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app)) as client:
            await provision(client, HUBSPOT_TOKEN, field_map, base_url="http://hubspot")

    asyncio.run(provisioned())
    with serve_app(app) as url:
        yield url, state


@pytest.fixture
def server(tmp_path: Path,
           hubspot: tuple[str, HubSpotState]) -> Iterator[tuple[Server, dict[str, str]]]:
    env = service_env(tmp_path, LINKCRM_TARGETS="local,hubspot",
                      HUBSPOT_ACCESS_TOKEN=HUBSPOT_TOKEN, HUBSPOT_BASE_URL=hubspot[0],
                      LINKCRM_TOUCH_RETENTION_DAYS="30")
    running = start_server(env)
    try:
        yield running, env
    finally:
        running.stop()


def webhook(server: Server, document: dict[str, Any]) -> int:
    body, headers = signed(document)
    answer = httpx.post(f"{server.url}/webhooks/tolinku", content=body, headers=headers,
                        timeout=10)
    assert answer.status_code == 200, answer.text
    return int(answer.json()["id"])


def identify(server: Server, body: dict[str, Any]) -> int:
    answer = httpx.post(f"{server.url}/v1/identify", json=body, timeout=10,
                        headers={"authorization": f"Bearer {API_KEY}"})
    assert answer.status_code == 200, answer.text
    return int(answer.json()["id"])


def settled(env: dict[str, str], ids: list[int]) -> bool:
    return all(cli_json("events", "show", str(i), env=env)["status"] in ("processed", "ignored")
               for i in ids)


def install(minutes_ago: int, platform: str, token: str = TOKEN) -> dict[str, Any]:
    return {"event": "install.tracked", "timestamp": stamp(NOW - timedelta(minutes=minutes_ago)),
            "data": {"token": token, "prefix": "promo", "campaign": CAMPAIGN,
                     "platform": platform}}


def test_ten_installs_of_a_shared_link_six_people_six_attributed_contacts(
    server: tuple[Server, dict[str, str]], hubspot: tuple[str, HubSpotState]
) -> None:
    running, env = server
    state = hubspot[1]
    # The referral story (a per-person link) and ten installs of one shared link.
    referral = [webhook(running, document) for document in story("ref_sample_sam")]
    installs = [webhook(running, install(120 - 5 * n, platform))
                for n, platform in enumerate(PLATFORMS)]
    # An old install of another shared link: past the 30-day retention.
    stale = webhook(running, install(60 * 24 * 45, "iOS", token="spring-promo"))
    wait_for(lambda: settled(env, referral + installs + [stale]), timeout=60,
             what="the installs and the referral story")
    referral.append(identify(running, identify_body("ref_sample_sam")))
    people = [f"person{n}@example.com" for n in range(6)]
    identified = [identify(running, {"token": TOKEN, "email": email, "first_name": f"P{n}",
                                     **({"platform": PLATFORMS[n].lower()} if n % 2 else {})})
                  for n, email in enumerate(people)]
    unknown = identify(running, {"token": "never-seen", "email": "noor@example.com"})
    expired = identify(running, {"token": "spring-promo", "email": "old@example.com"})
    wait_for(lambda: settled(env, identified + referral + [unknown, expired]), timeout=90,
             what="the identify calls")

    install_ids = set(installs)
    install_of = {event_id: (document["data"]["platform"].lower(),
                             document["timestamp"][:10])
                  for event_id, document in zip(
                      installs, [install(120 - 5 * n, p) for n, p in enumerate(PLATFORMS)],
                      strict=True)}
    claimed = []
    for event_id in identified:
        shown = cli_json("events", "show", str(event_id), env=env)
        touch = shown["touches"]
        assert touch["found"] and touch["count"] == 10
        assert touch["install"]["event_id"] in install_ids
        assert touch["first"]["event_id"] == installs[0]
        assert touch["last"]["event_id"] == installs[-1]
        claimed.append(touch["install"]["event_id"])
        assert all(o["status"] == "ok" for o in shown["outcomes"]), shown["outcomes"]
    assert len(set(claimed)) == 6  # no two people claim the same install
    explained = cli("explain", str(identified[0]), env=env)
    assert explained.returncode == 0, explained.stderr
    assert f"touches: found for token {TOKEN}" in explained.stdout
    assert f"claimed install event {claimed[0]}" in explained.stdout
    assert "link: shared (from its touches: prefix 'promo' is declared shared" in explained.stdout
    assert '"email": "person0@example.com"' in explained.stdout
    shown_text = cli("events", "show", str(identified[1]), env=env).stdout
    assert "install: install.tracked at" in shown_text and "why: 10 touch(es)" in shown_text

    contacts = cli_json("crm", "contacts", env=env)
    by_email = {c["fields"].get("email"): c for c in contacts}
    for email, event_id in zip(people, claimed, strict=True):
        fields = by_email[email]["fields"]
        platform, day = install_of[event_id]
        assert fields["first_touch_campaign"] == CAMPAIGN
        assert fields["first_touch_platform"] == platform
        assert fields["install_date"] == day
        assert {"field": "deep_link_token", "value": TOKEN} not in by_email[email]["identities"]
    assert not [c for c in contacts if c["fields"].get("deep_link_token") == TOKEN]
    assert not [c for c in contacts for key in c["identities"] if key["value"] == TOKEN]

    # HubSpot holds the same six people, none keyed on the shared token.
    hub = {r.properties.get("email"): r.properties for r in state.contacts.records.values()}
    for email, event_id in zip(people, claimed, strict=True):
        platform, _ = install_of[event_id]
        assert hub[email]["first_touch_campaign"] == CAMPAIGN
        assert hub[email]["first_touch_platform"] == platform
        assert hub[email].get("install_date")
    assert not [p for p in hub.values() if p.get("deep_link_token") == TOKEN]

    # The referral story: one contact at stage customer with one deal, as before.
    [sam] = [c for c in contacts if c["fields"].get("deep_link_token") == "ref_sample_sam"]
    assert sam["stage"] == "customer"
    assert sam["fields"]["email"] == "sam.sample@example.com"
    assert sam["fields"]["first_touch_campaign"] == "spring-referrals"
    assert sam["fields"]["install_date"] == "2026-03-01"
    deals = cli_json("crm", "deals", env=env)
    assert [(d["key"], d["contact_id"]) for d in deals] == [("referral-ref_sample_sam",
                                                              sam["id"])]
    [hub_sam] = [p for p in hub.values() if p.get("deep_link_token") == "ref_sample_sam"]
    assert hub_sam["lifecyclestage"] == "customer"
    assert hub_sam["email"] == "sam.sample@example.com"
    assert len(state.deals.records) == 1

    # A token never seen: the contact is still created, and the event says no touch was found.
    assert by_email["noor@example.com"]["fields"]["email"] == "noor@example.com"
    shown = cli_json("events", "show", str(unknown), env=env)
    assert not shown["touches"]["found"]
    assert shown["touches"]["why"] == ["no touch found for token 'never-seen'"]

    # A touch older than the retention is not attached.
    old = by_email["old@example.com"]["fields"]
    assert "first_touch_campaign" not in old and "install_date" not in old
    shown = cli_json("events", "show", str(expired), env=env)
    assert shown["touches"]["install"] is None
    assert shown["touches"]["why"] == ["no touch found for token 'spring-promo' "
                                       "(1 older than the retention)"]
    # ... and the old link stays shared: its person is keyed by email only.
    assert not [k for k in by_email["old@example.com"]["identities"]
                if k["field"] == "deep_link_token"]
    # `purge` forgets the touches past the retention, and only those: the old install, and
    # the referral story's install and sign-up of 2026-03-01.
    purged = cli_json("purge", "--older-than", "3650d", env=env)
    assert purged["touches_forgotten"] == 3
    assert cli_json("purge", "--older-than", "3650d", env=env)["touches_forgotten"] == 0
