"""The diff engine: two rule sets over recorded events, per rule, action and field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.config.fieldmap import CANONICAL
from engine.rules.comparable import incomparable
from engine.rules.diff import Differ, DiffResult, Recorded
from engine.rules.facets import same, target_lens
from engine.rules.files import load_ruleset
from engine.rules.model import RuleSet
from engine.targets.registry import dialect
from engine.worker.plan import action_problem
from tests.support.diff_story import RULES, TOKEN, edited_rules, recorded_story

SHIPPED = load_ruleset([RULES])


def run(old: RuleSet, new: RuleSet, events: list[Any], **options: Any) -> DiffResult:
    differ = Differ(old, new, **options)
    for number, envelope in enumerate(events, 1):
        differ.add(Recorded(f"event {number}", envelope, number))
    return differ.result()


def rows(result: DiffResult) -> list[tuple[Any, ...]]:
    return [(c.rule, c.label, c.field, c.kind, c.events) for c in result.changes]


def test_a_rule_change_shows_exactly_the_changed_fields(tmp_path: Path) -> None:
    new = load_ruleset([edited_rules(tmp_path / "new")])
    result = run(SHIPPED, new, recorded_story())
    assert (result.events, result.changed_events) == (5, 4)  # the click changes nothing
    assert rows(result) == [
        ("install-creates-lead", "upsert_contact", "set_once.first_touch_platform", "changed",
         1),
        ("install-creates-lead", "set_stage", None, "starts-failing", 1),
        ("referral-signup-creates-lead", "upsert_contact", "set.deep_link_prefix", "added", 1),
        ("referral-signup-creates-lead", "set_stage", "stage", "changed", 1),
        ("referral-converts", "create_deal", None, "dropped-action", 1),
        ("app-identifies-user", "upsert_contact", "set.name", "removed", 1),
    ]
    identity = {"deep_link_token": TOKEN}
    examples = [(e.ref, e.event_type, e.identity, e.before, e.after)
                for change in result.changes for e in change.examples]
    assert examples[0] == ("event 2", "install.tracked", identity, "ios", "iOS")
    assert examples[1][3] == {"identity": identity, "stage": "lead"}
    assert "identity is entirely null (deep_link_token: data.missing)" in \
        examples[1][4]["error"]
    assert examples[2][3:] == (None, "referral")
    assert examples[3][3:] == ("lead", "customer")
    assert examples[4][3:] == ({"identity": identity, "key": f"referral-{TOKEN}",
                                "title": f"Referral: {TOKEN}", "stage": "new",
                                "set.referral_code": TOKEN}, None)
    assert examples[5][:4] == ("event 5", "app.user_identified",
                               {**identity, "email": "sam.sample@example.com"}, "Sam Sample")
    assert examples[5][4] is None


def test_the_change_read_backwards_starts_what_stopped(tmp_path: Path) -> None:
    old = load_ruleset([edited_rules(tmp_path / "old")])
    result = run(old, SHIPPED, recorded_story())
    kinds = {(c.rule, c.label, c.field): c.kind for c in result.changes}
    assert kinds[("install-creates-lead", "set_stage", None)] == "stops-failing"
    assert kinds[("referral-converts", "create_deal", None)] == "new-action"
    assert kinds[("app-identifies-user", "upsert_contact", "set.name")] == "added"
    assert kinds[("referral-signup-creates-lead", "upsert_contact", "set.deep_link_prefix")] \
        == "removed"


def test_the_same_rules_change_nothing_and_counts_every_event() -> None:
    result = run(SHIPPED, SHIPPED, recorded_story() * 3)
    assert (result.events, result.changed_events, result.changes) == (15, 0, [])


def test_a_value_of_another_json_type_is_a_change(tmp_path: Path) -> None:
    one = tmp_path / "one"
    true = tmp_path / "true"
    edited_rules(one, [("deep_link_prefix: data.prefix\n          set_once:\n"
                        "            first_touch_campaign",
                        "deep_link_prefix: \"`1`\"\n          set_once:\n"
                        "            first_touch_campaign")])
    edited_rules(true, [("deep_link_prefix: data.prefix\n          set_once:\n"
                         "            first_touch_campaign",
                         "deep_link_prefix: \"`true`\"\n          set_once:\n"
                         "            first_touch_campaign")])
    result = run(load_ruleset([one]), load_ruleset([true]), recorded_story())
    assert rows(result) == [("install-creates-lead", "upsert_contact", "set.deep_link_prefix",
                             "changed", 1)]
    assert (result.changes[0].examples[0].before, result.changes[0].examples[0].after) == (
        1, True)
    assert not same(1, True) and not same(1, 1.0) and same({"a": [1]}, {"a": [1]})


def test_when_that_starts_failing_and_a_changed_error(tmp_path: Path) -> None:
    broken = edited_rules(tmp_path / "when", [
        ("on: install.tracked\n    when: data.token",
         "on: install.tracked\n    when: length(data.campaign) > `3`"),
        ("identity:\n            - deep_link_token: link.person_token\n",
         "identity:\n            - deep_link_token: data.nothing\n")])
    emptier = edited_rules(tmp_path / "emptier", [
        ("identity:\n            - deep_link_token: link.person_token\n"
         "            - email: lower(trim(data.email))",
         "identity:\n            - deep_link_token: data.nothing\n"
         "            - email: data.none")])
    events = [{"event": "install.tracked", "timestamp": "2026-03-01T00:00:00Z",
               "data": {"token": "t", "campaign": 5}},
              {"event": "app.user_identified", "timestamp": "2026-03-01T00:00:00Z",
               "data": {"user_id": "u1"}}]
    result = run(load_ruleset([broken]), load_ruleset([emptier]), events)
    assert rows(result) == [
        ("install-creates-lead", "when", None, "stops-failing", 1),
        ("install-creates-lead", "upsert_contact", None, "new-action", 1),
        ("install-creates-lead", "set_stage", None, "new-action", 1),
        ("app-identifies-user", "upsert_contact", None, "error-changed", 1),
    ]


def test_values_no_store_can_take_fail_as_the_worker_fails_them(tmp_path: Path) -> None:
    events = [{"event": "install.tracked", "timestamp": "2026-03-01T00:00:00Z",
               "data": {"token": "t", "prefix": "bad\ud800", "campaign": "c"}}]
    unprefixed = edited_rules(tmp_path / "new", [
        ("deep_link_prefix: data.prefix\n          set_once:\n            first_touch_campaign",
         "deep_link_prefix: \"'fixed'\"\n          set_once:\n            first_touch_campaign")])
    result = run(SHIPPED, load_ruleset([unprefixed]), events, screen=action_problem)
    assert rows(result) == [("install-creates-lead", "upsert_contact", None, "stops-failing", 1)]
    assert "lone surrogate" in result.changes[0].examples[0].before["error"]  # type: ignore


def test_examples_show_distinct_values_first_in_event_order(tmp_path: Path) -> None:
    new = load_ruleset([edited_rules(tmp_path / "new", EDITS_PLATFORM)])
    platforms = ["iOS", "iOS", "iOS", "Android", "iOS", "Web"]
    events = [{"event": "install.tracked", "timestamp": "2026-03-01T00:00:00Z",
               "data": {"token": f"t{i}", "platform": p}} for i, p in enumerate(platforms)]
    result = run(SHIPPED, new, events, examples=3)
    change = result.changes[0]
    assert change.events == 6
    assert [(e.ref, e.after) for e in change.examples] == [
        ("event 1", "iOS"), ("event 4", "Android"), ("event 6", "Web")]
    two = run(SHIPPED, new, events[:3], examples=2).changes[0]
    assert [e.ref for e in two.examples] == ["event 1", "event 2"]


EDITS_PLATFORM = [("first_touch_platform: lower(data.platform || data.device_type)\n"
                   "            install_date",
                   "first_touch_platform: data.platform || data.device_type\n"
                   "            install_date")]

RENAMED = [("first_touch_campaign:\n    type: string\n    label: First-touch campaign\n"
            "    hubspot: first_touch_campaign",
            "first_touch_campaign:\n    type: string\n    label: First-touch campaign\n"
            "    hubspot: utm_first_campaign")]


def test_field_maps_that_disagree_on_a_used_field_cannot_be_compared(tmp_path: Path) -> None:
    new = load_ruleset([edited_rules(tmp_path / "new", (), RENAMED)])
    assert incomparable(SHIPPED, new) == [
        "field 'first_touch_campaign': its hubspot field is 'first_touch_campaign' in OLD, "
        "'utm_first_campaign' in NEW"]
    assert incomparable(SHIPPED, new, canonical=False) == []
    result = run(SHIPPED, new, recorded_story(), lens=target_lens(dialect("hubspot")))
    assert rows(result) == [
        ("install-creates-lead", "upsert_contact", "set_once.first_touch_campaign", "removed",
         1),
        ("install-creates-lead", "upsert_contact", "set_once.utm_first_campaign", "added", 1)]
    assert run(SHIPPED, new, recorded_story(), lens=target_lens(CANONICAL)).changes == []


def test_an_unused_field_or_a_new_one_does_not_matter_but_stage_order_does(
        tmp_path: Path) -> None:
    relabelled = edited_rules(tmp_path / "relabelled", [
        ("            referral_code: data.referral_code || data.token\n",
         "            referral_code: data.referral_code || data.token\n"
         "            milestone: data.milestone\n")], [
        ("    label: Referral code\n", "    label: Code of the referral\n"),
        ("\n# Where each CRM keeps", "  milestone:\n    type: string\n    object: deal\n"
         "    hubspot: milestone\n\n# Where each CRM keeps")])
    assert incomparable(SHIPPED, load_ruleset([relabelled])) == []
    swapped = edited_rules(tmp_path / "swapped", (), [
        ("  - name: lead\n    hubspot: lead\n    salesforce: Open - Not Contacted\n"
         "    pipedrive: Lead\n", ""),
        ("    pipedrive: Customer\n", "    pipedrive: Customer\n  - name: lead\n"
         "    hubspot: lead\n    salesforce: Open - Not Contacted\n    pipedrive: Lead\n")])
    reasons = incomparable(SHIPPED, load_ruleset([swapped]), canonical=False)
    assert reasons == ["the contact stages are in another forward order: lead, customer in "
                       "OLD, customer, lead in NEW (whether a stage change moves a contact "
                       "then depends on its current stage, which a diff of plans cannot see)"]


def test_an_event_that_cannot_be_compared_is_counted_and_the_diff_goes_on(
        tmp_path: Path) -> None:
    deep: Any = "bottom"
    for _ in range(100_000):  # deeper than any recursion limit
        deep = {"a": deep}
    events = [{"event": "install.tracked", "timestamp": "2026-03-01T00:00:00Z",
               "data": {"token": "t", "prefix": deep}}, *recorded_story()]
    new = load_ruleset([edited_rules(tmp_path / "new")])
    result = run(SHIPPED, new, events)
    assert (result.events, result.changed_events, result.uncompared) == (6, 4, 1)
    assert len(result.changes) == 6
    assert result.uncompared_examples[0]["event"] == "event 1"
    assert str(result.uncompared_examples[0]["error"]).startswith("RecursionError")
