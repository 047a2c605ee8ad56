"""`linkcrm test` scenarios, --coverage, --fail-under, --update and `test`/`validate --watch`
through the real command line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.paths import REPO
from tests.support.shipped import SHIPPED_CASES
from tests.support.watched import Watched

RULES = REPO / "rules"


def linkcrm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture
def rules_copy(tmp_path: Path) -> Path:
    target = tmp_path / "rules"
    shutil.copytree(RULES, target)
    return target


def test_a_failing_scenario_shows_its_line_and_the_state_diff(rules_copy: Path) -> None:
    tests = rules_copy / "attribution_scenarios_test.yaml"
    tests.write_text(tests.read_text(encoding="utf-8").replace(
        "stage_history: [lead, customer]", "stage_history: [lead, customer, lead]"),
        encoding="utf-8")
    result = linkcrm("test", str(rules_copy))
    assert result.returncode == 1
    assert f"{tests}:29:5: FAIL stages never move backwards" in result.stdout
    assert '-        "lead"' in result.stdout
    assert result.stdout.splitlines()[-1] == f"{SHIPPED_CASES - 1} passed, 1 failed"


def test_coverage_text_and_json(rules_copy: Path) -> None:
    text = linkcrm("test", str(rules_copy), "--coverage")
    assert text.returncode == 0, text.stdout
    lines = text.stdout.splitlines()
    assert f"{rules_copy}/attribution.yaml: 18/18 (100.0%)" in lines
    assert lines[-2:] == ["coverage: 18/18 (100.0%)", f"{SHIPPED_CASES} passed, 0 failed"]
    # Without the scenarios, three `when` branches are never seen false.
    (rules_copy / "attribution_scenarios_test.yaml").unlink()
    lines = linkcrm("test", str(rules_copy), "--coverage").stdout.splitlines()
    assert "  -- referral-converts (line 55): fired 3x, when never false" in lines
    assert lines[-2:] == ["coverage: 15/18 (83.3%)", "21 passed, 0 failed"]
    as_json = json.loads(linkcrm("test", str(rules_copy), "--coverage", "--format",
                                 "json").stdout)
    assert as_json["passed"] == 21 and as_json["coverage"]["percent"] == 83.3
    rules = as_json["coverage"]["files"][0]["rules"]
    assert [(r["rule"], r["fired"], r["when_false"]) for r in rules] == [
        ("install-creates-lead", 2, 2), ("referral-signup-creates-lead", 2, 0),
        ("referral-converts", 3, 0), ("deferred-link-enriches-contact", 2, 0),
        ("app-identifies-user", 7, None)]
    assert as_json["coverage"]["unwritten_fields"] == []


def test_fail_under_fails_ci_when_coverage_is_low(rules_copy: Path) -> None:
    assert linkcrm("test", str(rules_copy), "--fail-under", "100").returncode == 0
    (rules_copy / "attribution_scenarios_test.yaml").unlink()
    assert linkcrm("test", str(rules_copy), "--fail-under", "80").returncode == 0
    low = linkcrm("test", str(rules_copy), "--fail-under", "90")
    assert low.returncode == 1
    assert low.stdout.splitlines()[-1].startswith(
        "coverage 83.3% is under --fail-under 90: add cases for the rules")
    bad = linkcrm("test", str(rules_copy), "--fail-under", "120")
    assert bad.returncode == 2 and "120" in bad.stderr


def test_update_rewrites_the_failing_case_then_reruns(rules_copy: Path) -> None:
    tests = rules_copy / "attribution_test.yaml"
    original = tests.read_text(encoding="utf-8")
    tests.write_text(original.replace("stage: customer}", "stage: lead}", 1), encoding="utf-8")
    updated = linkcrm("test", str(rules_copy), "--update")
    assert updated.returncode == 0, updated.stdout
    assert updated.stdout.splitlines() == [
        f"{tests}:70:5: updated referral conversion (shape A) makes a customer and one deal",
        f"{SHIPPED_CASES} passed, 0 failed"]
    assert tests.read_text(encoding="utf-8") == original
    assert linkcrm("test", str(rules_copy), "--update", "--watch").returncode == 2


def test_test_watch_reruns_on_every_save(rules_copy: Path) -> None:
    watched = Watched("test", str(rules_copy), "--watch")
    try:
        assert watched.until(f"{SHIPPED_CASES} passed")[-1] == f"{SHIPPED_CASES} passed, 0 failed"
        assert watched.until("watching ")[-1].endswith("files for changes (Ctrl-C stops)")
        tests = rules_copy / "attribution_test.yaml"
        tests.write_text(tests.read_text(encoding="utf-8").replace(
            "stage: customer}", "stage: lead}", 1), encoding="utf-8")
        rerun = watched.until(f"{SHIPPED_CASES - 1} passed")
        assert any(line.startswith("--- ") and f"changed: {tests}" in line for line in rerun)
        assert any("FAIL referral conversion (shape A)" in line for line in rerun)
        # A broken rule file is reported and the watch goes on.
        (rules_copy / "broken.yaml").write_text("version: 1\nrules: [{name: x}]\n",
                                                encoding="utf-8")
        watched.until("error: the rules do not load")
        (rules_copy / "broken.yaml").unlink()
        watched.until(f"{SHIPPED_CASES - 1} passed")
    finally:
        code = watched.stop()
    assert code == 0


def test_validate_watch_rechecks_on_every_save(rules_copy: Path) -> None:
    watched = Watched("validate", str(rules_copy), "--watch")
    try:
        watched.until("ok: 4 files checked")
        rules = rules_copy / "attribution.yaml"
        rules.write_text(rules.read_text(encoding="utf-8").replace(
            "- set_stage:", "- set_stagee:", 1), encoding="utf-8")
        found = watched.until("1 error in 1 file")
        assert any("unknown-action" in line for line in found)
    finally:
        assert watched.stop() == 0


def test_update_in_json_lists_what_it_did_and_left(rules_copy: Path) -> None:
    tests = rules_copy / "attribution_scenarios_test.yaml"
    original = tests.read_text(encoding="utf-8")
    tests.write_text(original.replace("stage_history: [lead, customer]", "stage_history: []"),
                     encoding="utf-8")
    done = linkcrm("test", str(rules_copy), "--update", "--format", "json")
    assert done.returncode == 1
    document = json.loads(done.stdout)
    assert document["updated"] == [{
        "file": str(tests), "line": 29, "name": "stages never move backwards", "updated": False,
        "reason": "match: subset (writing the whole output would change what it checks)"}]
    assert (document["passed"], document["failed"]) == (SHIPPED_CASES - 1, 1)
    assert tests.read_text(encoding="utf-8") != original  # left as it was: still failing


def test_failure_lines_escape_what_a_terminal_acts_on(rules_copy: Path) -> None:
    (rules_copy / "esc_test.yaml").write_text(
        'version: 1\ncases:\n  - name: "bad\\e[2J name"\n'
        '    events: [{event: app.user_identified, data: {user_id: "u\\e[2J"}}]\n'
        "    expect_state: {contacts: [{identity: {email: x@y.io}}]}\n", encoding="utf-8")
    result = linkcrm("test", str(rules_copy))
    assert result.returncode == 1 and "\x1b" not in result.stdout
    assert "FAIL bad\\x1b[2J name" in result.stdout
    assert "unexpected error: event 1: rule 'app-identifies-user'" in result.stdout
