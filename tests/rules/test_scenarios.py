"""Scenario cases: events through the real planner into the real embedded CRM, state compared."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from engine.cli.scenariocrm import replay_into_local_crm
from engine.rules.files import load_ruleset
from engine.rules.model import RuleSet
from engine.rules.ruletests import run_test_file, run_tests
from engine.rules.scenarios import (
    ContactState,
    CRMState,
    DealState,
    compare_state,
    run_scenario,
)
from tests.support.paths import REPO

RULES = REPO / "rules"


@pytest.fixture(scope="module")
def ruleset() -> RuleSet:
    return load_ruleset([str(RULES)])


def install(token: str, at: str, **data: Any) -> dict[str, Any]:
    return {"event": "install.tracked", "timestamp": at, "data": {"token": token, **data}}


def converted(token: str, at: str) -> dict[str, Any]:
    return {"event": "referral.completed", "timestamp": at, "data": {"token": token}}


def test_the_shipped_scenarios_pass() -> None:
    ruleset = load_ruleset([str(RULES)])
    results = run_test_file(RULES / "attribution_scenarios_test.yaml", ruleset,
                            replay_into_local_crm)
    assert [r.name for r in results if not r.passed] == []
    assert {"stages never move backwards",
            "set_once keeps the first touch; set is overwritten"} <= {r.name for r in results}


def test_set_once_keeps_the_first_touch_and_set_the_last(ruleset: RuleSet) -> None:
    events = [install("t1", "2026-03-01T12:00:00Z", campaign="spring", platform="iOS",
                      prefix="a"),
              install("t1", "2026-03-05T12:00:00Z", campaign="summer", platform="web",
                      prefix="b")]
    expected = {"contacts": [{"identity": {"deep_link_token": "t1"},
                              "fields": {"first_touch_campaign": "spring",
                                         "first_touch_platform": "ios",
                                         "install_date": "2026-03-01",
                                         "deep_link_prefix": "b"}}]}
    result = run_scenario(events, expected, True, ruleset, replay_into_local_crm)
    assert result.diff == "" and result.errors == ()
    # The same expectation with the second event's campaign fails, naming the field.
    wrong = {"contacts": [{"identity": {"deep_link_token": "t1"},
                           "fields": {"first_touch_campaign": "summer"}}]}
    failed = run_scenario(events, wrong, True, ruleset, replay_into_local_crm)
    assert '-        "first_touch_campaign": "summer"' in failed.diff
    assert '+        "first_touch_campaign": "spring"' in failed.diff


def test_stages_only_move_forward_and_history_shows_it(ruleset: RuleSet) -> None:
    events = [converted("t2", "2026-03-01T12:00:00Z"), install("t2", "2026-03-02T12:00:00Z")]
    result = run_scenario(events, {"contacts": []}, False, ruleset, replay_into_local_crm)
    contact = result.actual["contacts"][0]  # type: ignore[index]
    assert contact["stage"] == "customer"  # type: ignore[index,call-overload]
    assert contact["stage_history"] == ["customer"]  # type: ignore[index,call-overload]
    assert len(result.plans) == 2 and result.plans[1].actions[-1].kind == "set_stage"


def test_exact_match_lists_every_contact_and_deal(ruleset: RuleSet) -> None:
    events = [converted("t3", "2026-03-20T08:00:00Z"), converted("t3", "2026-03-21T08:00:00Z")]
    expected = {
        "contacts": [{"identity": {"deep_link_token": "t3"},
                      "fields": {"deep_link_token": "t3", "conversion_date": "2026-03-20"},
                      "stage": "customer", "stage_history": ["customer"]}],
        "deals": [{"key": "referral-t3", "title": "Referral: t3", "stage": "new",
                   "contact": {"deep_link_token": "t3"}, "fields": {"referral_code": "t3"}}]}
    assert run_scenario(events, expected, False, ruleset, replay_into_local_crm).diff == ""
    # Leaving the deal out of an exact expectation fails; with match: subset it passes.
    contacts_only = {"contacts": expected["contacts"]}
    missing = run_scenario(events, contacts_only, False, ruleset, replay_into_local_crm)
    assert '+      "key": "referral-t3"' in missing.diff
    assert run_scenario(events, contacts_only, True, ruleset, replay_into_local_crm).diff == ""


def test_errors_of_the_plan_name_the_event(ruleset: RuleSet) -> None:
    events = [{"event": "app.user_identified", "timestamp": "2026-03-01T12:00:00Z",
               "data": {"user_id": "u"}}]
    result = run_scenario(events, {"contacts": []}, False, ruleset, replay_into_local_crm)
    assert result.diff == ""
    assert len(result.errors) == 1 and result.errors[0].startswith("event 1: rule ")
    assert "identity is entirely null" in result.errors[0]


def test_a_stage_the_crm_refuses_is_an_error_of_that_event(tmp_path: Path) -> None:
    # The field map drops `customer`, the rules still set it: the embedded CRM refuses.
    folder = tmp_path / "rules"
    folder.mkdir()
    for name in ("attribution.yaml", "fields.yaml"):
        (folder / name).write_text((RULES / name).read_text(encoding="utf-8"),
                                   encoding="utf-8")
    ruleset = load_ruleset([str(folder)])
    narrowed = type(ruleset.field_map)(
        **{**ruleset.field_map.__dict__,
           "contact_stages": tuple(s for s in ruleset.field_map.contact_stages
                                   if s.name != "customer")})
    result = run_scenario([converted("t4", "2026-03-20T08:00:00Z")], {"contacts": []}, True,
                          RuleSet(ruleset.rules, narrowed), replay_into_local_crm)
    assert any(e.startswith("event 1: set_stage (rule referral-converts): local:")
               for e in result.errors), result.errors


def test_subset_finds_contacts_by_any_of_their_keys() -> None:
    state = CRMState(
        (ContactState({"deep_link_token": "t", "email": ["a@x.io", "b@x.io"]},
                      {"first_name": "A"}, "lead", ("lead",)),),
        (DealState("k", "T", None, 10.0, None, {}),))
    assert compare_state({"contacts": [{"identity": {"email": "b@x.io"}, "stage": "lead"}],
                          "deals": [{"key": "k", "amount": 10}]}, state, True) == ""
    nobody = compare_state({"contacts": [{"identity": {"email": "c@x.io"}}]}, state, True)
    assert "+    null" in nobody


def test_run_tests_without_a_replay_says_scenarios_need_the_crm(tmp_path: Path,
                                                                  ruleset: RuleSet) -> None:
    test_file = tmp_path / "s_test.yaml"
    test_file.write_text(
        "version: 1\ncases:\n  - name: s\n    events: [{event: test}]\n"
        "    expect_state: {contacts: []}\n", encoding="utf-8")
    (result,) = run_tests([test_file], ruleset)
    assert not result.passed and "scenario cases need the embedded CRM" in result.error
    (replayed,) = run_tests([test_file], ruleset, replay_into_local_crm)
    assert replayed.passed


def test_scenario_files_are_checked_with_clear_messages(tmp_path: Path) -> None:
    from engine.rules.ruletests import check_test_files

    def problems(case: str) -> list[str]:
        path = tmp_path / "x_test.yaml"
        path.write_text("version: 1\ncases:\n" + case, encoding="utf-8")
        return [f"{p.location.line}:{p.location.column}: {p.code}: {p.message} ({p.hint})"
                for p in check_test_files([path])]

    event = "{event: test}"
    assert problems(f"  - name: s\n    events: [{event}]\n") == [
        "3:5: missing-key: missing required key 'expect_state' (add 'expect_state:')"]
    assert problems(f"  - name: s\n    events: [{event}]\n    expect_state: {{}}\n"
                    "    expect: []\n") == [
        "6:5: misplaced-expectation: 'expect' does not go with 'events' (a scenario (events:) "
        "checks expect_state:, the CRM's state after all its events; check one event's plan in "
        "a case of its own)"]
    assert problems(f"  - name: s\n    event: {event}\n    expect: []\n"
                    "    expect_state: {contacts: []}\n") == [
        "6:5: misplaced-expectation: 'expect_state' does not go with 'event' (expect_state: "
        "belongs to scenarios: give the events as a list under events:, or check this event's "
        "plan with expect:)"]
    assert problems("  - name: s\n    events: [{event_file: nope.json}]\n"
                    "    expect_state: {}\n") == [
        "4:27: missing-event-file: 'nope.json' does not exist (event_file is relative to the "
        "test file)"]
    assert problems(f"  - name: s\n    events: [{event}]\n    expect_state:\n"
                    "      contacts: [{identity: {email: a@b.io}, stages: lead}]\n") == [
        "6:46: unknown-key: unknown key 'stages' (did you mean 'stage'?)"]
