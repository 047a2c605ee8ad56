"""Scale-out on PostgreSQL: two receivers and two workers on one database, one worker killed.

Every process is the real entry point (`linkcrm serve --no-worker`, `linkcrm worker`). Both CRM
emulators lose some answers after committing. The recording CRM (tests/emulators/recording.py)
is always a target: it counts every call per idempotency key and flags two workers inside calls
for one event, or two events touching one identity, at the same moment. The second run adds the
HubSpot target against the strict HubSpot emulator, whose rate limit both workers must share.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import psycopg
import pytest

from engine.rules.files import load_ruleset
from engine.storage.postgres.store import PostgresStorage
from engine.targets.hubspot.admin import provision
from engine.worker.plan import prepare
from tests.emulators.faults import FaultInjector
from tests.emulators.hubspot import create_hubspot_emulator
from tests.emulators.hubspot_state import HubSpotState
from tests.emulators.recording import URL_VARIABLE, RecordingEmulator, RecordingState
from tests.emulators.server import serve as serve_app
from tests.support.loadgen import (
    ROOT,
    SECRET,
    LoadResult,
    drive,
    free_port,
    linkcrm,
    stop,
    wait_ready,
    webhook_body,
    webhook_request,
)
from tests.support.postgres import fresh_schema, require_postgres, schema_url

pytestmark = pytest.mark.slow

LEASE = 5.0
PEOPLE = 240
WAVES = 6
HUBSPOT_TOKEN = "pat-na1-scale-out"
HUBSPOT_LIMIT = 1000  # requests per 10 s


def _bodies() -> list[bytes]:
    """Installs for every person; a referral sign-up for a third of them and a conversion for
    a sixth, on the same token: later events of one identity that must wait for earlier ones."""
    bodies = []
    for person in range(PEOPLE):
        token = f"tok_{person:05d}"
        bodies.append(webhook_body(person, kind=0, token=token))
        if person % 3 == 0:
            bodies.append(webhook_body(person, kind=1, token=token))
        if person % 6 == 0:
            bodies.append(webhook_body(person, kind=2, token=token))
    return bodies


def _deliveries(bodies: list[bytes], ports: list[int]) -> list[list[tuple[int, bytes, int]]]:
    """Waves of (port, request, body index); every fifth body also goes to the other receiver
    in the same wave, so the copies race each other."""
    waves: list[list[tuple[int, bytes, int]]] = [[] for _ in range(WAVES)]
    for index, body in enumerate(bodies):
        wave = waves[index * WAVES // len(bodies)]
        port = ports[index % 2]
        wave.append((port, webhook_request(body, port), index))
        if index % 5 == 0:
            other = ports[(index + 1) % 2]
            wave.append((other, webhook_request(body, other), index))
    return waves


class Load(threading.Thread):
    """Sends the waves from its own event loop while the test watches the workers."""

    def __init__(self, waves: list[list[tuple[int, bytes, int]]]) -> None:
        super().__init__(daemon=True)
        self.waves = waves
        self.results: list[tuple[int, int, bytes]] = []  # (body index, status, answer)

    def run(self) -> None:
        for wave in self.waves:
            result: LoadResult = asyncio.run(drive([(p, r) for p, r, _ in wave], connections=32))
            for (_, _, index), status, answer in zip(wave, result.statuses, result.answers,
                                                     strict=True):
                self.results.append((index, status, answer))
            time.sleep(0.4)


def _query(url: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as connection:
        return connection.execute(sql, params).fetchall()


def _owned_by(process: subprocess.Popen[bytes]) -> str:
    # Worker ids are host:pid:random (engine.worker.loop).
    return f"%:{process.pid}:%"


@pytest.fixture
def crm() -> Iterator[tuple[str, RecordingState]]:
    state = RecordingState(latency=0.02)
    with serve_app(RecordingEmulator(state, drop_rate=0.08, seed=11)) as url:
        yield url, state


@pytest.fixture
def hubspot() -> Iterator[tuple[str, HubSpotState, FaultInjector]]:
    """The HubSpot emulator, provisioned for the shipped field map, allowing HUBSPOT_LIMIT
    requests per 10 s to the private app whatever the number of workers."""
    app, state = create_hubspot_emulator(HUBSPOT_TOKEN, rate_limit=HUBSPOT_LIMIT)
    asyncio.run(_provision(app))
    state.forget_requests()
    faults = FaultInjector(cast(Any, app), rate=0.05, kinds=("drop_after_commit",), seed=5)
    with serve_app(faults) as url:
        yield url, state, faults


async def _provision(app: Any) -> None:
    field_map = load_ruleset([ROOT / "rules"]).field_map
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app)) as client:
        await provision(client, HUBSPOT_TOKEN, field_map, base_url="http://hubspot")


def test_two_receivers_two_workers_one_worker_killed(
    tmp_path: Path, crm: tuple[str, RecordingState]
) -> None:
    _run(tmp_path, crm, {})


def test_the_same_with_hubspot_sharing_one_rate_limit(
    tmp_path: Path, crm: tuple[str, RecordingState],
    hubspot: tuple[str, HubSpotState, FaultInjector],
) -> None:
    url, state, faults = hubspot
    _run(tmp_path, crm, {"LINKCRM_TARGETS": "hubspot,recording",
                         "HUBSPOT_ACCESS_TOKEN": HUBSPOT_TOKEN, "HUBSPOT_BASE_URL": url,
                         "HUBSPOT_RATE_LIMIT": str(HUBSPOT_LIMIT)})
    # One contact per person and one deal per conversion, despite lost answers and a crash.
    tokens = Counter(r.properties.get("deep_link_token") for r in state.contacts.records.values())
    assert tokens == Counter(f"tok_{person:05d}" for person in range(PEOPLE))
    deals = Counter(r.properties.get("linkcrm_deal_key") for r in state.deals.records.values())
    assert deals == Counter(f"referral-tok_{p:05d}" for p in range(0, PEOPLE, 6))
    stages = Counter(r.properties.get("lifecyclestage") for r in state.contacts.records.values())
    assert stages == {"customer": PEOPLE // 6, "lead": PEOPLE - PEOPLE // 6}
    assert faults.injected.get("drop_after_commit", 0) > 0
    # Two workers, one limit: after the first window (where the pacer learns the limit from
    # the answers' headers) HubSpot never had to refuse a request.
    assert state.first_request_at is not None
    late = [t for t in state.throttled_at if t > state.first_request_at + 10]
    assert late == [], f"{len(late)} requests over HubSpot's limit after the first window"


def _run(tmp_path: Path, crm: tuple[str, RecordingState], extra: dict[str, str]) -> None:
    require_postgres()
    crm_url, state = crm
    bodies = _bodies()
    with fresh_schema("lc_scale") as schema:
        url = schema_url(schema)  # for the test's own queries
        env = {"WEBHOOK_SECRET": SECRET, "LINKCRM_DATABASE_URL": schema_url(schema, pool_size=4),
               "LINKCRM_LEASE_SECONDS": str(LEASE), "LINKCRM_TARGETS": "recording",
               URL_VARIABLE: crm_url, "LINKCRM_LOG_LEVEL": "WARNING",
               "LINKCRM_RULES": str(ROOT / "rules"), **extra}
        ports = [free_port(), free_port()]
        processes: list[subprocess.Popen[bytes]] = []
        try:
            # Both receivers migrate the empty schema at the same moment.
            for port in ports:
                processes.append(linkcrm(["serve", "--no-worker", "--port", str(port)], env,
                                         tmp_path / f"receiver-{port}.log"))
            for port, process in zip(ports, processes, strict=True):
                wait_ready(port, process, tmp_path / f"receiver-{port}.log")
            workers = [linkcrm(["worker", "--concurrency", "4"], env,
                               tmp_path / f"worker-{n}.log", module="tests.emulators.recording")
                       for n in range(2)]
            processes += workers
            load = Load(_deliveries(bodies, ports))
            load.start()
            victim = workers[0]
            held = _kill_when_busy(url, victim, len(bodies), tmp_path)
            killed_at = time.monotonic()
            leased = [row[0] for row in _query(
                url, "SELECT id FROM inbox WHERE status IN ('received', 'failed')"
                " AND lease_owner LIKE %s", (_owned_by(victim),))]
            assert held and leased, "the killed worker held no event: nothing was tested"
            reclaimed = _wait_until_reclaimed(url, victim, leased, killed_at, deadline=30)
            load.join(timeout=60)
            assert not load.is_alive()
            _wait_until_drained(url, len(bodies), deadline=45, logs=tmp_path)
        finally:
            stop(processes)
        _check(url, bodies, load.results, state, leased)
    # The killed worker's events came back once its lease ran out: the surviving worker took
    # each of them within two lease lengths. (Finishing them may take longer: the CRM's
    # Retry-After and the retry backoff after a lost answer are waits the worker must honour.)
    late = {event_id: round(after, 1) for event_id, after in reclaimed.items()
            if after > 2 * LEASE}
    assert late == {}, f"events not taken over within two lease lengths of the kill: {late}"


def _kill_when_busy(url: str, victim: subprocess.Popen[bytes], total: int, logs: Path
                    ) -> bool:
    """SIGKILL the worker once a quarter of the events are done and it holds leases."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done = _query(url, "SELECT count(*) FROM inbox WHERE status = 'processed'")[0][0]
        holding = _query(url, "SELECT count(*) FROM inbox WHERE lease_owner LIKE %s"
                         " AND status IN ('received', 'failed')", (_owned_by(victim),))[0][0]
        if done >= total // 4 and holding:
            os.kill(victim.pid, signal.SIGKILL)
            victim.wait()
            return True
        if victim.poll() is not None:
            raise AssertionError(f"the worker exited early:\n{_logs(logs)}")
        time.sleep(0.02)
    raise AssertionError(f"the workers made no progress:\n{_logs(logs)}")


