"""The one SOQL escaping function, attacked: each value must reach the parser as one literal."""

from __future__ import annotations

import random

import pytest

from engine.targets.salesforce import soql
from tests.emulators.salesforce_soql import SOQLError, parse, read_string

HOSTILE = ["O'Brien", "back\\slash", "\\'", "ends with \\", "'", "''", "\\\\'", "a\nb\rc\td",
           "x' OR LastName LIKE '%", "x\\' OR LastName LIKE '%", "%_", "\\%", "日本語 ü ß 🙂",
           "quote\" mark", "\x00\x01\x1f\x7f", "\b\f", "\\u0027", "' OR Id != null OR Id = '"]


@pytest.mark.parametrize(("value", "escaped"), [
    ("O'Brien", "O\\'Brien"), ("a\\b", "a\\\\b"), ("\\'", "\\\\\\'"), ("a\nb", "a\\nb"),
    ("a\r\tb", "a\\r\\tb"), ('say "hi"', 'say \\"hi\\"'), ("50%_off", "50%_off"),
    ("\x00", "\\u0000"), ("ü🙂", "ü🙂"),
])
def test_escape_follows_the_soql_escape_sequences(value: str, escaped: str) -> None:
    assert soql.escape(value) == escaped


def test_escape_changes_exactly_the_reserved_and_control_characters() -> None:
    """Values with nothing to escape are passed through whole (the fast path): every
    character of the Basic Multilingual Plane, surrogates included, either stays itself or is
    one `escape` must change, in a value of its own and inside a longer one."""
    for code in range(0x10000):
        char = chr(code)
        reserved = char in "\\'\"" or code < 0x20 or code == 0x7F or 0xD800 <= code <= 0xDFFF
        assert (soql.escape(char) != char) == reserved, hex(code)
        assert (soql.escape(f"tok_{char}@x") != f"tok_{char}@x") == reserved, hex(code)


@pytest.mark.parametrize("value", HOSTILE)
def test_an_escaped_value_reads_back_as_exactly_one_literal(value: str) -> None:
    quoted = soql.literal(value)
    literal, end = read_string(quoted, 0)
    assert (literal.value, end) == (value, len(quoted))


@pytest.mark.parametrize("value", HOSTILE)
def test_a_query_with_a_hostile_value_matches_that_value_and_nothing_else(value: str) -> None:
    columns = {"Id": 1, "Email": 1, "LastName": 1}
    query = parse(soql.select_where(["Id"], "Lead", "Email", [value, "other"]), {"Lead": columns})
    assert query.where is not None
    assert query.where({"Id": "1", "Email": value, "LastName": "A"})
    assert not query.where({"Id": "2", "Email": "x", "LastName": "A"})
    assert not query.where({"Id": "3", "Email": None, "LastName": None})


def test_random_values_survive_the_strict_parser() -> None:
    alphabet = "ab'\\\"\n\r\t\b\f%_ ü🙂\x01\x7f()=,"
    rng = random.Random(4)
    for _ in range(2000):
        value = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        quoted = soql.literal(value)
        assert read_string(quoted, 0) == (read_string(quoted, 0)[0], len(quoted))
        assert read_string(quoted, 0)[0].value == value


@pytest.mark.parametrize("broken", ["'\\x'", "'\\%'", "'unterminated", "'ends\\'", "'a\nb'"])
def test_the_emulator_rejects_literals_that_break_the_escaping_rules(broken: str) -> None:
    with pytest.raises(SOQLError):
        parse(f"SELECT Id FROM Lead WHERE Email = {broken}", {"Lead": {"Id": 1, "Email": 1}})


def test_names_are_checked_because_they_cannot_be_escaped() -> None:
    assert soql.select_where(["Id", "Email"], "Lead", "Email", ["a'b"], limit=2) == \
        "SELECT Id, Email FROM Lead WHERE Email = 'a\\'b' LIMIT 2"
    for bad in ("Email = '' OR Id", "Lead--", "1Field", ""):
        with pytest.raises(ValueError):
            soql.select_where(["Id"], "Lead", bad, ["x"])


@pytest.mark.parametrize("value", HOSTILE)
def test_an_or_query_matches_a_record_holding_either_value_and_nothing_else(value: str) -> None:
    columns = {"Id": 1, "Email": 1, "Token__c": 1}
    text = soql.select_where_any(["Id"], "Lead", {"Token__c": [value, "t2"],
                                                  "Email": [value.upper(), "b@x.co"]})
    query = parse(text, {"Lead": columns})
    assert query.where is not None
    assert query.where({"Id": "1", "Token__c": value, "Email": None})
    assert query.where({"Id": "2", "Token__c": "other", "Email": value})  # any case
    assert query.where({"Id": "3", "Token__c": None, "Email": "B@X.CO"})
    assert not query.where({"Id": "4", "Token__c": "x", "Email": "y"})
    assert not query.where({"Id": "5", "Token__c": None, "Email": None})


def test_an_or_query_leaves_out_fields_without_values() -> None:
    assert soql.select_where_any(["Id", "Id"], "Lead", {"Token__c": ["a'b"], "Email": []}) == \
        "SELECT Id FROM Lead WHERE Token__c = 'a\\'b'"
    with pytest.raises(ValueError):
        soql.select_where_any(["Id"], "Lead", {"Email": []})
    with pytest.raises(ValueError):
        soql.select_where_any(["Id"], "Lead", {"Email = '' OR Id": ["x"]})


def test_parts_cut_at_the_count_or_where_the_encoded_query_would_pass_the_budget() -> None:
    frame = soql.select_where(["Id"], "Lead", "Email", ["", ""])

    def sizes(values: list[str], most: int, budget: int) -> list[int]:
        cut = list(soql.parts(values, lambda v: [v], frame, most=most, budget=budget))
        assert [v for part in cut for v in part] == values  # in order, each once
        for part in cut:
            text = soql.select_where(["Id"], "Lead", "Email", part)
            assert len(part) == 1 or soql.encoded_length(text) <= budget
        return [len(part) for part in cut]

    assert sizes([f"v{n}" for n in range(450)], 200, 100_000) == [200, 200, 50]
    # 'x…x' of 100 characters costs 100 + %27%27 + %2C%20 = 112 encoded characters.
    budget = soql.encoded_length(frame) + 10 * 112
    assert sizes(["x" * 100] * 25, 200, budget) == [10, 10, 5]
    assert sizes(["é" * 200] * 3, 200, budget) == [1, 1, 1]  # é: 6 characters once encoded
    assert sizes(["x" * 5000], 200, 10) == [1]  # too long alone: the server will say so
