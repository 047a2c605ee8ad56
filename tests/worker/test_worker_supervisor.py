"""A crashed worker is logged, restarted, and visible on /readyz and /metrics."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from engine.errors import ConfigError
from engine.runtime.metrics import Metrics
from engine.runtime.settings import Settings
from engine.runtime.supervisor import Supervisor
from engine.service.app import create_app
from engine.storage import Storage, open_storage
from engine.targets.local.target import LocalTarget
from engine.worker.assembly import StandaloneWorker
from engine.worker.loop import Worker
from tests.support.worker_helpers import store, wait_until, write_rules

pytestmark = pytest.mark.anyio

SETTINGS = Settings(webhook_secrets=("whsec_test",))



class Crashing:
    """A task that raises `times` times (quoting personal data), then returns."""

    def __init__(self, times: int) -> None:
        self.times = times
        self.calls = 0

    async def __call__(self) -> None:
        self.calls += 1
        if self.calls <= self.times:
            raise RuntimeError("crashed on ada@example.com")


async def test_a_crashed_task_is_logged_counted_and_restarted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics = Metrics()
    task = Crashing(times=2)
    caplog.set_level(logging.ERROR, logger="engine.worker.loop")
    await Supervisor(metrics, first_delay=0.01).run("worker", task)
    assert task.calls == 3
    crashes = [r for r in caplog.records if r.getMessage().startswith("background task crashed")]
    assert [(r.task, r.error_type, r.crashes_in_a_row) for r in crashes] == [  # type: ignore[attr-defined]
        ("worker", "RuntimeError", 1), ("worker", "RuntimeError", 2)]
    assert [r.restart_in_seconds for r in crashes] == [0.01, 0.02]  # type: ignore[attr-defined]
    assert "test_worker_supervisor.py" in crashes[0].where  # type: ignore[attr-defined]
    assert "ada@example.com" not in caplog.text  # the message may quote event data
    assert metrics.counter("linkcrm_task_crashes_total", "", ("task",)).value(task="worker") == 2


async def test_the_wait_doubles_up_to_the_cap_and_starts_over_after_a_stable_run() -> None:
    now = [0.0]
    delays: list[float] = []
    supervisor = Supervisor(first_delay=1, max_delay=4, stable_after=60, clock=lambda: now[0])
    runs = [0.0, 0.0, 0.0, 0.0, 120.0, 0.0]  # seconds each run lasts before it crashes

    async def task() -> None:
        if not runs:
            return
        now[0] += runs.pop(0)
        raise RuntimeError("boom")

    async def no_wait(delay: float) -> bool:
        delays.append(delay)
        return False

    supervisor._stopping = no_wait  # type: ignore[method-assign]
    await supervisor.run("worker", task)
    assert delays == [1, 2, 4, 4, 1, 2]


async def test_a_task_waiting_to_restart_is_down_until_stop_ends_the_wait() -> None:
    metrics = Metrics()
    supervisor = Supervisor(metrics, first_delay=60)
    running = asyncio.create_task(supervisor.run("worker", Crashing(times=1)))
    await wait_until(lambda: supervisor.down, what="the crash")
    assert supervisor.down == {"worker": "RuntimeError"} and not supervisor.ready
    assert 'linkcrm_task_up{task="worker"} 0' in await metrics.render()
    supervisor.stop()
    await asyncio.wait_for(running, 5)  # no 60-second wait, no restart
    assert supervisor.down == {}


async def test_fatal_errors_are_raised_not_retried() -> None:
    calls = 0

    async def misconfigured() -> None:
        nonlocal calls
        calls += 1
        raise ConfigError([])

    with pytest.raises(ConfigError):
        await Supervisor(fatal=(ConfigError,), first_delay=0.01).run("worker", misconfigured)
    assert calls == 1


def test_readyz_is_503_and_metrics_show_it_while_the_worker_is_down(tmp_path: Path) -> None:
    storage = open_storage(f"sqlite:///{tmp_path / 'linkcrm.db'}")
    asyncio.run(storage.migrate())

    async def worker() -> None:
        raise RuntimeError("the worker loop broke")

    app = create_app(storage, SETTINGS, background=[worker],
                     supervisor=Supervisor(first_delay=60))
    try:
        with TestClient(app) as client:
            for _ in range(200):
                answer = client.get("/readyz")
                if answer.status_code == 503:
                    break
            assert answer.status_code == 503
            assert answer.json() == {"status": "unavailable", "reason": "task_down",
                                     "down": {"worker": "RuntimeError"}}
            metrics = client.get("/metrics").text
            assert 'linkcrm_task_crashes_total{task="worker"} 1' in metrics
            assert 'linkcrm_task_up{task="worker"} 0' in metrics
            assert client.get("/healthz").status_code == 200  # alive, only not ready
    finally:
        asyncio.run(storage.close())


async def test_the_in_process_worker_comes_back_after_a_crash_and_applies_events(
    storage: Storage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rules = write_rules(tmp_path / "rules")
    claims = 0
    claim = storage.inbox.claim

    async def breaks_once(worker_id: str, limit: int, lease_seconds: float) -> list[object]:
        nonlocal claims
        claims += 1
        if claims == 1:
            raise AttributeError("a bug in the claim path")
        return list(await claim(worker_id, limit, lease_seconds))

    monkeypatch.setattr(storage.inbox, "claim", breaks_once)
    event_ids = [await store(storage, "install.tracked", token=f"tok_{n}") for n in range(3)]
    metrics = Metrics()
    supervisor = Supervisor(metrics, first_delay=0.05)

    async def worker() -> None:
        await Worker(storage, rules, [LocalTarget(storage.local_crm, rules.field_map)],
                     metrics=metrics).run()

    running = asyncio.create_task(supervisor.run("worker", worker))
    try:
        async def all_processed() -> bool:
            events = [await storage.inbox.get(event_id) for event_id in event_ids]
            return all(e is not None and e.status == "processed" for e in events)

        await wait_until(all_processed, what="the restarted worker")
        assert supervisor.ready
        assert metrics.counter("linkcrm_task_crashes_total", "", ("task",)).value(
            task="worker") == 1
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)


async def test_the_standalone_worker_restarts_after_a_crash_and_stops_for_good(
    storage: Storage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rules = write_rules(tmp_path / "rules")
    claims = 0
    claim = storage.inbox.claim

    async def breaks_once(worker_id: str, limit: int, lease_seconds: float) -> list[object]:
        nonlocal claims
        claims += 1
        if claims == 1:
            raise AttributeError("a bug in the claim path")
        return list(await claim(worker_id, limit, lease_seconds))

    monkeypatch.setattr(storage.inbox, "claim", breaks_once)
    event_id = await store(storage, "install.tracked", token="tok_1")
    metrics = Metrics()
    standalone = StandaloneWorker(storage, rules, SETTINGS, {}, metrics=metrics,
                                  supervisor=Supervisor(metrics, first_delay=0.05))
    running = asyncio.create_task(standalone.run())

    async def processed() -> bool:
        event = await storage.inbox.get(event_id)
        return event is not None and event.status == "processed"

    await wait_until(processed, what="the restarted worker")
    assert metrics.counter("linkcrm_task_crashes_total", "", ("task",)).value(task="worker") == 1
    standalone.stop()
    await asyncio.wait_for(running, 10)
