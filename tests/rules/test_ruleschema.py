"""The rule-file schema generated from the field map (`linkcrm schema`)."""

from __future__ import annotations

from typing import Any

import pytest
from jsonschema import Draft202012Validator

from engine.config.fieldmap import load_field_map
from engine.config.yamlsource import load_yaml
from engine.rules.eventschemas import known_types
from engine.rules.ruleschema import rule_schema
from tests.support.paths import REPO

RULES = REPO / "rules"


@pytest.fixture(scope="module")
def validator() -> Draft202012Validator:
    schema = rule_schema(load_field_map(RULES / "fields.yaml"))
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def rule(action: dict[str, Any], on: Any = "install.tracked") -> dict[str, Any]:
    return {"version": 1, "rules": [{"name": "r", "on": on, "actions": [action]}]}


def errors(validator: Draft202012Validator, document: Any) -> list[str]:
    return sorted(e.message for e in validator.iter_errors(document))


def test_the_shipped_rules_pass(validator: Draft202012Validator) -> None:
    text = (RULES / "attribution.yaml").read_text(encoding="utf-8")
    assert errors(validator, load_yaml(text, "attribution.yaml").data) == []


def test_field_names_are_the_field_maps_per_action(validator: Draft202012Validator) -> None:
    ok = {"upsert_contact": {"identity": {"email": "data.email"},
                             "set": {"first_touch_campaign": "data.campaign"}}}
    assert errors(validator, rule(ok)) == []
    typo = {"upsert_contact": {"identity": {"email": "data.email"},
                               "set_once": {"first_touch_campain": "data.campaign"}}}
    assert errors(validator, rule(typo)) == [
        "Additional properties are not allowed ('first_touch_campain' was unexpected)"]
    deal_field = {"upsert_contact": {"identity": {"email": "data.email"},
                                     "set": {"referral_code": "data.token"}}}
    assert errors(validator, rule(deal_field)) != []
    not_identity = {"set_stage": {"identity": {"first_name": "data.name"}, "stage": "lead"}}
    assert errors(validator, rule(not_identity)) != []


def test_stages_are_enums_per_object(validator: Draft202012Validator) -> None:
    stage = {"set_stage": {"identity": {"email": "data.email"}, "stage": "customr"}}
    assert errors(validator, rule(stage)) == ["'customr' is not one of ['lead', 'customer']"]
    deal = {"create_deal": {"identity": {"email": "data.email"}, "key": "data.token",
                            "title": "data.token", "stage": "lead"}}
    assert errors(validator, rule(deal)) == ["'lead' is not one of ['new', 'won']"]


def test_event_types_are_offered_and_custom_ones_allowed(
        validator: Draft202012Validator) -> None:
    schema = validator.schema
    assert schema["$defs"]["event_pattern"]["anyOf"][0] == {"enum": list(known_types())}
    action = {"set_stage": {"identity": {"email": "data.email"}, "stage": "lead"}}
    assert errors(validator, rule(action, on=["order.paid", "referral.*"])) == []


def test_fields_carry_label_and_type_for_the_editor(validator: Draft202012Validator) -> None:
    props = validator.schema["$defs"]["contact_fields"]["properties"]
    assert props["first_touch_platform"]["description"] == (
        "First-touch platform (enum: one of ios, android, web)")
    assert props["email"]["description"] == "Email (email), identity"
