"""Differential test: generated expressions give exactly what the jmespath package gives."""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Callable, Iterator

import jmespath
import jmespath.exceptions
import jmespath.parser
import pytest

from engine.rules.codegen import compile_search
from engine.rules.expressions import ExpressionError, compile_expression
from engine.rules.functions import FUNCTIONS, LinkcrmFunctions

SEED = 20260301
EXPRESSIONS = 8000
DOCUMENTS_PER_EXPRESSION = 3

KEYS = ["a", "b", "c", "foo", "items", "n", "s", "ts"]
SCALARS: list[object] = [
    None, True, False, 0, 1, -1, 2, 0.0, 1.0, -0.0, 2.5, -3.75, "", "a", "b", "abc",
    " Mixed Case ", "a,b,,c", "1", "1.5", "2026-03-01T23:30:00-02:00", "2026-03-01",
    "2026-03-01T12:30:00.250Z", "not a date", "2026-13-01",
]
STRINGS = [s for s in SCALARS if isinstance(s, str)]
NUMBERS = [n for n in SCALARS if type(n) in (int, float)]
FUNCTION_NAMES = sorted(FUNCTIONS.FUNCTION_TABLE)
UNKNOWN_NAMES = ["lowr", "nope", "to_dat", "sortby"]
COMPARATORS = ["==", "!=", "<", "<=", ">", ">="]
ADDRESS = re.compile(r"(?i)(?<=_expression object at )0x[0-9a-f]+")

# Our static error code -> the error jmespath raises when it reaches the same call.
STATIC_CLASSES: dict[str, tuple[type[BaseException], ...]] = {
    "unknown-function": (jmespath.exceptions.UnknownFunctionError,),
    "wrong-argument-count": (jmespath.exceptions.ArityError,),
    "argument-type": (jmespath.exceptions.JMESPathTypeError,),
    "expression-syntax": (ValueError,),  # a zero slice step: Python's own error
}


def same(a: object, b: object) -> bool:
    """Equal values of identical types, all the way down (True is not 1, 1 is not 1.0)."""
    if isinstance(a, str) and isinstance(b, str):
        # to_string(&expr) shows an object address, which differs between any two runs.
        return ADDRESS.sub("0x", a) == ADDRESS.sub("0x", b)
    if type(a) is not type(b):
        # Our expression references are not jmespath's class, but must stand for the same node.
        return (type(a).__name__ == type(b).__name__ == "_Expression"
                and getattr(a, "expression", None) == getattr(b, "expression", None))
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) ==
                                                     math.copysign(1, b))
    return a == b


def test_same_rejects_bool_for_int_and_int_for_float() -> None:
    assert same([1, {"a": 1.0}], [1, {"a": 1.0}])
    assert not same(True, 1)
    assert not same(1, True)
    assert not same(1, 1.0)
    assert not same([1, {"a": 1.0}], [1, {"a": 1}])
    assert not same({"a": [True]}, {"a": [1]})
    assert not same({"a": 1, "b": 2}, {"b": 2, "a": 1})
    assert not same(0.0, -0.0)


