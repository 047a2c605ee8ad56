"""One bad event is a dead letter, never a stopped worker: on SQLite and PostgreSQL alike.

Hostile values (lone surrogates, NUL, 1e400, 401-digit numbers, deep nesting, 1 MB strings)
go through the planner, the outcomes, the identity map and the embedded CRM; each event ends
processed or dead with a clear error, the same way on both backends, and the events after it
are processed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import subprocess
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from engine.actions import CreateDeal, IdentityKey, UpsertContact
from engine.errors import PermanentCRMError, UnstorableValueError
from engine.rules.model import RuleSet
from engine.runtime.metrics import Metrics
from engine.signing import sign
from engine.storage import FinalStatus, Finish, NewEvent, NewOutcome, Storage, open_storage
from engine.storage.touchrecords import AttributionRequest
from engine.targets.base import CallContext
from engine.targets.local.target import LocalTarget
from engine.worker.loop import Worker, WorkerOptions
from engine.worker.retrying import RetryPolicy
from tests.support.service_process import (
    ROOT,
    SECRET,
    cli,
    cli_json,
    service_env,
    start_server,
    wait_for,
)
from tests.support.worker_helpers import FakeTarget, store, write_rules

pytestmark = pytest.mark.anyio
BACKENDS = ("sqlite", "postgresql")  # every test that uses a database runs on both

RULES = """\
version: 1
rules:
  - name: contact
    on: install.tracked
    actions:
      - upsert_contact:
          identity: {deep_link_token: data.token}
          set: {deep_link_prefix: data.prefix}
  - name: deal
    on: install.tracked
    when: data.deal
    actions:
      - create_deal:
          identity: {deep_link_token: data.token}
          key: data.deal
          title: data.title
          stage: new
          amount: data.amount
