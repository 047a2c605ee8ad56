"""`linkcrm explain`: what is not an event, and values the field map refuses, exit 1."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.paths import REPO

INSTALL = {"event": "install.tracked", "timestamp": "2026-03-01T12:30:00Z",
           "data": {"token": "tok_1", "platform": "BlackBerry"}}


def linkcrm(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], cwd=REPO, input=stdin,
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize(("body", "reason"), [
    ("[1, 2]", "standard input holds an array, not an event"),
    ("", "standard input is empty"),
    ("   \n", "standard input is empty"),
    ('{"data": {"token": "t"}}', 'standard input has no "event"'),
    ('{"event": 42}', 'standard input has an "event" that is not text'),
    ('"install.tracked"', "standard input holds text, not an event"),
    ('{"id": 1, "envelope": {"event": "test"}}', "is a line of `linkcrm events export`"),
])
def test_what_is_not_an_event_exits_1_with_the_reason(body: str, reason: str) -> None:
    result = linkcrm("explain", "-", stdin=body)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith("error: ") and reason in result.stderr


def test_an_empty_file_is_named(tmp_path: Path) -> None:
    empty = tmp_path / "event.json"
    empty.write_text("", encoding="utf-8")
    result = linkcrm("explain", str(empty))
    assert result.returncode == 1
    assert f"error: {empty} is empty" in result.stderr


def test_a_value_the_field_refuses_exits_1_naming_rule_and_field() -> None:
    result = linkcrm("explain", "-", stdin=json.dumps(INSTALL))
    assert result.returncode == 1
    assert ("error: rule 'install-creates-lead', upsert_contact: first_touch_platform: "
            "'blackberry' is not one of ios, android, web") in result.stdout
    as_json = linkcrm("explain", "-", "--target", "hubspot", "--format", "json",
                      stdin=json.dumps(INSTALL))
    assert as_json.returncode == 1
    document = json.loads(as_json.stdout)
    assert document["value_errors"] == [
        "rule 'install-creates-lead', upsert_contact: first_touch_platform: 'blackberry' is "
        "not one of ios, android, web"]
    assert document["actions"][0]["target"]["errors"] == [
        "first_touch_platform: 'blackberry' is not one of ios, android, web"]


def test_a_clean_event_still_exits_0() -> None:
    event = dict(INSTALL, data={"token": "tok_1", "platform": "iOS"})
    result = linkcrm("explain", "-", "--target", "salesforce", stdin=json.dumps(event))
    assert result.returncode == 0, result.stdout + result.stderr
    assert ('defaults (only when it creates the record): {"LastName": "Deep Link", '
            '"Company": "Unknown", "LeadSource": "Deep Link"}') in result.stdout