def _wait_until_reclaimed(url: str, victim: subprocess.Popen[bytes], leased: list[int],
                          killed_at: float, *, deadline: float) -> dict[int, float]:
    """Seconds after the kill at which each of the dead worker's events left its hands: another
    worker leased it, or it was finished or rescheduled by one."""
    taken: dict[int, float] = {}
    until = killed_at + deadline
    while time.monotonic() < until and len(taken) < len(leased):
        still_held = {row[0] for row in _query(
            url, "SELECT id FROM inbox WHERE id = ANY(%s) AND lease_owner LIKE %s",
            (leased, _owned_by(victim)))}
        now = time.monotonic()
        for event_id in leased:
            if event_id not in still_held and event_id not in taken:
                taken[event_id] = now - killed_at
        time.sleep(0.05)
    missing = sorted(set(leased) - set(taken))
    assert missing == [], f"events still held by the dead worker after {deadline} s: {missing}"
    return taken


def _wait_until_drained(url: str, total: int, *, deadline: float, logs: Path) -> None:
    until = time.monotonic() + deadline
    while time.monotonic() < until:
        finished = _query(url, "SELECT count(*) FROM inbox"
                               " WHERE status IN ('processed', 'ignored', 'dead')")[0][0]
        if finished >= total:
            return
        time.sleep(0.1)
    rows = _query(url, "SELECT id, status, attempts, lease_owner, last_error FROM inbox"
                       " WHERE status NOT IN ('processed', 'ignored', 'dead') LIMIT 10")
    raise AssertionError(f"events still unfinished: {rows}\n{_logs(logs)}")


