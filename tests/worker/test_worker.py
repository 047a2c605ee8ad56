"""The worker: plans, retries, dead letters, replays and idempotency keys (SQLite, fake targets)."""

from __future__ import annotations

import hashlib
import json
import random
from datetime import timedelta
from pathlib import Path

import pytest

from engine.actions import TOUCHED, Action, IdentityKey, UpsertContact, identity_digest
from engine.errors import PermanentCRMError, RetryableCRMError
from engine.rules.model import RuleSet
from engine.runtime.metrics import Metrics
from engine.storage import EventFilter, Storage, open_storage
from engine.targets.local.target import LocalTarget
from engine.worker.loop import Worker, WorkerOptions
from engine.worker.plan import idempotency_key, prepare
from engine.worker.retrying import RetryPolicy
from tests.storage.contract import FakeClock
from tests.support.worker_helpers import BASE_RULES, FakeTarget, shipped_rules, store, write_rules

pytestmark = pytest.mark.anyio

QUICK = RetryPolicy(base=0.05, cap=1.0, max_attempts=5, rng=random.Random(7))



@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def rules(tmp_path: Path) -> RuleSet:
    return write_rules(tmp_path / "rules")


class Sleeps:
    """An injected sleep that records the backoff instead of waiting it out."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


async def test_the_shipped_story_lands_in_the_local_crm(storage: Storage) -> None:
    ruleset = shipped_rules()
    metrics = Metrics()
    await store(storage, "install.tracked", token="tok_1", campaign="spring", platform="iOS")
    await store(storage, "referral.completed", token="tok_1", referrer_token="tok_0")
    await Worker(storage, ruleset, [LocalTarget(storage.local_crm, ruleset.field_map)],
                 metrics=metrics).run_until_idle()
    [contact] = await storage.local_crm.contacts()
    assert contact.stage == "customer"
    assert [(c.from_stage, c.to_stage) for c in contact.stage_history] == [
        (None, "lead"), ("lead", "customer")]
    assert [c.event_id for c in contact.stage_history] == [1, 2]
    assert [d.key for d in await storage.local_crm.deals()] == ["referral-tok_1"]
    assert metrics.processed.value(status="processed") == 2
    assert metrics.actions.value(target="local", outcome="ok") == 5


async def test_an_event_no_rule_matches_is_ignored(storage: Storage, rules: RuleSet) -> None:
    target = FakeTarget()
    event_id = await store(storage, "link.clicked", token="tok_1")
    await Worker(storage, rules, [target]).run_until_idle()
    event = await storage.inbox.get(event_id)
    assert event is not None and event.status == "ignored"
    assert target.calls == [] and await storage.outcomes.of_event(event_id) == []


async def test_retryable_errors_back_off_with_jitter_and_honour_retry_after(
    storage: Storage, rules: RuleSet
) -> None:
    sleeps = Sleeps()
    metrics = Metrics()
    target = FakeTarget(errors=[RetryableCRMError("fake: timed out"),
                                RetryableCRMError("fake: 429", retry_after=0.5)])
    event_id = await store(storage, "install.tracked", token="tok_1")
    await Worker(storage, rules, [target], metrics=metrics, sleep=sleeps,
                 options=WorkerOptions(policy=QUICK)).run_until_idle()
    assert len(sleeps.delays) == 2
    assert 0 <= sleeps.delays[0] <= 0.05  # attempt 1: full jitter under the base
    assert 0.5 <= sleeps.delays[1] <= 0.55  # Retry-After plus a little jitter
    upsert, stage = await storage.outcomes.of_event(event_id)
    assert (upsert.status, upsert.attempts, stage.status, stage.attempts) == ("ok", 3, "ok", 1)
    assert metrics.actions.value(target="fake", outcome="retried") == 2
    assert metrics.actions.value(target="fake", outcome="ok") == 2


async def test_a_long_wait_is_rescheduled_durably_and_survives_a_restart(
    tmp_path: Path, rules: RuleSet, clock: FakeClock
) -> None:
    url = f"sqlite:///{tmp_path / 'restart.db'}"
    storage = open_storage(url, clock=clock)
    await storage.migrate()
    target = FakeTarget(errors=[RetryableCRMError("fake: 503", retry_after=120)])
    event_id = await store(storage, "install.tracked", token="tok_1")
    await Worker(storage, rules, [target], clock=clock).run_until_idle()
    event = await storage.inbox.get(event_id)
    assert event is not None and event.status == "failed" and event.lease_owner is None
    assert event.next_attempt_at is not None
    assert timedelta(seconds=120) <= event.next_attempt_at - clock() <= timedelta(seconds=122)
    [outcome] = await storage.outcomes.of_event(event_id)
    assert (outcome.status, outcome.error) == ("retrying", "fake: 503")
    await storage.close()

    restarted = open_storage(url, clock=clock)  # a new process: only the database remains
    await Worker(restarted, rules, [target], clock=clock).run_until_idle()
    assert len(target.calls) == 1  # not due yet
    clock.advance(123)
    await Worker(restarted, rules, [target], clock=clock).run_until_idle()
    event = await restarted.inbox.get(event_id)
    assert event is not None and event.status == "processed"
    assert [(o.status, o.attempts) for o in await restarted.outcomes.of_event(event_id)] == [
        ("ok", 2), ("ok", 1)]
    await restarted.close()


async def test_giving_up_after_the_last_attempt_dead_letters_the_action(
    storage: Storage, rules: RuleSet
) -> None:
    target = FakeTarget(always=RetryableCRMError("fake: 502 bad gateway"))
    policy = RetryPolicy(base=0.01, max_attempts=3, rng=random.Random(1))
    event_id = await store(storage, "install.tracked", token="tok_1")
    await Worker(storage, rules, [target], sleep=Sleeps(),
                 options=WorkerOptions(policy=policy)).run_until_idle()
    outcomes = await storage.outcomes.of_event(event_id)
    assert [(o.status, o.attempts) for o in outcomes] == [("dead", 3), ("dead", 3)]
    assert outcomes[0].error == "gave up after 3 attempts: fake: 502 bad gateway"


async def test_a_permanent_error_is_dead_lettered_with_rule_action_target_and_message(
    storage: Storage, rules: RuleSet
) -> None:
    message = 'hubspot: POST /crm/v3/objects/contacts -> 400: Property "prefix" does not exist'
    target = FakeTarget("hubspot", errors=[PermanentCRMError(message)])
    metrics = Metrics()
    event_id = await store(storage, "install.tracked", token="tok_1", prefix="p")
    await Worker(storage, rules, [target], metrics=metrics).run_until_idle()
    event = await storage.inbox.get(event_id)
    assert event is not None and event.status == "dead"
    assert event.last_error is not None and message in event.last_error
    assert "rule 'install-creates-lead', upsert_contact #0" in event.last_error
    letters = {(d.action_kind, d.target): d for d in await storage.inbox.dead_letters()}
    letter = letters[("upsert_contact", "hubspot")]
    assert (letter.event_id, letter.event_type, letter.rule, letter.error) == (
        event_id, "install.tracked", "install-creates-lead", message)
    assert target.kinds(event_id) == ["upsert_contact", "set_stage"]  # the next action still ran
    assert metrics.actions.value(target="hubspot", outcome="dead") == 1
    assert metrics.processed.value(status="dead") == 1


async def test_replay_after_a_fix_delivers_and_never_redoes_a_success(
    storage: Storage, rules: RuleSet
) -> None:
    target = FakeTarget("hubspot", errors=[PermanentCRMError("hubspot: missing property")])
    event_id = await store(storage, "install.tracked", token="tok_1", prefix="p")
    await Worker(storage, rules, [target]).run_until_idle()
    assert await storage.inbox.requeue_dead() == [event_id]  # the property was created meanwhile
    await Worker(storage, rules, [target]).run_until_idle()
    event = await storage.inbox.get(event_id)
    assert event is not None and (event.status, event.last_error) == ("processed", None)
    assert target.kinds(event_id) == ["upsert_contact", "set_stage", "upsert_contact"]
    assert [o.status for o in await storage.outcomes.of_event(event_id)] == ["ok", "ok"]
    assert await storage.inbox.dead_letters() == []


async def test_already_ok_outcomes_are_skipped_when_a_processed_event_is_replayed(
    storage: Storage, rules: RuleSet
) -> None:
    target = FakeTarget()
    event_id = await store(storage, "install.tracked", token="tok_1")
    await Worker(storage, rules, [target]).run_until_idle()
    assert await storage.inbox.requeue(event_id)
    await Worker(storage, rules, [target]).run_until_idle()
    event = await storage.inbox.get(event_id)
    assert event is not None and event.status == "processed"
    assert len(target.calls) == 2


async def test_evaluation_failures_dead_letter_the_event_with_the_message(
    storage: Storage, rules: RuleSet
) -> None:
    target = FakeTarget()
    event_id = await store(storage, "deferred_link.claimed", token="tok_1", prefix="p")
    await Worker(storage, rules, [target]).run_until_idle()
    event = await storage.inbox.get(event_id)
    assert event is not None and event.status == "dead"
    assert event.last_error is not None
    assert "rule 'claim-needs-an-email'" in event.last_error
    assert "identity is entirely null" in event.last_error
    assert target.kinds(event_id) == ["set_stage"]  # the action that did plan still ran


async def test_idempotency_keys_are_stable_when_a_rule_file_is_edited(
    storage: Storage, tmp_path: Path
) -> None:
    before = write_rules(tmp_path / "v1")
    edited = BASE_RULES.replace(
        "set: {deep_link_prefix: data.prefix}",
        "set: {deep_link_prefix: upper(data.prefix)}\n"
        "          set_once: {first_touch_campaign: \"'edited'\"}",
        1,
    ).replace(
        "    actions:\n      - upsert_contact:\n          identity: {deep_link_token: data.token}",
        "    actions:\n      - create_deal:\n          identity: {deep_link_token: data.token}\n"
        "          key: join('-', ['install', data.token])\n          title: \"'Install'\"\n"
        "          stage: new\n"
        "      - upsert_contact:\n          identity: {deep_link_token: data.token}",
        1,
    )
    after = write_rules(tmp_path / "v2", edited)
    event_id = await store(storage, "install.tracked", token="tok_1", prefix="p")
    event = await storage.inbox.get(event_id)
    assert event is not None
    old = {(k.action.kind, k.ordinal): k.key for k in prepare(event, before).actions}
    new = {(k.action.kind, k.ordinal): k.key for k in prepare(event, after).actions}
    assert set(new) - set(old) == {("create_deal", 0)}
    assert all(new[slot] == key for slot, key in old.items())

    target = FakeTarget()
    await Worker(storage, before, [target]).run_until_idle()
    assert await storage.inbox.requeue(event_id)
    await Worker(storage, after, [target]).run_until_idle()
    assert target.kinds(event_id) == ["upsert_contact", "set_stage", "create_deal"]


@pytest.mark.parametrize(("dedupe_key", "action", "ordinal", "pinned"), [
    ("sha-of-body", UpsertContact(rule="installs", identity=(
        IdentityKey("deep_link_token", "tok_1"),)), 0,
     "8d2cd1dfb8aba5feb95bb50d596fef53ee6346a3a75e396c35a77beb9853560f"),
    ('k"\\\x00', UpsertContact(rule="r\u2028é", identity=(
        IdentityKey("deep_link_token", "t\ud800\x00"), IdentityKey("email", "ä@b.c"))), 12,
     "17f73cc34f90e9351961b5cb27d2a4c2147c21a0a1fd631577ea56b0b71c6ab8"),
])
def test_idempotency_keys_never_change_across_releases(
        dedupe_key: str, action: Action, ordinal: int, pinned: str) -> None:
    """An upgraded worker must find the outcomes an older one recorded: the key is the
    sha256 of the compact JSON text of its parts (quotes, backslashes, NUL, a lone surrogate,
    non-ASCII text as they are), pinned here."""
    material = json.dumps([dedupe_key, action.rule, action.kind, ordinal,
                           [[key.field, key.value] for key in action.identity]],
                          ensure_ascii=False, separators=(",", ":"))
    expected = hashlib.sha256(material.encode("utf-8", "surrogatepass")).hexdigest()
    assert idempotency_key(dedupe_key, action, ordinal) == expected == pinned


async def test_the_identities_an_event_touched_stay_findable_after_it_is_done(
        storage: Storage) -> None:
    """The delivery log's search: the worker keeps one digest per identity an event touched
    (target "*"), after every target has finished with it; the targets' own ordering keys,
    which later events wait on, are gone."""
    ruleset = shipped_rules()
    first = await store(storage, "install.tracked", token="tok_find", campaign="spring")
    await store(storage, "install.tracked", token="tok_other", campaign="spring")
    await Worker(storage, ruleset, [LocalTarget(storage.local_crm, ruleset.field_map)]
                 ).run_until_idle()
    digest = identity_digest(TOUCHED, IdentityKey("deep_link_token", "tok_find"))
    found = await storage.inbox.browse(EventFilter(touched=(digest,)))
    assert [(e.id, e.status) for e in found] == [(first, "processed")]
    local = identity_digest("local", IdentityKey("deep_link_token", "tok_find"))
    assert await storage.inbox.browse(EventFilter(touched=(local,))) == []
