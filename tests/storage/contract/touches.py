"""The touches part of the storage contract: one touch per event, attribution with first,
last and one claimed install, the retention window, and a stored result for replays."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from engine.errors import UnstorableValueError
from engine.storage import Storage
from engine.storage.touchrecords import AttributionRequest, NewTouch

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def touch(event_id: int, minutes: int, *, platform: str | None = "ios",
          event_type: str = "install.tracked", token: str = "summer-promo",
          campaign: str = "instagram-story-may") -> NewTouch:
    return NewTouch(event_id=event_id, event_type=event_type, token=token, campaign=campaign,
                    prefix="promo", platform=platform, referrer=None, per_person=False,
                    occurred_at=T0 + timedelta(minutes=minutes))


def ask(event_id: int, minutes: int, *, platform: str | None = None,
        anchor: int | None = None, since: int | None = None,
        token: str = "summer-promo") -> AttributionRequest:
    before = T0 + timedelta(minutes=minutes)
    return AttributionRequest(
        event_id=event_id, token=token, platform=platform,
        anchor=before if anchor is None else T0 + timedelta(minutes=anchor), before=before,
        since=None if since is None else T0 + timedelta(minutes=since))


class TouchesContract:
    async def test_touches_kept_together_all_or_none(self, storage: Storage) -> None:
        assert await storage.touches.record(touch(1, 0))
        assert await storage.touches.record_many([touch(1, 5), touch(2, 10), touch(3, 20)]) == [
            False, True, True]  # the first was kept before (a retry)
        with pytest.raises(UnstorableValueError):
            await storage.touches.record_many([touch(4, 30), touch(5, 40, token="t\ud800")])
        got = await storage.touches.attribute(ask(100, 60))
        assert got.detail["count"] == 3  # 1, 2 and 3; nothing of the failed write
        assert await storage.touches.record_many([]) == []

    async def test_a_touch_is_kept_once_per_event(self, storage: Storage) -> None:
        assert await storage.touches.record(touch(1, 0))
        assert not await storage.touches.record(touch(1, 5))  # a retry of the same event
        got = await storage.touches.attribute(ask(100, 60))
        assert got.detail["count"] == 1
        assert got.detail["first"]["timestamp"] == "2026-03-01T12:00:00Z"

    async def test_first_last_and_the_closest_earlier_install_on_the_platform(
        self, storage: Storage
    ) -> None:
        await storage.touches.record(touch(1, 0, platform="android"))
        await storage.touches.record(touch(2, 10, platform="ios"))
        await storage.touches.record(touch(3, 20, platform="android"))
        await storage.touches.record(touch(4, 30, event_type="deferred_link.claimed"))
        await storage.touches.record(touch(5, 90, platform="ios"))  # after the identify
        got = await storage.touches.attribute(ask(100, 60, platform="iOS"))
        detail = got.detail
        assert got.found and detail["count"] == 4
        assert detail["first"]["event_id"] == 1
        assert detail["last"]["event_id"] == 4
        assert detail["last"]["event"] == "deferred_link.claimed"
        assert detail["install"]["event_id"] == 2  # same platform beats closer in time
        assert detail["install"]["platform"] == "ios"
        assert "claimed install event 2" in " ".join(detail["why"])
        # The next person on Android gets the closest earlier Android install, then the other.
        assert (await storage.touches.attribute(ask(101, 61, platform="android"))
                ).detail["install"]["event_id"] == 3
        assert (await storage.touches.attribute(ask(102, 62, platform="android"))
                ).detail["install"]["event_id"] == 1
        # No unclaimed install left before the identify: first and last, no install.
        last = await storage.touches.attribute(ask(103, 63, platform="ios"))
        assert last.detail["install"] is None and last.detail["count"] == 4
        assert "3 already attributed" in " ".join(last.detail["why"])

    async def test_the_install_time_the_app_sent_picks_the_install(
        self, storage: Storage
    ) -> None:
        for event_id, minutes in ((1, 0), (2, 10), (3, 20)):
            await storage.touches.record(touch(event_id, minutes))
        got = await storage.touches.attribute(ask(100, 60, anchor=9))
        assert got.detail["install"]["event_id"] == 2

    async def test_an_event_keeps_its_attribution(self, storage: Storage) -> None:
        await storage.touches.record(touch(1, 0))
        await storage.touches.record(touch(2, 10))
        first = await storage.touches.attribute(ask(100, 60))
        again = await storage.touches.attribute(ask(100, 60))
        assert again.detail == first.detail
        assert (await storage.touches.attribution(100)) is not None
        assert (await storage.touches.attribution(100)).detail == first.detail  # type: ignore[union-attr]
        assert await storage.touches.attribution(999) is None
        other = await storage.touches.attribute(ask(101, 60))
        assert other.detail["install"]["event_id"] == 1

    async def test_touches_past_the_retention_are_not_attached(self, storage: Storage) -> None:
        await storage.touches.record(touch(1, 0))
        await storage.touches.record(touch(2, 100, token="other"))
        got = await storage.touches.attribute(ask(100, 200, since=50))
        assert not got.found and got.detail["install"] is None
        assert got.detail["why"] == ["no touch found for token 'summer-promo' "
                                     "(1 older than the retention)"]
        assert await storage.touches.forget(T0 + timedelta(minutes=50)) == 1

    async def test_the_link_is_the_latest_touch_of_any_age_before_the_identify(
        self, storage: Storage
    ) -> None:
        def linked(event_id: int, minutes: int, prefix: str, per_person: bool) -> NewTouch:
            return NewTouch(event_id=event_id, event_type="link.clicked", token="summer-promo",
                            campaign=None, prefix=prefix, platform=None, referrer=f"r{event_id}",
                            per_person=per_person, occurred_at=T0 + timedelta(minutes=minutes))

        await storage.touches.record(linked(1, 0, "old", True))
        await storage.touches.record(linked(2, 10, "older-but-later", False))
        await storage.touches.record(linked(3, 300, "after-the-identify", True))
        # Every touch before the identify is past the retention: none is attached, but the
        # link is still the latest of them.
        gone = await storage.touches.attribute(ask(100, 200, since=50))
        assert not gone.found and gone.detail["count"] == 0 and gone.detail["last"] is None
        assert gone.detail["link"] == {"prefix": "older-but-later", "referrer": "r2"}
        assert gone.detail["per_person"] is False
        assert gone.detail["why"] == ["no touch found for token 'summer-promo' "
                                      "(2 older than the retention)"]
        # One touch within it: it is first, last and the link, the older one ignored.
        one = await storage.touches.attribute(ask(101, 200, since=5))
        assert one.detail["count"] == 1
        assert one.detail["first"] == one.detail["last"]
        assert one.detail["last"]["event_id"] == 2
        assert one.detail["link"] == {"prefix": "older-but-later", "referrer": "r2"}
        assert one.detail["why"][0] == ("1 touch(es) of token 'summer-promo' within the "
                                        "retention, 1 older ignored")
        # No retention: both count; still nothing after the identify.
        both = await storage.touches.attribute(ask(102, 200))
        assert (both.detail["count"], both.detail["first"]["event_id"],
                both.detail["last"]["event_id"]) == (2, 1, 2)
        assert both.detail["per_person"] is False and both.detail["install"] is None
        assert both.detail["why"][1] == "no unclaimed install of this token before the identify"

    async def test_an_unknown_token_finds_nothing(self, storage: Storage) -> None:
        got = await storage.touches.attribute(ask(100, 60, token="never-seen"))
        assert not got.found
        assert got.detail["first"] is None and got.detail["last"] is None
        assert got.detail["why"] == ["no touch found for token 'never-seen'"]

    async def test_concurrent_identifies_claim_distinct_installs(self, storage: Storage) -> None:
        for n in range(10):
            await storage.touches.record(touch(n + 1, n, platform=("ios", "android")[n % 2]))
        got = await asyncio.gather(*(storage.touches.attribute(
            ask(100 + n, 60, platform=("ios", "android", None)[n % 3])) for n in range(12)))
        claimed = [a.detail["install"]["event_id"] for a in got if a.detail["install"]]
        assert sorted(claimed) == list(range(1, 11))
