"""The parts agree: registry, schemas, README, shipped files (in the spirit of test_docs.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from engine.actions import ACTIONS
from engine.config.resources import load_schema, validator
from engine.rules.eventschemas import known_types
from engine.rules.functions import describe
from tests.support.paths import REPO

ROOT = REPO
README = (ROOT / "README.md").read_text(encoding="utf-8")
SCHEMAS = sorted((ROOT / "schemas").rglob("*.json"))


@pytest.mark.parametrize("path", SCHEMAS, ids=lambda p: p.name)
def test_every_schema_is_a_valid_draft_2020_12_schema(path: Path) -> None:
    schema = json.loads(path.read_text(encoding="utf-8"))
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(schema)


def test_every_action_is_in_the_schema_the_test_schema_and_the_readme() -> None:
    rule_actions = load_schema("rules.schema.json")["$defs"]["action"]["properties"]
    test_actions = load_schema("rule-tests.schema.json")["$defs"]["expected_action"]["properties"]
    assert set(rule_actions) == set(ACTIONS)
    assert set(test_actions) - {"rule"} == set(ACTIONS)
    for name, cls in ACTIONS.items():
        assert f"`{name}`" in README
        declared = set(rule_actions[name]["properties"]) - {"identity"}
        fields = set(cls(rule="", identity=()).payload())
        assert declared == fields, name


def test_every_custom_function_is_documented_with_an_example() -> None:
    custom = [doc for doc in describe() if doc.custom]
    assert {doc.name for doc in custom} >= {"lower", "upper", "trim", "split", "replace",
                                             "to_date", "to_epoch_ms"}
    for doc in custom:
        assert f"| `{doc.name}(" in README, doc.name


def test_every_documented_event_type_has_a_schema() -> None:
    assert set(known_types()) == {"install.tracked", "referral.created", "referral.completed",
                                  "deferred_link.claimed", "link.clicked", "test",
                                  "app.user_identified"}
    for name in known_types():
        assert f"`{name}`" in README


@pytest.mark.parametrize("path", sorted((ROOT / "rules").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_yaml_files_point_editors_at_their_schema(path: Path) -> None:
    first = path.read_text(encoding="utf-8").splitlines()[0]
    schema = ("fields.schema.json" if path.name == "fields.yaml" else
              "rule-tests.schema.json" if path.stem.endswith("_test") else "rules.schema.json")
    assert first == f"# yaml-language-server: $schema=../schemas/{schema}"


def test_event_schemas_accept_both_payload_shapes_and_reject_a_bad_envelope() -> None:
    install = validator("events/install.tracked.json")
    assert install.is_valid({"event": "install.tracked", "timestamp": "2026-03-01T00:00:00Z",
                             "data": {"token": "t", "campaign": "c", "platform": "ios"}})
    assert install.is_valid({"event": "install.tracked", "timestamp": "2026-03-01T00:00:00Z",
                             "data": {"hostname": "h", "device_type": "d", "ip": "1.2.3.4",
                                      "extra": {"anything": True}}})
    assert not install.is_valid({"event": "install.tracked", "timestamp": "x", "data": []})
    assert not install.is_valid({"event": "referral.created", "timestamp": "x", "data": {}})
    identify = validator("events/app.user_identified.json")
    assert not identify.is_valid({"event": "app.user_identified", "timestamp": "x",
                                  "data": {"first_name": "no identity"}})


def test_readme_starts_with_the_two_commands() -> None:
    lines = README.splitlines()
    block = lines[lines.index("```sh") + 1: lines.index("```")]
    commands = [line for line in block if line and not line.startswith("#")]
    assert len(commands) == 2
    assert "pytest" in commands[1] and "pip install -e '.[test]'" in commands[1]
