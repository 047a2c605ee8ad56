"""Field map loading and per-CRM value coercion."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.config.fieldmap import CANONICAL, CoercionError, Dialect, FieldMap, load_field_map
from engine.errors import ConfigError
from engine.targets.registry import dialect
from tests.support.paths import REPO

SHIPPED = REPO / "rules" / "fields.yaml"


@pytest.fixture(scope="module")
def field_map() -> FieldMap:
    return load_field_map(SHIPPED)


def test_shipped_map_carries_the_crm_names(field_map: FieldMap) -> None:
    token = field_map.fields["deep_link_token"]
    assert token.identity
    assert token.in_crm("hubspot") is not None
    assert token.in_crm("salesforce").name == "Deep_Link_Token__c"  # type: ignore[union-attr]
    pipedrive = token.in_crm("pipedrive")
    assert pipedrive is not None and dialect("pipedrive").kind(pipedrive) == "label"
    assert field_map.fields["email"].in_crm("pipedrive").kind == "builtin"  # type: ignore[union-attr]
    assert [s.name for s in field_map.contact_stages] == ["lead", "customer"]
    assert field_map.contact_stage("customer").value("salesforce") == "Deep Link Customer"  # type: ignore[union-attr]
    assert field_map.targets["salesforce"]["lead_defaults"]["LeadSource"] == "Deep Link"
    for name in ("first_touch_campaign", "first_touch_platform", "install_date",
                 "referral_source", "referral_date", "conversion_date", "deep_link_token",
                 "deep_link_prefix"):
        assert field_map.fields[name].in_crm("hubspot").name == name  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("target", "field", "value", "expected"),
    [
        ("hubspot", "install_date", "2026-03-01T23:30:00-02:00", "1772409600000"),
        ("hubspot", "install_date", "2026-03-02", "1772409600000"),
        ("salesforce", "install_date", "2026-03-01T23:30:00-02:00", "2026-03-02"),
        ("pipedrive", "install_date", 1772409600000, "2026-03-02"),
        ("local", "install_date", "2026-03-02T00:00:00Z", "2026-03-02"),
        ("salesforce", "last_deep_link_claimed_at", "2026-03-01T12:31:10Z",
         "2026-03-01T12:31:10.000Z"),
        ("pipedrive", "last_deep_link_claimed_at", "2026-03-01T14:31:10+02:00",
         "2026-03-01T12:31:10Z"),
        ("hubspot", "deep_link_token", 42, "42"),
        ("local", "email", " a@b.co ", "a@b.co"),
        ("local", "first_touch_platform", "ios", "ios"),
    ],
)
def test_coercion_per_crm(field_map: FieldMap, target: str, field: str, value: object,
                          expected: object) -> None:
    assert field_map.coerce(dialect(target), field, value) == expected  # type: ignore[arg-type]


def test_the_target_s_dialect_decides_how_values_are_written(field_map: FieldMap) -> None:
    """The field map knows no CRM's ways: the same field and value come out as the dialect
    passed in says, and a bare name in fields.yaml means what that target takes it to mean."""
    plain = Dialect("hubspot")
    assert field_map.coerce(plain, "install_date", "2026-03-02") == "2026-03-02"
    assert field_map.coerce(dialect("hubspot"), "install_date", "2026-03-02") == "1772409600000"
    european = Dialect("hubspot", write_date=lambda day: day.strftime("%d/%m/%Y"))
    assert field_map.coerce(european, "install_date", "2026-03-02") == "02/03/2026"
    token = field_map.fields["deep_link_token"].in_crm("pipedrive")
    assert token is not None and token.bare
    assert (plain.kind(token), dialect("pipedrive").kind(token)) == ("name", "label")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("email", "not-an-email", "is not an email address"),
        ("install_date", "yesterday", "is not an ISO 8601 date"),
        ("first_touch_platform", "blackberry", "is not one of ios, android, web"),
        ("deep_link_token", {"a": 1}, "expected a text value"),
    ],
)
def test_coercion_errors_name_the_field(field_map: FieldMap, field: str, value: object,
                                        message: str) -> None:
    with pytest.raises(CoercionError, match=message) as caught:
        field_map.coerce(CANONICAL, field, value)  # type: ignore[arg-type]
    assert str(caught.value).startswith(field)


def test_bad_field_map_reports_every_problem(tmp_path: Path) -> None:
    path = tmp_path / "fields.yaml"
    path.write_text(
        "version: 1\nfields:\n  Bad-Name: {type: string}\n  x: {type: strng}\n"
        "contact_stages:\n  - {name: lead}\n  - {name: lead}\ndeal_stages: []\n",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as caught:
        load_field_map(path)
    codes = sorted(p.code for p in caught.value.problems)
    assert codes == ["duplicate-stage", "empty-value", "invalid-name", "invalid-value"]
    rendered = str(caught.value)
    assert f"{path}:3:3: invalid-name" in rendered
    assert "did you mean 'string'?" in rendered
