"""Compiling rule expressions: root paths, literals, static errors and their locations."""

from __future__ import annotations

import dataclasses

import jmespath
import jmespath.exceptions
import pytest

from engine.rules.expressions import Expression, ExpressionError, compile_expression
from engine.rules.functions import FUNCTIONS

EVENT = {
    "event": "install.tracked",
    "timestamp": "2026-03-01T23:30:00-02:00",
    "data": {"token": "tok-1", "email": "  Ada@Example.COM ", "campaign": None,
             "utm_campaign": "spring",
             "items": [{"sku": "A", "price": 3}, {"sku": "B", "price": 1}]},
}


@pytest.mark.parametrize(
    ("source", "paths"),
    [
        ("lifecycle", (("lifecycle",),)),
        ("data.token || data.referral_code", (("data", "token"), ("data", "referral_code"))),
        ("join('-', ['r', data.token])", (("data", "token"),)),
        ("data.items[0].sku", (("data", "items"),)),
        ("data.items[*].sku", (("data", "items"),)),
        ("data.items[?price > `1`].sku", (("data", "items"),)),
        ("sort_by(data.items, &price)[0].sku", (("data", "items"),)),
        ("map(&lower(@), data.tags)", (("data", "tags"),)),
        ("*.token", ()),  # the whole document: no chain
        ("{id: data.token, at: to_date(timestamp)}", (("data", "token"), ("timestamp",))),
        ("data | token", (("data", "token"),)),
        ("@.data.token", (("data", "token"),)),
        ('data."first-name"', (("data", "first-name"),)),
        ("event == 'install.tracked' && data.token", (("event",), ("data", "token"))),
        ("data.token || data.token", (("data", "token"),)),
        ("data || data.token", (("data",), ("data", "token"))),
        ("length(@)", ()),
        ("@ | data.token", (("data", "token"),)),
        ("'lead'", ()),
        ("`{\"a\": 1}`", ()),
    ],
)
def test_root_paths(source: str, paths: tuple[tuple[str, ...], ...]) -> None:
    assert compile_expression(source).root_paths() == paths


@pytest.mark.parametrize(
    ("source", "value"),
    [("'lead'", "lead"), ("`42`", 42), ("`4.5`", 4.5), ("`true`", True), ("`null`", None),
     ("`[1, \"a\"]`", [1, "a"]), ("('lead')", "lead")],
)
def test_literals(source: str, value: object) -> None:
    expression = compile_expression(source)
    assert expression.is_literal
    assert expression.literal_value == value and type(expression.literal_value) is type(value)
    assert expression.search(EVENT) == value


@pytest.mark.parametrize("source", ["data.token", "'a' || 'b'", "['lead']", "!`true`"])
def test_non_literals(source: str) -> None:
    expression = compile_expression(source)
    assert not expression.is_literal
    assert expression.literal_value is None


def test_a_literal_container_is_never_shared_between_evaluations() -> None:
    expression = compile_expression("`{\"tags\": [\"a\"]}`")
    first = expression.search({})
    assert isinstance(first, dict)
    first["tags"].append("mutated")
    assert expression.search({}) == {"tags": ["a"]}
    assert expression.literal_value == {"tags": ["a"]}


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("data.token", "tok-1"),
        ("data.campaign || data.utm_campaign", "spring"),
        ("join(' ', ['Referral:', data.token || data.referral_code])", "Referral: tok-1"),
        ("to_date(timestamp)", "2026-03-02"),
        ("to_epoch_ms(timestamp)", 1772415000000),
        ("lower(trim(data.email))", "ada@example.com"),
        ("event == 'install.tracked' && data.token", "tok-1"),
        ("event == 'referral.completed' && data.token", False),
        ("max_by(data.items, &price).sku", "A"),
        ("sort_by(data.items, &price)[].sku", ["B", "A"]),
        ("data.items[?price > `1`].sku | [0]", "A"),
    ],
)
def test_rule_expressions_give_what_jmespath_gives(source: str, expected: object) -> None:
    result = compile_expression(source).search(EVENT)
    assert result == expected and type(result) is type(expected)
    options = jmespath.Options(custom_functions=FUNCTIONS)
    assert jmespath.search(source, EVENT, options=options) == expected


def test_run_time_errors_are_the_packages_own() -> None:
    expression = compile_expression("lower(data.items)")
    with pytest.raises(jmespath.exceptions.JMESPathTypeError):
        expression.search(EVENT)
    with pytest.raises(jmespath.exceptions.JMESPathError, match="to_date"):
        compile_expression("to_date(data.token)").search(EVENT)


def test_expressions_are_cached_and_immutable() -> None:
    expression = compile_expression("data.token")
    assert compile_expression("data.token") is expression
    assert isinstance(expression, Expression) and expression.source == "data.token"
    with pytest.raises(dataclasses.FrozenInstanceError):
        expression.source = "x"  # type: ignore[misc]


