"""linkcrm's custom JMESPath functions, called through the jmespath package itself."""

from __future__ import annotations

import jmespath
import jmespath.exceptions
import pytest

from engine.rules.functions import (
    CUSTOM_FUNCTION_NAMES,
    FUNCTIONS,
    InvalidValueError,
    describe,
    format_signature,
)

OPTIONS = jmespath.Options(custom_functions=FUNCTIONS)


def search(expression: str, document: object = None) -> object:
    return jmespath.search(expression, document, options=OPTIONS)


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("lower('Ada@Example.COM')", "ada@example.com"),
        ("upper('fr-be')", "FR-BE"),
        ("trim('  Ada \t\n')", "Ada"),
        ("trim('')", ""),
        ("split('a,b,,c', ',')", ["a", "b", "", "c"]),
        ("split('abc', ',')", ["abc"]),
        ("split('a--b', '--')", ["a", "b"]),
        ("replace('+1 555 0100', ' ', '')", "+15550100"),
        ("replace('aaa', 'a', 'bb')", "bbbbbb"),
        ("lower(trim(data.email))", "ada@example.com"),
    ],
)
def test_string_functions(expression: str, expected: object) -> None:
    assert search(expression, {"data": {"email": "  Ada@Example.com "}}) == expected


@pytest.mark.parametrize(
    "expression",
    ["lower(missing)", "upper(missing)", "trim(missing)", "split(missing, ',')",
     "replace(missing, 'a', 'b')", "to_date(missing)", "to_epoch_ms(missing)"],
)
def test_a_null_subject_gives_null(expression: str) -> None:
    assert search(expression, {}) is None


def test_a_null_subject_falls_through_a_fallback_chain() -> None:
    document = {"data": {"referral_code": " R-1 "}}
    assert search("lower(trim(data.token)) || trim(data.referral_code)", document) == "R-1"


@pytest.mark.parametrize(
    "expression",
    ["lower(`1`)", "upper(`true`)", "trim(`[]`)", "split('a', `null`)", "replace('a', 'a', `1`)",
     "to_date(`1772368200`)", "to_epoch_ms(`{}`)"],
)
def test_wrong_types_raise_the_packages_type_error(expression: str) -> None:
    with pytest.raises(jmespath.exceptions.JMESPathTypeError):
        search(expression)


def test_split_rejects_an_empty_separator() -> None:
    with pytest.raises(InvalidValueError, match=r"^split\(\): the separator must not be empty$"):
        search("split('abc', '')")


@pytest.mark.parametrize(
    ("timestamp", "date"),
    [
        ("2026-03-01T12:30:00Z", "2026-03-01"),
        ("2026-03-01T23:30:00-02:00", "2026-03-02"),  # 01:30 UTC the next day
        ("2026-03-01T01:00:00+05:30", "2026-02-28"),
        ("2024-03-01T00:30:00+01:00", "2024-02-29"),  # leap day
        ("2026-12-31T23:59:59.999999-00:01", "2027-01-01"),
        ("2026-03-01T12:30:00.123456789Z", "2026-03-01"),
        ("2026-03-01T12:30:00", "2026-03-01"),  # no offset: UTC, as Tolinku sends
        ("2026-03-01t12:30z", "2026-03-01"),
        ("2026-03-01 12:30:00+0200", "2026-03-01"),
        ("2026-03-01", "2026-03-01"),
    ],
)
def test_to_date_gives_the_utc_calendar_date(timestamp: str, date: str) -> None:
    assert search("to_date(ts)", {"ts": timestamp}) == date


@pytest.mark.parametrize(
    ("timestamp", "epoch_ms"),
    [
        ("1970-01-01T00:00:00Z", 0),
        ("1970-01-01", 0),
        ("2026-03-01T12:30:00Z", 1772368200000),
        ("2026-03-01T12:30:00.250Z", 1772368200250),
        ("2026-03-01T14:30:00.250+02:00", 1772368200250),
        ("2026-03-01T12:30:00.9999999Z", 1772368200999),  # truncated, never rounded up
        ("1969-12-31T23:59:59.999Z", -1),
        ("1969-12-31T23:59:59.9995Z", -1),  # floor: int(float) would give 0
        ("9999-12-31T23:59:59.999Z", 253402300799999),
    ],
)
def test_to_epoch_ms_is_an_exact_integer(timestamp: str, epoch_ms: int) -> None:
    result = search("to_epoch_ms(ts)", {"ts": timestamp})
    assert type(result) is int
    assert result == epoch_ms


@pytest.mark.parametrize(
    "bad",
    ["2026-13-01", "2026-02-30", "2026-03-01T25:00:00Z", "2026-03-01T12:30:00+24:00",
     "2026-03-01T12:30:00+02:75", "1772368200", "", "yesterday", "2026-W09-1", "20260301",
     "2026-03-01T12", " 2026-03-01", "2026-03-01T12:60:00Z", "0001-01-01T00:30:00+01:00",
     "9999-12-31T23:30:00-01:00"],
)
def test_an_unparseable_timestamp_names_the_function_and_the_value(bad: str) -> None:
    for function in ("to_date", "to_epoch_ms"):
        with pytest.raises(InvalidValueError) as caught:
            search(f"{function}(ts)", {"ts": bad})
        assert str(caught.value) == (
            f"{function}(): {bad!r} is not an ISO 8601 timestamp"
            " (expected e.g. '2026-03-01T12:30:00Z' or '2026-03-01')"
        )
        assert isinstance(caught.value, jmespath.exceptions.JMESPathError)


def test_describe_covers_every_function_once_with_a_working_example() -> None:
    docs = describe()
    assert [doc.name for doc in docs] == sorted(FUNCTIONS.FUNCTION_TABLE)
    assert {doc.name for doc in docs if doc.custom} == set(CUSTOM_FUNCTION_NAMES)
    for doc in docs:
        assert doc.signature == format_signature(doc.name)
        assert doc.example.startswith(f"{doc.name}(")
        result = search(doc.example, {})
        assert result == doc.result and type(result) is type(doc.result), doc.name


def test_signatures_read_like_the_code_declares_them() -> None:
    assert format_signature("to_date") == "to_date(string|null)"
    assert format_signature("split") == "split(string|null, string)"
    assert format_signature("merge") == "merge(object...)"
    assert format_signature("sort_by") == "sort_by(array, expref)"
