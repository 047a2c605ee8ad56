"""The service and operations commands through `python -m engine.cli`: exit codes and output."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import httpx
import pytest
import uvicorn
from click.testing import CliRunner

from engine.cli import main
from engine.storage.sqlite.schema import LATEST
from engine.storage.sqlite.store import SQLiteStorage
from tests.support.service_process import (
    ROOT,
    cli,
    cli_json,
    service_env,
    signed,
    start_server,
    wait_for,
)

SERVICE_COMMANDS = [
    ["serve"], ["worker"], ["migrate"], ["events"], ["events", "list"], ["events", "show"],
    ["events", "export"],
    ["rules"], ["rules", "publish"], ["rules", "list"], ["rules", "activate"],
    ["replay"], ["crm"], ["crm", "contacts"], ["crm", "deals"], ["purge"], ["send-samples"],
]


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return service_env(tmp_path)


@pytest.fixture
def migrated(env: dict[str, str]) -> dict[str, str]:
    done = cli("migrate", env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith(f"schema at version {LATEST}")
    return env


def test_serve_refuses_to_start_without_a_webhook_secret(env: dict[str, str]) -> None:
    del env["WEBHOOK_SECRET"]
    done = cli("serve", "--port", "1", env=env)
    assert done.returncode == 2 and done.stdout == ""
    assert "WEBHOOK_SECRET is not set" in done.stderr
    assert "export WEBHOOK_SECRET=whsec_$(python3 -c" in done.stderr


def test_serve_refuses_an_unknown_target_before_binding(env: dict[str, str]) -> None:
    env["LINKCRM_TARGETS"] = "locl"
    done = cli("serve", "--port", "1", env=env)
    assert done.returncode == 2
    assert "unknown-target" in done.stderr and "did you mean 'local'" in done.stderr


def test_bad_settings_are_usage_errors(env: dict[str, str]) -> None:
    env["LINKCRM_WORKER_CONCURRENCY"] = "lots"
    done = cli("events", "list", env=env)
    assert done.returncode == 2 and "LINKCRM_WORKER_CONCURRENCY" in done.stderr


def test_a_database_without_schema_says_to_migrate(env: dict[str, str]) -> None:
    done = cli("events", "list", env=env)
    assert done.returncode == 1 and "linkcrm migrate" in done.stderr


@pytest.fixture
def root_logging() -> Iterator[None]:
    """Put the root logger back after an in-process `serve` configured JSON logging."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.parametrize("worker", [True, False], ids=["with-worker", "no-worker"])
def test_serve_migrates_the_database_once(
    env: dict[str, str], worker: bool, monkeypatch: pytest.MonkeyPatch, root_logging: None
) -> None:
    """The schema is created before the targets start and then served as it is: one
    migration per start, with or without the in-process worker."""
    migrations: list[str] = []
    migrate = SQLiteStorage.migrate

    async def counted(self: SQLiteStorage) -> int:
        migrations.append(self.path)
        return await migrate(self)

    async def serve_nothing(self: uvicorn.Server, sockets: object = None) -> None:
        pass  # the app is built on the open storage; serving it is not the point here

    monkeypatch.setattr(SQLiteStorage, "migrate", counted)
    monkeypatch.setattr(uvicorn.Server, "serve", serve_nothing)
    args = ["serve", "--port", "0", *([] if worker else ["--no-worker"])]
    result = CliRunner().invoke(main, args, env=env)
    assert result.exit_code == 0, result.output
    assert migrations == [env["LINKCRM_DATABASE_URL"].removeprefix("sqlite:///")]


def test_listings_on_an_empty_database(migrated: dict[str, str]) -> None:
    assert cli_json("events", "list", env=migrated) == []
    assert cli_json("crm", "contacts", env=migrated) == []
    assert cli_json("crm", "deals", env=migrated) == []
    assert cli("events", "list", env=migrated).stdout == "no events\n"


def test_usage_and_lookup_errors(migrated: dict[str, str]) -> None:
    missing = cli("events", "show", "999", env=migrated)
    assert missing.returncode == 1 and "no event 999" in missing.stderr
    nothing = cli("replay", env=migrated)
    assert nothing.returncode == 2 and "name event ids" in nothing.stderr
    unknown = cli("replay", "999", env=migrated)
    assert unknown.returncode == 1 and "event 999 was not re-queued" in unknown.stderr
    bad_age = cli("purge", "--older-than", "a month", env=migrated)
    assert bad_age.returncode == 2 and "use e.g. 30d" in bad_age.stderr
    assert cli_json("purge", "--older-than", "30d", env=migrated)["purged"] == 0