def test_odd_field_names_and_strings_stay_data() -> None:
    # Identifiers and literals reach the generated code only as constants, never as source.
    name = "a'\\\"\n) or __import__('os'"
    quoted = '"a\'\\\\\\"\\n) or __import__(\'os\'"'
    assert compile_expression(quoted).search({name: 1}) == 1
    assert compile_expression("'x\\') or 1 #'").search({}) == "x') or 1 #"


def test_expressions_nested_too_deep_for_python_still_evaluate() -> None:
    source = "a" + "[*].a" * 30
    document: object = [1]
    for _ in range(31):
        document = {"a": [document]}
    expected = jmespath.search(source, document)
    assert compile_expression(source).search(document) == expected


def test_absurd_nesting_is_a_syntax_error_not_a_crash() -> None:
    problem = error("(" * 5000 + "a" + ")" * 5000)
    assert (problem.code, problem.message) == ("expression-syntax",
                                               "the expression is nested too deeply")


def error(source: str) -> ExpressionError:
    with pytest.raises(ExpressionError) as caught:
        compile_expression(source)
    assert isinstance(caught.value, ValueError)
    return caught.value


@pytest.mark.parametrize(
    ("source", "code", "message", "offset", "hint"),
    [
        ("lowr(data.email)", "unknown-function", "unknown function lowr()", 0,
         "did you mean lower()?"),
        ("trim(data.a) || data.to_dat(timestamp)", "unknown-function",
         "unknown function to_dat()", 21, "did you mean to_date()?"),
        ("zzz()", "unknown-function", "unknown function zzz()", 0,
         "known functions: abs, avg, ceil, contains, ends_with, floor, join, keys, length, "
         "lower, map, max, max_by, merge, min, min_by, not_null, replace, reverse, sort, "
         "sort_by, split, starts_with, sum, to_array, to_date, to_epoch_ms, to_number, "
         "to_string, trim, type, upper, values"),
        ("join('-')", "wrong-argument-count", "join() takes 2 arguments, got 1", 0,
         "usage: join(string, array-string), e.g. join('-', ['referral', 'abc123'])"),
        ("data.to_date(a, b)", "wrong-argument-count", "to_date() takes 1 argument, got 2", 5,
         "usage: to_date(string|null), e.g. to_date('2026-03-01T23:30:00-02:00')"),
        ("merge()", "wrong-argument-count", "merge() takes at least 1 argument, got 0", 0,
         'usage: merge(object...), e.g. merge(`{"a": 1}`, `{"b": 2}`)'),
        ("not_null()", "wrong-argument-count", "not_null() takes at least 1 argument, got 0", 0,
         "usage: not_null(any...), e.g. not_null(`null`, 'x')"),
        ("to_date(`42`)", "argument-type",
         "argument 1 of to_date() must be string or null, got number (42)", 8,
         "usage: to_date(string|null), e.g. to_date('2026-03-01T23:30:00-02:00')"),
        ("join(', ', ['a', `1`])", "argument-type",
         "argument 2 of join() must be array-string, got an array containing a number", 17,
         "usage: join(string, array-string), e.g. join('-', ['referral', 'abc123'])"),
        ("max(`[1, \"a\"]`)", "argument-type",
         "argument 1 of max() must be array-number or array-string,"
         " got an array containing a string ([1, \"a\"])", 4,
         "usage: max(array-number|array-string), e.g. max(`[1, 3, 2]`)"),
        ("join('', `[{}]`)", "argument-type",
         "argument 2 of join() must be array-string, got an array containing an object ([{}])", 9,
         "usage: join(string, array-string), e.g. join('-', ['referral', 'abc123'])"),
        ("abs(data.a == `1`)", "argument-type",
         "argument 1 of abs() must be number, got boolean", 4,
         "usage: abs(number), e.g. abs(`-3`)"),
        ("abs(a > b)", "argument-type",
         "argument 1 of abs() must be number, got boolean", 4,
         "usage: abs(number), e.g. abs(`-3`)"),
        ("upper(!a)", "argument-type",
         "argument 1 of upper() must be string or null, got boolean", 6,
         "usage: upper(string|null), e.g. upper('fr')"),
        ("sum({a: b})", "argument-type",
         "argument 1 of sum() must be array-number, got object", 4,
         "usage: sum(array-number), e.g. sum(`[1, 2]`)"),
        ("merge(data, 'x')", "argument-type",
         "argument 2 of merge() must be object, got string ('x')", 12,
         'usage: merge(object...), e.g. merge(`{"a": 1}`, `{"b": 2}`)'),
        ("sort_by(data.items, price)", "argument-type",
         "argument 2 of sort_by() must be an expression reference (&...), got a value", 20,
         'prefix the argument with & to pass an expression, as in'
         ' sort_by(`[{"n": 2}, {"n": 1}]`, &n)'),
        ("length(&data)", "argument-type",
         "argument 1 of length() must be string or array or object,"
         " got an expression reference (&...)", 7, "remove the &; for example length('abc')"),
        ("lower(a) || length(abs(&b))", "argument-type",
         "argument 1 of abs() must be number, got an expression reference (&...)", 23,
         "remove the &; for example abs(`-3`)"),
    ],
)
def test_static_errors(source: str, code: str, message: str, offset: int, hint: str) -> None:
    problem = error(source)
    assert (problem.code, problem.message) == (code, message)
    if offset >= 0:
        assert (problem.offset, problem.hint) == (offset, hint)
        assert problem.caret == f"{source}\n{' ' * offset}^"


