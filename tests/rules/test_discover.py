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
