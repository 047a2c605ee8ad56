"""The static warning for functions that refuse null fed an event field that may be absent."""

from __future__ import annotations

import pytest

from engine.rules.expressions import compile_expression
from engine.rules.nullcheck import nullable_arguments


@pytest.mark.parametrize(("source", "function", "path", "offset"), [
    ("starts_with(data.referrer_id, 'partner-')", "starts_with", ("data", "referrer_id"), 12),
    ("contains(lower(data.platform), 'ios')", "contains", ("data", "platform"), 9),
    ("ends_with('x', data.suffix)", "ends_with", ("data", "suffix"), 15),
    ("length(data.items || data.list)", "length", ("data", "list"), 7),
    ("data.a && starts_with(data.b, 'x')", "starts_with", ("data", "b"), 22),
    ("sort_by(data.items, &name)", "sort_by", ("data", "items"), 8),
])
def test_warns_where_a_missing_field_fails_the_call(source: str, function: str,
                                                     path: tuple[str, ...],
                                                     offset: int) -> None:
    (found,) = nullable_arguments(source)
    assert (found.function, found.path, found.offset) == (function, path, offset)
    assert found.caret.splitlines()[1] == " " * offset + "^"
    # And it is true: the expression fails on an event without the field.
    with pytest.raises(Exception, match="invalid type for value: None"):
        compile_expression(source).search({"data": {"a": True}})


@pytest.mark.parametrize("source", [
    "starts_with(data.referrer_id || '', 'partner-')",   # a default
    "data.referrer_id && starts_with(data.referrer_id, 'p')",  # guarded on the left of &&
    "lower(data.platform)",                              # linkcrm's helpers pass null through
    "to_date(timestamp)",
    "join('-', ['referral', data.token])",               # an element, not the argument
    "not_null(data.a, data.b)",                          # takes anything
    "data.items[?starts_with(sku, 'a')]",                # elements, not the event
    "sort_by(data.items || `[]`, &starts_with(name, 'a'))",  # inside &expr: elements
    "starts_with('abc', 'a')",
    "length(@)",
])
def test_no_warning_where_null_cannot_reach_the_call(source: str) -> None:
    assert nullable_arguments(source) == []


def test_the_rules_when_guards_the_actions_reads() -> None:
    source = "starts_with(data.referrer_id, 'partner-')"
    assert nullable_arguments(source, [("data", "referrer_id")]) == []
    assert nullable_arguments(source, [("data", "referrer_id", "kind")]) == []
    assert len(nullable_arguments(source, [("data", "other")])) == 1


def test_a_syntax_error_gives_no_warning_here() -> None:
    assert nullable_arguments("starts_with(data.x") == []