@pytest.mark.parametrize(
    "source",
    [
        "length([a])",  # a multi-select list is an array: fine
        "lower([a][0])",  # an element could be anything
        "lower(`null`)",
        "not_null(&a)",  # any type is accepted, an expression reference too
        "sort_by(@, [&a][0])",  # an expression reference could flow here
        "to_string(a == b)",
        "join('-', ['a', data.b])",
        "upper(!data.a)",  # (!data).a: a field of a boolean, so null
    ],
)
def test_what_cannot_be_decided_statically_compiles(source: str) -> None:
    compile_expression(source)


@pytest.mark.parametrize(
    ("source", "message", "offset", "hint"),
    [
        ("", "the expression is empty", 0,
         "write a JMESPath expression such as data.token, or a literal such as 'lead'"),
        ("   ", "the expression is empty", 0,
         "write a JMESPath expression such as data.token, or a literal such as 'lead'"),
        ("event = 'x'", "invalid JMESPath syntax: unknown token '='", 6,
         "compare with ==, as in event == 'install.tracked'"),
        ('event == "lead" &&', "invalid JMESPath syntax: the expression ends too early", 18,
         "complete the expression: it stops after an operator, a dot or an open bracket;"
         " and JMESPath string literals use single quotes: 'lead' (\"lead\" names a field)"),
        ("data.first-name", "invalid JMESPath syntax: unknown token '-'", 10,
         'double-quote a field name that contains "-", as in data."first-name"'),
        ("a and b", "invalid JMESPath syntax: unexpected token: and", 2,
         "JMESPath writes 'and' as &&"),
        ("'abc", "invalid JMESPath syntax: unclosed ' delimiter", 0,
         "close the string literal with a single quote: 'lead'"),
        ("foo[", "invalid JMESPath syntax: the expression ends too early", 4,
         "complete the expression: it stops after an operator, a dot or an open bracket"),
        ("data.", "invalid JMESPath syntax: the expression ends too early", 5,
         "complete the expression: it stops after an operator, a dot or an open bracket"),
        ("data.`1`", "invalid JMESPath syntax: a '.' must be followed by a field name, '[' or"
         " '{', found 1", 5, "check the expression at the caret against the JMESPath grammar:"
         " https://jmespath.org/specification.html"),
        ("a[::0]", "a slice step cannot be 0", 2,
         "use a step of 1 or more ([::2]) or negative ([::-1])"),
    ],
)
def test_syntax_errors(source: str, message: str, offset: int, hint: str) -> None:
    problem = error(source)
    assert (problem.code, problem.message, problem.offset, problem.hint) == (
        "expression-syntax", message, offset, hint)
    assert problem.caret == f"{source}\n{' ' * offset}^"


def test_the_caret_is_under_the_problem_like_jmespaths_own() -> None:
    source = "data.token || data.x &&"
    with pytest.raises(jmespath.exceptions.ParseError) as theirs:
        jmespath.compile(source)
    problem = error(source)
    assert problem.offset == theirs.value.lex_position
    assert problem.caret == "data.token || data.x &&\n                       ^"
    assert str(problem) == (
        "expression-syntax: invalid JMESPath syntax: the expression ends too early\n"
        f"{problem.caret}\n"
        "    hint: complete the expression: it stops after an operator, a dot or an open bracket"
    )


@pytest.mark.parametrize(("source", "offset", "opener"), [
    ("starts_with(data.x, 'p'", 11, "("),
    ("data.token || data.[x", 19, "["),
    ("join(')', [data.x]", 4, "("),  # a bracket inside a string literal does not count
    ("[data.a, {b: data.b}", 0, "["),
])
def test_an_unclosed_bracket_is_pointed_at(source: str, offset: int, opener: str) -> None:
    problem = error(source)
    assert problem.message == f"invalid JMESPath syntax: this {opener!r} is never closed"
    assert problem.offset == offset
    assert problem.hint.startswith(f"close it with {dict(['()', '[]', '{}'])[opener]!r}")


def test_the_caret_stays_in_column_for_multi_line_sources() -> None:
    problem = error("data.token ||\n\tlowr(x)")
    assert problem.offset == 15
    assert problem.caret == "data.token ||  lowr(x)\n               ^"
