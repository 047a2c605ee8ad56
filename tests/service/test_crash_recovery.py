"""Nothing acknowledged is lost, nothing is applied twice: SIGKILL mid-load, and duplicates.

The real server (`python -m engine.cli serve`, receiver and worker in one process) runs on
loopback with a SQLite database in tmp_path; the local CRM is read back through the storage.
"""

from __future__ import annotations

import asyncio
import hashlib
import queue
import threading
import time
from pathlib import Path

import httpx
import pytest

from engine.storage import InboxEvent, LocalContact, LocalDeal, open_storage
from tests.support.service_process import Server, service_env, signed, start_server, wait_for

EVENTS = 600  # the bounded load
KILL_AFTER = 150  # acknowledgements before the kill
CLIENTS = 8

pytestmark = pytest.mark.slow


def conversion(token: str) -> tuple[bytes, dict[str, str]]:
    return signed({"event": "referral.completed", "timestamp": "2026-03-20T08:15:00Z",
                   "data": {"token": token, "referrer_token": "tok_referrer"}})


def read_store(env: dict[str, str]) -> tuple[list[InboxEvent], list[LocalContact],
                                             list[LocalDeal]]:
    async def read() -> tuple[list[InboxEvent], list[LocalContact], list[LocalDeal]]:
        storage = open_storage(env["LINKCRM_DATABASE_URL"])
        try:
            return (await storage.inbox.list_events(limit=100_000),
                    await storage.local_crm.contacts(),
                    await storage.local_crm.deals())
        finally:
            await storage.close()

    return asyncio.run(read())


def wait_until_worked_off(server: Server, timeout: float = 60) -> None:
    def idle() -> bool:
        pending = [server.metric("linkcrm_inbox_events", status=s) for s in ("received", "failed")]
        return pending == [0, 0]

    wait_for(idle, timeout=timeout, what="the worker to finish the inbox")


def assert_durable(server: Server) -> None:
    """Read from the live server's own writing connection: FULL (2) or EXTRA (3), and WAL."""
    assert server.metric("linkcrm_storage_setting", setting="sqlite_synchronous") in (2, 3)
    assert server.metric("linkcrm_storage_setting", setting="sqlite_wal") == 1


def test_every_acknowledged_event_survives_sigkill_and_reaches_the_crm_once(
    tmp_path: Path,
) -> None:
    # One event at a time: the worker lags behind the receiver, so the kill finds it mid-work.
    env = service_env(tmp_path, LINKCRM_LEASE_SECONDS="2", LINKCRM_WORKER_CONCURRENCY="1")
    server = start_server(env)
    assert_durable(server)
    bodies = [conversion(f"crash_{n:04d}") for n in range(EVENTS)]
    work: queue.SimpleQueue[int] = queue.SimpleQueue()
    for n in range(EVENTS):
        work.put(n)
    acked: set[int] = set()
    cut_off: set[int] = set()  # sent before the kill, answered by a broken connection
    lock = threading.Lock()
    unsent: set[int] = set()
    killed = threading.Event()
    kill_at = [float("inf")]

    def client() -> None:
        with httpx.Client(base_url=server.url, timeout=10) as http:
            while not killed.is_set():
                try:
                    n = work.get_nowait()
                except queue.Empty:
                    return
                body, headers = bodies[n]
                started = time.monotonic()
                try:
                    response = http.post("/webhooks/tolinku", content=body, headers=headers)
                except httpx.TransportError:
                    with lock:
                        # Sent before the kill and never answered: it was in flight.
                        (cut_off if started < kill_at[0] else unsent).add(n)
                    continue
                if response.status_code == 200:
                    with lock:
                        acked.add(n)

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for thread in threads:
        thread.start()
    wait_for(lambda: len(acked) >= KILL_AFTER, timeout=60, what="the first acknowledgements")
    killed.set()
    kill_at[0] = time.monotonic()
    server.kill()
    for thread in threads:
        thread.join(timeout=30)
    # The kill landed mid-load: requests were on the wire, and more were still to come.
    assert cut_off, "no request was in flight at the kill"
    assert len(acked) < EVENTS and not work.empty()
    acked_before_kill = len(acked)
    # Straight from the file the killed process left: every acknowledged event is there, and
    # the worker was still behind (so the restart has work that the kill interrupted).
    stored, _, _ = read_store(env)
    stored_keys = {event.dedupe_key for event in stored}
    assert all(hashlib.sha256(bodies[n][0]).hexdigest() in stored_keys for n in acked)
    assert any(event.status in ("received", "failed") for event in stored)

    restarted = start_server(env)
    try:
        assert_durable(restarted)
        # Tolinku retries what it got no answer for; whatever the killed server had stored
        # comes back as a duplicate.
        with httpx.Client(base_url=restarted.url, timeout=10) as http:
            for n in sorted(cut_off | unsent):
                response = http.post("/webhooks/tolinku", content=bodies[n][0],
                                     headers=bodies[n][1])
                assert response.status_code == 200
                acked.add(n)
        wait_until_worked_off(restarted)
    finally:
        assert restarted.stop() in (0, -15), restarted.log.read_text()

    events, contacts, deals = read_store(env)
    by_key = {event.dedupe_key: event for event in events}
    for n in acked:
        assert hashlib.sha256(bodies[n][0]).hexdigest() in by_key, f"event {n} is missing"
    assert {event.status for event in events} == {"processed"}
    tokens = [c.identities[0].value for c in contacts]
    assert len(tokens) == len(set(tokens)) == len(events)  # one contact per event, no more
    assert {f"crash_{n:04d}" for n in acked} <= set(tokens)
    assert all([(h.from_stage, h.to_stage) for h in c.stage_history] == [(None, "customer")]
               for c in contacts)
    assert sorted(d.key for d in deals) == sorted(f"referral-{t}" for t in tokens)
    lost = sum(hashlib.sha256(bodies[n][0]).hexdigest() not in by_key for n in acked)
    print(f"\ncrash recovery: {acked_before_kill} acknowledged before SIGKILL, {len(acked)} in "
          f"all, {lost} lost, {len(tokens) - len(set(tokens))} duplicate contacts, "
          f"{len(deals) - len({d.key for d in deals})} duplicate deals")


def test_the_same_delivery_sent_five_times_at_once_is_applied_once(tmp_path: Path) -> None:
    env = service_env(tmp_path)
    server = start_server(env)
    body, headers = conversion("dup_0001")
    answers: list[dict[str, object]] = []
    start = threading.Barrier(5)

    def deliver() -> None:
        with httpx.Client(base_url=server.url, timeout=10) as http:
            start.wait()
            response = http.post("/webhooks/tolinku", content=body, headers=headers)
            assert response.status_code == 200
            answers.append(response.json())

    try:
        threads = [threading.Thread(target=deliver) for _ in range(5)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert sorted(str(a["status"]) for a in answers) == ["duplicate"] * 4 + ["stored"]
        assert len({a["id"] for a in answers}) == 1
        wait_until_worked_off(server)
        time.sleep(0.3)  # a second application, if any, would land now
    finally:
        assert server.stop() in (0, -15)
    events, contacts, deals = read_store(env)
    assert len(events) == len(contacts) == len(deals) == 1
    assert [(h.from_stage, h.to_stage) for h in contacts[0].stage_history] == [(None, "customer")]
