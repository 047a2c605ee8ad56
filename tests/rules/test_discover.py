"""Which files are rule files: event fixtures under an `events/` folder are not."""

from __future__ import annotations

from pathlib import Path

from engine.rules.files import discover
from engine.rules.validation import check_paths

RULE = """version: 1
rules:
  - name: install-creates-lead
    on: install.tracked
    actions:
      - set_stage: {identity: {deep_link_token: data.token}, stage: lead}
"""
FIELDS = """version: 1
fields:
  deep_link_token: {type: string, identity: true, hubspot: deep_link_token}
contact_stages:
  - {name: lead, hubspot: lead}
deal_stages:
  - {name: new, hubspot: appointmentscheduled}
"""
EVENT = "event: install.tracked\ntimestamp: '2026-03-01T12:00:00Z'\ndata: {token: t}\n"


def test_event_fixtures_are_not_rule_files(tmp_path: Path) -> None:
    (tmp_path / "fields.yaml").write_text(FIELDS, encoding="utf-8")
    (tmp_path / "installs.yaml").write_text(RULE, encoding="utf-8")
    (tmp_path / "events").mkdir()
    (tmp_path / "events" / "install.yaml").write_text(EVENT, encoding="utf-8")
    (tmp_path / "events" / "install.json").write_text("{}", encoding="utf-8")
    (tmp_path / "events" / "nested").mkdir()
    (tmp_path / "events" / "nested" / "more.yml").write_text(EVENT, encoding="utf-8")

    sources = discover([tmp_path])

    assert sources.rule_files == [tmp_path / "installs.yaml"]
    assert check_paths([tmp_path]) == []


def test_a_folder_named_events_is_skipped_only_inside_the_rules_folder(tmp_path: Path) -> None:
    rules = tmp_path / "events"  # the rules folder itself may be called anything
    rules.mkdir()
    (rules / "fields.yaml").write_text(FIELDS, encoding="utf-8")
    (rules / "installs.yaml").write_text(RULE, encoding="utf-8")

    assert discover([rules]).rule_files == [rules / "installs.yaml"]


BROKEN_FIELDS = """version: 1
fields:
  deep_link_token: {type: string, identity: true, hubspot: deep_link_token}
  first_touch_campaign: {type: strng, hubspot: first_touch_campaign}
contact_stages:
  - {name: lead, hubspot: lead}
deal_stages:
  - {name: new, hubspot: appointmentscheduled}
"""
RULE_WITH_MISTAKES = """version: 1
rules:
  - name: install-creates-lead
    on: install.tracked
    actions:
      - upsert_contact:
          identity: {deep_link_token: data.token}
          set: {first_touch_campaign: data.campaign, first_touch_campain: data.campaign}
      - set_stage: {identity: {deep_link_token: data.token}, stage: leed}
"""


def test_a_broken_field_map_does_not_hide_the_rules_problems(tmp_path: Path) -> None:
    (tmp_path / "fields.yaml").write_text(BROKEN_FIELDS, encoding="utf-8")
    (tmp_path / "installs.yaml").write_text(RULE_WITH_MISTAKES, encoding="utf-8")

    found = [(Path(p.location.file).name, p.code, p.message) for p in check_paths([tmp_path])]

    assert found == [
        ("fields.yaml", "invalid-value", "'strng' is not allowed here"),
        ("installs.yaml", "unknown-field",
         "'first_touch_campain' is not a field in the field map"),
        ("installs.yaml", "unknown-stage", "'leed' is not a contact stage"),
    ]


def test_a_field_map_without_its_lists_checks_no_fields(tmp_path: Path) -> None:
    (tmp_path / "fields.yaml").write_text("version: 1\nfields: {}\n", encoding="utf-8")
    (tmp_path / "installs.yaml").write_text(RULE_WITH_MISTAKES, encoding="utf-8")

    codes = {p.code for p in check_paths([tmp_path])}

    assert "missing-key" in codes
    assert not codes & {"unknown-field", "unknown-stage"}
