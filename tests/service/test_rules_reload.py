"""Done when (issue 10): a rule fix ships to running processes without a restart.

`serve` on SQLite, and `serve --no-worker` with two `linkcrm worker` processes on PostgreSQL,
start with a rule set that dead-letters an install that names its platform (the install date
is read from the platform by mistake, and "iOS" is no date). While events flow, the fixed
rules are published; the dead event is replayed and processed with the new rules, without a
restart; every outcome carries the version that planned it; `rules activate` of the old
version brings the old plan back for new events; `kill -HUP` republishes the rules folder.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine.rules.versions import collect
from engine.storage import InboxEvent, open_storage
from tests.support.paths import REPO
from tests.support.postgres import fresh_schema, require_postgres, schema_url
from tests.support.service_process import (
    cli,
    cli_json,
    service_env,
    signed,
    start_server,
    wait_for,
)

pytestmark = pytest.mark.slow

PICK_UP_SECONDS = 2.0
SIGHUP_SECONDS = 30.0


def broken_rules(folder: Path) -> Path:
    """The shipped rules with the install date read from the platform first: an install that
    names its platform ("iOS" is no date) fails to plan its contact upsert and is dead. No rule
    tests (they would refuse it)."""
    folder.mkdir()
    shutil.copy(REPO / "rules" / "fields.yaml", folder)
    text = (REPO / "rules" / "attribution.yaml").read_text()
    fixed = "install_date: to_date(timestamp)"
    assert fixed in text
    (folder / "attribution.yaml").write_text(
        text.replace(fixed, "install_date: to_date(data.platform || timestamp)", 1))
    return folder


def fixed_rules(folder: Path) -> Path:
    shutil.copytree(REPO / "rules", folder)
    return folder


def install(token: str, platform: str | None = "iOS") -> dict[str, Any]:
    """An install; without `platform` it names a `device_type` (which every version reads)."""
    data = {"token": token, "prefix": "invite"}
    data.update({"platform": platform} if platform else {"device_type": "web"})
    return {"event": "install.tracked", "timestamp": "2026-03-01T12:00:00Z", "data": data}


@dataclass
class Flow:
    """Sends installs without a platform (every version handles them) until stopped."""

    url: str
    sent: int = 0
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Flow:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(timeout=10)

    def _run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self._stop.is_set():
                body, headers = signed(install(f"tok_flow_{self.sent}", None))
                answer = client.post(f"{self.url}/webhooks/tolinku", content=body,
                                     headers=headers)
                if answer.status_code != 200:
                    self.failures.append(f"{answer.status_code} {answer.text[:200]}")
                self.sent += 1
                time.sleep(0.05)


def send(url: str, document: dict[str, Any]) -> None:
    body, headers = signed(document)
    answer = httpx.post(f"{url}/webhooks/tolinku", content=body, headers=headers, timeout=10)
    assert answer.status_code == 200, answer.text


def _find(env: dict[str, str], token: str) -> InboxEvent | None:
    """The stored event whose body carries `token` (read straight from the database: a CLI
    call per event would make the test crawl)."""

    async def find() -> InboxEvent | None:
        storage = open_storage(env["LINKCRM_DATABASE_URL"], create=False)
        try:
            for event in await storage.inbox.list_events(limit=5000):
                if event.body is not None and json.loads(event.body)["data"]["token"] == token:
                    return event
            return None
        finally:
            await storage.close()

    return asyncio.run(find())


def event_of(env: dict[str, str], token: str) -> dict[str, Any]:
    """`events show --format json` of the event whose body carries `token`."""
    found = _find(env, token)
    assert found is not None, f"no event for {token}"
    shown: dict[str, Any] = cli_json("events", "show", str(found.id), env=env)
    return shown


def settled(env: dict[str, str], token: str, status: str) -> Callable[[], bool]:
    def check() -> bool:
        found = _find(env, token)
        return found is not None and found.status == status
    return check


def flowed_ids(env: dict[str, str]) -> list[int]:
    async def ids() -> list[int]:
        storage = open_storage(env["LINKCRM_DATABASE_URL"], create=False)
        try:
            return sorted(e.id for e in await storage.inbox.list_events(limit=5000)
                          if e.body is not None and b"tok_flow_" in e.body)
        finally:
            await storage.close()

    return asyncio.run(ids())


def versions_of(shown: dict[str, Any]) -> set[str]:
    return {o["rules_version"] for o in shown["outcomes"]}


def story(env: dict[str, str], url: str, rules: Path, tmp_path: Path,
          picked_up: Callable[[str, float], None], hang_up: Callable[[], None]) -> None:
    """The whole story against running processes; `picked_up(v)` returns once every process
    runs version v (or fails after PICK_UP_SECONDS)."""
    broken = collect([rules]).version
    fixed_folder = fixed_rules(tmp_path / "fixed")
    fixed = collect([fixed_folder]).version
    picked_up(broken, PICK_UP_SECONDS)

    send(url, install("tok_dead"))
    wait_for(settled(env, "tok_dead", "dead"), timeout=60, what="the iOS install dead-lettered")
    dead = event_of(env, "tok_dead")
    assert "'iOS' is not an ISO 8601 timestamp" in dead["last_error"]
    assert versions_of(dead) == {broken}  # its stage was set; the upsert never planned

    with Flow(url) as flow:
        published = cli("rules", "publish", str(fixed_folder), env=env)
        assert published.returncode == 0, published.stderr
        assert f"published {fixed}" in published.stdout
        picked_up(fixed, PICK_UP_SECONDS)
        replayed = cli("replay", "--all-dead", env=env)
        assert replayed.returncode == 0, replayed.stderr
        wait_for(settled(env, "tok_dead", "processed"), timeout=60,
                 what="the dead event processed with the fixed rules")
        time.sleep(0.5)
    assert flow.failures == [] and flow.sent > 5
    again = event_of(env, "tok_dead")
    # The upsert was planned by the fix; the stage, done before, keeps the version that did it.
    assert {(o["action"], o["status"], o["rules_version"]) for o in again["outcomes"]} == {
        ("upsert_contact", "ok", fixed), ("set_stage", "ok", broken)}

    # Events that flowed meanwhile: each was planned once, with the snapshot of its claim, so
    # its outcomes name one version; the first ran the old one, the last the new one.
    rows = flowed_ids(env)
    flowed = [cli_json("events", "show", str(event_id), env=env)
              for event_id in (rows[0], rows[-1])]
    assert [versions_of(shown) for shown in flowed] == [{broken}, {fixed}]

    # Roll back: a new iOS install is planned by the old version again, and dies again.
    rolled = cli("rules", "activate", broken, env=env)
    assert rolled.returncode == 0, rolled.stderr
    picked_up(broken, PICK_UP_SECONDS)
    send(url, install("tok_after_rollback"))
    wait_for(settled(env, "tok_after_rollback", "dead"), timeout=60, what="the old plan")
    assert versions_of(event_of(env, "tok_after_rollback")) == {broken}
    assert "'iOS' is not an ISO 8601 timestamp" in event_of(env, "tok_after_rollback")[
        "last_error"]

    # SIGHUP: the rules folder now holds the fix; every process runs it again.
    shutil.copy(fixed_folder / "attribution.yaml", rules / "attribution.yaml")
    shutil.copy(fixed_folder / "attribution_test.yaml", rules / "attribution_test.yaml")
    shutil.copytree(fixed_folder / "events", rules / "events")
    folder_version = collect([rules]).version
    assert folder_version == fixed  # the retired fix: SIGHUP activates it again
    hang_up()  # the rule checks and tests run first: more than the 2 s of a publish
    picked_up(folder_version, SIGHUP_SECONDS)
    send(url, install("tok_after_hangup"))
    wait_for(settled(env, "tok_after_hangup", "processed"), timeout=60, what="the SIGHUP fix")
    assert versions_of(event_of(env, "tok_after_hangup")) == {folder_version}


def test_serve_on_sqlite_follows_published_rules(tmp_path: Path) -> None:
    rules = broken_rules(tmp_path / "rules")
    env = service_env(tmp_path, LINKCRM_RULES=str(rules), LINKCRM_LOG_LEVEL="INFO")
    server = start_server(env)
    try:
        def picked_up(version: str, within: float) -> None:
            wait_for(lambda: server.metric("linkcrm_rules_info", role="active",
                                           version=version) == 1,
                     timeout=within, what=f"serve running rules {version}")

        def hang_up() -> None:
            server.process.send_signal(signal.SIGHUP)

        story(env, server.url, rules, tmp_path, picked_up, hang_up)
        assert server.process.poll() is None
    finally:
        server.stop()
    log = server.log.read_text()
    assert "rules version" in log and "active (was" in log


@pytest.fixture
def postgres_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    require_postgres()
    rules = broken_rules(tmp_path / "rules")
    with fresh_schema() as schema:
        yield service_env(tmp_path, LINKCRM_DATABASE_URL=schema_url(schema),
                          LINKCRM_RULES=str(rules), LINKCRM_LOG_LEVEL="INFO")


def test_two_workers_on_postgres_follow_published_rules(
    postgres_env: dict[str, str], tmp_path: Path
) -> None:
    env = postgres_env
    rules = Path(env["LINKCRM_RULES"])
    server = start_server(env, "--no-worker", log=tmp_path / "serve.log")
    logs = [tmp_path / f"worker{n}.log" for n in (1, 2)]
    workers: list[subprocess.Popen[bytes]] = []
    for log in logs:
        with log.open("ab") as sink:
            workers.append(subprocess.Popen(
                [sys.executable, "-m", "engine.cli", "worker"], env=env, cwd=REPO,
                stdout=sink, stderr=sink))
    try:
        def picked_up(version: str, within: float) -> None:
            """Each worker logs "rules version V active" when it starts with or switches to
            V: both must, within the time given (the first time: once they have started)."""
            def both() -> bool:
                return all(log.read_text().count(f"rules version {version} active") >= count
                           for log, count in zip(logs, expected(version), strict=True))
            wait_for(both, timeout=within if started[0] else 60,
                     what=f"both workers running rules {version}")
            started[0] = True
            seen[version] = seen.get(version, 0) + 1

        seen: dict[str, int] = {}
        started = [False]

        def expected(version: str) -> list[int]:
            return [seen.get(version, 0) + 1] * 2

        def hang_up() -> None:
            workers[0].send_signal(signal.SIGHUP)

        story(env, server.url, rules, tmp_path, picked_up, hang_up)
        assert all(worker.poll() is None for worker in workers)
        assert server.process.poll() is None
    finally:
        server.stop()
        for worker in workers:
            if worker.poll() is None:
                worker.terminate()
        for worker in workers:
            try:
                worker.wait(timeout=20)
            except subprocess.TimeoutExpired:
                worker.kill()
    for log in logs:
        assert "Traceback" not in log.read_text()
