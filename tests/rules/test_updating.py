"""`linkcrm test --update`: only the failing expectations change; comments and layout stay."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from engine.cli.scenariocrm import replay_into_local_crm
from engine.rules.files import load_ruleset
from engine.rules.ruletests import run_test_file
from engine.rules.updating import update_file
from tests.support.paths import REPO

RULES = REPO / "rules"


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    target = tmp_path / "rules"
    shutil.copytree(RULES, target)
    return target


def run_and_update(path: Path) -> list[str]:
    ruleset = load_ruleset([str(path.parent)])
    failed = [r for r in run_test_file(path, ruleset, replay_into_local_crm) if not r.passed]
    return [f"{u.result.name}: {u.reason or 'updated'}" for u in update_file(path, failed)]


def passes(path: Path) -> bool:
    ruleset = load_ruleset([str(path.parent)])
    return all(r.passed for r in run_test_file(path, ruleset, replay_into_local_crm))


def test_a_wrong_plan_is_rewritten_and_nothing_else_changes(folder: Path) -> None:
    path = folder / "attribution_test.yaml"
    original = path.read_text(encoding="utf-8")
    broken = original.replace("first_touch_platform: ios\n", "first_touch_platform: web\n", 1)
    broken = broken.replace("stage: customer}", "stage: lead}  # was customer", 1)
    path.write_text(broken, encoding="utf-8")
    assert not passes(path)
    assert run_and_update(path) == [
        "install (shape A) creates a lead with first-touch attribution: updated",
        "referral conversion (shape A) makes a customer and one deal: updated"]
    assert passes(path)
    # Byte for byte the original, but the comment on the rewritten line, which stays.
    assert path.read_text(encoding="utf-8") == original.replace(
        "stage: customer}", "stage: customer}  # was customer", 1)


def test_a_scenario_state_is_rewritten_keeping_comments_and_key_order(folder: Path) -> None:
    path = folder / "attribution_scenarios_test.yaml"
    original = path.read_text(encoding="utf-8")
    path.write_text(original.replace("deep_link_prefix: reinvite ", "deep_link_prefix: invite   ")
                    .replace("          stage: lead\n          stage_history: [lead]\n", ""),
                    encoding="utf-8")
    assert not passes(path)
    assert run_and_update(path) == ["set_once keeps the first touch; set is overwritten: updated"]
    assert path.read_text(encoding="utf-8") == original


def test_subset_cases_and_one_line_cases_are_left_with_the_reason(tmp_path: Path) -> None:
    for name in ("attribution.yaml", "fields.yaml"):
        shutil.copy(RULES / name, tmp_path / name)
    path = tmp_path / "x_test.yaml"
    text = (
        "version: 1\n"
        "cases:\n"
        "  - {name: one line, event: {event: test}, expect: [{set_stage: {identity: {a: b},"
        " stage: lead}}]}\n"
        "  - name: subset\n"
        "    match: subset\n"
        "    event: {event: test}\n"
        "    expect: [{set_stage: {identity: {a: b}, stage: lead}}]\n"
    )
    path.write_text(text, encoding="utf-8")
    assert run_and_update(path) == [
        "one line: the case is written on one line; write it as a block mapping to update it",
        "subset: match: subset (writing the whole output would change what it checks)"]
    assert path.read_text(encoding="utf-8") == text


def test_expected_errors_follow_the_actual_ones(tmp_path: Path) -> None:
    for name in ("attribution.yaml", "fields.yaml"):
        shutil.copy(RULES / name, tmp_path / name)
    path = tmp_path / "x_test.yaml"
    path.write_text(
        "version: 1\n"
        "cases:\n"
        "  - name: identify without keys\n"
        "    event: {event: app.user_identified, data: {user_id: u}}\n"
        "    expect: []\n"
        "    # the last case\n", encoding="utf-8")
    assert run_and_update(path) == ["identify without keys: updated"]
    text = path.read_text(encoding="utf-8")
    # Too long for one line: a block list, inserted after `expect`, before the comment.
    assert text.endswith("    expect: []\n    expect_errors:\n"
                         "      - \"rule 'app-identifies-user', "
                         "action 0 (upsert_contact), event app.user_identified: identity is "
                         "entirely null (deep_link_token: link.person_token, email: "
                         "lower(trim(data.email)))\"\n    # the last case\n")
    assert passes(path)
