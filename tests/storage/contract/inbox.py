"""The inbox part of the storage contract: dedupe, leases, ordering, dead letters, purge."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from engine.errors import UnstorableEventError
from engine.storage import PLANNING_WAIT, EventFilter, FinalStatus, Finish, NewOutcome, Storage
from tests.storage.contract.support import FakeClock, event, outcome


class InboxContract:
    """Deliveries: stored once, leased to one worker, in order per identity."""

    # -- inbox and dedupe ------------------------------------------------------------------------

    async def test_store_keeps_every_field(self, storage: Storage) -> None:
        stored = await storage.inbox.store(event(1))
        assert stored.duplicate is False
        got = await storage.inbox.get(stored.id)
        assert got is not None
        assert got.body == event(1).body
        assert got.dedupe_key == event(1).dedupe_key
        assert (got.event_type, got.event_timestamp) == ("install.tracked", "2026-03-01T00:00:00Z")
        assert got.received_at == datetime(2026, 3, 1, 11, 0, tzinfo=UTC)
        assert dict(got.headers) == {"user-agent": "Tolinku/1.0"}
        assert (got.status, got.attempts, got.lease_owner) == ("received", 0, None)
        assert got.source == "tolinku"

    async def test_same_bytes_twice_is_a_duplicate_of_the_first(self, storage: Storage) -> None:
        first = await storage.inbox.store(event(1))
        second = await storage.inbox.store(event(1))
        assert second.duplicate is True
        assert second.id == first.id
        assert len(await storage.inbox.list_events()) == 1

    async def test_prefixed_keys_dedupe_alike_in_one_batch_and_across_batches(
        self, storage: Storage
    ) -> None:
        """Identical copies in one batch: the first is stored and told so, the rest are its
        duplicates, whatever prefix leads their key (ids may skip where copies conflicted)."""
        stamped = replace(event(1), dedupe_prefix="2026-03-01T00:00:00Z\x00\u00e9")
        first, copy, other = await asyncio.gather(
            storage.inbox.store(stamped), storage.inbox.store(stamped),
            storage.inbox.store(event(2)))
        assert (first.duplicate, copy.duplicate, other.duplicate) == (False, True, False)
        assert copy.id == first.id != other.id
        later = await asyncio.gather(storage.inbox.store(event(2)), storage.inbox.store(stamped))
        assert [(r.id, r.duplicate) for r in later] == [(other.id, True), (first.id, True)]
        assert len(await storage.inbox.list_events()) == 2

    async def test_concurrent_identical_deliveries_store_exactly_one(
        self, storage: Storage
    ) -> None:
        results = await asyncio.gather(*(storage.inbox.store(event(7)) for _ in range(25)))
        assert sum(not r.duplicate for r in results) == 1
        assert len({r.id for r in results}) == 1
        assert len(await storage.inbox.list_events()) == 1

    async def test_concurrent_distinct_deliveries_are_all_stored(self, storage: Storage) -> None:
        results = await asyncio.gather(*(storage.inbox.store(event(n)) for n in range(40)))
        assert not any(r.duplicate for r in results)
        assert len({r.id for r in results}) == 40
        assert len(await storage.inbox.list_events(limit=100)) == 40

    async def test_an_unstorable_event_fails_alone_and_its_batch_is_stored(
        self, storage: Storage
    ) -> None:
        """A lone surrogate in the event type can never be stored: that one delivery gets an
        error that says so (a 400, never retried), and the deliveries committed with it are
        stored as if it had not been there."""
        bad = replace(event(99), event_type="install.tracked\ud800")
        results = await asyncio.gather(
            *(storage.inbox.store(event(n)) for n in range(5)),
            storage.inbox.store(bad),
            *(storage.inbox.store(event(n)) for n in range(5, 10)),
            return_exceptions=True,
        )
        refused = results[5]
        assert isinstance(refused, UnstorableEventError), refused
        assert "U+D800 at character 16" in str(refused)
        stored = [r for r in results if not isinstance(r, BaseException)]
        assert len(stored) == 10 and not any(r.duplicate for r in stored)
        listed = await storage.inbox.list_events(limit=100)
        assert sorted(e.id for e in listed) == sorted(r.id for r in stored)
        assert bad.dedupe_key not in {e.dedupe_key for e in listed}

    async def test_a_nul_in_the_event_metadata_is_stored_the_same_on_both_backends(
        self, storage: Storage
    ) -> None:
        """PostgreSQL text cannot hold NUL: both backends keep it as U+FFFD in the type, time
        and source columns, and the raw body exactly as it came."""
        nul = replace(event(7), event_type="install\x00tracked", event_timestamp="2026\x00",
                      source="tolinku\x00")
        stored = await storage.inbox.store(nul)
        kept = await storage.inbox.get(stored.id)
        assert kept is not None
        assert (kept.event_type, kept.event_timestamp, kept.source) == (
            "install\ufffdtracked", "2026\ufffd", "tolinku\ufffd")
        assert kept.body == nul.body

    async def test_list_events_newest_first_with_status_filter_and_paging(
        self, storage: Storage
    ) -> None:
        ids = [(await storage.inbox.store(event(n))).id for n in range(5)]
        listed = await storage.inbox.list_events(limit=2)
        assert [e.id for e in listed] == [ids[4], ids[3]]
        older = await storage.inbox.list_events(limit=10, before_id=ids[3])
        assert [e.id for e in older] == [ids[2], ids[1], ids[0]]
        claimed = await storage.inbox.claim("w", 1, 30)
        await storage.inbox.finish(claimed[0].id, "w", "ignored")
        assert [e.id for e in await storage.inbox.list_events(status="ignored")] == [ids[0]]

    # -- claims and leases -----------------------------------------------------------------------

    async def test_claim_returns_due_events_in_arrival_order(self, storage: Storage) -> None:
        ids = [(await storage.inbox.store(event(n))).id for n in range(5)]
        first = await storage.inbox.claim("w1", 3, 30)
        assert [e.id for e in first] == ids[:3]
        assert all(e.lease_owner == "w1" and e.attempts == 1 for e in first)
        second = await storage.inbox.claim("w2", 10, 30)
        assert [e.id for e in second] == ids[3:]
        assert await storage.inbox.claim("w3", 10, 30) == []

    async def test_expired_lease_comes_back_and_the_old_worker_loses_it(
        self, storage: Storage, clock: FakeClock
    ) -> None:
        stored = await storage.inbox.store(event(1))
        assert [e.id for e in await storage.inbox.claim("crashed", 1, 30)] == [stored.id]
        clock.advance(29)
        assert await storage.inbox.claim("w2", 1, 30) == []
        clock.advance(2)
        again = await storage.inbox.claim("w2", 1, 30)
        assert [e.id for e in again] == [stored.id]
        assert again[0].attempts == 2
        assert await storage.inbox.finish(stored.id, "crashed", "processed") is False
        assert await storage.inbox.finish(stored.id, "w2", "processed") is True
        got = await storage.inbox.get(stored.id)
        assert got is not None and got.status == "processed" and got.lease_owner is None

    async def test_leases_extended_together_only_where_still_held(
        self, storage: Storage, clock: FakeClock
    ) -> None:
        ids = [(await storage.inbox.store(event(n))).id for n in range(3)]
        assert [e.id for e in await storage.inbox.claim("w1", 2, 30)] == ids[:2]
        clock.advance(31)  # both leases ran out; another worker takes the first
        assert [e.id for e in await storage.inbox.claim("w2", 1, 30)] == [ids[0]]
        assert await storage.inbox.extend_leases([*ids, ids[1]], "w1", 30) == {ids[1]}
        clock.advance(20)  # w1's second lease was pushed out: still held
        assert [e.id for e in await storage.inbox.claim("w3", 5, 30)] == [ids[2]]
        assert await storage.inbox.extend_leases([], "w1", 30) == set()

    async def test_extend_lease_keeps_the_event(self, storage: Storage, clock: FakeClock) -> None:
        stored = await storage.inbox.store(event(1))
        await storage.inbox.claim("w1", 1, 30)
        clock.advance(20)
        assert await storage.inbox.extend_lease(stored.id, "w1", 30) is True
        clock.advance(20)
        assert await storage.inbox.claim("w2", 1, 30) == []
        assert await storage.inbox.extend_lease(stored.id, "w2", 30) is False

    async def test_finished_events_are_not_claimed(self, storage: Storage) -> None:
        statuses: tuple[FinalStatus, ...] = ("processed", "ignored", "dead")
        for n, status in enumerate(statuses):
            stored = await storage.inbox.store(event(n))
            await storage.inbox.claim("w", 1, 30)
            assert await storage.inbox.finish(stored.id, "w", status, "boom" if n == 2 else None)
        assert await storage.inbox.claim("w", 10, 30) == []
        with pytest.raises(ValueError):
            await storage.inbox.finish(1, "w", "received")  # type: ignore[arg-type]

    async def test_finish_many_finishes_what_this_worker_still_leases(
        self, storage: Storage
    ) -> None:
        ids = [(await storage.inbox.store(event(n))).id for n in range(6)]
        assert len(await storage.inbox.claim("w", 5, 30)) == 5  # the sixth is not leased
        assert await storage.inbox.finish(ids[4], "w", "processed")  # finished already
        done = await storage.inbox.finish_many("w", [
            Finish(ids[0], "processed"), Finish(ids[1], "dead", "HubSpot answered 400"),
            Finish(ids[2], "processed"), Finish(ids[3], "ignored"), Finish(ids[4], "dead", "x"),
            Finish(ids[5], "processed")])
        assert done == [True, True, True, True, False, False]
        got = [await storage.inbox.get(event_id) for event_id in ids]
        assert [(e.status, e.last_error, e.lease_owner) for e in got if e is not None] == [
            ("processed", None, None), ("dead", "HubSpot answered 400", None),
            ("processed", None, None), ("ignored", None, None), ("processed", None, None),
            ("received", None, None)]
        assert await storage.inbox.finish_many("other", [Finish(ids[5], "processed")]) == [False]

    async def test_retry_later_waits_for_its_time(
        self, storage: Storage, clock: FakeClock
    ) -> None:
        stored = await storage.inbox.store(event(1))
        await storage.inbox.claim("w", 1, 30)
        later = clock() + timedelta(minutes=5)
        assert await storage.inbox.retry_later(stored.id, "w", later, "HubSpot answered 503")
        got = await storage.inbox.get(stored.id)
        assert got is not None
        assert (got.status, got.last_error, got.next_attempt_at) == (
            "failed", "HubSpot answered 503", later)
        assert got.lease_owner is None
        clock.advance(299)
        assert await storage.inbox.claim("w", 1, 30) == []
        clock.advance(2)
        again = await storage.inbox.claim("w", 1, 30)
        assert [e.attempts for e in again] == [2]

    async def test_claims_take_the_earliest_due_first(
        self, storage: Storage, clock: FakeClock
    ) -> None:
        # A rescheduled event comes back behind the events that arrived before it fell due,
        # however early it arrived itself; new events keep their arrival order.
        early = (await storage.inbox.store(event(1, received_at=clock()))).id
        assert [e.id for e in await storage.inbox.claim("w", 1, 30)] == [early]
        assert await storage.inbox.retry_later(early, "w", clock() + timedelta(seconds=10), "busy")
        clock.advance(5)
        newer = (await storage.inbox.store(event(2, received_at=clock()))).id
        clock.advance(10)
        latest = (await storage.inbox.store(event(3, received_at=clock()))).id
        assert [e.id for e in await storage.inbox.claim("w", 2, 30)] == [newer, early]
        assert [e.id for e in await storage.inbox.claim("w", 5, 30)] == [latest]

    async def test_earlier_unfinished_events_block_per_identity(self, storage: Storage) -> None:
        a = (await storage.inbox.store(event(1))).id
        b = (await storage.inbox.store(event(2))).id
        c = (await storage.inbox.store(event(3))).id
        await storage.inbox.set_ordering_keys(a, ["local:deep_link_token:tok_1"])
        await storage.inbox.set_ordering_keys(b, ["local:deep_link_token:tok_2"])
        await storage.inbox.set_ordering_keys(c, ["local:deep_link_token:tok_1", "local:email:x"])
        assert await storage.inbox.earlier_unfinished(c, ["local:deep_link_token:tok_1"]) == [a]
        assert await storage.inbox.earlier_unfinished(c, ["local:email:x"]) == []
        assert await storage.inbox.earlier_unfinished(a, ["local:deep_link_token:tok_1"]) == []
        await storage.inbox.claim("w", 1, 30)
        await storage.inbox.finish(a, "w", "processed")
        assert await storage.inbox.earlier_unfinished(c, ["local:deep_link_token:tok_1"]) == []

    async def test_keys_recorded_together_and_replaced_when_finishing(
        self, storage: Storage
    ) -> None:
        a, b, c = [(await storage.inbox.store(event(n))).id for n in (1, 2, 3)]
        ada, bob = "local:deep_link_token:tok_1", "*:email:bob"
        await storage.inbox.set_ordering_keys_many({a: [ada], b: [], c: [ada, bob]})
        assert await storage.inbox.earlier_unfinished(c, [ada]) == [a]
        assert await storage.inbox.earlier_unfinished(c, [bob]) == []  # b: none, but recorded
        assert [e.id for e in await storage.inbox.claim("w", 3, 30)] == [a, b, c]
        # Finishing with keys keeps only those (a touched-identity key, for the delivery log).
        assert await storage.inbox.finish(c, "w", "processed", ordering_keys=[bob])
        assert [e.id for e in await storage.inbox.browse(EventFilter(touched=(bob,)))] == [c]
        assert [e.id for e in await storage.inbox.browse(EventFilter(touched=(ada,)))] == [a]
        # Not leased by this worker: neither the status nor the keys change.
        assert not await storage.inbox.finish(a, "other", "processed", ordering_keys=[])
        assert await storage.inbox.earlier_unfinished(b, [ada]) == [a]
        assert await storage.inbox.finish(a, "w", "processed")
        assert await storage.inbox.earlier_unfinished(b, [ada]) == []

    async def test_earlier_events_of_many_events_in_one_read(self, storage: Storage) -> None:
        a, b, c, d = [(await storage.inbox.store(event(n))).id for n in (1, 2, 3, 4)]
        ada, bob = "local:ada", "local:bob"
        await storage.inbox.set_ordering_keys_many({a: [ada], c: [ada, bob], d: [bob]})
        # b's keys are not recorded: it holds back every later event that has keys.
        assert await storage.inbox.earlier_pending_many({a: [ada], c: [ada, bob], d: [bob],
                                                         b: []}) == {
            a: ([], []), c: ([a], [b]), d: ([c], [b]), b: ([], [])}
        await storage.inbox.set_ordering_keys(b, [])
        assert await storage.inbox.earlier_pending_many({c: [bob], d: [ada]}) == {
            c: ([], []), d: ([a, c], [])}
        assert await storage.inbox.earlier_pending_many({}) == {}

    async def test_an_earlier_event_being_planned_elsewhere_holds_back_a_later_one(
        self, storage: Storage, make_storage: Callable[[], Storage]
    ) -> None:
        key = "hubspot:person-1"
        other = make_storage()  # another worker process on the same database
        try:
            first = (await storage.inbox.store(event(1))).id
            second = (await storage.inbox.store(event(2))).id
            claimed = await other.inbox.claim("other", 1, 30)  # its keys are not recorded yet
            assert [e.id for e in claimed] == [first]
            await storage.inbox.set_ordering_keys(second, [key])
            started = time.monotonic()
            assert await storage.inbox.earlier_unfinished(second, [key]) == [first]
            assert time.monotonic() - started >= PLANNING_WAIT * 0.9

            async def plan_first(keys: list[str]) -> None:
                await asyncio.sleep(PLANNING_WAIT / 4)
                await other.inbox.set_ordering_keys(first, keys)

            # Another identity: the check waits for the keys, then lets the later event go.
            results = await asyncio.gather(
                storage.inbox.earlier_unfinished(second, [key]), plan_first(["hubspot:person-2"]))
            assert results[0] == []
            await other.inbox.set_ordering_keys(first, [key])
            assert await storage.inbox.earlier_unfinished(second, [key]) == [first]
            assert await other.inbox.finish(first, "other", "processed")
            assert await storage.inbox.earlier_unfinished(second, [key]) == []
            # A requeued event is planned again (the rules may have changed): until its keys
            # are recorded anew, later events wait for it.
            await other.inbox.set_ordering_keys(first, [])
            assert await storage.inbox.requeue(first)
            assert await storage.inbox.earlier_unfinished(second, [key]) == [first]
            await storage.inbox.set_ordering_keys(first, ["hubspot:person-2"])
            assert await storage.inbox.earlier_unfinished(second, [key]) == []
        finally:
            await other.close()


    # -- dead letters and replay -----------------------------------------------------------------

    async def test_dead_letters_name_event_rule_action_and_error(self, storage: Storage) -> None:
        dead_event = (await storage.inbox.store(event(1))).id
        await storage.inbox.claim("w", 1, 30)
        await storage.inbox.finish(dead_event, "w", "dead", "no rule could parse the body")
        with_dead_action = (await storage.inbox.store(event(2))).id
        await storage.outcomes.record(
            outcome(with_dead_action, "dead", error="PROPERTY_DOESNT_EXIST: first_touch"))
        letters = await storage.inbox.dead_letters()
        by_event = {letter.event_id: letter for letter in letters}
        assert by_event[dead_event].error == "no rule could parse the body"
        assert by_event[dead_event].action_kind is None
        action = by_event[with_dead_action]
        assert (action.rule, action.action_kind, action.target, action.error) == (
            "install-creates-lead", "upsert_contact", "hubspot",
            "PROPERTY_DOESNT_EXIST: first_touch")
        assert action.event_type == "install.tracked"

    async def test_requeue_makes_dead_letters_pending_again(self, storage: Storage) -> None:
        dead_event = (await storage.inbox.store(event(1))).id
        await storage.inbox.claim("w", 1, 30)
        await storage.inbox.finish(dead_event, "w", "processed")
        await storage.outcomes.record(outcome(dead_event, "ok", key="k-ok"))
        await storage.outcomes.record(outcome(dead_event, "dead", key="k-dead", error="bad"))
        assert await storage.inbox.requeue_dead() == [dead_event]
        got = await storage.inbox.get(dead_event)
        assert got is not None and (got.status, got.attempts) == ("received", 0)
        statuses = {o.idempotency_key: (o.status, o.attempts)
                    for o in await storage.outcomes.of_event(dead_event)}
        assert statuses == {"k-ok": ("ok", 1), "k-dead": ("retrying", 0)}
        assert await storage.inbox.dead_letters() == []
        assert [e.id for e in await storage.inbox.claim("w", 5, 30)] == [dead_event]

    async def test_requeue_refuses_unknown_in_flight_and_purged_events(
        self, storage: Storage, clock: FakeClock
    ) -> None:
        assert await storage.inbox.requeue(999) is False
        leased = (await storage.inbox.store(event(1))).id
        await storage.inbox.claim("w", 1, 30)
        assert await storage.inbox.requeue(leased) is False
        await storage.inbox.finish(leased, "w", "processed")
        await storage.inbox.purge_raw_bodies(clock() + timedelta(days=1))
        assert await storage.inbox.requeue(leased) is False


    async def test_diagnostics_are_cleaned_the_same_way(self, storage: Storage) -> None:
        first = (await storage.inbox.store(event(1))).id
        second = (await storage.inbox.store(event(2))).id
        recorded = await storage.outcomes.record(NewOutcome(
            event_id=first, rule="r", action_kind="upsert_contact", target="hubspot",
            idempotency_key="k1", status="dead", error="bad\x00value \ud800",
            request_summary={"fields": ["a\x00"]},
            response={"summary": "x\x00\udfff", "n": float("inf"), "k\ud800": 1}))
        assert recorded.error == "bad\ufffdvalue \ufffd"
        assert recorded.request_summary == {"fields": ["a\ufffd"]}
        assert recorded.response == {"summary": "x\ufffd\ufffd", "n": "inf", "k\ufffd": 1}
        [stored] = await storage.outcomes.of_event(first)
        assert (stored.error, stored.response) == (recorded.error, recorded.response)
        assert [e.id for e in await storage.inbox.claim("w", 2, 30)] == [first, second]
        assert await storage.inbox.finish(first, "w", "dead", "why\x00 \ud800")
        assert await storage.inbox.retry_later(second, "w", datetime(2030, 1, 1, tzinfo=UTC),
                                         "later\x00")
        dead = await storage.inbox.get(first)
        waiting = await storage.inbox.get(second)
        assert dead is not None and dead.last_error == "why\ufffd \ufffd"
        assert waiting is not None and waiting.last_error == "later\ufffd"
        errors = {letter.error for letter in await storage.inbox.dead_letters()}
        assert errors == {"why\ufffd \ufffd", "bad\ufffdvalue \ufffd"}


    # -- maintenance -----------------------------------------------------------------------------

    async def test_purge_drops_bodies_but_keeps_dedupe(self, storage: Storage) -> None:
        old = datetime(2026, 1, 1, tzinfo=UTC)
        done = (await storage.inbox.store(event(1, received_at=old))).id
        pending = (await storage.inbox.store(event(2, received_at=old))).id
        recent = (await storage.inbox.store(event(3))).id
        assert [e.id for e in await storage.inbox.claim("w", 3, 30)] == [done, pending, recent]
        await storage.inbox.finish(done, "w", "processed")
        await storage.inbox.finish(recent, "w", "ignored")
        assert await storage.inbox.purge_raw_bodies(datetime(2026, 2, 1, tzinfo=UTC)) == 1
        purged = await storage.inbox.get(done)
        assert purged is not None and purged.body is None and purged.status == "processed"
        for kept_id in (pending, recent):
            kept = await storage.inbox.get(kept_id)
            assert kept is not None and kept.body is not None
        assert (await storage.inbox.store(event(1))).duplicate is True

    async def test_inbox_stats_count_by_status_and_oldest_pending(
        self, storage: Storage
    ) -> None:
        empty = await storage.inbox.stats()
        assert dict(empty.by_status) == {
            "received": 0, "processed": 0, "ignored": 0, "failed": 0, "dead": 0}
        assert empty.oldest_pending_received_at is None
        first = datetime(2026, 2, 1, tzinfo=UTC)
        a = (await storage.inbox.store(event(1, received_at=first))).id
        await storage.inbox.store(event(2))
        await storage.inbox.claim("w", 1, 30)
        await storage.inbox.finish(a, "w", "dead", "x")
        stats = await storage.inbox.stats()
        assert stats.by_status["received"] == 1 and stats.by_status["dead"] == 1
        assert stats.oldest_pending_received_at == datetime(2026, 3, 1, 11, 0, tzinfo=UTC)


    async def test_inbox_counts_follow_every_change(
        self, make_storage: Callable[[], Storage], storage: Storage, clock: FakeClock
    ) -> None:
        """The counts /metrics reads are kept with each write, whichever process makes it."""
        other = make_storage()
        try:
            ids = [r.id for r in await asyncio.gather(
                *(storage.inbox.store(event(n)) for n in range(12)),
                *(other.inbox.store(event(n)) for n in range(8, 16)))]  # 4 duplicates
            claimed = await other.inbox.claim("w", 6, 30)
            await other.inbox.finish(claimed[0].id, "w", "processed")
            await storage.inbox.finish(claimed[1].id, "w", "ignored")
            await storage.inbox.finish(claimed[2].id, "w", "dead", "x")
            await other.inbox.finish(claimed[3].id, "w", "dead", "x")
            later = clock() + timedelta(hours=1)
            await storage.inbox.retry_later(claimed[4].id, "w", later, "later")
            await other.inbox.extend_lease(claimed[5].id, "w", 60)  # no status change
            assert await storage.inbox.requeue(claimed[2].id)
            assert await storage.inbox.finish(claimed[5].id, "w", "processed")
            await storage.inbox.purge_raw_bodies(clock() + timedelta(days=1))
            expected = dict.fromkeys(("received", "processed", "ignored", "failed", "dead"), 0)
            for stored in await storage.inbox.list_events(limit=100):
                expected[stored.status] += 1
            assert sum(expected.values()) == len(set(ids)) == 16
            assert dict((await storage.inbox.stats()).by_status) == expected
            assert dict((await other.inbox.stats()).by_status) == expected
            assert expected == {"received": 11, "processed": 2, "ignored": 1, "failed": 1,
                                "dead": 1}
        finally:
            await other.close()
