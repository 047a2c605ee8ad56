"""Queued calls share a target's batch endpoint: results stay per action, and the worker's
per-identity order holds with batching on."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from pathlib import Path

import pytest

from engine.actions import Action, IdentityKey, UpsertContact
from engine.errors import PermanentCRMError, RetryableCRMError
from engine.storage import Storage
from engine.targets.base import CallContext, Outcome, batches
from engine.worker.batch import Batcher, _Call
from engine.worker.loop import Worker, WorkerOptions
from tests.support.worker_helpers import FakeTarget, store, write_rules

pytestmark = pytest.mark.anyio



class BatchingTarget:
    """Records each batch; `refuse` names identity values whose actions fail permanently."""

    name = "batching"

    def __init__(self, latency: float = 0.02, refuse: Sequence[str] = ()) -> None:
        self.latency = latency
        self.refuse = set(refuse)
        self.batches: list[list[Action]] = []
        self.contexts: list[CallContext] = []
        self.broken = False

    async def execute(self, action: Action, context: CallContext) -> Outcome:
        raise AssertionError("the worker must use execute_many")

    async def execute_many(self, items: Sequence[tuple[Action, CallContext]]
                           ) -> list[Outcome | Exception]:
        self.batches.append([action for action, _ in items])
        self.contexts += [context for _, context in items]
        await asyncio.sleep(self.latency)
        if self.broken:
            raise RuntimeError("adapter bug")
        return [PermanentCRMError(f"refused {a.identity[0].value}")
                if a.identity[0].value in self.refuse else Outcome(a.identity[0].value, "ok")
                for a, _ in items]

    async def aclose(self) -> None:
        return None


def upsert(token: str) -> UpsertContact:
    return UpsertContact("r", (IdentityKey("deep_link_token", token),))


async def test_one_call_goes_out_at_once_and_queued_calls_share_the_next_batch() -> None:
    target = BatchingTarget(refuse=["t3"])
    assert batches(target)
    batcher = Batcher(target, size=4)
    assert (await batcher.execute(upsert("t0"), CallContext("k0"))).record_id == "t0"
    first = asyncio.create_task(batcher.execute(upsert("t1"), CallContext("k1")))
    await asyncio.sleep(0.005)  # t1's batch is in flight; the rest queue up behind it
    rest = [asyncio.create_task(batcher.execute(upsert(f"t{n}"), CallContext(f"k{n}")))
            for n in range(2, 8)]
    results = await asyncio.gather(first, *rest, return_exceptions=True)
    assert [len(batch) for batch in target.batches] == [1, 1, 4, 2]
    assert [r.record_id if isinstance(r, Outcome) else str(r) for r in results] == [
        "t1", "t2", "refused t3", "t4", "t5", "t6", "t7"]
    target.broken = True  # a bug fails its batch's calls (the worker retries them) only
    with pytest.raises(RuntimeError, match="adapter bug"):
        await batcher.execute(upsert("t8"), CallContext("k8"))
    target.broken = False
    assert (await batcher.execute(upsert("t9"), CallContext("k9"))).record_id == "t9"
    await batcher.aclose()


async def test_a_short_answer_is_retryable_for_the_calls_it_left_out() -> None:
    class Short(BatchingTarget):
        async def execute_many(self, items: Sequence[tuple[Action, CallContext]]
                               ) -> list[Outcome | Exception]:
            return (await super().execute_many(items))[:1]

    batcher = Batcher(Short(latency=0.01))
    calls = [batcher.execute(upsert(f"t{n}"), CallContext(f"k{n}")) for n in range(3)]
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert isinstance(results[0], Outcome)
    assert all(isinstance(r, RetryableCRMError) for r in results[1:])


async def test_the_worker_batches_concurrent_events_and_keeps_each_identity_in_order(
        storage: Storage, tmp_path: Path) -> None:
    rules = write_rules(tmp_path / "rules")
    for round_ in ("first", "second"):
        for n in range(12):
            await store(storage, "install.tracked", token=f"t{n % 6}", prefix=f"{round_}-{n}")
    target = BatchingTarget()
    worker = Worker(storage, rules, [target], options=WorkerOptions(concurrency=8))
    await worker.run_until_idle()
    assert max(len(batch) for batch in target.batches) > 1
    # A later event of an identity may share a batch with the earlier one (queued behind it);
    # the order of the batches and of each batch's items is the arrival order per identity.
    applied: dict[str, list[str]] = {}
    for batch in target.batches:
        for action in batch:
            if isinstance(action, UpsertContact):
                prefix = action.set["deep_link_prefix"]
                applied.setdefault(action.identity[0].value, []).append(str(prefix))
    for token, prefixes in applied.items():
        numbers = [int(p.split("-")[1]) + (100 if p.startswith("second") else 0)
                   for p in prefixes]
        assert numbers == sorted(numbers), (token, prefixes)  # arrival order per identity
    assert sum(len(p) for p in applied.values()) == 24
    unbatched = Worker(storage, rules, [target], options=WorkerOptions(batch_size=1))
    assert unbatched.callers["batching"] is target


async def test_a_batch_holds_as_many_records_as_the_target_writes_in_one_request(
        storage: Storage, tmp_path: Path) -> None:
    """Salesforce's Collections take 200 records: its batches fill one; a target that does not
    say gets 100 (HubSpot's inputs); `batch_size` caps both, and 1 turns batching off."""
    rules = write_rules(tmp_path / "rules")

    class Wide(BatchingTarget):
        name, batch_records = "wide", 200

    def sizes(**options: int) -> dict[str, int | None]:
        worker = Worker(storage, rules, [Wide(), BatchingTarget()],
                        options=WorkerOptions(**options))
        return {name: caller.size if isinstance(caller, Batcher) else None
                for name, caller in worker.callers.items()}

    assert sizes() == {"wide": 200, "batching": 100}
    assert sizes(batch_size=150) == {"wide": 150, "batching": 100}
    assert sizes(batch_size=1) == {"wide": None, "batching": None}


async def test_each_call_carries_its_event_rule_and_key_as_an_argument(
        storage: Storage, tmp_path: Path) -> None:
    """The worker tells a target which event and rule each action comes from (the local CRM
    records the event in its stage history) in the call itself, batched or one by one."""
    rules = write_rules(tmp_path / "rules")
    events = [await store(storage, "install.tracked", token=f"t{n}", prefix="p")
              for n in range(3)]
    batching, single = BatchingTarget(), FakeTarget("single")
    await Worker(storage, rules, [batching, single],
                 options=WorkerOptions(concurrency=4)).run_until_idle()
    assert {c.rule for c in batching.contexts} == {"install-creates-lead"}
    called = {"batching": [(c.event_id, c.idempotency_key) for c in batching.contexts],
              "single": [(event, key) for event, _, key in single.calls]}
    for target, calls in called.items():
        recorded = [(event, o.idempotency_key) for event in events
                    for o in await storage.outcomes.of_event(event) if o.target == target]
        assert sorted(calls, key=str) == sorted(recorded, key=str) and len(recorded) == 6


async def test_a_later_event_in_the_same_claim_follows_without_reading_the_inbox_again(
        storage: Storage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The claim's one order check already found the earlier events of each identity; a later
    event's first wait follows them (they are all in progress here) without a read per event."""
    rules = write_rules(tmp_path / "rules")
    for round_ in ("first", "second"):
        for n in range(6):
            await store(storage, "install.tracked", token=f"t{n}", prefix=f"{round_}-{n}")
    reads: list[int] = []
    original = storage.inbox.earlier_unfinished

    async def counted(event_id: int, keys: Sequence[str]) -> list[int]:
        reads.append(event_id)
        return await original(event_id, keys)

    monkeypatch.setattr(storage.inbox, "earlier_unfinished", counted)
    target = BatchingTarget()
    await Worker(storage, rules, [target], options=WorkerOptions(concurrency=12)).run_until_idle()
    assert reads == []
    applied = [str(a.set["deep_link_prefix"]) for batch in target.batches for a in batch
               if isinstance(a, UpsertContact)]
    for n in range(6):  # each token's first event before its second
        assert applied.index(f"first-{n}") < applied.index(f"second-{n}")


def _scanned(queue: list[_Call], size: int, in_flight: set[IdentityKey], wait: bool,
             full: bool, coming: set[IdentityKey]) -> tuple[list[_Call], list[_Call], int]:
    """The batch rule read straight off the queue, call by call (how `_take` read it before
    it kept an index): (taken, left, how many records short)."""
    taken: list[_Call] = []
    left: list[_Call] = []
    records: set[IdentityKey] = set()
    blocked = set(in_flight)
    for call in queue:
        keys = set(call.action.identity)
        record = call.action.identity[:1]
        new = bool(record) and record[0] not in records
        if (new and len(records) >= size) or keys & blocked \
                or (wait and any(key in coming for key in keys)):
            left.append(call)
            blocked |= keys
            continue
        taken.append(call)
        records.update(record)
    short = size - len(records)
    if full and short > 0:
        return [], queue, short
    return taken, left, short


async def test_a_batch_takes_what_reading_the_whole_queue_in_order_would() -> None:
    """Thousands of random queues of calls that share records and second keys, with keys in
    flight and keys still coming: `_take` (which reads the queue only until its batch has its
    records, then an index by key) takes exactly the calls, in the order, that reading every
    queued call in order takes, and leaves the rest queued in order, batch after batch."""
    rng = random.Random(12)
    tokens = [IdentityKey("deep_link_token", f"t{n}") for n in range(12)]
    emails = [IdentityKey("email", f"e{n}") for n in range(5)]

    def identity() -> tuple[IdentityKey, ...]:
        shape = rng.random()
        if shape < 0.03:
            return ()
        if shape < 0.15:
            return (rng.choice(emails),)
        token = rng.choice(tokens)
        return (token, rng.choice(emails)) if shape < 0.5 else (token,)

    target = BatchingTarget()
    compared = 0
    for _ in range(300):
        batcher = Batcher(target, size=rng.randint(1, 6))
        coming: set[IdentityKey] = set()
        batcher.coming = coming.__contains__
        reference: list[_Call] = []
        for _ in range(rng.randint(1, 5)):  # batches, with calls arriving in between
            for _ in range(rng.randint(0, 25)):
                reference.append(batcher._enqueue(UpsertContact("r", identity()),
                                                  CallContext("k")))
            in_flight = set(rng.sample([*tokens, *emails], rng.randint(0, 3)))
            batcher._sending = {None: frozenset(in_flight)}  # type: ignore[dict-item]
            coming.clear()
            coming.update(rng.sample([*tokens, *emails], rng.randint(0, 2)))
            wait, full = rng.random() < 0.4, rng.random() < 0.3
            expected, reference, short = _scanned(reference, batcher.size, in_flight, wait,
                                                  full, coming)
            assert batcher._take(wait, full) == (expected, short)
            assert list(batcher._queue.values()) == reference
            compared += 1
    assert compared > 600
