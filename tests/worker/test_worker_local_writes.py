"""The embedded CRM takes an event's actions in one write (on SQLite, a claim's events' actions
in one write: `ClaimWriter.process` in engine/worker/claimwrite.py) and their outcomes with the
event's finish in another (`Applier.together`), on both backends, with the same results as one
action at a time."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import pytest

from engine.errors import StorageError
from engine.rules.model import RuleSet
from engine.storage import FinalStatus, Finish, NewOutcome, Storage, open_storage, records
from engine.targets.local.target import LocalTarget
from engine.worker.loop import Worker, WorkerOptions
from engine.worker.retrying import RetryPolicy
from tests.support.worker_helpers import store, write_rules

pytestmark = pytest.mark.anyio
BACKENDS = ("sqlite", "postgresql")  # every test that uses a database runs on both


class Sleeps:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


@pytest.fixture
def rules(tmp_path: Path) -> RuleSet:
    return write_rules(tmp_path / "rules")


def worker(storage: Storage, rules: RuleSet, sleeps: Sleeps | None = None) -> Worker:
    policy = RetryPolicy(base=0.01, cap=0.05, max_attempts=3, rng=random.Random(3))
    return Worker(storage, rules, [LocalTarget(storage.local_crm, rules.field_map)],
                  options=WorkerOptions(policy=policy), sleep=sleeps or Sleeps())


async def test_actions_are_one_write_and_their_outcomes_go_with_the_finish(
    storage: Storage, rules: RuleSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    applied: list[list[str]] = []
    finished: list[tuple[int, FinalStatus, list[str]]] = []
    apply_all, finish = storage.local_crm.apply_all, storage.inbox.finish

    async def spy_apply(ops: Sequence[records.LocalOp]) -> list[records.LocalResult | Exception]:
        applied.append([type(op).__name__ for op in ops])
        return await apply_all(ops)

    async def spy_finish(event_id: int, worker_id: str, status: FinalStatus,
                         error: str | None = None, *,
                         ordering_keys: Sequence[str] | None = None,
                         outcomes: Sequence[NewOutcome] = ()) -> bool:
        finished.append((event_id, status, [outcome.action_kind for outcome in outcomes]))
        return await finish(event_id, worker_id, status, error, ordering_keys=ordering_keys,
                            outcomes=outcomes)

    finish_many = storage.inbox.finish_many
    together: list[list[int]] = []

    async def spy_finish_many(worker_id: str, finishes: Sequence[Finish]) -> list[bool]:
        together.append([f.event_id for f in finishes])
        finished.extend((f.event_id, f.status, [o.action_kind for o in f.outcomes])
                        for f in finishes)
        return await finish_many(worker_id, finishes)

    async def no_separate_record(outcomes: Sequence[NewOutcome]) -> None:
        raise AssertionError("outcomes recorded apart from the finish")

    monkeypatch.setattr(storage.local_crm, "apply_all", spy_apply)
    monkeypatch.setattr(storage.inbox, "finish", spy_finish)
    monkeypatch.setattr(storage.inbox, "finish_many", spy_finish_many)
    monkeypatch.setattr(storage.outcomes, "record_many", no_separate_record)
    ids = [await store(storage, "install.tracked", token=f"tok_{n}", prefix="p")
           for n in range(3)]
    running = worker(storage, rules)
    await running.run_until_idle()
    assert running.leases.held == 0  # every event let go, none kept counting as in flight
    if storage.local_crm.one_write:  # SQLite: the claim's three events in one write each
        assert applied == [["UpsertContactOp", "SetStageOp"] * 3]
        assert together == [ids]
    else:
        assert applied == [["UpsertContactOp", "SetStageOp"]] * 3
    assert sorted(finished) == [(event_id, "processed", ["upsert_contact", "set_stage"])
                                for event_id in ids]
    for event_id in ids:
        event = await storage.inbox.get(event_id)
        assert event is not None and event.status == "processed"
        assert [(o.status, o.attempts) for o in await storage.outcomes.of_event(event_id)] == [
            ("ok", 1), ("ok", 1)]
    contacts = await storage.local_crm.contacts()
    assert sorted((c.identities[0].value, c.stage) for c in contacts) == [
        ("tok_0", "lead"), ("tok_1", "lead"), ("tok_2", "lead")]


async def test_a_failed_write_counts_as_the_first_actions_attempt_then_goes_one_by_one(
    storage: Storage, rules: RuleSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    apply_all = storage.local_crm.apply_all
    calls: list[int] = []

    # On SQLite the claim's write comes first; failing, it costs the event no attempt.
    claim_write = storage.local_crm.one_write
    failing = 2 if claim_write else 1

    async def fails(ops: Sequence[records.LocalOp]) -> list[records.LocalResult | Exception]:
        calls.append(len(ops))
        if len(calls) <= failing:
            raise StorageError("record the contact: disk I/O error")
        return await apply_all(ops)

    monkeypatch.setattr(storage.local_crm, "apply_all", fails)
    event_id = await store(storage, "install.tracked", token="tok_1", prefix="p")
    sleeps = Sleeps()
    await worker(storage, rules, sleeps).run_until_idle()
    # The event's whole write, then each action on its own after the backoff.
    assert calls == [2] * failing + [1, 1] and len(sleeps.delays) == 1
    event = await storage.inbox.get(event_id)
    assert event is not None and event.status == "processed"
    outcomes = await storage.outcomes.of_event(event_id)
    assert [(o.action_kind, o.status, o.attempts) for o in outcomes] == [
        ("upsert_contact", "ok", 2), ("set_stage", "ok", 1)]
    [contact] = await storage.local_crm.contacts()
    assert (contact.stage, dict(contact.fields)) == ("lead", {"deep_link_prefix": "p"})


async def test_an_action_its_data_fails_is_dead_and_the_next_ones_still_apply(
    storage: Storage, rules: RuleSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    apply_all = storage.local_crm.apply_all

    async def refuses_the_first(ops: Sequence[records.LocalOp]
                                ) -> list[records.LocalResult | Exception]:
        # As a store answers for an op its own data fails: that op's error in its place.
        return [ValueError("'x\\ud800' cannot be stored"), *await apply_all(ops[1:])]

    monkeypatch.setattr(storage.local_crm, "apply_all", refuses_the_first)
    event_id = await store(storage, "install.tracked", token="tok_1", prefix="p")
    await worker(storage, rules).run_until_idle()
    event = await storage.inbox.get(event_id)
    assert event is not None and event.status == "dead"
    assert "local: upsert_contact failed: 'x\\ud800' cannot be stored" in (event.last_error or "")
    outcomes = await storage.outcomes.of_event(event_id)
    assert [(o.action_kind, o.status, o.attempts) for o in outcomes] == [
        ("upsert_contact", "dead", 1), ("set_stage", "ok", 1)]
    [contact] = await storage.local_crm.contacts()
    assert (contact.stage, dict(contact.fields)) == ("lead", {})


async def test_a_claims_failed_write_leaves_each_event_to_write_its_own(
    tmp_path: Path, rules: RuleSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_storage(f"sqlite:///{tmp_path / 'claim.db'}") as storage:
        await storage.migrate()
        apply_all = storage.local_crm.apply_all
        calls: list[int] = []

        async def fails_once(ops: Sequence[records.LocalOp]
                             ) -> list[records.LocalResult | Exception]:
            calls.append(len(ops))
            if len(calls) == 1:
                raise StorageError("record the contact: disk I/O error")
            return await apply_all(ops)

        monkeypatch.setattr(storage.local_crm, "apply_all", fails_once)
        ids = [await store(storage, "install.tracked", token=f"tok_{n}", prefix="p")
               for n in range(3)]
        sleeps = Sleeps()
        await worker(storage, rules, sleeps).run_until_idle()
        assert calls == [6, 2, 2, 2] and sleeps.delays == []  # at once, no attempt spent
        for event_id in ids:
            event = await storage.inbox.get(event_id)
            assert event is not None and event.status == "processed"
            assert [(o.status, o.attempts) for o in await storage.outcomes.of_event(event_id)
                    ] == [("ok", 1), ("ok", 1)]



async def test_a_later_event_of_a_person_in_the_same_claim_waits_for_the_earlier_one(
    storage: Storage, rules: RuleSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    # tok_a's second event is claimed with its first: it is not written with the claim, it
    # waits for the first to finish and then goes on its own, so the last value is its.
    apply_all = storage.local_crm.apply_all
    applied: list[list[str]] = []

    async def spy(ops: Sequence[records.LocalOp]) -> list[records.LocalResult | Exception]:
        applied.append([op.identity[0].value for op in ops])
        return await apply_all(ops)

    monkeypatch.setattr(storage.local_crm, "apply_all", spy)
    ids = [await store(storage, "install.tracked", token=token, prefix=prefix)
           for token, prefix in (("tok_a", "first"), ("tok_b", "b"), ("tok_a", "second"))]
    await worker(storage, rules).run_until_idle()
    if storage.local_crm.one_write:
        assert applied == [["tok_a", "tok_a", "tok_b", "tok_b"], ["tok_a", "tok_a"]]
    for event_id in ids:
        event = await storage.inbox.get(event_id)
        assert event is not None and event.status == "processed"
    fields = {c.identities[0].value: c.fields for c in await storage.local_crm.contacts()}
    assert fields == {"tok_a": {"deep_link_prefix": "second"}, "tok_b": {"deep_link_prefix": "b"}}
