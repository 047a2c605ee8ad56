"""`linkcrm events export` through the real command line: JSON Lines for any stored value,
and redaction that keeps what rules read."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from engine.cli.redaction import Redactor
from tests.support.diff_story import record, recorded_story
from tests.support.service_process import ROOT, service_env


def linkcrm(*args: str, env: dict[str, str], stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], env=env, cwd=ROOT,
                          input=stdin, capture_output=True, text=True, timeout=60, check=False)


def _reject(name: str) -> Any:
    raise ValueError(f"{name} in the output")


def strict_lines(text: str) -> list[Any]:
    """Each line parsed as strict JSON (no NaN or Infinity literals)."""
    assert text.endswith("\n")
    return [json.loads(line, parse_constant=_reject) for line in text[:-1].split("\n")]


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return service_env(tmp_path)


def database(env: dict[str, str]) -> Path:
    return Path(env["LINKCRM_DATABASE_URL"].removeprefix("sqlite:///"))


def test_export_writes_each_event_on_a_line_newest_first(env: dict[str, str]) -> None:
    story = recorded_story()
    ids = record(database(env), story)
    done = linkcrm("events", "export", env=env)
    assert done.returncode == 0, done.stderr
    lines = strict_lines(done.stdout)
    assert [line["id"] for line in lines] == ids[::-1]
    assert [line["envelope"] for line in lines] == story[::-1]
    assert set(lines[0]) == {"id", "received_at", "source", "envelope"}
    assert lines[0]["source"] == "tolinku" and lines[0]["received_at"].endswith("Z")
    assert done.stderr.startswith("exported 5 event(s) received since ")
    limited = strict_lines(linkcrm("events", "export", "--limit", "2", env=env).stdout)
    assert [line["id"] for line in limited] == ids[::-1][:2]


def test_since_leaves_out_older_events(env: dict[str, str]) -> None:
    record(database(env), recorded_story()[:2],
           received_at=datetime.now(UTC) - timedelta(days=10))
    recent = record(database(env), recorded_story()[2:])
    done = linkcrm("events", "export", env=env)  # the default: 7 days
    assert [line["id"] for line in strict_lines(done.stdout)] == recent[::-1]
    assert len(strict_lines(linkcrm("events", "export", "--since", "30d", env=env).stdout)) \
        == 5
    bad = linkcrm("events", "export", "--since", "soon", env=env)
    assert bad.returncode == 2 and "'soon' is not a duration" in bad.stderr


DEEP = 400
ODD_BODIES = [
    # a lone surrogate, a NUL, a line separator, a C1 control and a bidi override in data
    b'{"event":"install.tracked","timestamp":"2026-03-01T00:00:00Z","data":{"token":'
    b'"t\\ud800x","prefix":"nul\\u0000here","campaign":"line\\u2028sep\\u0085c1\\u202eltr"}}',
    # a number past the float range and one of 300 digits
    b'{"event":"test","timestamp":"2026-03-01T00:00:00Z","data":{"big":1e400,"neg":-1e400,'
    b'"digits":' + b"9" * 300 + b"}}",
    # nesting as deep as the receiver lets through
    b'{"event":"test","timestamp":"2026-03-01T00:00:00Z","data":' + b'{"a":[' * DEEP
    + b'"bottom Ada Lovelace"' + b"]}" * DEEP + b"}",
    # NaN, which JSON cannot carry, and a body that is not JSON at all
    b'{"event":"test","timestamp":"2026-03-01T00:00:00Z","data":{"x":NaN}}',
    b"not json",
]


@pytest.mark.parametrize("redact", [False, True], ids=["plain", "redacted"])
def test_any_stored_value_stays_valid_json_lines(env: dict[str, str], tmp_path: Path,
                                                 redact: bool) -> None:
    record(database(env), [], bodies=ODD_BODIES)
    out = tmp_path / "events.jsonl"
    done = linkcrm("events", "export", "--output", str(out), *(["--redact"] * redact), env=env)
    assert done.returncode == 0, done.stderr
    raw = out.read_bytes()
    raw.decode("utf-8")  # valid UTF-8 throughout
    for invisible in ("\u2028", "\x85", "\u202e"):
        assert invisible.encode() not in raw  # escaped, so no reader splits or flips a line
    lines = strict_lines(raw.decode())
    assert len(lines) == 3
    assert "skipped 1 (body holds NaN, which JSON cannot carry); skipped 1 (body not JSON)" \
        in done.stderr
    deep, numbers, odd = (line["envelope"] for line in lines)
    assert numbers["data"] == json.loads(ODD_BODIES[1])["data"]  # inf, -inf, 300 digits
    assert odd["data"]["token"] == "t\ud800x"
    assert odd["data"]["prefix"] == "nul\x00here"
    node = deep["data"]
    for _ in range(DEEP):
        node = node["a"][0]
    if redact:
        assert node.startswith("text-") and len(node) == len("text-") + 12
    else:
        assert node == "bottom Ada Lovelace"
    diffed = linkcrm("diff", "rules", "rules", "--events", str(out), "--format", "json",
                     env=env)
    assert diffed.returncode == 0, diffed.stderr
    assert json.loads(diffed.stdout)["events"] == 3
    assert list(tmp_path.glob("events.jsonl.partial-*")) == []


def test_output_is_only_replaced_once_complete(env: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "events.jsonl"
    out.write_text("the previous export\n", encoding="utf-8")
    env["LINKCRM_DATABASE_URL"] = f"sqlite:///{tmp_path / 'missing.db'}"
    done = linkcrm("events", "export", "--output", str(out), env=env)
    assert done.returncode == 1 and "missing.db" in done.stderr
    assert out.read_text(encoding="utf-8") == "the previous export\n"
    assert list(tmp_path.glob("events.jsonl.partial-*")) == []


def test_redact_key_needs_redact(env: dict[str, str]) -> None:
    done = linkcrm("events", "export", "--redact-key", "k", env=env)
    assert done.returncode == 2 and "--redact-key needs --redact" in done.stderr


ENVELOPE = {
    "event": "app.user_identified", "timestamp": "2026-03-20T09:00:00Z",
    "data": {
        "token": "ref_sam", "email": " Sam.Sample@Example.com ", "first_name": "Sam",
        "lastName": "Sample", "name": "Sam Sample", "user_id": "user_42",
        "campaign": "Spring Sale 2026", "utm_content": "hero banner", "platform": "iOS",
        "ip": "203.0.113.7", "phone": "+1 555 0100", "message": "call me at noon",
        "note": "see sam.sample@example.com", "referral_url": "https://x.example/?r=sam@ex.io",
        "created": "2026-03-20 09:00:00", "amount": 42, "vip": True, "tags": ["a b", "ab"],
        "nested": {"display-name": "Sammy", "comment": "nice  one", "code": "X 1"},
    },
}


def test_redaction_replaces_emails_names_and_free_text_and_keeps_what_rules_read() -> None:
    redactor = Redactor("fixed key")
    hashed = redactor.envelope(ENVELOPE)
    data = hashed["data"]
    email = data["email"].strip()
    assert data["email"] == f" {email} " and email.startswith("user-")
    assert email.endswith("@redacted.invalid")
    for key in ("first_name", "lastName", "name"):
        assert data[key].startswith("name-"), key
    assert data["nested"]["display-name"].startswith("name-")
    for key in ("ip", "phone", "message"):
        assert data[key].startswith("text-"), key
    assert data["nested"]["comment"].startswith("text-")
    assert data["tags"][0].startswith("text-") and data["tags"][1] == "ab"
    assert data["note"].startswith("text-")
    assert data["referral_url"].startswith("https://x.example/?r=user-")
    kept = ("token", "user_id", "campaign", "utm_content", "platform", "created", "amount",
            "vip")
    assert {key: data[key] for key in kept} == {key: ENVELOPE["data"][key] for key in kept}
    assert data["nested"]["code"].startswith("text-")  # `code` is no key rules commonly read
    assert hashed["event"] == ENVELOPE["event"] and hashed["timestamp"] == ENVELOPE["timestamp"]
    text = json.dumps(hashed)
    for secret in ("Sam", "Sample", "203.0.113", "555", "noon", "sam@ex.io", "Sammy"):
        assert secret not in text, secret
    assert ENVELOPE["data"]["email"] == " Sam.Sample@Example.com "  # the original untouched


def test_placeholders_are_stable_within_an_export_and_repeatable_with_a_key() -> None:
    one, other = Redactor("k"), Redactor("k")
    assert one.text("Ada@Example.com", "email") == one.text("ada@example.com", "email") \
        == other.text("ada@example.com", "email")
    assert one.text("Ada", "first_name") == other.text("Ada", "first_name") != \
        one.text("Bea", "first_name")
    assert Redactor().text("Ada", "first_name") != Redactor().text("Ada", "first_name")
