"""Evaluation: matching, `when`, null handling, identity fallbacks, failures that stay local."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.actions import CreateDeal, IdentityKey, SetStage, UpsertContact
from engine.errors import ConfigError
from engine.rules.evaluator import plan
from engine.rules.files import load_ruleset
from engine.rules.model import RuleSet
from tests.support.paths import REPO, TESTS

FIELDS = (TESTS / "rulefiles" / "fields.yaml").read_text(encoding="utf-8")


def ruleset(tmp_path: Path, rules: str) -> RuleSet:
    (tmp_path / "fields.yaml").write_text(FIELDS, encoding="utf-8")
    (tmp_path / "r.yaml").write_text("version: 1\nrules:\n" + rules, encoding="utf-8")
    return load_ruleset([tmp_path])


def event(kind: str, **data: object) -> dict[str, object]:
    return {"event": kind, "timestamp": "2026-03-01T12:00:00Z", "data": data}


TOKEN = (IdentityKey("deep_link_token", "t1"),)


def test_globs_lists_and_skip_reasons(tmp_path: Path) -> None:
    rules = ruleset(tmp_path, """
  - name: any-referral
    on: referral.*
    actions:
      - set_stage: {identity: {deep_link_token: data.token}, stage: lead}
  - name: installs-or-claims
    on: [install.tracked, deferred_link.claimed]
    when: data.campaign
    actions:
      - set_stage: {identity: {deep_link_token: data.token}, stage: lead}
""")
    result = plan(event("referral.completed", token="t1"), rules)
    assert result.matched == ("any-referral",)
    assert result.actions == (SetStage("any-referral", TOKEN, "lead"),)
    assert result.skipped[0].reason == (
        "listens to install.tracked, deferred_link.claimed, not referral.completed")
    claimed = plan(event("deferred_link.claimed", token="t1"), rules)
    assert claimed.matched == ()
    assert [s.reason for s in claimed.skipped][1] == "when 'data.campaign' was null"


def test_when_follows_jmespath_truthiness(tmp_path: Path) -> None:
    rules = ruleset(tmp_path, """
  - name: r
    on: test
    when: data.flag
    actions:
      - set_stage: {identity: {deep_link_token: "'t1'"}, stage: lead}
""")
    for value, applies in ((0, True), ("x", True), (False, False), ("", False), ([], False),
                           ({}, False), (None, False), ([0], True)):
        assert bool(plan(event("test", flag=value), rules).actions) is applies, value


def test_null_and_empty_values_leave_fields_untouched(tmp_path: Path) -> None:
    rules = ruleset(tmp_path, """
  - name: r
    on: install.tracked
    actions:
      - upsert_contact:
          identity: {deep_link_token: data.token}
          set: {first_touch_campaign: data.campaign, first_touch_platform: data.platform}
          set_once: {install_date: to_date(timestamp)}
""")
    result = plan(event("install.tracked", token="t1", campaign="", platform=None), rules)
    assert result.actions == (
        UpsertContact("r", TOKEN, {}, {"install_date": "2026-03-01"}),)


def test_identity_priority_skips_null_keys_and_fails_alone_when_all_null(tmp_path: Path) -> None:
    rules = ruleset(tmp_path, """
  - name: r
    on: app.user_identified
    actions:
      - upsert_contact:
          identity: [{email: data.email}, {deep_link_token: data.token}]
      - set_stage: {identity: {deep_link_token: "'fixed'"}, stage: customer}
""")
    ok = plan(event("app.user_identified", token="t1"), rules)
    assert ok.actions[0].identity == TOKEN
    both = plan(event("app.user_identified", token="t1", email="a@b.co"), rules)
    assert both.actions[0].identity == (IdentityKey("email", "a@b.co"), *TOKEN)
    failed = plan(event("app.user_identified"), rules)
    assert [a.kind for a in failed.actions] == ["set_stage"]  # the other action still runs
    (failure,) = failed.failures
    assert failure.rule == "r" and failure.action == "upsert_contact"
    assert "identity is entirely null (email: data.email, deep_link_token: data.token)" in (
        failure.message)
    assert "event app.user_identified" in failure.message


def test_runtime_type_error_fails_that_action_with_rule_and_expression(tmp_path: Path) -> None:
    rules = ruleset(tmp_path, """
  - name: r
    on: referral.completed
    actions:
      - create_deal:
          identity: {deep_link_token: data.token}
          key: join('-', ['referral', data.token])
          title: "'Referral'"
          stage: new
          amount: data.amount
""")
    good = plan(event("referral.completed", token="t1", amount=12.5), rules)
    assert good.actions == (CreateDeal("r", TOKEN, "referral-t1", "Referral", "new", 12.5, {}),)
    bad = plan(event("referral.completed", token=7), rules)
    (failure,) = bad.failures
    assert "rule 'r', action 0 (create_deal), event referral.completed" in failure.message
    assert "join('-', ['referral', data.token])" in failure.message
    text_amount = plan(event("referral.completed", token="t1", amount="12"), rules)
    assert "amount: 'data.amount' gave '12', expected a number" in text_amount.failures[0].message


def test_evaluation_is_deterministic(tmp_path: Path) -> None:
    rules = load_ruleset([REPO / "rules"])
    sample = event("referral.completed", referral_code="C-1", referrer_id="u")
    assert plan(sample, rules) == plan(sample, rules)


def test_non_object_events_match_nothing(tmp_path: Path) -> None:
    rules = load_ruleset([REPO / "rules"])
    for weird in ([], "text", {"event": 5}, {}):
        result = plan(weird, rules)
        assert result.actions == () and result.failures == ()


def test_rule_files_that_do_not_load_raise_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        ruleset(tmp_path, "  - name: r\n    on: test\n    actions: [{set_stage: {}}]\n")
    assert {p.code for p in caught.value.problems} == {"missing-key"}


def test_a_python_type_error_inside_jmespath_fails_only_that_rule(tmp_path: Path) -> None:
    rules = ruleset(tmp_path, """
  - name: r
    on: test
    when: data.a < data.b
    actions:
      - set_stage: {identity: {deep_link_token: "'t1'"}, stage: lead}
""")
    result = plan(event("test", a="x", b=1), rules)
    assert result.actions == ()
    (failure,) = result.failures
    assert failure.action == "when" and "data.a < data.b" in failure.message
