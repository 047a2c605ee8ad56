"""`linkcrm validate`, `test`, `explain` and `bench` through the real command line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.paths import REPO, TESTS
from tests.support.shipped import SHIPPED_CASES

ROOT = REPO
RULES = ROOT / "rules"
GOLDEN = TESTS / "rulefiles"


def linkcrm(*args: str, cwd: Path = ROOT, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], cwd=cwd, input=stdin,
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture
def rules_copy(tmp_path: Path) -> Path:
    target = tmp_path / "rules"
    shutil.copytree(RULES, target)
    return target


def test_validate_and_test_pass_on_the_shipped_rules() -> None:
    validated = linkcrm("validate", "rules/")
    assert validated.returncode == 0, validated.stdout + validated.stderr
    assert validated.stdout.strip() == "ok: 4 files checked, no problems"
    tested = linkcrm("test", "rules/")
    assert tested.returncode == 0, tested.stdout
    assert tested.stdout.strip().splitlines()[-1] == f"{SHIPPED_CASES} passed, 0 failed"


def test_validate_defaults_to_rules_in_the_working_folder(rules_copy: Path) -> None:
    assert linkcrm("validate", cwd=rules_copy.parent).returncode == 0
    missing = linkcrm("validate", cwd=rules_copy)
    assert missing.returncode == 2
    assert "no rules folder at 'rules'" in missing.stderr


def test_validate_reports_errors_sorted_with_exit_1(rules_copy: Path) -> None:
    (rules_copy / "broken.yaml").write_text(
        (GOLDEN / "unknown_action.yaml").read_text(encoding="utf-8"), encoding="utf-8")
    (rules_copy / "also_broken.yaml").write_text(
        (GOLDEN / "wrong_argument_count.yaml").read_text(encoding="utf-8").replace(
            "referral-converts", "other-rule"), encoding="utf-8")
    result = linkcrm("validate", str(rules_copy))
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"{rules_copy}/also_broken.yaml:8:16: wrong-argument-count:")
    assert any(line.startswith(f"{rules_copy}/broken.yaml:6:9: unknown-action:")
               for line in lines)
    assert lines[-1] == "2 errors in 2 files"
    as_json = json.loads(linkcrm("validate", str(rules_copy), "--format", "json").stdout)
    assert as_json["ok"] is False
    assert [p["code"] for p in as_json["problems"]] == ["wrong-argument-count", "unknown-action"]
    assert as_json["problems"][1] == {
        "file": f"{rules_copy}/broken.yaml", "line": 6, "column": 9, "severity": "error",
        "code": "unknown-action", "message": "'set_stagee' is not a known action",
        "rule": "won-deal", "path": "$.rules[0].actions[0]", "hint": "did you mean 'set_stage'?",
        "detail": None}


def test_warnings_pass_unless_strict(rules_copy: Path) -> None:
    text = (rules_copy / "attribution.yaml").read_text(encoding="utf-8")
    (rules_copy / "attribution.yaml").write_text(
        text.replace("deep_link_prefix: data.prefix", "deep_link_prefix: invite", 1),
        encoding="utf-8")
    relaxed = linkcrm("validate", str(rules_copy))
    assert relaxed.returncode == 0
    assert "undeclared-path (warning)" in relaxed.stdout
    assert "\"'invite'\"" in relaxed.stdout
    assert linkcrm("validate", "--strict", str(rules_copy)).returncode == 1


def test_a_failing_rule_test_shows_file_line_and_a_diff(rules_copy: Path) -> None:
    tests = rules_copy / "attribution_test.yaml"
    tests.write_text(tests.read_text(encoding="utf-8").replace(
        "first_touch_platform: ios}", "first_touch_platform: android}", 1), encoding="utf-8")
    result = linkcrm("test", str(rules_copy))
    assert result.returncode == 1
    head = f"{tests}:115:5: FAIL deferred link claim (shape A) enriches the contact"
    assert head in result.stdout
    assert '-      "first_touch_platform": "android"' in result.stdout
    assert '+      "first_touch_platform": "ios"' in result.stdout
    assert result.stdout.splitlines()[-1] == "25 passed, 1 failed"


def test_test_refuses_rules_that_do_not_load(rules_copy: Path) -> None:
    (rules_copy / "bad.yaml").write_text("version: 1\nrules: [{name: x}]\n", encoding="utf-8")
    result = linkcrm("test", str(rules_copy))
    assert result.returncode == 1
    assert "missing-key" in result.stderr and "the rules do not load" in result.stderr


def test_explain_json_shape_with_target() -> None:
    result = linkcrm("explain", "rules/events/referral_completed_b.json", "--target",
                     "salesforce", "--format", "json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["event"]["event"] == "referral.completed"
    assert document["matched"] == ["referral-converts"]
    assert {"rule": "install-creates-lead",
            "reason": "listens to install.tracked, not referral.completed"} in document["skipped"]
    upsert, stage, deal = document["actions"]
    assert upsert["action"] == "upsert_contact" and upsert["rule"] == "referral-converts"
    assert upsert["identity"] == {"deep_link_token": "CAROL-42"}
    assert upsert["set_once"] == {"conversion_date": "2026-03-20", "referral_source": "user_17"}
    assert upsert["target"]["set_once"] == {"Conversion_Date__c": "2026-03-20",
                                            "Referral_Source__c": "user_17"}
    assert stage["target"]["stage"] == {"field": "Status", "value": "Deep Link Customer"}
    assert deal["key"] == "referral-CAROL-42"
    # As Salesforce gets them: the Lead defaults a new Lead carries, the Opportunity's names.
    assert upsert["target"]["defaults"] == {"LastName": "Deep Link", "Company": "Unknown",
                                            "LeadSource": "Deep Link"}
    assert deal["target"]["Linkcrm_Deal_Key__c"] == "referral-CAROL-42"
    assert deal["target"]["Name"] == "Referral: CAROL-42"
    assert deal["target"]["stage"] == {"field": "StageName", "value": "Prospecting"}
    assert "key" not in deal["target"] and "title" not in deal["target"]
    assert document["value_errors"] == []


def test_explain_reads_stdin_and_shows_ignored_events() -> None:
    click = json.dumps({"event": "link.clicked", "timestamp": "2026-03-01T00:00:00Z",
                        "data": {"token": "t"}})
    result = linkcrm("explain", "-", "--rules", "rules", stdin=click)
    assert result.returncode == 0
    assert "matched: no rule" in result.stdout
    assert "actions: none (the event is recorded as ignored)" in result.stdout


def test_explain_exits_1_when_an_action_fails_and_2_on_a_missing_file() -> None:
    identify = json.dumps({"event": "app.user_identified", "timestamp": "2026-03-01T00:00:00Z",
                           "data": {"user_id": "u"}})
    failed = linkcrm("explain", "-", stdin=identify)
    assert failed.returncode == 1
    assert "identity is entirely null" in failed.stdout
    assert linkcrm("explain", "nope.json").returncode == 2
    assert linkcrm("explain", "-", stdin="{not json").returncode == 1


def test_bench_prints_rates_and_the_ratio() -> None:
    result = linkcrm("bench", "--events", "100", "--seconds", "0.2")
    assert result.returncode == 0, result.stderr
    assert "100 distinct events, plans identical for both" in result.stdout
    assert "events/s" in result.stdout and "of hand-written" in result.stdout


@pytest.mark.parametrize("command", ["validate", "test", "explain", "diff", "bench"])
def test_every_command_has_help_with_an_example(command: str) -> None:
    result = linkcrm(command, "--help")
    assert result.returncode == 0
    assert "Example:" in result.stdout and f"linkcrm {command}" in result.stdout


def test_unknown_command_is_a_usage_error() -> None:
    result = linkcrm("valdate")
    assert result.returncode == 2
    assert "validate" in result.stderr