class Generator:
    """Random documents and expressions from one seed; every node type appears."""

    def __init__(self, seed: int) -> None:
        self.r = random.Random(seed)

    def value(self, depth: int) -> object:
        r = self.r
        roll = r.random()
        if depth <= 0 or roll < 0.35:
            return r.choice(SCALARS)
        if roll < 0.55:
            return [self.value(depth - 1) for _ in range(r.randint(0, 4))]
        if roll < 0.65:
            pool = r.choice([STRINGS, NUMBERS, SCALARS])
            return [r.choice(pool) for _ in range(r.randint(0, 4))]
        if roll < 0.75:
            return [{"n": r.choice(NUMBERS), "s": r.choice(STRINGS), "a": self.value(0)}
                    for _ in range(r.randint(0, 4))]
        return {k: self.value(depth - 1) for k in r.sample(KEYS, r.randint(0, 5))}

    def document(self) -> object:
        if self.r.random() < 0.9:
            return {k: self.value(3) for k in self.r.sample(KEYS, self.r.randint(2, len(KEYS)))}
        return self.value(3)

    def literal(self) -> str:
        r = self.r
        if r.random() < 0.4:
            return "'" + r.choice(STRINGS) + "'"
        return "`" + json.dumps(self.value(1)) + "`"

    def leaf(self) -> str:
        r = self.r
        roll = r.random()
        if roll < 0.55:
            key = r.choice(KEYS)
            return f'"{key}"' if r.random() < 0.1 else key
        if roll < 0.7:
            return "@"
        return self.literal()

    def rhs(self, depth: int) -> str:
        r = self.r
        return r.choice(["", "", f".{r.choice(KEYS)}", f"[{r.randint(-2, 2)}]",
                         f".[{self.expr(depth)}, {self.leaf()}]", f".{{k: {self.expr(depth)}}}",
                         "[]", f".{self.call(depth)}"])

    def expr(self, depth: int) -> str:
        if depth <= 0:
            return self.leaf()
        r = self.r
        d = depth - 1
        kind = r.randrange(22)
        e = self.expr
        if kind == 0:
            return f"{e(d)}.{r.choice(KEYS)}"
        if kind == 1:
            return f"{e(d)}[{r.randint(-3, 3)}]"
        if kind == 2:
            parts = [str(r.randint(-3, 3)) if r.random() < 0.5 else "" for _ in range(2)]
            step = r.choice(["", "", ":1", ":-1", ":2", ":-2", ":0"])
            return f"{e(d)}[{parts[0]}:{parts[1]}{step}]{self.rhs(d)}"
        if kind == 3:
            return f"{e(d)}[*]{self.rhs(d)}"
        if kind == 4:
            return f"{e(d)}.*{self.rhs(d)}" if r.random() < 0.7 else f"*{self.rhs(d)}"
        if kind == 5:
            return f"{e(d)}[]{self.rhs(d)}"
        if kind == 6:
            return f"{e(d)}[?{self.condition(d)}]{self.rhs(d)}"
        if kind == 7:
            return f"[{', '.join(e(d) for _ in range(r.randint(1, 3)))}]"
        if kind == 8:
            pairs = [f"{k}: {e(d)}" for k in r.sample(KEYS, r.randint(1, 3))]
            return "{" + ", ".join(pairs) + "}"
        if kind == 9:
            return f"{e(d)} | {e(d)}"
        if kind == 10:
            return f"{e(d)} || {e(d)}"
        if kind == 11:
            return f"{e(d)} && {e(d)}"
        if kind == 12:
            return f"!{e(d)}"
        if kind == 13:
            return self.condition(d)
        if kind in (14, 15, 16, 17):
            return self.call(d)
        if kind == 18:
            return f"({e(d)})"
        if kind == 19:
            return f"{e(d)}.[{e(d)}, {e(d)}]"
        if kind == 20:
            return f"@.{r.choice(KEYS)}"
        return self.leaf()

    def condition(self, depth: int) -> str:
        return f"{self.expr(depth)} {self.r.choice(COMPARATORS)} {self.expr(depth)}"

    def call(self, depth: int) -> str:
        r = self.r
        if r.random() < 0.03:
            return f"{r.choice(UNKNOWN_NAMES)}({self.expr(depth)})"
        name = r.choice(FUNCTION_NAMES)
        params = FUNCTIONS.FUNCTION_TABLE[name]["signature"]
        count = len(params)
        if params and params[-1].get("variadic"):
            count += r.randint(0, 2)
        if r.random() < 0.04:
            count = max(0, count + r.choice([-1, 1]))
        args = []
        for index in range(count):
            types = params[min(index, len(params) - 1)]["types"] if params else []
            wants_expref = "expref" in types
            if wants_expref != (r.random() < 0.05):
                args.append(f"&{self.expr(depth)}")
            else:
                args.append(self.expr(depth))
        return f"{name}({', '.join(args)})"


class RecordingFunctions(LinkcrmFunctions):
    """linkcrm's functions, noting each call the reference interpreter makes."""

    def __init__(self) -> None:
        super().__init__()
        self.called: list[str] = []

    def call_function(self, function_name: str, resolved_args: list[object]) -> object:
        self.called.append(function_name)
        return super().call_function(function_name, resolved_args)


