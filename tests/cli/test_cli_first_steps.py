"""What a new user meets first: a port that is taken, a command run in the wrong folder, a
database that is not there. Each is one clear error naming the port or the database."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.postgres import BASE_URL, require_postgres
from tests.support.service_process import ROOT, cli, service_env, start_server


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return service_env(tmp_path)


def test_a_second_serve_on_a_taken_port_says_so_and_exits_3(env: dict[str, str],
                                                             tmp_path: Path) -> None:
    first = start_server(env)
    try:
        other = {**env, "LINKCRM_DATABASE_URL": f"sqlite:///{tmp_path / 'other.db'}"}
        started = time.monotonic()
        second = cli("serve", "--port", str(first.port), env=other)
        assert time.monotonic() - started < 20
        assert second.returncode == 3, second.stderr
        assert second.stderr.startswith(f"error: cannot listen on 127.0.0.1:{first.port}: "
                                        f"port {first.port} is in use"), second.stderr
        assert f"--port {first.port + 1}" in second.stderr  # the fix
        assert len(second.stderr.strip().splitlines()) == 1, second.stderr
        assert not (tmp_path / "other.db").exists()  # stopped before touching anything
        assert first.process.poll() is None
        # send-samples signed with another secret: says which server refused it, and why
        wrong = cli("send-samples", "--url", first.url, env={**other,
                    "WEBHOOK_SECRET": "whsec_another"})
        assert wrong.returncode == 1
        assert f"the server at {first.url} refused the signature" in wrong.stderr
        assert "another process may hold the port" in wrong.stderr
    finally:
        first.stop()
    commands = (ROOT / "README.md").read_text(encoding="utf-8").split("## Commands", 1)[1]
    assert re.search(r"3 \(`serve` cannot listen", commands.split("\n## ", 1)[0])


READ_ONLY = [["events", "list"], ["events", "show", "1"], ["crm", "contacts"], ["crm", "deals"],
             ["replay", "1"], ["replay", "--all-dead"], ["purge", "--older-than", "30d"],
             ["worker"]]


def test_commands_other_than_serve_and_migrate_never_create_a_database(
        env: dict[str, str], tmp_path: Path) -> None:
    database = tmp_path / "linkcrm.db"
    for command in READ_ONLY:
        done = cli(*command, env=env)
        assert done.returncode == 1, (command, done.stderr)
        assert f"no database at {database}; run `linkcrm migrate` or `linkcrm serve` first" \
            in done.stderr, (command, done.stderr)
        assert not database.exists(), command
    assert cli("migrate", env=env).returncode == 0
    assert database.exists()
    assert cli("events", "list", env=env).stdout == "no events\n"


def test_the_default_database_outside_the_project_folder(tmp_path: Path) -> None:
    env = service_env(tmp_path)
    del env["LINKCRM_DATABASE_URL"]  # sqlite:///linkcrm.db, relative to where the user is
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = subprocess.run([sys.executable, "-m", "engine.cli", "crm", "contacts"], env=env,
                          cwd=elsewhere, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert f"no database at linkcrm.db (in {elsewhere})" in done.stderr, done.stderr
    assert list(elsewhere.iterdir()) == []


def test_a_database_in_a_missing_folder_is_named(env: dict[str, str], tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "linkcrm.db"
    env["LINKCRM_DATABASE_URL"] = f"sqlite:///{missing}"
    for command in (["migrate"], ["events", "list"]):
        done = cli(*command, env=env)
        assert done.returncode == 1 and str(missing) in done.stderr, done.stderr
        assert "unable to open database file" not in done.stderr
    assert "the folder " + str(missing.parent) + " does not exist" in cli(
        "migrate", env=env).stderr
    assert not missing.parent.exists()


def _url_with(password: str, database: str) -> str:
    base = BASE_URL.split("?", 1)[0].rsplit("/", 1)[0]
    assert "@" in base
    return base.replace("@", f":{password}@", 1) + "/" + database


def test_an_unreachable_postgresql_is_one_clear_line(env: dict[str, str]) -> None:
    require_postgres()
    env["LINKCRM_DATABASE_URL"] = _url_with("pw_secret_1", "nosuchdb")
    shown = _url_with("***", "nosuchdb")
    for command in (["events", "list"], ["migrate"], ["serve", "--port", "0"], ["worker"]):
        done = cli(*command, env=env)
        assert done.returncode == 1, (command, done.stderr)
        assert done.stderr == (f'error: cannot connect to {shown}: database "nosuchdb" does '
                               "not exist\n"), (command, done.stderr)
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    env["LINKCRM_DATABASE_URL"] = f"postgresql://postgres:pw_secret_1@127.0.0.1:{port}/test"
    done = cli("migrate", env=env)
    assert done.returncode == 1
    assert done.stderr == (f"error: cannot connect to postgresql://postgres:***@127.0.0.1:{port}"
                           "/test: Connection refused (is PostgreSQL running and listening "
                           "there?)\n"), done.stderr
