"""The delivery log page's reads: filtered keyset pages and per-minute activity."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from engine.actions import IdentityKey, identity_digest
from engine.storage import ActivityCount, EventFilter, Storage
from tests.storage.contract.support import FakeClock, event, outcome

START = datetime(2026, 3, 1, 10, 0, tzinfo=UTC)


async def _story(storage: Storage) -> list[int]:
    """Ten events a minute apart: even ones installs, odd ones referrals; 3 and 7 dead."""
    ids = []
    for n in range(10):
        kind = "install.tracked" if n % 2 == 0 else "referral.completed"
        stored = await storage.inbox.store(event(n, event_type=kind,
                                                 received_at=START + timedelta(minutes=n)))
        ids.append(stored.id)
    claimed = await storage.inbox.claim("w", 10, 60)
    for item in claimed:
        status = "dead" if item.id in (ids[3], ids[7]) else "processed"
        await storage.inbox.finish(item.id, "w", status)  # type: ignore[arg-type]
    return ids


class BrowsingContract:
    """`Inbox.browse`, `Inbox.activity`, `Outcomes.activity` and `Outcomes.recent_retries`."""

    async def test_browse_pages_newest_first_by_keyset(self, storage: Storage) -> None:
        ids = await _story(storage)
        first = await storage.inbox.browse(EventFilter(), limit=4)
        assert [e.id for e in first] == ids[::-1][:4]
        second = await storage.inbox.browse(EventFilter(), limit=4, before_id=first[-1].id)
        assert [e.id for e in second] == ids[::-1][4:8]
        last = await storage.inbox.browse(EventFilter(), limit=4, before_id=second[-1].id)
        assert [e.id for e in last] == ids[::-1][8:]

    async def test_browse_filters_by_status_type_and_together(self, storage: Storage) -> None:
        ids = await _story(storage)
        dead = await storage.inbox.browse(EventFilter(status="dead"))
        assert [e.id for e in dead] == [ids[7], ids[3]]
        installs = await storage.inbox.browse(EventFilter(event_type="install.tracked"))
        assert [e.id for e in installs] == [ids[8], ids[6], ids[4], ids[2], ids[0]]
        both = await storage.inbox.browse(EventFilter(status="processed",
                                                      event_type="referral.completed"))
        assert [e.id for e in both] == [ids[9], ids[5], ids[1]]
        assert await storage.inbox.browse(EventFilter(event_type="<script>")) == []

    async def test_browse_by_received_time_is_half_open(self, storage: Storage) -> None:
        ids = await _story(storage)
        window = EventFilter(received_from=START + timedelta(minutes=2),
                             received_until=START + timedelta(minutes=5))
        assert [e.id for e in await storage.inbox.browse(window)] == [ids[4], ids[3], ids[2]]
        between = EventFilter(received_from=START + timedelta(minutes=2, seconds=30))
        assert [e.id for e in await storage.inbox.browse(between, limit=100)][-1] == ids[3]
        later = EventFilter(received_from=START + timedelta(hours=1))
        assert await storage.inbox.browse(later) == []
        earlier = EventFilter(received_until=START)
        assert await storage.inbox.browse(earlier) == []

    async def test_browse_on_an_empty_inbox_is_empty(self, storage: Storage) -> None:
        assert await storage.inbox.browse(EventFilter(received_from=START)) == []

    async def test_browse_by_the_identities_an_event_touched(self, storage: Storage) -> None:
        ids = await _story(storage)
        ada = identity_digest("local", IdentityKey("email", "ada@example.com"))
        bob = identity_digest("local", IdentityKey("email", "bob@example.com"))
        await storage.inbox.set_ordering_keys(ids[1], [ada])
        await storage.inbox.set_ordering_keys(ids[6], [ada, bob])
        touched = await storage.inbox.browse(EventFilter(touched=(ada,)))
        assert [e.id for e in touched] == [ids[6], ids[1]]
        assert [e.id for e in await storage.inbox.browse(
            EventFilter(touched=(bob,), status="processed"))] == [ids[6]]
        assert await storage.inbox.browse(EventFilter(touched=())) == []
        assert await storage.inbox.browse(EventFilter(touched=("local:none",))) == []

    async def test_activity_counts_events_per_minute_and_status(self, storage: Storage) -> None:
        await _story(storage)
        counted = await storage.inbox.activity(START + timedelta(minutes=6))
        assert counted == [
            ActivityCount(START + timedelta(minutes=6), None, "processed", 1),
            ActivityCount(START + timedelta(minutes=7), None, "dead", 1),
            ActivityCount(START + timedelta(minutes=8), None, "processed", 1),
            ActivityCount(START + timedelta(minutes=9), None, "processed", 1),
        ]

    async def test_outcome_activity_and_retries(self, storage: Storage,
                                                clock: FakeClock) -> None:
        ids = await _story(storage)
        await storage.outcomes.record(outcome(ids[8], "ok", target="hubspot", key="a"))
        await storage.outcomes.record(outcome(ids[9], "retrying", target="hubspot", key="b",
                                              error="429 Too Many Requests"))
        await storage.outcomes.record(outcome(ids[0], "ok", target="local", key="c"))
        since = START + timedelta(minutes=5)  # ids[0]'s outcome is of an older event
        minute = clock.now.replace(second=0, microsecond=0)
        assert await storage.outcomes.activity(since) == [
            ActivityCount(minute, "hubspot", "ok", 1),
            ActivityCount(minute, "hubspot", "retrying", 1),
        ]
        retries = await storage.outcomes.recent_retries(since)
        assert [(r.event_id, r.error) for r in retries] == [(ids[9], "429 Too Many Requests")]
        assert await storage.outcomes.recent_retries(clock.now + timedelta(minutes=1)) == []
