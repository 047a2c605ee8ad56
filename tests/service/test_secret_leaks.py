"""No secret reaches a log line, an error or `--help`: a full `linkcrm serve` run into the three
emulated CRMs (and one on PostgreSQL with a password in its URL), good and bad deliveries,
the operations commands, then every secret value is looked for in everything printed."""

from __future__ import annotations

import json
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, quote_plus

import click
import httpx
import pytest

from engine.cli import main
from engine.rules.files import load_ruleset
from engine.runtime.redact import redact_url
from engine.runtime.settings import Settings
from tests.support.crm_stack import HUBSPOT_TOKEN, PIPEDRIVE_TOKEN, jwt_key, running
from tests.support.postgres import fresh_schema, require_postgres, schema_url
from tests.support.service_process import (
    API_KEY,
    ROOT,
    SECRET,
    cli,
    service_env,
    signed,
    start_server,
    wait_for,
)

pytestmark = pytest.mark.anyio
FIELD_MAP = load_ruleset([ROOT / "rules"]).field_map
DB_PASSWORD = "pw_" + secrets.token_hex(8)
CLIENT_SECRET = "sfsecret_" + secrets.token_hex(8)



@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A SQLite file, or a fresh PostgreSQL schema reached by a URL with a password in it
    (the test server trusts every connection, so any password is accepted)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'linkcrm.db'}"
        return
    require_postgres()
    with fresh_schema() as schema:
        url = schema_url(schema).replace("postgres@", f"postgres:{DB_PASSWORD}@", 1)
        assert DB_PASSWORD in url
        yield url


def _secret_values(env: dict[str, str]) -> dict[str, str]:
    values = {"WEBHOOK_SECRET": SECRET, "LINKCRM_API_KEYS": API_KEY,
              "HUBSPOT_ACCESS_TOKEN": HUBSPOT_TOKEN, "PIPEDRIVE_API_TOKEN": PIPEDRIVE_TOKEN}
    if "SF_CLIENT_SECRET" in env:
        values["SF_CLIENT_SECRET"] = env["SF_CLIENT_SECRET"]
    if "SF_PRIVATE_KEY" in env:  # every line of the key's body
        for number, line in enumerate(env["SF_PRIVATE_KEY"].splitlines()):
            if not line.startswith("-----"):
                values[f"SF_PRIVATE_KEY line {number}"] = line
    if DB_PASSWORD in env["LINKCRM_DATABASE_URL"]:
        values["database password"] = DB_PASSWORD
    return values


def _bad_deliveries(url: str) -> None:
    """Deliveries an attacker or a broken sender makes; each is refused."""
    good = {"event": "install.tracked", "timestamp": "2026-03-01T12:30:00Z",
            "data": {"token": "ref_leak", "campaign": "c"}}
    body, headers = signed(good)
    hook = f"{url}/webhooks/tolinku"
    with httpx.Client(timeout=10) as client:
        assert client.post(hook, content=body, headers={**headers,
                           "x-webhook-signature": "0" * 64}).status_code == 401
        assert client.post(hook, content=body, headers={
            "content-type": "application/json"}).status_code == 401
        broken, broken_headers = b"{not json", dict(headers)
        from engine.signing import sign
        broken_headers["x-webhook-signature"] = sign(broken, SECRET)
        assert client.post(hook, content=broken, headers=broken_headers).status_code == 400
        big = b'{"event":"install.tracked","data":{"x":"' + b"a" * 2_000_000 + b'"}}'
        assert client.post(hook, content=big, headers={
            **headers, "x-webhook-signature": sign(big, SECRET)}).status_code == 413
        identify = f"{url}/v1/identify"
        person = {"token": "ref_leak", "email": "leak@example.com"}
        assert client.post(identify, json=person, headers={
            "authorization": "Bearer wrong"}).status_code == 401
        assert client.post(identify, json=person).status_code == 401
        assert client.post(identify, json=person, headers={
            "authorization": f"Bearer {API_KEY}"}).status_code == 200
        assert client.post(hook, content=body, headers=headers).status_code == 200
        # a conversion the rules refuse (a dead letter, with its error stored and shown)
        dead = {"event": "referral.completed", "timestamp": "not a time",
                "data": {"token": "ref_leak"}}
        dead_body, dead_headers = signed(dead)
        assert client.post(hook, content=dead_body, headers=dead_headers).status_code == 200


