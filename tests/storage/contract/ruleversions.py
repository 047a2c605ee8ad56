"""The rule versions part of the storage contract: publish, list, get, activate, active, and
the version each action outcome records."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import replace

import pytest

from engine.errors import UnstorableValueError
from engine.storage import NewRuleVersion, Storage
from tests.storage.contract.support import FakeClock, event, outcome


def version(n: int, *, label: str | None = None) -> NewRuleVersion:
    return NewRuleVersion(version=f"{n:012x}", files={"rules.yaml": f"rules: [{n}]\n",
                                                      "fields.yaml": "fields: {}\n"},
                          published_by="ada", label=label)


class RuleVersionsContract:
    """Published rule sets: idempotent by version, exactly one active, rollback by activate."""

    async def test_publish_stores_files_who_when_and_activates(
        self, storage: Storage, clock: FakeClock
    ) -> None:
        versions = storage.rule_versions
        assert await versions.active() is None
        assert await versions.active_version() is None
        assert await versions.list_versions() == []
        first = await versions.publish(version(1, label="abc123"))
        assert first.created
        stored = first.version
        assert (stored.version, stored.label, stored.published_by, stored.status) == (
            f"{1:012x}", "abc123", "ada", "active")
        assert dict(stored.files) == dict(version(1).files)
        assert stored.published_at == clock.now
        assert stored.activated_at == clock.now
        assert await versions.get(stored.version) == stored
        assert await versions.active() == stored
        assert await versions.active_version() == stored.version
        assert await versions.get(f"{9:012x}") is None

    async def test_exactly_one_version_is_active_and_activate_rolls_back(
        self, storage: Storage, clock: FakeClock
    ) -> None:
        versions = storage.rule_versions
        await versions.publish(version(1))
        clock.advance(1)
        await versions.publish(version(2))
        listed = await versions.list_versions()
        assert [(v.version, v.status) for v in listed] == [
            (f"{2:012x}", "active"), (f"{1:012x}", "retired")]
        clock.advance(1)
        back = await versions.activate(f"{1:012x}")
        assert back is not None and back.status == "active" and back.activated_at == clock.now
        assert await versions.active_version() == f"{1:012x}"
        assert [v.status for v in await versions.list_versions()] == ["retired", "active"]

    async def test_activating_an_unknown_version_changes_nothing(self, storage: Storage) -> None:
        versions = storage.rule_versions
        await versions.publish(version(1))
        before = await versions.list_versions()
        assert await versions.activate(f"{7:012x}") is None
        assert await versions.list_versions() == before

    async def test_publishing_the_same_content_again_is_idempotent(
        self, storage: Storage, clock: FakeClock
    ) -> None:
        versions = storage.rule_versions
        first = await versions.publish(version(1, label="first"))
        await versions.publish(version(2))
        clock.advance(5)
        again = await versions.publish(version(1, label="second"))
        assert not again.created
        assert again.version.label == "first"  # the first publish's record is kept
        assert again.version.published_at == first.version.published_at
        assert again.version.status == "active"  # ... and it is active again
        assert len(await versions.list_versions()) == 2
        assert (await versions.publish(version(1))).version.status == "active"  # no-op

    async def test_shadow_publish_leaves_the_active_version(self, storage: Storage) -> None:
        versions = storage.rule_versions
        await versions.publish(version(1))
        shadow = await versions.publish(version(2), "shadow")
        assert shadow.version.status == "shadow"
        assert await versions.active_version() == f"{1:012x}"
        await versions.publish(version(1), "shadow")  # the active one stays active
        assert await versions.active_version() == f"{1:012x}"
        promoted = await versions.activate(f"{2:012x}")
        assert promoted is not None and promoted.status == "active"

    async def test_a_newer_shadow_retires_the_one_before(self, storage: Storage) -> None:
        versions = storage.rule_versions
        await versions.publish(version(1))
        await versions.publish(version(2), "shadow")
        await versions.publish(version(3), "shadow")
        assert [(v.version, v.status) for v in await versions.list_versions()] == [
            (f"{3:012x}", "shadow"), (f"{2:012x}", "retired"), (f"{1:012x}", "active")]
        await versions.publish(version(2), "shadow")  # a retired one comes back as shadow
        assert {v.version: v.status for v in await versions.list_versions()} == {
            f"{1:012x}": "active", f"{2:012x}": "shadow", f"{3:012x}": "retired"}
        await versions.activate(f"{2:012x}")  # promoting the shadow leaves none
        assert {v.version: v.status for v in await versions.list_versions()} == {
            f"{1:012x}": "retired", f"{2:012x}": "active", f"{3:012x}": "retired"}

    async def test_concurrent_activations_leave_exactly_one_active(
        self, make_storage: Callable[[], Storage], storage: Storage
    ) -> None:
        """Two processes publishing and activating at once: one active at the end, always."""
        other = make_storage()
        try:
            for n in range(4):
                await storage.rule_versions.publish(version(n))
            await asyncio.gather(*(
                (storage if n % 2 else other).rule_versions.activate(f"{n % 4:012x}")
                for n in range(12)),
                *(other.rule_versions.publish(version(n)) for n in range(4, 8)))
            listed = await storage.rule_versions.list_versions()
            assert sum(v.status == "active" for v in listed) == 1
        finally:
            await other.close()

    async def test_bad_publishes_are_refused_before_storing(self, storage: Storage) -> None:
        versions = storage.rule_versions
        with pytest.raises(ValueError, match="active or shadow"):
            await versions.publish(version(1), "retired")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="needs its files"):
            await versions.publish(NewRuleVersion(f"{1:012x}", {}, "ada"))
        with pytest.raises(UnstorableValueError):
            await versions.publish(NewRuleVersion(f"{1:012x}", {"r.yaml": "a\x00b"}, "ada"))
        assert await versions.list_versions() == []

    async def test_each_outcome_records_the_rule_version_that_planned_it(
        self, storage: Storage
    ) -> None:
        """The latest attempt's version is kept; a success is final, its version too."""
        event_id = (await storage.inbox.store(event(1))).id
        first = await storage.outcomes.record(
            replace(outcome(event_id, "retrying", error="timeout"), rules_version="aaaaaaaaaaaa"))
        assert first.rules_version == "aaaaaaaaaaaa"
        ok = await storage.outcomes.record(
            replace(outcome(event_id, "ok"), rules_version="bbbbbbbbbbbb"))
        assert ok.rules_version == "bbbbbbbbbbbb"
        again = await storage.outcomes.record(
            replace(outcome(event_id, "retrying"), rules_version="cccccccccccc"))
        assert again.rules_version == "bbbbbbbbbbbb"
        unknown = await storage.outcomes.record(outcome(event_id, "dead", target="local"))
        assert unknown.rules_version is None
        assert [o.rules_version for o in await storage.outcomes.of_event(event_id)] == [
            "bbbbbbbbbbbb", None]

    async def test_current_names_the_active_and_the_latest_shadow_version(
        self, storage: Storage
    ) -> None:
        versions = storage.rule_versions
        assert await versions.current() == (None, None)
        await versions.publish(version(1))
        assert await versions.current() == (f"{1:012x}", None)
        await versions.publish(version(2), "shadow")
        await versions.publish(version(3), "shadow")
        assert await versions.current() == (f"{1:012x}", f"{3:012x}")
        await versions.activate(f"{3:012x}")  # the shadow promoted: the older one is left
        assert await versions.current() == (f"{3:012x}", f"{2:012x}")

    async def test_wait_for_change_hears_another_process_publish_within_a_second(
        self, storage: Storage, make_storage: Callable[[], Storage]
    ) -> None:
        other = make_storage()  # another linkcrm process on the same database
        try:
            versions = storage.rule_versions
            await versions.publish(version(1))
            assert await versions.current() == (f"{1:012x}", None)
            # Settle: the first wait may wake at once (PostgreSQL's LISTEN coming up).
            await versions.wait_for_change(0.3)
            assert await versions.wait_for_change(0.3) is False  # nothing changed
            loop = asyncio.get_running_loop()

            async def publish_later() -> None:
                await asyncio.sleep(0.1)
                await other.rule_versions.publish(version(2))

            publisher = asyncio.create_task(publish_later())
            began = loop.time()
            assert await versions.wait_for_change(5.0) is True
            assert loop.time() - began < 1.0
            await publisher
            assert await versions.current() == (f"{2:012x}", None)

            async def activate_later() -> None:
                await asyncio.sleep(0.1)
                await other.rule_versions.activate(f"{1:012x}")

            activator = asyncio.create_task(activate_later())
            assert await versions.wait_for_change(5.0) is True
            await activator
            assert await versions.current() == (f"{1:012x}", None)
        finally:
            await other.close()
