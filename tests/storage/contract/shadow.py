"""The shadow results part of the storage contract: one row per (version, event), counts by
outcome, the differences paged in event order, values from events cleaned; and the rule
version a requeued event is pinned to."""

from __future__ import annotations

from datetime import timedelta

import pytest

from engine.storage import NewShadowResult, Storage
from tests.storage.contract.support import FakeClock, event

SHADOW = "5" * 12
ACTIVE = "a" * 12


def change(value: object) -> dict[str, object]:
    return {"rule": "install-creates-lead", "action": "upsert_contact", "ordinal": 0,
            "field": "set.first_touch_campaign", "change": "changed", "before": "spring",
            "after": value, "identity": {"deep_link_token": "tok_1"}}


class ShadowResultsContract:
    async def _events(self, storage: Storage, count: int) -> list[int]:
        return [(await storage.inbox.store(event(n))).id for n in range(count)]

    async def test_results_are_counted_by_outcome_and_differences_paged(
        self, storage: Storage, clock: FakeClock
    ) -> None:
        shadow = storage.shadow
        empty = await shadow.counts(SHADOW)
        assert (empty.events, empty.first_at, empty.active_versions) == (0, None, ())
        ids = await self._events(storage, 5)
        await shadow.record(NewShadowResult(ids[0], SHADOW, ACTIVE, "install.tracked", "same"))
        clock.advance(1)
        await shadow.record(NewShadowResult(ids[1], SHADOW, ACTIVE, "install.tracked",
                                            "changed", [change("summer")]))
        await shadow.record(NewShadowResult(ids[2], SHADOW, None, "signup.completed",
                                            "uncompared", error="RecursionError: deep"))
        clock.advance(1)
        await shadow.record(NewShadowResult(ids[3], SHADOW, ACTIVE, "install.tracked",
                                            "changed", [change("autumn"), change(None)]))
        await shadow.record(NewShadowResult(ids[4], "6" * 12, ACTIVE, "install.tracked",
                                            "changed", [change("other version")]))
        counts = await shadow.counts(SHADOW)
        assert (counts.same, counts.changed, counts.uncompared, counts.events) == (1, 2, 1, 4)
        assert set(counts.active_versions) == {ACTIVE, None}
        assert counts.first_at is not None and counts.last_at == clock.now
        assert counts.last_at - counts.first_at == timedelta(seconds=2)
        found = await shadow.differences(SHADOW)
        assert [(r.event_id, r.outcome) for r in found] == [
            (ids[1], "changed"), (ids[2], "uncompared"), (ids[3], "changed")]
        assert found[0].changes == [change("summer")]
        assert found[0].active_version == ACTIVE and found[0].event_type == "install.tracked"
        assert found[1].error == "RecursionError: deep" and found[1].active_version is None
        assert found[2].changes == [change("autumn"), change(None)]
        page = await shadow.differences(SHADOW, after_event_id=ids[1], limit=1)
        assert [r.event_id for r in page] == [ids[2]]
        assert await shadow.differences(SHADOW, after_event_id=ids[3]) == []

    async def test_observing_an_event_again_replaces_its_row(self, storage: Storage) -> None:
        shadow = storage.shadow
        [event_id] = await self._events(storage, 1)
        await shadow.record(NewShadowResult(event_id, SHADOW, ACTIVE, "install.tracked",
                                            "changed", [change("summer")]))
        await shadow.record(NewShadowResult(event_id, SHADOW, "b" * 12, "install.tracked",
                                            "same"))
        counts = await shadow.counts(SHADOW)
        assert (counts.same, counts.changed, counts.active_versions) == (1, 0, ("b" * 12,))
        assert await shadow.differences(SHADOW) == []

    async def test_values_no_store_can_keep_are_cleaned_not_refused(
        self, storage: Storage
    ) -> None:
        [event_id] = await self._events(storage, 1)
        nasty = {"lone": "x\ud800y", "nul": "a\x00b", "huge": 10 ** 5000,
                 "inf": float("inf"), "deep": [[[[1]]]]}
        await storage.shadow.record(NewShadowResult(
            event_id, SHADOW, ACTIVE, "install\x00.tracked\udc00", "changed",
            [change(nasty)], error="bad\x00\ud800"))
        [stored] = await storage.shadow.differences(SHADOW)
        after = stored.changes[0]
        assert isinstance(after, dict)
        value = after["after"]
        assert isinstance(value, dict)
        assert value["lone"] == "x\ufffdy" and value["nul"] == "a\ufffdb"
        assert value["inf"] == "inf" and value["deep"] == [[[[1]]]]
        assert isinstance(value["huge"], str) and "digits" in value["huge"]
        assert stored.event_type == "install\ufffd.tracked\ufffd"
        assert stored.error == "bad\ufffd\ufffd"

    async def test_purge_drops_results_observed_before_the_cutoff(
        self, storage: Storage, clock: FakeClock
    ) -> None:
        first, second = await self._events(storage, 2)
        await storage.shadow.record(NewShadowResult(first, SHADOW, ACTIVE, "t", "changed",
                                                    [change("old")]))
        clock.advance(60)
        cutoff = clock.now
        await storage.shadow.record(NewShadowResult(second, SHADOW, ACTIVE, "t", "same"))
        assert await storage.shadow.purge(cutoff) == 1
        counts = await storage.shadow.counts(SHADOW)
        assert (counts.same, counts.changed) == (1, 0)
        assert await storage.shadow.purge(cutoff) == 0

    async def test_bad_calls_are_refused_before_anything_is_written(
        self, storage: Storage
    ) -> None:
        [event_id] = await self._events(storage, 1)
        with pytest.raises(ValueError, match="rule version"):
            await storage.shadow.record(NewShadowResult(event_id, " ", ACTIVE, "t", "same"))
        with pytest.raises(ValueError, match="same, changed or uncompared"):
            await storage.shadow.record(NewShadowResult(
                event_id, SHADOW, ACTIVE, "t", "different"))  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="at least one row"):
            await storage.shadow.differences(SHADOW, limit=0)
        assert (await storage.shadow.counts(SHADOW)).events == 0

    async def test_a_requeued_event_is_pinned_to_a_rule_version_or_unpinned(
        self, storage: Storage
    ) -> None:
        first, second = await self._events(storage, 2)
        assert (await storage.inbox.get(first)).rules_version is None  # type: ignore[union-attr]
        assert await storage.inbox.requeue(first, rules_version=ACTIVE)
        pinned = await storage.inbox.get(first)
        assert pinned is not None and pinned.rules_version == ACTIVE
        [claimed, _] = await storage.inbox.claim("w1", 2, 30)
        assert claimed.id == first and claimed.rules_version == ACTIVE
        await storage.inbox.finish(first, "w1", "dead", "boom")
        assert await storage.inbox.requeue_dead(rules_version=SHADOW) == [first]
        assert (await storage.inbox.get(first)).rules_version == SHADOW  # type: ignore[union-attr]
        assert (await storage.inbox.get(second)).rules_version is None  # type: ignore[union-attr]
        assert await storage.inbox.requeue(first)
        assert (await storage.inbox.get(first)).rules_version is None  # type: ignore[union-attr]
        with pytest.raises(ValueError, match="rule version"):
            await storage.inbox.requeue(first, rules_version="")