async def test_no_secret_in_any_log_error_or_help(database: str, tmp_path: Path) -> None:
    printed: list[str] = []
    async with running(FIELD_MAP) as stack:
        stack.salesforce.client_secret = CLIENT_SECRET
        crm_env = stack.environ()
        env = service_env(tmp_path, **crm_env, LINKCRM_DATABASE_URL=database,
                          LINKCRM_LOG_LEVEL="DEBUG")
        server = start_server(env, log=tmp_path / "serve.log")
        try:
            sent = cli("send-samples", "--url", server.url, env=env)
            assert sent.returncode == 0, sent.stderr
            printed += [sent.stdout, sent.stderr]
            _bad_deliveries(server.url)
            wait_for(lambda: (server.metric("linkcrm_inbox_events", status="received") or 0) +
                     (server.metric("linkcrm_inbox_events", status="failed") or 0) == 0,
                     timeout=60, what="every event finished")
            for args in (["events", "list"], ["events", "list", "--format", "json"],
                         ["crm", "contacts"], ["crm", "deals"], ["replay", "--all-dead"]):
                done = cli(*args, env=env)
                printed += [done.stdout, done.stderr]
            shown = json.loads(cli("events", "list", "--format", "json", env=env).stdout)
            for event in shown:
                for output_format in ("text", "json"):
                    done = cli("events", "show", str(event["id"]), "--format", output_format,
                               env=env)
                    printed += [done.stdout, done.stderr]
            for target in ("hubspot", "salesforce", "pipedrive"):
                done = cli("doctor", target, env=env)
                printed += [done.stdout, done.stderr]
        finally:
            server.stop()
        log = server.log.read_text()
        assert '"event stored"' in log and '"request rejected"' in log
        for email in ("sam.sample@example.com", "leak@example.com"):  # personal data
            spellings = {email, quote(email, safe=""), quote_plus(email)}
            assert not any(spelling in log for spelling in spellings), f"{email} is in the log"
        printed.append(log)
        # A second serve on the same port, and the JWT flow with a private key
        key_env = {**env, "SF_PRIVATE_KEY": jwt_key(), "SF_USERNAME": "x@example.com"}
        key_env.pop("SF_CLIENT_SECRET")
        for run_env in (env, key_env):
            with socket.socket() as busy:
                busy.bind(("127.0.0.1", 0))
                busy.listen()
                done = cli("serve", "--port", str(busy.getsockname()[1]), env=run_env)
                printed += [done.stdout, done.stderr]
            done = cli("doctor", "salesforce", env=run_env)
            printed += [done.stdout, done.stderr]
    for bad_url in (database.replace("/test?", "/nosuchdb?") if "postgresql" in database
                    else f"sqlite:///{tmp_path}/missing/linkcrm.db",):
        done = cli("events", "list", env={**env, "LINKCRM_DATABASE_URL": bad_url})
        assert done.returncode != 0
        printed += [done.stdout, done.stderr]
    printed += _every_help(env)
    everything = "\n".join(printed)
    assert "install.tracked" in everything and "referral.completed" in everything
    leaked = {name for name, value in _secret_values({**env, **key_env}).items()
              if value in everything}
    assert not leaked, f"secrets printed: {sorted(leaked)}"


def _every_help(env: dict[str, str]) -> list[str]:
    outputs = []
    pending: list[list[str]] = [[]]
    while pending:
        path = pending.pop()
        done = cli(*path, "--help", env=env)
        assert done.returncode == 0, done.stderr
        outputs.append(done.stdout)
        command: click.Command = main
        for name in path:
            assert isinstance(command, click.Group)
            command = command.commands[name]
        if isinstance(command, click.Group):
            pending += [[*path, name] for name in command.commands]
    return outputs



@pytest.mark.parametrize(("url", "shown"), [
    ("postgresql://app:s3cret@db:5432/linkcrm?sslmode=require",
     "postgresql://app:***@db:5432/linkcrm?sslmode=require"),
    ("postgresql://app@db/linkcrm?password=s3cret&sslpassword=s3cret&application_name=x",
     "postgresql://app@db/linkcrm?password=***&sslpassword=***&application_name=x"),
    ("postgresql://app:s3/cr?et@db/linkcrm", "postgresql://***"),  # unescaped: unparseable
    ("postgresql://app:s3@cret@db/linkcrm", "postgresql://app:***@db/linkcrm"),
    ("sqlite:///linkcrm.db", "sqlite:///linkcrm.db"),
    ("sqlite:////var/lib/linkcrm.db", "sqlite:////var/lib/linkcrm.db"),
])
def test_database_urls_are_shown_without_their_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    settings = Settings.from_env({"LINKCRM_DATABASE_URL": url, "WEBHOOK_SECRET": "whsec_x"})
    assert "s3" not in repr(settings) and "whsec_x" not in repr(settings)
    assert f"database_url={shown!r}" in repr(settings)