"""

MB = 1024 * 1024
BIG = "1" + "0" * 400  # 401 digits: a valid JSON number, too large for a float

# (name, the event's `data` as raw JSON text, final status, what the error says)
HOSTILE = [
    ("surrogate in the identity", r'{"token":"x\ud800","deal":"d","title":"t"}', "dead",
     "identity deep_link_token holds a lone surrogate (\\ud800) at character 2"),
    ("surrogate in a field", r'{"token":"s2","prefix":"p\udfff"}', "dead",
     "set.deep_link_prefix holds a lone surrogate (\\udfff)"),
    ("NUL in the identity", r'{"token":"n\u0000"}', "dead",
     "identity deep_link_token holds a NUL character (\\x00) at character 2"),
    ("NUL in a field value", r'{"token":"n2","prefix":"a\u0000b"}', "processed", None),
    ("NUL in a deal title", r'{"token":"n3","deal":"d3","title":"T\u0000"}', "dead",
     "title holds a NUL character"),
    ("1e400 in a field", r'{"token":"f1","prefix":1e400}', "dead",
     "set.deep_link_prefix is not a finite number (inf)"),
    ("1e400 as an amount", r'{"token":"f2","deal":"d5","title":"t","amount":1e400}', "dead",
     "amount is not a finite number"),
    ("a 401-digit amount", '{"token":"f3","deal":"d6","title":"t","amount":' + BIG + "}", "dead",
     "amount is a 401-digit number"),
    ("a 401-digit field", '{"token":"f4","prefix":' + BIG + "}", "processed", None),
    ("a field nested 100 deep", '{"token":"deep1","prefix":' + "[" * 100 + "]" * 100 + "}",
     "dead", "nests deeper than 64 levels"),
    ("a body nested 500 deep", '{"token":"deep2","x":' + "[" * 500 + "]" * 500 + "}",
     "processed", None),
    ("a body nested beyond the parser", '{"token":"deep3","x":' + "[" * 5000 + "]" * 5000 + "}",
     "dead", "nests too deeply"),
    ("a 1 MB field", '{"token":"m1","prefix":"' + "z" * MB + '"}', "processed", None),
    ("a 1 MB identity", '{"token":"' + "t" * MB + '"}', "dead",
     "is 1048576 characters long; a key holds at most 512"),
    ("text beyond the BMP", r'{"token":"\ud83d\ude00","deal":"d9","title":"\ud83d\ude00"}',
     "processed", None),
]


def raw_event(data: str) -> NewEvent:
    body = ('{"event":"install.tracked","timestamp":"2026-03-01T12:00:00Z","data":' + data
            + "}").encode()
    return NewEvent(body=body, event_type="install.tracked",
                    event_timestamp="2026-03-01T12:00:00Z",
                    dedupe_key=hashlib.sha256(body).hexdigest(), received_at=datetime.now(UTC))


@pytest.fixture
def rules(tmp_path: Path) -> RuleSet:
    return write_rules(tmp_path / "rules", RULES)


def local_worker(storage: Storage, rules: RuleSet, metrics: Metrics | None = None) -> Worker:
    policy = RetryPolicy(base=0.01, cap=0.05, max_attempts=3, rng=random.Random(1))
    return Worker(storage, rules, [LocalTarget(storage.local_crm, rules.field_map)],
                  metrics=metrics,
                  options=WorkerOptions(policy=policy))


async def test_a_poison_event_is_a_dead_letter_and_the_events_after_it_are_processed(
    storage: Storage, rules: RuleSet
) -> None:
    metrics = Metrics()
    poison = (await storage.inbox.store(raw_event(r'{"token":"x\ud800"}'))).id
    normal = [await store(storage, "install.tracked", token=f"tok_{n}", prefix="p")
              for n in range(3)]
    await local_worker(storage, rules, metrics).run_until_idle()
    dead = await storage.inbox.get(poison)
    assert dead is not None and dead.status == "dead" and dead.lease_owner is None
    assert "identity deep_link_token holds a lone surrogate (\\ud800)" in (dead.last_error or "")
    for event_id in normal:
        event = await storage.inbox.get(event_id)
        assert event is not None and event.status == "processed"
    tokens = sorted(c.identities[0].value for c in await storage.local_crm.contacts())
    assert tokens == ["tok_0", "tok_1", "tok_2"]
    assert metrics.processed.value(status="dead") == 1
    assert metrics.processed.value(status="processed") == 3
    # The claim's touches go in one write; the poison's cannot be kept, the others still are.
    later = datetime.now(UTC) + timedelta(days=1)
    for n in range(3):
        found = await storage.touches.attribute(AttributionRequest(
            event_id=1000 + n, token=f"tok_{n}", platform=None, anchor=later, before=later,
            since=None))
        assert found.detail["count"] == 1


async def test_hostile_values_end_applied_or_dead_the_same_on_both_backends(
    storage: Storage, rules: RuleSet
) -> None:
    ids = {name: (await storage.inbox.store(raw_event(data))).id for name, data, _, _ in HOSTILE}
    after = await store(storage, "install.tracked", token="after", prefix="p")
    await local_worker(storage, rules).run_until_idle()
    for name, _, status, error in HOSTILE:
        event = await storage.inbox.get(ids[name])
        assert event is not None, name
        assert (name, event.status) == (name, status), event.last_error
        if error is not None:
            assert error in (event.last_error or ""), (name, event.last_error)
            if "value" in name or "field" in name or "identity" in name:
                assert "fix the value at its source" in (event.last_error or "")
    last = await storage.inbox.get(after)
    assert last is not None and last.status == "processed"
    fields = {c.identities[0].value: c.fields for c in await storage.local_crm.contacts()}
    assert fields["n2"]["deep_link_prefix"] == "a\x00b"  # kept exactly, on both backends
    assert fields["f4"]["deep_link_prefix"] == int(BIG)
    assert fields["m1"]["deep_link_prefix"] == "z" * MB
    assert "\U0001f600" in fields and "t" * MB not in fields
    deals = {deal.key: deal for deal in await storage.local_crm.deals()}
    assert deals["d9"].title == "\U0001f600" and "d3" not in deals and "d5" not in deals


async def test_an_error_in_the_worker_itself_dead_letters_that_event_only(
    storage: Storage, rules: RuleSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = await store(storage, "install.tracked", token="tok_a", prefix="p")
    broken = await store(storage, "install.tracked", token="tok_b", prefix="p")
    last = await store(storage, "install.tracked", token="tok_c", prefix="p")
    finish = storage.inbox.finish

    async def buggy(event_id: int, worker_id: str, status: FinalStatus,
                    error: str | None = None, *, ordering_keys: Sequence[str] | None = None,
                    outcomes: Sequence[NewOutcome] = ()) -> bool:
        # Writing the event's outcomes with its finish fails; dead-lettering it does not.
        if any(outcome.event_id == broken for outcome in outcomes):
            raise KeyError("a bug that quotes ada@example.com")
        return await finish(event_id, worker_id, status, error, ordering_keys=ordering_keys,
                            outcomes=outcomes)

    finish_many = storage.inbox.finish_many

    async def buggy_many(worker_id: str, finishes: Sequence[Finish]) -> list[bool]:
        # A claim's events finish together: the one write fails, then each finishes alone.
        if any(outcome.event_id == broken for f in finishes for outcome in f.outcomes):
            raise KeyError("a bug that quotes ada@example.com")
        return await finish_many(worker_id, finishes)

    monkeypatch.setattr(storage.inbox, "finish", buggy)
    monkeypatch.setattr(storage.inbox, "finish_many", buggy_many)
    await local_worker(storage, rules).run_until_idle()
    statuses = {}
    for event_id in (first, broken, last):
        event = await storage.inbox.get(event_id)
        assert event is not None
        statuses[event_id] = (event.status, event.lease_owner)
    assert statuses == {first: ("processed", None), broken: ("dead", None),
                        last: ("processed", None)}
    dead = await storage.inbox.get(broken)
    assert dead is not None and dead.last_error == (
        "the worker failed on this event: KeyError: 'a bug that quotes ada@example.com'")


async def test_keys_one_event_cannot_record_fail_that_event_only(
    storage: Storage, rules: RuleSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A claim records every event's ordering keys in one write; when that write fails on one
    # event's data, each event records its own, and only that one is a dead letter.
    ids = [await store(storage, "install.tracked", token=f"tok_{n}", prefix="p")
           for n in range(3)]
    record_one = storage.inbox.set_ordering_keys
    together: list[list[int]] = []

    async def refused(keys: dict[int, list[str]]) -> None:
        together.append(sorted(keys))
        raise UnstorableValueError("an ordering key cannot be stored")

    async def one(event_id: int, keys: list[str]) -> None:
        if event_id == ids[1]:
            raise UnstorableValueError("an ordering key cannot be stored")
        await record_one(event_id, keys)

    monkeypatch.setattr(storage.inbox, "set_ordering_keys_many", refused)
    monkeypatch.setattr(storage.inbox, "set_ordering_keys", one)
    await local_worker(storage, rules).run_until_idle()
    assert together == [ids]
    statuses = [(await storage.inbox.get(event_id)) for event_id in ids]
    assert [e.status for e in statuses if e is not None] == ["processed", "dead", "processed"]
    contacts = await storage.local_crm.contacts()
    assert sorted(c.identities[0].value for c in contacts) == ["tok_0", "tok_2"]


async def test_a_value_the_store_refuses_is_dead_at_once_not_retried(
    storage: Storage, rules: RuleSet
) -> None:
    target = FakeTarget(always=UnstorableValueError("identity deep_link_token is too long"))
    event_id = await store(storage, "install.tracked", token="tok_1", prefix="p")
    await Worker(storage, rules, [target]).run_until_idle()
    [outcome] = await storage.outcomes.of_event(event_id)
    assert (outcome.status, outcome.attempts) == ("dead", 1)
    assert outcome.error == "fake: identity deep_link_token is too long"
    assert len(target.calls) == 1


def test_the_standalone_worker_dead_letters_a_poison_event_and_keeps_going(
    database_url: str, tmp_path: Path
) -> None:
    async def fill() -> tuple[int, list[int]]:
        async with open_storage(database_url) as storage:
            await storage.migrate()
            poison = (await storage.inbox.store(raw_event(r'{"token":"x\ud800"}'))).id
            normal = [await store(storage, "install.tracked", token=f"tok_{n}")
                      for n in range(3)]
            return poison, normal

    poison, normal = asyncio.run(fill())
    env = service_env(tmp_path, LINKCRM_DATABASE_URL=database_url, LINKCRM_LOG_LEVEL="INFO")
    worker = subprocess.Popen([sys.executable, "-m", "engine.cli", "worker"], env=env,
                              cwd=ROOT, stderr=subprocess.PIPE)
    try:
        wanted = {poison: "dead", **{event_id: "processed" for event_id in normal}}
        wait_for(lambda: {e["id"]: e["status"] for e in cli_json("events", "list", env=env)
                          if e["id"] in wanted} == wanted, what="the worker")
        assert worker.poll() is None  # still running
    finally:
        worker.terminate()
        _, stderr = worker.communicate(timeout=20)
    assert worker.returncode == 0, stderr
    assert b"lone surrogate" not in stderr and b"Traceback" not in stderr
    assert b"worker stopped" in stderr


async def test_the_cli_shows_every_hostile_event_and_contact(
    database_url: str, storage: Storage, rules: RuleSet, tmp_path: Path
) -> None:
    ids = [(await storage.inbox.store(raw_event(data))).id for _, data, _, _ in HOSTILE]
    await local_worker(storage, rules).run_until_idle()
    env = service_env(tmp_path, LINKCRM_DATABASE_URL=database_url,
                      LINKCRM_RULES=str(tmp_path / "rules"))
    commands = [["events", "list"], ["crm", "contacts"], ["crm", "deals"]]
    commands += [["events", "show", str(event_id)] for event_id in ids]
    for command in commands:
        for output in ("text", "json"):
            done = await asyncio.to_thread(cli, *command, "--format", output, env=env)
            assert (command, done.returncode, done.stderr) == (command, 0, ""), output
            if output == "json":
                json.loads(done.stdout)


def test_serve_takes_a_signed_poison_event_and_goes_on_with_the_next_ones(
    tmp_path: Path,
) -> None:
    env = service_env(tmp_path)
    server = start_server(env)
    try:
        for data in (r'{"token":"x\ud800"}', '{"token":"tok_1"}', '{"token":"tok_2"}'):
            body = ('{"event":"install.tracked","timestamp":"2026-03-01T12:00:00Z","data":'
                    + data + "}").encode()
            sent = httpx.post(f"{server.url}/webhooks/tolinku", content=body, timeout=10,
                              headers={"content-type": "application/json",
                                       "x-webhook-signature": sign(body, SECRET)})
            assert sent.status_code == 200, sent.text
        wanted = {1: "dead", 2: "processed", 3: "processed"}
        wait_for(lambda: {e["id"]: e["status"] for e in cli_json("events", "list", env=env)}
                 == wanted, what="the in-process worker")
        assert httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200
        assert server.metric("linkcrm_events_processed_total", status="dead") == 1
        assert server.metric("linkcrm_task_crashes_total", task="worker") == 0
    finally:
        server.stop()
    tokens = {i["value"] for c in cli_json("crm", "contacts", env=env) for i in c["identities"]}
    assert tokens == {"tok_1", "tok_2"}


@pytest.mark.parametrize("action", [
    UpsertContact(rule="r", identity=(IdentityKey("deep_link_token", "x\x00"),)),
    UpsertContact(rule="r", identity=(IdentityKey("deep_link_token", "x"),),
                  set={"deep_link_prefix": float("inf")}),
    CreateDeal(rule="r", identity=(IdentityKey("deep_link_token", "x"),), key="d",
               title="t", amount=float("inf")),
], ids=["NUL in the identity", "an infinite field", "an infinite amount"])
async def test_the_local_crm_refuses_what_no_store_keeps_at_once_on_both_backends(
    storage: Storage, rules: RuleSet, action: UpsertContact | CreateDeal
) -> None:
    """Past the planner (a replay with other rules, a caller of its own), the embedded CRM
    still says "permanent": both backends refuse the value the same way, never "retry"."""
    target = LocalTarget(storage.local_crm, rules.field_map)
    with pytest.raises(PermanentCRMError, match="no store can keep it as it is"):
        await target.execute(action, CallContext("key"))
    assert await storage.local_crm.contacts() == [] and await storage.local_crm.deals() == []
