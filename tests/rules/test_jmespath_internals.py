"""What engine/rules/jmespath_internals.py relies on inside jmespath still holds.

Each test fails when a jmespath release renames, re-signs or changes the behaviour of one of
the internals that compiled expressions and located syntax errors depend on.
"""

from __future__ import annotations

import inspect
import warnings
from decimal import Decimal
from fractions import Fraction

import jmespath
import jmespath.functions
import jmespath.parser
import pytest

from engine.rules.codegen import _FAST_TYPES, compile_search
from engine.rules.functions import FUNCTIONS
from engine.rules.jmespath_internals import (
    EXPREF_CLASS_NAME,
    Expref,
    LocatingParser,
    equals,
    function_table,
    is_comparable,
    is_false,
    not_,
    stock_argument_checks,
)

Functions = jmespath.functions.Functions

VALUES: list[object] = [
    None, True, False, 0, 1, 2, -1, 0.0, 1.0, -0.0, 2.5, Decimal("0"), Decimal("1"),
    Fraction(1, 1), "", "a", "b", "0", "1", [], [0], [False], {}, {"a": 1},
]


def parameters(function: object) -> list[str]:
    return list(inspect.signature(function).parameters)  # type: ignore[arg-type]


# -- an `&expr` value ---------------------------------------------------------------------------


def test_an_expref_is_type_checked_by_its_class_name() -> None:
    theirs = jmespath.search("&a", {})
    assert type(theirs).__name__ == EXPREF_CLASS_NAME == Expref.__name__
    assert jmespath.functions.REVERSE_TYPES_MAP["expref"] == (EXPREF_CLASS_NAME,)
    assert jmespath.functions.TYPES_MAP[EXPREF_CLASS_NAME] == "expref"
    ours = Expref({"type": "field", "value": "a", "children": []}, lambda value: None, FUNCTIONS)
    # to_string(&a) prints the repr: ours reads as theirs but for the address.
    assert repr(ours).split(" at 0x")[0] == repr(theirs).split(" at 0x")[0]
    printed = compile_search(jmespath.parser.Parser().parse("to_string(&a)").parsed, FUNCTIONS)
    assert jmespath.search("to_string(&a)", {}).split(" at 0x")[0] == printed({}).split(
        " at 0x")[0] == '"<jmespath.visitor._Expression object'


@pytest.mark.parametrize("call", ["sort_by", "max_by", "min_by", "map"])
def test_functions_evaluate_an_expref_through_visit_with_its_expression(call: str) -> None:
    node = jmespath.parser.Parser().parse("a").parsed
    seen: list[object] = []

    def search(value: object) -> object:
        seen.append(value)
        return value["a"]  # type: ignore[index]

    ref = Expref(node, search, FUNCTIONS)
    items = [{"a": 2}, {"a": 1}, {"a": 3}]
    args: list[object] = [ref, items] if call == "map" else [items, ref]
    expected = {"sort_by": [{"a": 1}, {"a": 2}, {"a": 3}], "max_by": {"a": 3},
                "min_by": {"a": 1}, "map": [2, 1, 3]}[call]
    assert Functions().call_function(call, args) == expected
    assert seen and all(value in items for value in seen)


def test_an_expref_visiting_another_node_gets_the_reference_interpreter() -> None:
    ref = Expref({"type": "field", "value": "a", "children": []}, lambda value: "compiled",
                 FUNCTIONS)
    other = jmespath.parser.Parser().parse("b").parsed
    assert ref.visit(ref.expression, {"a": 1}) == "compiled"
    assert ref.visit(other, {"b": 2}) == 2


# -- the function table and its argument check ------------------------------------------------


@pytest.mark.parametrize("functions", [Functions(), FUNCTIONS], ids=["jmespath", "linkcrm"])
def test_the_function_table_has_the_layout_the_fast_path_reads(
    functions: jmespath.functions.Functions,
) -> None:
    table = function_table(functions)
    assert {"abs", "length", "sort_by", "to_string"} <= set(table)
    for name, spec in table.items():
        assert set(spec) == {"function", "signature"}, name
        assert callable(spec["function"]), name
        for parameter in spec["signature"]:
            assert set(parameter) <= {"types", "variadic"}, name
            assert all(isinstance(kind, str) for kind in parameter["types"]), name
    assert table["abs"]["function"](functions, -2) == 2  # called as function(self, *args)


