"""Rule-test coverage: rules fired, `when` branches, actions planned, fields written."""

from __future__ import annotations

from pathlib import Path

from engine.rules.coverage import Coverage, render_text
from engine.rules.evaluator import plan
from engine.rules.files import load_ruleset
from tests.support.paths import REPO

RULES = """\
version: 1
rules:
  - name: installs
    on: install.tracked
    when: data.token
    actions:
      - upsert_contact:
          identity: {deep_link_token: data.token}
          set: {deep_link_token: data.token}
          set_once: {install_date: to_date(timestamp)}
      - set_stage:
          identity: {deep_link_token: data.token}
          stage: lead
  - name: identify
    on: app.user_identified
    actions:
      - upsert_contact:
          identity: {email: data.email}
          set: {first_name: data.first_name}
"""


def coverage_of(tmp_path: Path) -> Coverage:
    (tmp_path / "fields.yaml").write_text(
        (REPO / "rules" / "fields.yaml").read_text(encoding="utf-8"), encoding="utf-8")
    (tmp_path / "r.yaml").write_text(RULES, encoding="utf-8")
    return Coverage(load_ruleset([str(tmp_path)]))


def test_counts_rules_when_branches_and_actions(tmp_path: Path) -> None:
    coverage = coverage_of(tmp_path)
    ruleset = coverage.ruleset
    install = {"event": "install.tracked", "timestamp": "2026-03-01T00:00:00Z",
               "data": {"token": "t"}}
    coverage.observe(plan(install, ruleset))
    coverage.observe(plan(install, ruleset))
    report = coverage.report()
    (rules_file,) = report.files
    installs, identify = rules_file.rules
    assert (installs.fired, installs.when_false) == (2, 0)
    assert [a.planned for a in installs.actions] == [2, 2]
    assert (identify.fired, identify.when_false, identify.actions[0].planned) == (0, None, 0)
    # installs: fired, when-false (no), 2 actions; identify: fired (no), 1 action (no)
    assert (report.covered, report.total, report.percent) == (3, 6, 50.0)

    coverage.observe(plan({**install, "data": {}}, ruleset))  # when false
    # identify with no email: the rule fires, its action fails and is not counted as planned
    coverage.observe(plan({"event": "app.user_identified", "data": {}}, ruleset))
    report = coverage.report()
    installs, identify = report.files[0].rules
    assert installs.when_false == 1 and identify.fired == 1
    assert identify.actions[0].planned == 0
    assert (report.covered, report.total) == (5, 6)


def test_fields_no_rule_writes_and_fields_no_test_saw(tmp_path: Path) -> None:
    coverage = coverage_of(tmp_path)
    report = coverage.report()
    assert "referral_source" in report.unwritten_fields
    assert "first_name" not in report.unwritten_fields
    assert set(report.untested_fields) == {"deep_link_token", "install_date", "first_name"}
    coverage.observe(plan({"event": "app.user_identified",
                           "data": {"email": "a@b.io", "first_name": "A"}}, coverage.ruleset))
    assert "first_name" not in coverage.report().untested_fields


def test_text_report_names_what_never_ran(tmp_path: Path) -> None:
    coverage = coverage_of(tmp_path)
    lines = render_text(coverage.report())
    assert lines[0] == f"{tmp_path / 'r.yaml'}: 0/6 (0.0%)"
    assert "  -- installs (line 3): never fired, when never false" in lines
    assert "       never planned: action 1 (set_stage, line 11)" in lines
    assert lines[-1] == "coverage: 0/6 (0.0%)"
    as_json = coverage.report().as_dict()
    assert as_json["percent"] == 0.0 and as_json["files"][0]["rules"][1] == {  # type: ignore[index]
        "rule": "identify", "line": 14, "fired": 0, "when_false": None,
        "actions": [{"index": 0, "action": "upsert_contact", "line": 17, "planned": 0}]}
