"""Shadow mode's observer: a candidate rule version planned on live events next to the active
one, its differences recorded, and not one CRM request made for it."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine.errors import StorageError
from engine.rules.diff import FoundChange
from engine.rules.model import RuleSet
from engine.runtime.metrics import Metrics
from engine.storage import NewShadowResult, Storage, open_storage
from engine.targets.hubspot.admin import provision
from engine.targets.hubspot.target import HubSpotTarget
from engine.worker.loop import Worker
from engine.worker.shadow import ShadowObserver
from engine.worker.snapshot import Rules
from tests.emulators.hubspot import create_hubspot_emulator
from tests.emulators.hubspot_state import HubSpotState
from tests.support.worker_helpers import BASE_RULES, store, write_rules

pytestmark = pytest.mark.anyio

TOKEN = "pat-na1-shadow"
BASE = "http://hubspot.test"
ACTIVE = "a" * 12
SHADOW = "5" * 12

# The candidate: the install rule also writes the campaign, moves to another stage, and
# creates a deal; the claim rule is unchanged.
CANDIDATE = BASE_RULES.replace(
    "          set: {deep_link_prefix: data.prefix}\n"
    "      - set_stage: {identity: {deep_link_token: data.token}, stage: lead}\n"
    "  - name: claim-needs-an-email",
    "          set: {deep_link_prefix: data.prefix, first_touch_campaign: data.campaign}\n"
    "      - set_stage: {identity: {deep_link_token: data.token}, stage: customer}\n"
    "      - create_deal:\n"
    "          identity: {deep_link_token: data.token}\n"
    "          key: join('-', ['install', data.token])\n"
    "          title: data.token\n"
    "          stage: new\n"
    "  - name: claim-needs-an-email", 1)


@pytest.fixture
async def storage(tmp_path: Path) -> AsyncIterator[Storage]:
    opened = open_storage(f"sqlite:///{tmp_path / 'linkcrm.db'}")
    await opened.migrate()
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
def rulesets(tmp_path: Path) -> tuple[RuleSet, RuleSet]:
    assert CANDIDATE != BASE_RULES
    return (replace(write_rules(tmp_path / "active"), version=ACTIVE),
            replace(write_rules(tmp_path / "shadow", CANDIDATE), version=SHADOW))


async def test_differences_are_recorded_and_the_shadow_makes_no_crm_request(
    storage: Storage, rulesets: tuple[RuleSet, RuleSet]
) -> None:
    active, shadow = rulesets
    app, state = create_hubspot_emulator(TOKEN)
    metrics = Metrics()
    observer = ShadowObserver(storage, metrics=metrics)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url=BASE) as client:
        await provision(client, TOKEN, active.field_map, base_url=BASE)
        state.requests.clear()
        installs = [await store(storage, "install.tracked", token=f"tok_{n}", prefix="spring",
                                campaign=f"campaign {n}") for n in range(3)]
        claim = await store(storage, "deferred_link.claimed", email="ada@example.com",
                            token="tok_0", prefix="spring")
        # Observing alone, with the CRM up and the events pending: not one request.
        for event in await storage.inbox.list_events():
            await observer.observe(event, active, shadow)
        assert sum(state.requests.values()) == 0
        target = HubSpotTarget(client, TOKEN, active.field_map, storage.identities,
                               storage.rate_limits, base_url=BASE)
        # The worker as `serve` runs it while a shadow version is published: each claimed
        # event is shown to the observer next to being applied with the active rules.
        await Worker(storage, active, [target], rules=lambda: Rules(active, shadow),
                     shadow=observer).run_until_idle()
    assert observer.failures == 0 and observer.counts["changed"] >= 6
    assert metrics.counter("linkcrm_shadow_events_total", "", ("outcome",)).value(
        outcome="changed") == observer.counts["changed"]
    # The CRM got the active plan only: no campaign, no stage `customer`, no deal, and not
    # one request for a deal.
    assert_only_the_active_plan(state)
    assert not [request for request in state.requests if "deals" in request]

    counts = await storage.shadow.counts(SHADOW)
    assert (counts.same, counts.changed, counts.uncompared) == (1, 3, 0)
    assert counts.active_versions == (ACTIVE,)
    found = await storage.shadow.differences(SHADOW)
    assert [r.event_id for r in found] == installs and claim not in [r.event_id for r in found]
    changes = [FoundChange.from_json(item) for item in found[0].changes]
    described = [(c.rule, c.action, c.field, c.kind, c.before, c.after) for c in changes]
    assert described == [
        ("install-creates-lead", "upsert_contact", "set.first_touch_campaign", "added", None,
         "campaign 0"),
        ("install-creates-lead", "set_stage", "stage", "changed", "lead", "customer"),
        ("install-creates-lead", "create_deal", None, "new-action", None,
         {"identity": {"deep_link_token": "tok_0"}, "key": "install-tok_0", "title": "tok_0",
          "stage": "new"}),
    ]
    assert all(c.identity == {"deep_link_token": "tok_0"} for c in changes)


def assert_only_the_active_plan(state: HubSpotState) -> None:
    contacts = list(state.contacts.records.values())
    assert len(contacts) == 4  # three installs; the claim makes an email contact
    assert all("first_touch_campaign" not in c.properties for c in contacts)
    assert "customer" not in {c.properties.get("lifecyclestage") for c in contacts}
    assert not state.deals.records


async def test_observing_again_replaces_and_the_same_plan_records_same(
    storage: Storage, rulesets: tuple[RuleSet, RuleSet]
) -> None:
    active, shadow = rulesets
    observer = ShadowObserver(storage)
    event_id = await store(storage, "deferred_link.claimed", email="ada@example.com",
                           token="tok_0", prefix="p")
    event = await storage.inbox.get(event_id)
    assert event is not None
    await observer.observe(event, active, shadow)
    await observer.observe(event, active, shadow)  # a retry: still one event
    counts = await storage.shadow.counts(SHADOW)
    assert (counts.same, counts.changed) == (1, 0)
    assert observer.counts["same"] == 2


async def test_unplannable_bodies_are_skipped_and_unforeseen_errors_recorded(
    storage: Storage, rulesets: tuple[RuleSet, RuleSet], monkeypatch: pytest.MonkeyPatch
) -> None:
    active, shadow = rulesets
    observer = ShadowObserver(storage)
    event_id = await store(storage, "install.tracked", token="tok_1", prefix="p")
    event = await storage.inbox.get(event_id)
    assert event is not None
    await observer.observe(replace(event, body=None), active, shadow)
    await observer.observe(replace(event, body=b"not json"), active, shadow)
    assert observer.counts["skipped"] == 2
    assert (await storage.shadow.counts(SHADOW)).events == 0

    def explode(*_: Any) -> Any:
        raise RecursionError("maximum recursion depth exceeded for tok_1")

    monkeypatch.setattr("engine.rules.diff.plan", explode)
    await observer.observe(event, active, shadow)
    [recorded] = await storage.shadow.differences(SHADOW)
    assert recorded.outcome == "uncompared" and recorded.error is not None
    assert recorded.error.startswith("RecursionError: ")


async def test_a_failing_store_is_logged_without_event_data_and_never_raises(
    storage: Storage, rulesets: tuple[RuleSet, RuleSet], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture
) -> None:
    active, shadow = rulesets
    observer = ShadowObserver(storage)
    event_id = await store(storage, "install.tracked", token="tok_secret", prefix="p",
                           campaign="ada@example.com")
    event = await storage.inbox.get(event_id)
    assert event is not None

    async def broken(result: NewShadowResult) -> None:
        raise StorageError(f"disk full while writing {result.changes}")

    monkeypatch.setattr(storage.shadow, "record", broken)
    with caplog.at_level(logging.WARNING, logger="engine.worker.shadow"):
        await observer.observe(event, active, shadow)
        await observer.observe(event, active, replace(shadow, version=None))
    assert observer.failures == 2
    logged = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert "StorageError" in logged and "ValueError" in logged
    assert "tok_secret" not in logged and "ada@example.com" not in logged