def test_call_function_checks_arguments_through_the_two_hooks() -> None:
    assert parameters(Functions.call_function) == ["self", "function_name", "resolved_args"]
    assert parameters(Functions._validate_arguments) == [
        "self", "args", "signature", "function_name"]
    assert parameters(Functions._type_check) == ["self", "actual", "signature", "function_name"]
    calls: list[str] = []

    class Recording(Functions):  # type: ignore[misc]
        def _validate_arguments(self, args: object, signature: object, name: str) -> object:
            calls.append("validate")
            return super()._validate_arguments(args, signature, name)

        def _type_check(self, actual: object, signature: object, name: str) -> object:
            calls.append("type_check")
            return super()._type_check(actual, signature, name)

    assert Recording().call_function("abs", [-1]) == 1
    assert calls == ["validate", "type_check"]
    with pytest.raises(jmespath.exceptions.JMESPathTypeError):
        Recording().call_function("abs", ["x"])
    assert stock_argument_checks(Functions()) and stock_argument_checks(FUNCTIONS)
    assert not stock_argument_checks(Recording())


def test_the_fast_type_tests_accept_a_subset_of_what_jmespath_accepts() -> None:
    for kind, names in _FAST_TYPES.items():
        accepted = jmespath.functions.REVERSE_TYPES_MAP[kind]
        assert {name.lstrip("_") if name == "_NoneType" else name for name in names} <= set(
            accepted), kind


# -- the parser --------------------------------------------------------------------------------


def test_the_parser_hooks_keep_their_signatures() -> None:
    Parser = jmespath.parser.Parser
    assert parameters(Parser._do_parse) == ["self", "expression"]
    assert parameters(Parser._expression) == ["self", "binding_power"]
    assert inspect.signature(Parser._expression).parameters["binding_power"].default == 0
    assert parameters(Parser._parse_index_expression) == ["self"]
    assert parameters(Parser._lookahead_token) == ["self", "number"]


@pytest.mark.parametrize("source", [
    "foo.bar[0] || baz", "a[?b > `1`].c | [0]", "sort_by(items, &n)[-1].s", "!a && (b || c)",
    "{x: a, y: [b, c]}", "a[1:2]", "*.a", "`text`",
])
def test_the_locating_parser_parses_as_jmespath_does_and_notes_every_start(source: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PendingDeprecationWarning)  # `text`: still valid
        reference = jmespath.parser.Parser().parse(source).parsed  # now in the shared cache
    parser = LocatingParser()
    node = parser.parse_uncached(source)  # parsed again all the same: no start is missed
    assert node == reference
    assert parser.starts[id(node)] == 0


def test_the_locating_parser_notes_where_operands_start() -> None:
    parser = LocatingParser()
    node = parser.parse_uncached("foo.bar[0] || baz")
    left, right = node["children"]
    index_expression = left["children"][1]
    assert (parser.starts[id(left)], parser.starts[id(index_expression)],
            parser.starts[id(right)]) == (0, 4, 14)


# -- truth and comparison ----------------------------------------------------------------------


@pytest.mark.parametrize("left", VALUES, ids=repr)
def test_equality_matches_jmespath(left: object) -> None:
    for right in VALUES:
        document = {"a": left, "b": right}
        assert jmespath.search("a == b", document) is equals(left, right), (left, right)
        assert jmespath.search("a != b", document) is (not equals(left, right)), (left, right)


@pytest.mark.parametrize("value", VALUES, ids=repr)
def test_truth_negation_and_ordering_match_jmespath(value: object) -> None:
    document = {"a": value}
    assert jmespath.search("!a", document) is not_(value)
    assert jmespath.search("a || 'other'", document) == ("other" if is_false(value) else value)
    assert jmespath.search("[a][?@]", document) == ([] if is_false(value) else [value])
    assert (jmespath.search("a <= a", document) is None) is (not is_comparable(value))


def test_compiled_code_uses_the_mirrored_rules() -> None:
    parsed = jmespath.parser.Parser().parse("a == b").parsed
    search = compile_search(parsed, FUNCTIONS)
    for left in VALUES:
        for right in VALUES:
            assert search({"a": left, "b": right}) is equals(left, right), (left, right)
