"""Constants checked against the field map: type and options."""

from __future__ import annotations

import pytest

from engine.config.fieldmap import FieldSpec
from engine.rules.constants import constant_problem

PLATFORM = FieldSpec("platform", "enum", options=("ios", "android", "web"))


@pytest.mark.parametrize(("spec", "value"), [
    (FieldSpec("amount", "number"), 49.99),
    (FieldSpec("count", "integer"), 3),
    (FieldSpec("day", "date"), "2026-03-01"),
    (FieldSpec("at", "datetime"), "2026-03-01T12:00:00Z"),
    (FieldSpec("email", "email"), "ada@example.com"),
    (FieldSpec("ok", "boolean"), True),
    (FieldSpec("name", "string"), "spring"),
    (FieldSpec("name", "string"), 42),  # written as text "42"
    (PLATFORM, "ios"),
    (PLATFORM, None),  # null leaves the field untouched
])
def test_constants_that_fit(spec: FieldSpec, value: object) -> None:
    assert constant_problem(spec, value) is None


@pytest.mark.parametrize(("spec", "value", "message", "hint"), [
    (FieldSpec("amount", "number"), "49.99", "amount is a number, but the constant '49.99' is "
     "text", 'write the number as a JMESPath number literal: "`49.99`"'),
    (FieldSpec("count", "integer"), 1.5, "the constant `1.5` cannot be written to count "
     "(integer): 1.5 is not a whole number", 'write an integer constant such as "`42`"'),
    (PLATFORM, "iOS", "'iOS' is not an option of platform",
     "did you mean 'ios'? options are case-sensitive, as the field map declares them"),
    (PLATFORM, "iphone", "'iphone' is not an option of platform",
     "expected one of: 'android', 'ios', 'web' (the options are declared in the field map)"),
    (FieldSpec("ok", "boolean"), "true", "ok is a boolean, but the constant 'true' is text",
     'write "`true`" or "`false`"'),
    (FieldSpec("day", "date"), "01/03/2026", "the constant '01/03/2026' cannot be written to "
     "day (date): '01/03/2026' is not an ISO 8601 date",
     "write a date constant such as \"'2026-03-01'\""),
])
def test_constants_that_do_not_fit(spec: FieldSpec, value: object, message: str,
                                   hint: str) -> None:
    assert constant_problem(spec, value) == (message, hint)
