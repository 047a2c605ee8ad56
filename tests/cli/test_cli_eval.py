"""`linkcrm eval EXPR [EVENT]` through the real command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.support.paths import REPO

EVENT = "rules/events/referral_completed_b.json"


def linkcrm(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], cwd=REPO, input=stdin,
                          capture_output=True, text=True, timeout=60, check=False)


def test_prints_the_value_and_its_type() -> None:
    result = linkcrm("eval", "lower(data.referral_code)", EVENT)
    assert result.returncode == 0, result.stderr
    assert result.stdout == '"carol-42"  (string)\n'
    assert linkcrm("eval", "data.missing", EVENT).stdout == "null  (null)\n"
    assert linkcrm("eval", "length(data)", EVENT).stdout == "4  (number)\n"


def test_custom_functions_work_and_json_output_has_value_and_type() -> None:
    result = linkcrm("eval", "to_epoch_ms(timestamp)", EVENT, "--format", "json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"value": 1773994500000, "type": "number"}  # 08:15Z


def test_an_evaluation_error_exits_1_with_a_caret_under_the_call() -> None:
    result = linkcrm("eval", "data.referrer_id && to_date(data.referral_code)", EVENT)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert lines[0] == ("error: to_date(): 'CAROL-42' is not an ISO 8601 timestamp (expected "
                        "e.g. '2026-03-01T12:30:00Z' or '2026-03-01')")
    assert lines[1:] == ["    data.referrer_id && to_date(data.referral_code)",
                         "                        ^"]
    as_json = json.loads(linkcrm("eval", "to_date(data.referral_code)", EVENT, "--format",
                                 "json").stdout)
    assert as_json["column"] == 1 and as_json["error"].startswith("to_date(): ")


def test_a_bad_expression_exits_2_with_the_caret_and_a_hint() -> None:
    result = linkcrm("eval", "lower(data.platform", EVENT)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "expression-syntax: invalid JMESPath syntax: this '(' is never closed",
        "    lower(data.platform",
        "         ^",
        "    hint: close it with ')' where its arguments end",
    ]
    unknown = linkcrm("eval", "lowr(data.platform)", EVENT, "--format", "json")
    assert unknown.returncode == 2
    assert json.loads(unknown.stdout)["error"]["hint"] == "did you mean lower()?"


def test_without_event_it_reads_json_lines_from_stdin() -> None:
    lines = [{"event": "install.tracked", "data": {"referrer_id": "partner-7"}},
             {"event": "install.tracked", "data": {}},
             {"id": 9, "received_at": "2026-03-01T00:00:00Z",
              "envelope": {"event": "install.tracked", "data": {"referrer_id": "user_1"}}}]
    stdin = "\n".join(json.dumps(line) for line in lines) + "\n"
    result = linkcrm("eval", "starts_with(data.referrer_id, 'partner-')", stdin=stdin)
    assert result.returncode == 1  # the event without referrer_id fails
    assert result.stdout.splitlines()[0] == "line 1: true  (boolean)"
    assert result.stdout.splitlines()[1:4] == [
        "line 2: error: starts_with() wants string here, got null (a missing field is null: "
        "give a default with || '' or test it first)",
        "    starts_with(data.referrer_id, 'partner-')",
        "                ^"]
    assert result.stdout.splitlines()[-1] == "line 3: false  (boolean)"
    assert result.stderr == ("warning: starts_with() fails when data.referrer_id is missing "
                             "(null); give a default: data.referrer_id || ''\n")
    fixed = linkcrm("eval", "starts_with(data.referrer_id || '', 'partner-')", "--format",
                    "json", stdin=stdin)
    assert fixed.returncode == 0, fixed.stderr
    assert [json.loads(line) for line in fixed.stdout.splitlines()] == [
        {"line": 1, "value": True, "type": "boolean"},
        {"line": 2, "value": False, "type": "boolean"},
        {"line": 3, "value": False, "type": "boolean"}]


def test_bad_input_exits_2_naming_it(tmp_path: Path) -> None:
    assert linkcrm("eval", "a", "nope.json").returncode == 2
    not_an_event = linkcrm("eval", "a", stdin="[1, 2]\n")
    assert not_an_event.returncode == 2
    assert "standard input:1: an array, not an object" in not_an_event.stderr
    empty = tmp_path / "empty.json"
    empty.write_text("", encoding="utf-8")
    assert "is empty" in linkcrm("eval", "a", str(empty)).stderr


def test_event_data_cannot_move_the_terminal() -> None:
    stdin = json.dumps({"event": "x", "data": {"v": "\x1b[2J\nforged"}}) + "\n"
    result = linkcrm("eval", "data.v", stdin=stdin)
    assert result.stdout == 'line 1: "\\u001b[2J\\nforged"  (string)\n'


def test_a_type_error_points_at_the_argument_of_the_wrong_type() -> None:
    stdin = json.dumps({"event": "x", "data": {"a": "", "n": 5}}) + "\n"
    result = linkcrm("eval", "data.a || ends_with('abc', data.n)", "--format", "json",
                     stdin=stdin)
    assert result.returncode == 1
    assert json.loads(result.stdout) == {
        "line": 1, "error": "ends_with() wants string here, got number 5",
        "column": 28, "caret": "data.a || ends_with('abc', data.n)\n" + " " * 27 + "^"}