def outcome(run: Callable[[], object]) -> tuple[str, object]:
    try:
        return "value", run()
    except Exception as exc:
        return "error", type(exc)


def cases() -> Iterator[tuple[str, list[object]]]:
    generator = Generator(SEED)
    for _ in range(EXPRESSIONS):
        source = generator.expr(generator.r.randint(1, 4))
        yield source, [generator.document() for _ in range(DOCUMENTS_PER_EXPRESSION)]


def check_static(error: ExpressionError, source: str, documents: list[object]) -> None:
    """A load-time error must be one the package would raise on reaching that code."""
    recording = RecordingFunctions()
    options = jmespath.Options(custom_functions=recording)
    # With one problem in the source, jmespath must raise exactly its kind; with several,
    # it may meet another one first.
    # Ordering comparisons of a string with a number raise TypeError, another problem.
    single = source.count("(") + source.count("::0") + source.count(":0]") <= 1 and not (
        "<" in source or ">" in source)
    for document in documents:
        recording.called.clear()
        kind, result = outcome(lambda doc=document: jmespath.search(source, doc, options))
        if error.code == "expression-syntax" and error.message != "a slice step cannot be 0":
            assert kind == "error" and issubclass(result, jmespath.exceptions.ParseError), source
            continue
        named = re.findall(r"(\w+)\(\)", error.message + "slice()")[0]
        if kind == "error":
            expected = STATIC_CLASSES[error.code]
            if named == "merge":  # only its first argument is type-checked; the rest fail
                expected += (TypeError, ValueError)  # inside dict.update
            assert issubclass(result, expected if single else Exception), (
                source, error.message, result)
        elif error.code != "expression-syntax" and named != "merge":
            # (merge's extra arguments are checked against its signature, which the package
            # skips: merge(a, '') "works" there because '' is an empty iterable.)
            if source.count(f"{named}(") == 1:
                # It returned, so the flagged call was never reached (short-circuit, empty
                # projection, ...): had it run, it would have raised.
                assert named not in recording.called, (source, error.message)


def test_generated_expressions_agree_with_jmespath() -> None:
    options = jmespath.Options(custom_functions=FUNCTIONS)
    pairs = static = errors = 0
    kinds: set[str] = set()
    for source, documents in cases():
        try:
            parsed = jmespath.parser.Parser().parse(source).parsed
        except jmespath.exceptions.ParseError:
            with pytest.raises(ExpressionError) as caught:
                compile_expression(source)
            assert caught.value.code == "expression-syntax"
            continue
        kinds.update(_node_types(parsed))
        unchecked = compile_search(parsed, FUNCTIONS)
        assert unchecked.__name__ == "_search", source  # generated, not the fallback
        try:
            checked = compile_expression(source).search
        except ExpressionError as exc:
            static += 1
            check_static(exc, source, documents)
            checked = unchecked  # the generated code itself must still agree, below
        for document in documents:
            pairs += 1
            expected = outcome(lambda doc=document, src=source: jmespath.search(src, doc, options))
            errors += expected[0] == "error"
            for search in (unchecked, checked):
                actual = outcome(lambda doc=document, s=search: s(doc))
                assert actual[0] == expected[0], (source, document, actual, expected)
                if expected[0] == "error":
                    assert actual[1] is expected[1], (source, document, actual, expected)
                else:
                    assert same(actual[1], expected[1]), (source, document, actual, expected)
    assert pairs >= 10_000
    assert static > 50 and errors > 500  # the generator does reach the error paths
    assert kinds >= {
        "field", "subexpression", "index_expression", "index", "slice", "projection",
        "value_projection", "filter_projection", "flatten", "identity", "current", "literal",
        "multi_select_list", "multi_select_dict", "key_val_pair", "pipe", "or_expression",
        "and_expression", "not_expression", "comparator", "function_expression", "expref",
    }


def _node_types(node: object) -> Iterator[str]:
    if isinstance(node, dict):
        yield node["type"]
        for child in node.get("children", []):
            yield from _node_types(child)
