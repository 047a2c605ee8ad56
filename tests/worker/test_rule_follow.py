"""Running workers follow the published rules: a new active version within 2 s, an event in
flight finishing with the version it started with, a version that does not load kept out, a
field-map change draining onto new targets, and the shadow hook."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from engine.errors import ConfigError, Location, Problem
from engine.rules.model import RuleSet
from engine.rules.versions import collect, load_version, version_of
from engine.runtime.metrics import Metrics
from engine.runtime.settings import Settings
from engine.storage import InboxEvent, NewRuleVersion, Storage, open_storage
from engine.targets.base import Target
from engine.worker import assembly
from engine.worker.assembly import FollowingWorker
from engine.worker.follow import RuleFollower
from engine.worker.loop import Worker, WorkerOptions
from engine.worker.snapshot import Rules
from tests.support.worker_helpers import BASE_RULES, FakeTarget, store, wait_until, write_rules

pytestmark = pytest.mark.anyio

BACKENDS = ("sqlite", "postgresql")
SETTINGS = Settings(webhook_secrets=("whsec_test",))
# The same rules, another stage: what a fix published while events flow looks like.
CUSTOMER_RULES = BASE_RULES.replace("stage: lead}", "stage: customer}", 1)


async def publish(storage: Storage, folder: Path, text: str = BASE_RULES) -> RuleSet:
    write_rules(folder, text)
    files = collect([folder])
    await storage.rule_versions.publish(NewRuleVersion(files.version, files.files, "test"))
    return load_version(files.files, files.version)


@pytest.fixture
async def other(database_url: str) -> AsyncIterator[Storage]:
    """Another process on the same database: it publishes, the storage under test follows."""
    opened = open_storage(database_url)
    yield opened
    await opened.close()


async def next_change(follower: RuleFollower, timeout: float = 5.0) -> Rules:
    changes = follower.changes()
    try:
        async with asyncio.timeout(timeout):
            return await anext(changes)
    finally:
        await changes.aclose()


async def test_a_publish_by_another_process_is_picked_up_within_two_seconds(
    storage: Storage, other: Storage, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = await publish(storage, tmp_path / "v1")
    metrics = Metrics()
    follower = RuleFollower(storage, Rules(first), metrics=metrics)
    caplog.set_level(logging.INFO, logger="engine.worker.rules")
    follower.announce()
    waiting = asyncio.create_task(next_change(follower))
    await asyncio.sleep(0.3)  # the follower is waiting (PostgreSQL: listening) by now
    loop = asyncio.get_running_loop()
    began = loop.time()
    second = await publish(other, tmp_path / "v2", CUSTOMER_RULES)
    candidate = await waiting
    assert loop.time() - began < 2.0
    assert candidate.versions == (second.version, None)
    follower.adopt(candidate)
    assert follower.current.active.version == second.version
    assert follower.current.active.rule("install-creates-lead") is not None
    messages = [r.getMessage() for r in caplog.records]
    assert f"rules version {first.version} active (was none)" in messages
    assert f"rules version {second.version} active (was {first.version})" in messages
    text = await metrics.render()
    assert f'linkcrm_rules_info{{role="active",version="{second.version}"}} 1' in text
    assert "linkcrm_rules_reloads_total 1" in text
    assert "linkcrm_rules_reload_failures_total 0" in text
    # Rolled back by another process: picked up the same way.
    await other.rule_versions.activate(str(first.version))
    assert (await next_change(follower)).versions == (first.version, None)


async def test_a_version_that_does_not_load_is_logged_and_kept_out(
    storage: Storage, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = await publish(storage, tmp_path / "v1")
    metrics = Metrics()
    follower = RuleFollower(storage, Rules(first), metrics=metrics)
    # Stored by a linkcrm that knows an action this one does not.
    files = dict(collect([tmp_path / "v1"]).files)
    files["rules.yaml"] = files["rules.yaml"].replace("set_stage:", "set_mood:", 1)
    broken = version_of(files)
    await storage.rule_versions.publish(NewRuleVersion(broken, files, "future-linkcrm"))
    caplog.set_level(logging.INFO, logger="engine.worker.rules")
    assert await follower.check() is None
    assert follower.current.active.version == first.version
    refused = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert [r.getMessage() for r in refused] == [
        f"rules version {broken} cannot run in this process; it keeps running {first.version}"]
    assert any("set_mood" in p or "rules.yaml" in p for p in refused[0].problems)  # type: ignore[attr-defined]
    assert await follower.check() is None  # refused once, not reloaded on every poll
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1
    assert "linkcrm_rules_reload_failures_total 1" in await metrics.render()
    fixed = await publish(storage, tmp_path / "v3", CUSTOMER_RULES)
    candidate = await follower.check()
    assert candidate is not None and candidate.active.version == fixed.version


async def test_each_claim_plans_with_the_current_snapshot_and_an_event_in_flight_keeps_its_own(
    storage: Storage, tmp_path: Path
) -> None:
    first = await publish(storage, tmp_path / "v1")
    follower = RuleFollower(storage, Rules(first))
    target = FakeTarget()
    worker = Worker(storage, first, [target], rules=lambda: follower.current)
    running = asyncio.create_task(worker.run())
    try:
        early = await store(storage, "install.tracked", token="tok_early", prefix="a")
        target.gates[early] = asyncio.Event()
        await wait_until(lambda: early in target.started, what="the early event in flight")
        second = await publish(storage, tmp_path / "v2", CUSTOMER_RULES)
        candidate = await follower.check()
        assert candidate is not None
        follower.adopt(candidate)
        later = await store(storage, "install.tracked", token="tok_later", prefix="b")
        await wait_until(lambda: later in target.events(), what="the later event applied")
        target.gates[early].set()

        async def both_done() -> bool:
            found = [await storage.inbox.get(e) for e in (early, later)]
            return all(e is not None and e.status == "processed" for e in found)

        await wait_until(both_done, what="both events processed")
    finally:
        worker.stop()
        await running
    stages = {e: [a.payload().get("stage") for i, a, _ in target.calls
                  if i == e and a.kind == "set_stage"] for e in (early, later)}
    assert stages == {early: ["lead"], later: ["customer"]}
    for event_id, version in ((early, first.version), (later, second.version)):
        assert {o.rules_version for o in await storage.outcomes.of_event(event_id)} == {version}


class Observer:
    def __init__(self, fail: bool = False) -> None:
        self.seen: list[tuple[int, str | None, str | None]] = []
        self.fail = fail

    async def observe(self, event: InboxEvent, active: RuleSet, shadow: RuleSet) -> None:
        self.seen.append((event.id, active.version, shadow.version))
        if self.fail:
            raise RuntimeError(f"observer broke on {event.body!r}")


async def test_the_shadow_hook_sees_each_claimed_event_and_its_failures_never_reach_the_event(
    storage: Storage, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = await publish(storage, tmp_path / "v1")
    candidate = write_rules(tmp_path / "v2", CUSTOMER_RULES)
    metrics = Metrics()
    watching = Observer()
    worker = Worker(storage, first, [FakeTarget()], metrics=metrics,
                    rules=lambda: Rules(first, candidate), shadow=watching)
    one = await store(storage, "install.tracked", token="tok_1", prefix="a")
    await worker.run_until_idle()
    assert watching.seen == [(one, first.version, candidate.version)]
    breaking = Observer(fail=True)
    caplog.set_level(logging.WARNING, logger="engine.worker.loop")
    worker = Worker(storage, first, [FakeTarget()], metrics=metrics,
                    rules=lambda: Rules(first, candidate), shadow=breaking)
    two = await store(storage, "install.tracked", token="tok_2", prefix="b")
    await worker.run_until_idle()
    assert breaking.seen == [(two, first.version, candidate.version)]
    assert (await storage.inbox.get(two)).status == "processed"  # type: ignore[union-attr]
    assert worker.shadow_failures.value() == 1
    assert "tok_2" not in caplog.text  # the error quotes the body: only its type is logged
    # Without a shadow in the snapshot the hook is not called.
    quiet = Observer()
    worker = Worker(storage, first, [FakeTarget()], rules=lambda: Rules(first), shadow=quiet)
    await store(storage, "install.tracked", token="tok_3", prefix="c")
    await worker.run_until_idle()
    assert quiet.seen == []


async def test_a_slow_shadow_observer_never_holds_an_event_back(
    storage: Storage, tmp_path: Path
) -> None:
    first = await publish(storage, tmp_path / "v1")
    candidate = write_rules(tmp_path / "v2", CUSTOMER_RULES)
    stuck = asyncio.Event()

    class Slow:
        async def observe(self, event: InboxEvent, active: RuleSet, shadow: RuleSet) -> None:
            await stuck.wait()

    worker = Worker(storage, first, [FakeTarget()], rules=lambda: Rules(first, candidate),
                    shadow=Slow(), options=WorkerOptions(drain_timeout=0.2))
    event = await store(storage, "install.tracked", token="tok_1", prefix="a")
    async with asyncio.timeout(5):
        await worker.run_until_idle()  # the observer never returns; drained and cancelled
    assert (await storage.inbox.get(event)).status == "processed"  # type: ignore[union-attr]
    assert not worker._observers


def _field_map_with(extra: str) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        fields = folder / "fields.yaml"
        fields.write_text(fields.read_text().replace(
            "\nfields:\n", f"\nfields:\n  {extra}:\n    type: string\n    label: {extra}\n", 1))
    return edit


async def test_a_field_map_change_drains_and_restarts_on_new_targets_or_is_refused(
    storage: Storage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture
) -> None:
    first = await publish(storage, tmp_path / "v1")
    started: list[list[Target]] = []
    real = assembly.start_targets
    fit = True

    async def start(targets: list[Target]) -> None:
        """The CRM fits every field map but one (a Pipedrive field that does not exist)."""
        started.append(targets)
        if not fit:
            raise ConfigError([Problem(Location("local"), "field-missing",
                                       "the CRM has no field unfit_field")])
        await real(targets)

    monkeypatch.setattr(assembly, "start_targets", start)
    follower = RuleFollower(storage, Rules(first))
    following = FollowingWorker(storage, follower, SETTINGS, {}, metrics=Metrics())
    running = asyncio.create_task(following.run())
    try:
        await wait_until(lambda: following.current is not None, what="the first worker")
        worker_one = following.current
        assert len(started) == 1
        # Rules only: swapped in place, same Worker and targets.
        only_rules = await publish(storage, tmp_path / "v2", CUSTOMER_RULES)
        await wait_until(lambda: follower.current.active.version == only_rules.version,
                         what="the rules-only change")
        assert following.current is worker_one and len(started) == 1
        # A field map the CRM does not fit: refused, the running version stays.
        fit = False
        caplog.set_level(logging.ERROR, logger="engine.worker.rules")
        folder = tmp_path / "v3"
        write_rules(folder, CUSTOMER_RULES)
        _field_map_with("unfit_field")(folder)
        files = collect([folder])
        await storage.rule_versions.publish(NewRuleVersion(files.version, files.files, "t"))
        await wait_until(lambda: len(started) == 2, what="the unfit targets tried")
        await asyncio.sleep(0.6)
        assert follower.current.active.version == only_rules.version
        assert following.current is worker_one
        assert any(r.getMessage().startswith(f"rules version {files.version} cannot run")
                   for r in caplog.records)
        # A field map that fits: the worker drains and a new one starts on new targets.
        fit = True
        folder = tmp_path / "v4"
        write_rules(folder, CUSTOMER_RULES)
        _field_map_with("fine_field")(folder)
        files = collect([folder])
        await storage.rule_versions.publish(NewRuleVersion(files.version, files.files, "t"))
        await wait_until(lambda: follower.current.active.version == files.version,
                         what="the field-map change")
        await wait_until(lambda: following.current is not worker_one, what="a new worker")
        assert len(started) == 3
        assert "fine_field" in following.current.ruleset.field_map.fields  # type: ignore[union-attr]
        event = await store(storage, "install.tracked", token="tok_new", prefix="n")

        async def done() -> bool:
            stored = await storage.inbox.get(event)
            return stored is not None and stored.status == "processed"

        await wait_until(done, what="an event on the new targets")
        assert {o.rules_version for o in await storage.outcomes.of_event(event)} == {
            files.version}
    finally:
        following.stop()
        await running
