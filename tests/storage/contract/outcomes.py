"""The outcomes part of the storage contract."""

from __future__ import annotations

from engine.storage import Storage
from tests.storage.contract.support import event, outcome


class OutcomesContract:
    """Action outcomes: one per (target, idempotency key), success final."""

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

    async def test_the_outcomes_of_many_events_in_one_read(self, storage: Storage) -> None:
        first, second, none = [(await storage.inbox.store(event(n))).id for n in (1, 2, 3)]
        await storage.outcomes.record(outcome(first, "ok", target="hubspot"))
        await storage.outcomes.record(outcome(second, "retrying", target="local", key="k2"))
        await storage.outcomes.record(outcome(first, "dead", target="local", error="bad"))
        found = await storage.outcomes.of_events([second, first, none, first])
        assert {event_id: [(o.target, o.status) for o in outcomes]
                for event_id, outcomes in found.items()} == {
            first: [("hubspot", "ok"), ("local", "dead")], second: [("local", "retrying")],
            none: []}
        assert found[first] == await storage.outcomes.of_event(first)
        assert await storage.outcomes.of_events([]) == {}

    async def test_record_many_upserts_each_in_order(self, storage: Storage) -> None:
        event_id = (await storage.inbox.store(event(1))).id
        await storage.outcomes.record(outcome(event_id, "ok", key="done"))
        await storage.outcomes.record_many([
            outcome(event_id, "retrying", key="k1", error="timeout \x00 \ud800"),
            outcome(event_id, "retrying", key="done", error="a late retry"),
            outcome(event_id, "dead", key="k2", error="refused"),
        ])
        await storage.outcomes.record_many([outcome(event_id, "ok", key="k1")])
        await storage.outcomes.record_many([])
        recorded = await storage.outcomes.of_event(event_id)
        assert [(o.idempotency_key, o.status, o.attempts, o.error) for o in recorded] == [
            ("done", "ok", 1, None),  # success is final: the late retry changed nothing
            ("k1", "ok", 2, None),
            ("k2", "dead", 1, "refused")]
        await storage.outcomes.record_many([outcome(event_id, "retrying", key="k3",
                                                    error="timeout \x00 \ud800")])
        k3 = await storage.outcomes.get("hubspot", "k3")
        assert k3 is not None and k3.error == "timeout \ufffd \ufffd"  # cleaned, not refused

    async def test_an_events_last_outcomes_go_with_its_finish(self, storage: Storage) -> None:
        kept, lost = [(await storage.inbox.store(event(n))).id for n in (1, 2)]
        await storage.inbox.claim("w", 2, 30)
        await storage.outcomes.record(outcome(kept, "ok", key="done"))
        assert await storage.inbox.finish(kept, "w", "processed", outcomes=[
            outcome(kept, "ok", key="k1"),
            outcome(kept, "retrying", key="done", error="a late retry"),
            outcome(kept, "dead", key="k2", error="refused \x00 \ud800")])
        got = await storage.inbox.get(kept)
        assert got is not None and (got.status, got.lease_owner) == ("processed", None)
        assert [(o.idempotency_key, o.status, o.attempts, o.error)
                for o in await storage.outcomes.of_event(kept)] == [
            ("done", "ok", 1, None),  # success is final
            ("k1", "ok", 1, None),
            ("k2", "dead", 1, "refused \ufffd \ufffd")]  # cleaned, not refused
        # Another worker holds the event now: it is not finished, but what the CRM answered
        # is recorded all the same.
        assert not await storage.inbox.finish(lost, "another", "processed",
                                              outcomes=[outcome(lost, "ok", key="k3")])
        got = await storage.inbox.get(lost)
        assert got is not None and got.status == "received"
        assert [o.idempotency_key for o in await storage.outcomes.of_event(lost)] == ["k3"]