def test_every_service_command_has_help_with_an_example() -> None:
    for path in SERVICE_COMMANDS:
        command: click.Command = main
        for name in path:
            assert isinstance(command, click.Group)
            command = command.commands[name]
        assert command.help is not None and "Example" in command.help, path
    done = cli("serve", "--help", env={})
    assert done.returncode == 0 and "linkcrm serve --port 8000" in done.stdout


def test_first_run_story_from_send_samples_to_crm_contacts(env: dict[str, str]) -> None:
    server = start_server(env)
    try:
        url = ["--url", server.url]
        sent = cli("send-samples", *url, env=env)
        assert sent.returncode == 0, sent.stderr
        assert sent.stdout.count("-> 200 stored") == 4  # three webhooks and the identify call
        again = cli_json("send-samples", *url, env=env)
        assert [row["status"] for row in again] == ["duplicate"] * 4

        def customer() -> bool:
            contacts = cli_json("crm", "contacts", env=env)
            return bool(contacts) and contacts[0]["stage"] == "customer" and \
                "email" in contacts[0]["fields"]

        wait_for(customer, timeout=30, what="the sample contact")
        [contact] = cli_json("crm", "contacts", env=env)
        assert [(h["from"], h["to"]) for h in contact["stage_history"]] == [
            (None, "lead"), ("lead", "customer")]
        assert contact["fields"]["first_touch_campaign"] == "spring-referrals"
        assert contact["fields"]["name"] == "Sam Sample"
        [deal] = cli_json("crm", "deals", env=env)
        assert (deal["key"], deal["contact_id"]) == ("referral-ref_sample_sam", contact["id"])
        text = cli("crm", "contacts", env=env).stdout
        assert "stage lead -> customer" in text

        body, headers = signed({"event": "link.clicked", "timestamp": "2026-03-01T00:00:00Z",
                                "data": {"token": "t"}})
        clicked = httpx.post(f"{server.url}/webhooks/tolinku", content=body, headers=headers)
        wait_for(lambda: cli_json("events", "list", "--status", "ignored", env=env),
                 what="the ignored click")

        events = cli_json("events", "list", env=env)
        assert {e["status"] for e in events} == {"processed", "ignored"}
        shown = cli_json("events", "show", "3", env=env)
        assert shown["event"] == "referral.completed"
        assert shown["plan"]["matched"] == ["referral-converts"]
        assert [(o["target"], o["action"], o["status"]) for o in shown["outcomes"]] == [
            ("local", "upsert_contact", "ok"), ("local", "set_stage", "ok"),
            ("local", "create_deal", "ok")]
        text = cli("events", "show", "3", env=env).stdout
        assert "rules matched (as the rules are now): referral-converts" in text
        assert "local: create_deal (rule referral-converts) -> ok" in text

        replayed = cli_json("replay", "3", str(clicked.json()["id"]), env=env)
        assert {key: replayed[key] for key in ("requeued", "refused", "pinned")} == {
            "requeued": sorted([3, clicked.json()["id"]]), "refused": [], "pinned": False}
        wait_for(lambda: cli_json("events", "show", "3", env=env)["status"] == "processed",
                 what="the replay")
        assert len(cli_json("crm", "deals", env=env)) == 1
        assert server.metric("linkcrm_events_processed_total", status="processed") == 5
        assert server.metric("linkcrm_actions_total", target="local", outcome="ok") == 8
    finally:
        server.stop()
    assert json.loads(cli("crm", "contacts", "--format", "json", env=env).stdout)


def test_the_standalone_worker_applies_what_serve_no_worker_stored(env: dict[str, str]) -> None:
    server = start_server(env, "--no-worker")
    try:
        sent = cli("send-samples", "--url", server.url, env=env)
        assert sent.returncode == 0, sent.stderr
        assert cli_json("crm", "contacts", env=env) == []  # nothing applies them yet
    finally:
        server.stop()
    worker = subprocess.Popen([sys.executable, "-m", "engine.cli", "worker", "--concurrency", "2"],
                              env={**env, "LINKCRM_LOG_LEVEL": "INFO"}, cwd=ROOT,
                              stderr=subprocess.PIPE)
    try:
        wait_for(lambda: len(cli_json("crm", "deals", env=env)) == 1, what="the worker")
    finally:
        worker.terminate()
        _, stderr = worker.communicate(timeout=20)
    assert worker.returncode == 0, stderr
    assert b"worker stopped" in stderr