def _logs(directory: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(
        directory.glob("*.log")))


def _check(url: str, bodies: list[bytes], results: list[tuple[int, int, bytes]],
           state: RecordingState, leased: list[int]) -> None:
    # Every delivery was acknowledged; each body was stored once, whichever receiver got it.
    assert [status for _, status, _ in results if status != 200] == []
    answers = [json.loads(answer)["status"] for _, _, answer in results]
    assert answers.count("stored") == len(bodies)
    inbox = _query(url, "SELECT id, dedupe_key, status, updated_at FROM inbox ORDER BY id")
    by_key = {key: event_id for event_id, key, _, _ in inbox}
    assert len(inbox) == len(bodies)
    assert set(by_key) == {hashlib.sha256(body).hexdigest() for body in bodies}
    assert {status for _, _, status, _ in inbox} == {"processed"}

    # Every planned action reached the CRM exactly once: one record per idempotency key, for
    # the right event, and no call beyond a retry after a lost answer or the crash.
    events = asyncio.run(_events(url))
    ruleset = load_ruleset([ROOT / "rules"])
    expected = {keyed.key: event.id for event in events
                for keyed in prepare(event, ruleset).actions}
    with state.lock:
        records = dict(state.records)
        calls, dropped = dict(state.calls), dict(state.dropped)
        concurrent, overlaps = list(state.concurrent_events), list(state.identity_overlaps)
    assert {key: record.event for key, record in records.items()} == expected
    crashed = set(leased)
    unexplained = {key: calls[key] for key in records
                   if calls[key] > 1 + dropped.get(key, 0) + (records[key].event in crashed)}
    assert unexplained == {}, "an action was processed again without a lost answer or crash"
    assert sum(dropped.values()) > 0, "no answer was lost: the retry path was not tested"
    assert concurrent == [], "two workers processed one event at the same time"
    assert overlaps == [], "two events of one identity were applied at the same time"

    # Per identity, arrival order: an earlier event's records all precede a later one's.
    by_identity: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for record in records.values():
        for field, value in record.identity:
            by_identity[f"{field}={value}"].append((record.event, record.sequence))
    for identity, seen in by_identity.items():
        ordered = [event for event, _ in sorted(seen, key=lambda pair: pair[1])]
        assert ordered == sorted(ordered), f"{identity} applied out of order: {ordered}"


async def _events(url: str) -> list[Any]:
    storage = PostgresStorage.from_url(url)
    try:
        return await storage.inbox.list_events(limit=100_000)
    finally:
        await storage.close()
