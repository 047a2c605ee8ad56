"""Event data printed by the CLI cannot drive the terminal: escape sequences, line breaks, C1
controls, bidi overrides and lone surrogates from a webhook are shown escaped in text output,
and JSON output stays valid JSON that loads back to the very same values."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from engine.actions import IdentityKey
from engine.storage import NewEvent, NewOutcome, open_storage, utc_now
from tests.support.service_process import cli, service_env

pytestmark = pytest.mark.anyio

# Clears the screen, retitles the window, forges a line, CSI (C1), DEL, a line separator, a
# right-to-left override, NUL.
HOSTILE = "a\x1b[2J\x1b]0;pwned\x07\r\nFORGED line\x9b31m\x7f\u2028\u202e\x00z"
SURROGATE = "x\ud800"  # valid in JSON text, impossible to write as UTF-8
# A key (identity, deal key) cannot hold a NUL; stored errors and the event type show it as
# U+FFFD (both backends agree, see engine/storage/values.py); other characters are kept as is.
KEY = HOSTILE.replace("\x00", "")
DIAGNOSTIC = HOSTILE.replace("\x00", "\ufffd")
UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")



def assert_terminal_safe(text: str) -> None:
    """Nothing a terminal acts on, except the line ends the CLI writes itself, and no line
    that data could have started."""
    for line in text.split("\n"):
        assert not UNSAFE.search(line), repr(line)
    assert not re.search(r"^FORGED", text, re.MULTILINE), text


async def _hostile_database(env: dict[str, str]) -> None:
    storage = open_storage(env["LINKCRM_DATABASE_URL"])
    try:
        await storage.migrate()
        body = json.dumps({"event": "install.tracked", "timestamp": HOSTILE,
                           "data": {"token": HOSTILE + SURROGATE, "campaign": HOSTILE}})
        stored = await storage.inbox.store(NewEvent(
            body=body.encode(), event_type="install.tracked" + HOSTILE, event_timestamp=HOSTILE,
            dedupe_key="hostile", received_at=utc_now(), source="tolinku" + HOSTILE))
        [claimed] = await storage.inbox.claim("w", 1, 60)
        await storage.outcomes.record(NewOutcome(
            event_id=stored.id, rule="install-creates-lead", action_kind="upsert_contact",
            target="local", idempotency_key="k", status="dead", error="CRM said " + HOSTILE,
            response={"summary": "summary " + HOSTILE}))
        assert await storage.inbox.finish(claimed.id, "w", "dead", error="failed: " + HOSTILE)
        identity = [IdentityKey("deep_link_token", KEY)]
        await storage.local_crm.upsert_contact(identity, {"first_touch_campaign": HOSTILE}, {})
        await storage.local_crm.create_deal(identity, KEY, "Referral: " + KEY, None, None, {})
    finally:
        await storage.close()


async def test_event_values_are_escaped_in_text_and_exact_in_json(tmp_path: Path) -> None:
    env = service_env(tmp_path)
    await _hostile_database(env)
    for command in (["events", "list"], ["events", "list", "--status", "dead"],
                    ["events", "show", "1"], ["crm", "contacts"], ["crm", "deals"]):
        done = cli(*command, env=env)
        assert done.returncode == 0, done.stderr
        assert_terminal_safe(done.stdout + done.stderr)
        assert "\\x1b[2J" in done.stdout, (command, done.stdout)  # shown, escaped
    shown = cli("events", "show", "1", env=env).stdout
    # The stored error holds one problem a line: each is its own escaped, prefixed line.
    assert "  error: failed: a\\x1b[2J\\x1b]0;pwned\\x07\\r\n" \
        "  error: FORGED line\\x9b31m\\x7f\\u2028\\u202e\ufffdz\n" in shown

    def exact(*command: str) -> object:
        done = cli(*command, "--format", "json", env=env)
        assert done.returncode == 0, done.stderr
        assert_terminal_safe(done.stdout)
        return json.loads(done.stdout)

    [event] = exact("events", "list")
    assert (event["event"], event["last_error"]) == ("install.tracked" + DIAGNOSTIC,
                                                     "failed: " + DIAGNOSTIC)
    document = exact("events", "show", "1")
    assert isinstance(document, dict)
    assert document["body"]["data"]["token"] == HOSTILE + SURROGATE
    assert document["outcomes"][0]["error"] == "CRM said " + DIAGNOSTIC
    [contact] = exact("crm", "contacts")
    assert contact["identities"] == [{"field": "deep_link_token", "value": KEY}]
    assert contact["fields"]["first_touch_campaign"] == HOSTILE
    [deal] = exact("crm", "deals")
    assert (deal["key"], deal["title"]) == (KEY, "Referral: " + KEY)


def test_explain_escapes_the_event_it_is_given(tmp_path: Path) -> None:
    env = service_env(tmp_path)
    event, unknown = tmp_path / "event.json", tmp_path / "unknown.json"
    event.write_text(json.dumps({"event": "install.tracked", "timestamp": "2026-03-01T00:00:00Z",
                                 "data": {"token": HOSTILE + SURROGATE,
                                          "campaign": HOSTILE}}), encoding="utf-8")
    unknown.write_text(json.dumps({"event": HOSTILE, "data": {}}), encoding="utf-8")
    for command in ([str(event)], [str(event), "--target", "hubspot"], [str(unknown)]):
        done = cli("explain", *command, env=env)
        assert done.returncode == 0, done.stderr
        assert_terminal_safe(done.stdout + done.stderr)
        assert "\\x1b[2J" in done.stdout or "\\u001b[2J" in done.stdout, done.stdout
        done = cli("explain", *command, "--format", "json", env=env)
        assert done.returncode == 0, done.stderr
        assert_terminal_safe(done.stdout)
    assert "\\ud800" in cli("explain", str(event), env=env).stdout
    planned = json.loads(cli("explain", str(event), "--format", "json", env=env).stdout)
    assert planned["actions"][0]["identity"] == {"deep_link_token": HOSTILE + SURROGATE}
    assert json.loads(cli("explain", str(unknown), "--format", "json", env=env).stdout)[
        "event"]["event"] == HOSTILE
