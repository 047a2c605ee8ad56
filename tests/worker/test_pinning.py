"""Pinned rule versions: the rule set a requeued event is planned with, loaded once, and the
active one whenever the pin does not load."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from engine.rules.model import RuleSet
from engine.rules.versions import collect
from engine.storage import InboxEvent, NewRuleVersion, RuleVersion, Storage, open_storage
from engine.targets.local.target import LocalTarget
from engine.worker.loop import Worker
from engine.worker.pinning import PinnedRules
from tests.support.worker_helpers import BASE_RULES, store, write_rules

pytestmark = pytest.mark.anyio

OTHER_RULES = BASE_RULES.replace("stage: lead}\n  - name: claim",
                                 "stage: customer}\n  - name: claim", 1)


@pytest.fixture
async def storage(tmp_path: Path) -> AsyncIterator[Storage]:
    opened = open_storage(f"sqlite:///{tmp_path / 'linkcrm.db'}")
    await opened.migrate()
    try:
        yield opened
    finally:
        await opened.close()


async def publish(storage: Storage, folder: Path, *, status: str = "active") -> str:
    files = collect([folder])
    await storage.rule_versions.publish(NewRuleVersion(files.version, files.files, "ada"),
                                        status)  # type: ignore[arg-type]
    return files.version


class CountingVersions:
    """The storage's rule versions, counting reads."""

    def __init__(self, storage: Storage) -> None:
        self.inner = storage.rule_versions
        self.reads = 0

    async def get(self, version: str) -> RuleVersion | None:
        self.reads += 1
        return await self.inner.get(version)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def pinned_event(storage: Storage, pin: str | None) -> InboxEvent:
    event_id = await store(storage, "install.tracked", token="tok_1", prefix="p")
    assert await storage.inbox.requeue(event_id, rules_version=pin)
    event = await storage.inbox.get(event_id)
    assert event is not None and event.rules_version == pin
    return event


async def test_unpinned_and_active_pins_plan_with_the_active_rules(
    storage: Storage, tmp_path: Path
) -> None:
    folder = tmp_path / "active"
    active = replace(write_rules(folder), version=await publish(storage, folder))
    versions = CountingVersions(storage)
    pinned = PinnedRules(versions)  # type: ignore[arg-type]
    assert await pinned.ruleset_for(await pinned_event(storage, None), active) is active
    assert await pinned.ruleset_for(await pinned_event(storage, active.version), active) is active
    assert versions.reads == 0 and pinned.fallbacks == 0


async def test_a_pinned_version_is_loaded_once_and_planned_with(
    storage: Storage, tmp_path: Path
) -> None:
    folder, other = tmp_path / "active", tmp_path / "other"
    active = replace(write_rules(folder), version=await publish(storage, folder))
    write_rules(other, OTHER_RULES)
    old = await publish(storage, other, status="shadow")
    versions = CountingVersions(storage)
    pinned = PinnedRules(versions)  # type: ignore[arg-type]
    first = await pinned.ruleset_for(await pinned_event(storage, old), active)
    assert first.version == old and first is not active
    [rule] = [r for r in first.rules if r.name == "install-creates-lead"]
    assert [t.stage for t in rule.actions if t.stage] == ["customer"]
    again = await pinned.ruleset_for(await pinned_event(storage, old), active)
    assert again is first and versions.reads == 1


async def test_a_pin_that_does_not_load_falls_back_to_the_active_rules_and_is_logged(
    storage: Storage, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "active"
    active = replace(write_rules(folder), version=await publish(storage, folder))
    versions = CountingVersions(storage)
    clock = Clock()
    pinned = PinnedRules(versions, clock=clock, retry_seconds=30)  # type: ignore[arg-type]
    unknown = "0" * 12
    with caplog.at_level(logging.WARNING, logger="engine.worker.pinning"):
        assert await pinned.ruleset_for(await pinned_event(storage, unknown), active) is active
        assert await pinned.ruleset_for(await pinned_event(storage, unknown), active) is active
    assert versions.reads == 1  # not asked again for a while...
    clock.now += 31
    assert await pinned.ruleset_for(await pinned_event(storage, unknown), active) is active
    assert versions.reads == 2  # ...then again
    assert pinned.fallbacks == 3
    [record, *_] = caplog.records
    assert "does not load" in record.getMessage()
    assert record.__dict__["rules_version"] == unknown
    assert record.__dict__["error_type"] == "LookupError"

    # Damaged files (they no longer hash to their version): the same.
    damaged = "1" * 12
    await storage.rule_versions.publish(
        NewRuleVersion(damaged, {"rules.yaml": BASE_RULES}, "ada"), "shadow")
    assert await pinned.ruleset_for(await pinned_event(storage, damaged), active) is active
    assert caplog.records[-1].__dict__["error_type"] == "RuleFilesError"


async def test_a_pin_with_another_field_map_plans_with_the_active_rules(
    storage: Storage, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder, other = tmp_path / "active", tmp_path / "other"
    active: RuleSet = replace(write_rules(folder), version=await publish(storage, folder))
    write_rules(other)
    fields = other / "fields.yaml"
    fields.write_text(fields.read_text(encoding="utf-8").replace(
        "hubspot: lifecyclestage", "hubspot: hs_lead_status", 1), encoding="utf-8")
    assert "hs_lead_status" in fields.read_text(encoding="utf-8")
    mapped = await publish(storage, other, status="shadow")
    pinned = PinnedRules(storage.rule_versions)
    with caplog.at_level(logging.WARNING, logger="engine.worker.pinning"):
        assert await pinned.ruleset_for(await pinned_event(storage, mapped), active) is active
    assert "maps fields unlike the active one" in caplog.records[-1].getMessage()
    assert pinned.fallbacks == 1


async def test_the_worker_plans_a_pinned_replay_with_its_version_and_records_it(
    storage: Storage, tmp_path: Path
) -> None:
    """`replay --rules-version OLD` through the real worker loop: the pinned event is planned
    by OLD while the active version plans everything else, and each outcome says which."""
    old = await publish(storage, _folder(tmp_path / "old", BASE_RULES))
    new = await publish(storage, _folder(tmp_path / "new", OTHER_RULES))
    active = replace(write_rules(tmp_path / "new-loaded", OTHER_RULES), version=new)
    pinned = await store(storage, "install.tracked", token="tok_pin", prefix="spring")
    assert await storage.inbox.requeue(pinned, rules_version=old)
    free = await store(storage, "install.tracked", token="tok_free", prefix="spring")
    target = LocalTarget(storage.local_crm, active.field_map)
    await Worker(storage, active, [target]).run_until_idle()

    assert {o.rules_version for o in await storage.outcomes.of_event(pinned)} == {old}
    assert {o.rules_version for o in await storage.outcomes.of_event(free)} == {new}
    contacts = await storage.local_crm.contacts()
    stages = {token: c.stage for c in contacts for token in ("tok_pin", "tok_free")
              if any(token in str(identity) for identity in c.identities)}
    assert stages == {"tok_pin": "lead", "tok_free": "customer"}


def _folder(folder: Path, text: str) -> Path:
    write_rules(folder, text)
    return folder
