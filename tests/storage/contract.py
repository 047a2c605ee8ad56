"""The storage contract: behaviour every backend must show, tested through the interface only.

A backend's test module subclasses `StorageContract` and provides three fixtures:

    make_storage     a factory: each call opens a new, not yet migrated Storage on the test's
                     database (two calls = two processes sharing one database), using `clock`
    storage          an open, migrated, empty Storage from make_storage
    failing_storage  an open, migrated Storage whose writes cannot commit (full or read-only)
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from engine.actions import IdentityKey
from engine.errors import StorageError, UnstorableEventError, UnstorableValueError
from engine.storage import PLANNING_WAIT, FinalStatus, NewEvent, NewOutcome, Storage

STAGES = ("subscriber", "lead", "opportunity", "customer")
TOKEN = IdentityKey("deep_link_token", "tok_1")
EMAIL = IdentityKey("email", "ada@example.com")


class FakeClock:
    """A clock the test moves by hand, so leases and retries are tested without sleeping."""

    def __init__(self) -> None:
        self.now = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def event(n: int = 0, *, body: bytes | None = None, received_at: datetime | None = None,
          event_type: str = "install.tracked") -> NewEvent:
    raw = body if body is not None else (
        b'{"event":"%s","timestamp":"2026-03-01T00:00:00Z","data":{"n":%d}}'
        % (event_type.encode(), n)
    )
    return NewEvent(
        body=raw,
        event_type=event_type,
        event_timestamp="2026-03-01T00:00:00Z",
        dedupe_key=hashlib.sha256(raw).hexdigest(),
        received_at=received_at or datetime(2026, 3, 1, 11, 0, tzinfo=UTC),
        headers={"user-agent": "Tolinku/1.0"},
    )


def outcome(event_id: int, status: str, *, target: str = "hubspot", key: str = "k1",
            error: str | None = None) -> NewOutcome:
    return NewOutcome(
        event_id=event_id, rule="install-creates-lead", action_kind="upsert_contact",
        target=target, idempotency_key=key, status=status,  # type: ignore[arg-type]
        request_summary={"identity": {"deep_link_token": "tok_1"}},
        response={"id": "101"} if status == "ok" else None, error=error,
    )


@pytest.mark.anyio
class StorageContract:
    @pytest.fixture
    def anyio_backend(self) -> str:
        return "asyncio"

    @pytest.fixture
    def clock(self) -> FakeClock:
        return FakeClock()

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

    async def test_an_earlier_event_being_planned_elsewhere_holds_back_a_later_one(
        self, storage: Storage, make_storage: Callable[[], Storage]
    ) -> None:
        key = "hubspot:person-1"
        other = make_storage()  # another worker process on the same database
        try:
            first = (await storage.inbox.store(event(1))).id
            second = (await storage.inbox.store(event(2))).id
            assert [e.id for e in await other.inbox.claim("other", 1, 30)] == [first]  # keys not yet
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

    # -- outcomes --------------------------------------------------------------------------------

    async def test_outcomes_count_attempts_and_success_is_final(self, storage: Storage) -> None:
        event_id = (await storage.inbox.store(event(1))).id
        first = await storage.outcomes.record(outcome(event_id, "retrying", error="timeout"))
        assert (first.status, first.attempts, first.error) == ("retrying", 1, "timeout")
        ok = await storage.outcomes.record(outcome(event_id, "ok"))
        assert (ok.status, ok.attempts, ok.response) == ("ok", 2, {"id": "101"})
        replayed = await storage.outcomes.record(outcome(event_id, "retrying", error="again"))
        assert (replayed.status, replayed.attempts, replayed.error) == ("ok", 2, None)
        got = await storage.outcomes.get("hubspot", "k1")
        assert got is not None and got.status == "ok"
        assert got.request_summary == {"identity": {"deep_link_token": "tok_1"}}
        assert await storage.outcomes.get("salesforce", "k1") is None

    async def test_idempotency_keys_are_unique_per_target(self, storage: Storage) -> None:
        event_id = (await storage.inbox.store(event(1))).id
        await storage.outcomes.record(outcome(event_id, "ok", target="hubspot"))
        await storage.outcomes.record(outcome(event_id, "dead", target="local", error="bad"))
        outcomes = await storage.outcomes.of_event(event_id)
        assert [(o.target, o.status) for o in outcomes] == [("hubspot", "ok"), ("local", "dead")]
        counts = await storage.outcomes.counts()
        assert counts[("hubspot", "ok")] == 1 and counts[("local", "dead")] == 1

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

    # -- identity map and deal keys --------------------------------------------------------------

    async def test_identity_map_first_binding_wins_and_priority_order(
        self, storage: Storage
    ) -> None:
        assert await storage.identities.lookup_identity("hubspot", [EMAIL, TOKEN]) is None
        assert await storage.identities.bind_identity("hubspot", TOKEN, "101") == "101"
        assert await storage.identities.bind_identity("hubspot", TOKEN, "202") == "101"
        assert await storage.identities.bind_identity("hubspot", EMAIL, "303") == "303"
        assert await storage.identities.lookup_identity("hubspot", [EMAIL, TOKEN]) == "303"
        assert await storage.identities.lookup_identity("hubspot", [TOKEN, EMAIL]) == "101"
        assert await storage.identities.lookup_identity("salesforce", [TOKEN]) is None
        await storage.identities.unbind_identity("hubspot", TOKEN)
        assert await storage.identities.lookup_identity("hubspot", [TOKEN]) is None

    async def test_concurrent_binds_agree_on_one_record(self, storage: Storage) -> None:
        winners = await asyncio.gather(
            *(storage.identities.bind_identity("pipedrive", TOKEN, str(n)) for n in range(10)))
        assert len(set(winners)) == 1
        assert await storage.identities.lookup_identity("pipedrive", [TOKEN]) == winners[0]

    async def test_deal_keys_first_binding_wins(self, storage: Storage) -> None:
        assert await storage.identities.lookup_deal("hubspot", "referral-tok_1") is None
        assert await storage.identities.bind_deal("hubspot", "referral-tok_1", "d1") == "d1"
        assert await storage.identities.bind_deal("hubspot", "referral-tok_1", "d2") == "d1"
        assert await storage.identities.lookup_deal("hubspot", "referral-tok_1") == "d1"
        assert await storage.identities.lookup_deal("pipedrive", "referral-tok_1") is None

    async def test_token_bucket_is_shared_and_refills(
        self, storage: Storage, clock: FakeClock
    ) -> None:
        assert await storage.rate_limits.take_tokens("hubspot", 1, 2, 1.0) == 0
        assert await storage.rate_limits.take_tokens("hubspot", 1, 2, 1.0) == 0
        assert await storage.rate_limits.take_tokens("hubspot", 1, 2, 1.0) == pytest.approx(1.0)
        assert await storage.rate_limits.take_tokens("salesforce", 1, 2, 1.0) == 0
        clock.advance(1)
        assert await storage.rate_limits.take_tokens("hubspot", 1, 2, 1.0) == 0

    # -- the embedded CRM ------------------------------------------------------------------------

    async def test_upsert_set_once_keeps_the_first_value(self, storage: Storage) -> None:
        created = await storage.local_crm.upsert_contact(
            [TOKEN], {"deep_link_prefix": "invite"},
            {"first_touch_campaign": "spring", "first_touch_platform": ""})
        assert created.created is True
        again = await storage.local_crm.upsert_contact(
            [TOKEN], {"deep_link_prefix": "promo", "company": None},
            {"first_touch_campaign": "summer", "first_touch_platform": "iOS"})
        assert (again.contact_id, again.created) == (created.contact_id, False)
        [contact] = await storage.local_crm.contacts()
        assert dict(contact.fields) == {
            "deep_link_prefix": "promo", "first_touch_campaign": "spring",
            "first_touch_platform": "iOS"}

    async def test_upsert_matches_by_priority_and_attaches_new_keys(
        self, storage: Storage
    ) -> None:
        stub = await storage.local_crm.upsert_contact([TOKEN], {}, {})
        enriched = await storage.local_crm.upsert_contact(
            [EMAIL, TOKEN], {"first_name": "Ada"}, {})
        assert enriched.contact_id == stub.contact_id
        by_email = await storage.local_crm.upsert_contact([EMAIL], {"last_name": "L"}, {})
        assert by_email.contact_id == stub.contact_id
        [contact] = await storage.local_crm.contacts()
        assert set(contact.identities) == {TOKEN, EMAIL}
        assert dict(contact.fields) == {"first_name": "Ada", "last_name": "L"}

    async def test_concurrent_upserts_of_one_identity_make_one_contact(
        self, storage: Storage
    ) -> None:
        results = await asyncio.gather(
            *(storage.local_crm.upsert_contact([TOKEN], {"n": n}, {}) for n in range(10)))
        assert sum(r.created for r in results) == 1
        assert len(await storage.local_crm.contacts()) == 1

    async def test_stages_only_move_forward_with_history(self, storage: Storage) -> None:
        lead = await storage.local_crm.set_stage([TOKEN], "lead", STAGES, event_id=None)
        assert (lead.from_stage, lead.to_stage, lead.changed) == (None, "lead", True)
        back = await storage.local_crm.set_stage([TOKEN], "subscriber", STAGES)
        assert (back.to_stage, back.changed) == ("lead", False)
        same = await storage.local_crm.set_stage([TOKEN], "lead", STAGES)
        assert same.changed is False
        event_id = (await storage.inbox.store(event(1))).id
        done = await storage.local_crm.set_stage([TOKEN], "customer", STAGES, event_id=event_id)
        assert (done.from_stage, done.to_stage, done.changed) == ("lead", "customer", True)
        [contact] = await storage.local_crm.contacts()
        assert contact.stage == "customer"
        assert [(h.from_stage, h.to_stage, h.event_id) for h in contact.stage_history] == [
            (None, "lead", None), ("lead", "customer", event_id)]
        with pytest.raises(ValueError, match="unknown stage"):
            await storage.local_crm.set_stage([TOKEN], "won", STAGES)

    async def test_one_deal_per_key_ever(self, storage: Storage) -> None:
        first = await storage.local_crm.create_deal(
            [TOKEN], "referral-tok_1", "Referral: tok_1", "new", 49.0, {"source": "referral"})
        assert first.created is True and first.contact_id is not None
        again = await storage.local_crm.create_deal(
            [TOKEN], "referral-tok_1", "Another title", "won", 99.0, {})
        assert (again.deal_id, again.created) == (first.deal_id, False)
        racing = await asyncio.gather(*(storage.local_crm.create_deal(
            [TOKEN], "referral-tok_2", "t", None, None, {}) for _ in range(8)))
        assert sum(r.created for r in racing) == 1
        deals = await storage.local_crm.deals()
        assert [(d.key, d.title, d.stage, d.amount) for d in deals] == [
            ("referral-tok_1", "Referral: tok_1", "new", 49.0),
            ("referral-tok_2", "t", None, None)]
        assert deals[0].contact_id == first.contact_id
        assert dict(deals[0].fields) == {"source": "referral"}

    async def test_contact_actions_need_an_identity(self, storage: Storage) -> None:
        with pytest.raises(ValueError):
            await storage.local_crm.upsert_contact([], {"a": 1}, {})

    # -- values: kept exactly or refused, the same on every backend ------------------------------

    async def test_data_is_kept_exactly_or_refused_the_same_way(self, storage: Storage) -> None:
        deep: object = "bottom"
        for _ in range(63):  # 64 levels with the fields object itself: the most allowed
            deep = [deep]
        kept = {"nul": "a\x00b", "big": 10 ** 400, "mb": "z" * 1024 * 1024, "emoji": "\U0001f600",
                "deep": deep, "tiny": 5e-324, "huge": 1.7e308}
        await storage.local_crm.upsert_contact([TOKEN], kept, {})
        nested: object = 1
        for _ in range(100):
            nested = {"x": nested}
        refusals = [
            storage.local_crm.upsert_contact([IdentityKey("email", "ada\x00@example.com")], {}, {}),
            storage.local_crm.upsert_contact([IdentityKey("deep_link_token", "x\ud800")], {}, {}),
            storage.local_crm.upsert_contact([IdentityKey("deep_link_token", "t" * 513)], {}, {}),
            storage.local_crm.upsert_contact([EMAIL], {"n": float("inf")}, {}),
            storage.local_crm.upsert_contact([EMAIL], {}, {"n": float("nan")}),
            storage.local_crm.upsert_contact([EMAIL], {"s": ["ok", "\udfff"]}, {}),
            storage.local_crm.upsert_contact([EMAIL], {"s": {"\ud800": 1}}, {}),
            storage.local_crm.upsert_contact([EMAIL], {"s": nested}, {}),
            storage.local_crm.set_stage([EMAIL], "lead\x00", STAGES),
            storage.local_crm.create_deal([EMAIL], "d\x00", "t", None, None, {}),
            storage.local_crm.create_deal([EMAIL], "d1", "title\x00", None, None, {}),
            storage.local_crm.create_deal([EMAIL], "d1", "t", None, float("inf"), {}),
            storage.local_crm.create_deal([EMAIL], "d1", "t", None, 10 ** 400, {}),
            storage.local_crm.create_deal([EMAIL], "d1", "t", None, None, {"f": float("-inf")}),
            storage.identities.bind_identity("hubspot", IdentityKey("email", "a\x00b"), "101"),
            storage.identities.bind_identity("hubspot", EMAIL, "10\x001"),
            storage.identities.lookup_identity("hubspot", [IdentityKey("deep_link_token", "\ud800")]),
            storage.identities.bind_deal("hubspot", "k" * 600, "201"),
            storage.identities.lookup_deal("hubspot", "k\x00"),
        ]
        for refused in refusals:
            with pytest.raises(UnstorableValueError, match="no store can keep it as it is"):
                await refused
        [contact] = await storage.local_crm.contacts()
        assert contact.identities == (TOKEN,) and dict(contact.fields) == kept
        assert await storage.local_crm.deals() == []
        assert await storage.identities.lookup_identity("hubspot", [EMAIL]) is None
        with pytest.raises(UnstorableValueError) as raised:
            await storage.identities.bind_identity("hubspot", IdentityKey("email", "ada\x00"), "101")
        assert str(raised.value) == (
            "identity email holds a NUL character (\\x00) at character 4, which a key cannot "
            "hold: no store can keep it as it is; fix the value at its source, or map another "
            "field")

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

    async def test_migrate_is_idempotent_and_safe_concurrently(
        self, make_storage: Callable[[], Storage]
    ) -> None:
        first, second = make_storage(), make_storage()
        try:
            assert await first.schema_version() == 0
            versions = await asyncio.gather(first.migrate(), second.migrate())
            assert versions[0] == versions[1] >= 1
            stored = await first.inbox.store(event(1))
            assert await second.migrate() == versions[0]
            assert await first.schema_version() == versions[0]
            assert (await second.inbox.store(event(1))).id == stored.id
        finally:
            await first.close()
            await second.close()

    async def test_ping_answers_when_migrated(self, storage: Storage) -> None:
        await storage.ping()
        durability = await storage.durability()
        assert all(isinstance(value, int) for value in durability.values())

    async def test_unmigrated_database_says_to_migrate(
        self, make_storage: Callable[[], Storage]
    ) -> None:
        fresh = make_storage()
        try:
            with pytest.raises(StorageError, match="migrate"):
                await fresh.ping()
            with pytest.raises(StorageError, match="migrate"):
                await fresh.inbox.store(event(1))
        finally:
            await fresh.close()

    async def test_a_write_that_cannot_commit_raises_storage_error(
        self, failing_storage: Storage
    ) -> None:
        big = event(1, body=b"x" * 300_000)
        with pytest.raises(StorageError):
            await failing_storage.inbox.store(big)
        results = await asyncio.gather(
            *(failing_storage.inbox.store(event(n, body=bytes([n]) * 300_000))
              for n in range(1, 6)),
            return_exceptions=True,
        )
        assert all(isinstance(r, StorageError) for r in results)
        assert await failing_storage.inbox.list_events() == []

    async def test_writes_that_fail_make_check_writable_fail(
        self, failing_storage: Storage, storage: Storage
    ) -> None:
        """/readyz asks check_writable: free (nothing written) while commits go through; once
        one fails, only a test write that commits says writable again."""
        await storage.inbox.store(event(1))
        await storage.check_writable()
        await failing_storage.check_writable()  # nothing has failed yet: nothing is probed
        with pytest.raises(StorageError):
            await failing_storage.inbox.store(event(2, body=b"x" * 300_000))
        with pytest.raises(StorageError):
            await failing_storage.check_writable()
        with pytest.raises(StorageError):  # and again: a failed probe clears nothing
            await failing_storage.check_writable()
        assert [e.id for e in await storage.inbox.list_events()] == [1]

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
            await storage.inbox.retry_later(claimed[4].id, "w", clock() + timedelta(hours=1), "later")
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

    async def test_a_closed_storage_refuses_work(self, storage: Storage) -> None:
        await storage.close()
        with pytest.raises(StorageError):
            await storage.inbox.store(event(1))
        await storage.close()  # idempotent
