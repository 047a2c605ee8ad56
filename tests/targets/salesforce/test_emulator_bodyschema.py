"""The emulators' fast body check says exactly what python-jsonschema says (bodyschema.py)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from tests.emulators.bodyschema import BodySchema
from tests.emulators.salesforce import SCHEMAS as SALESFORCE


def _schema(name: str) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((SALESFORCE / f"{name}.json").read_text())
    return document


def _lead(**fields: Any) -> dict[str, Any]:
    return {"attributes": {"type": "Lead"}, "LastName": "Ng", **fields}


COLLECTIONS = [
    {"records": [_lead(Email="a@example.com", Score__c=1.5, Active__c=True, Note__c=None)]},
    {"allOrNone": False, "records": [_lead() for _ in range(200)]},
    {"records": [_lead() for _ in range(201)]},  # one too many
    {"records": []},
    {"records": [_lead(Id="00Q000000000001")]},  # Id is not a field an upsert may set
    {"records": [_lead(Nested__c={"a": 1})]},  # not a scalar
    {"records": [{"LastName": "Ng"}]},  # no attributes
    {"records": [_lead(**{"bad name": "x"})]},
    {"records": [_lead(Text__c="\ud800 lone surrogate")]},  # jsonschema-rs cannot take it
    {"records": [_lead(Big__c=10**400)]},  # nor this integer
    {"records": [_lead(Huge__c=[10**400])]},  # invalid, and past jsonschema-rs too
    {"records": [_lead(Text__c="nul \x00 and " + "x" * 1_000_000)]},
    [],
    None,
]


@pytest.mark.parametrize("body", COLLECTIONS, ids=range(len(COLLECTIONS)))
def test_the_fast_check_finds_what_jsonschema_finds(body: Any) -> None:
    schema = _schema("collections_upsert")
    expected = [error.message for error in Draft202012Validator(schema).iter_errors(body)]
    assert [error.message for error in BodySchema(schema).iter_errors(body)] == expected


def test_the_bodies_above_are_both_valid_and_invalid() -> None:
    check = Draft202012Validator(_schema("collections_upsert"))
    valid = [check.is_valid(body) for body in COLLECTIONS]
    assert valid.count(True) == 5 and valid.count(False) == len(COLLECTIONS) - 5


def test_refs_within_the_schema_are_followed() -> None:
    schema = _schema("lead_write")
    check = BodySchema(schema)
    reference = Draft202012Validator(schema)
    for body in ({"LastName": "Ng", "Install_Date__c": "2026-12-01"},
                 {"LastName": "Ng", "Install_Date__c": "12/01/2026"}):
        assert [e.message for e in check.iter_errors(body)] == \
            [e.message for e in reference.iter_errors(body)]
    assert not reference.is_valid({"LastName": "Ng", "Install_Date__c": "12/01/2026"})


def test_a_schema_with_formats_is_refused() -> None:
    with pytest.raises(ValueError, match="format"):
        BodySchema({"properties": {"when": {"type": "string", "format": "date"}}})


class _Walked:
    def iter_errors(self, body: Any) -> Any:
        raise AssertionError("python-jsonschema walked the body")


def test_a_valid_body_is_not_walked_by_jsonschema(monkeypatch: pytest.MonkeyPatch) -> None:
    check = BodySchema(_schema("collections_upsert"))
    monkeypatch.setattr(check, "_explains", _Walked())
    assert list(check.iter_errors({"records": [_lead() for _ in range(200)]})) == []
    with pytest.raises(AssertionError, match="walked"):
        check.iter_errors({"records": []})
