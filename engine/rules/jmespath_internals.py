"""Everything linkcrm relies on inside jmespath beyond its documented API, in one place.

jmespath documents `search`, `compile`, `Options`, the parser's `parse` and custom functions
(a `Functions` subclass with `@signature` `_func_*` methods). Compiling expressions to Python
(codegen.py) and pointing at the character where each part of an expression starts
(expressions.py) need a little more; every such reliance is here, and
tests/rules/test_jmespath_internals.py fails when a jmespath release changes one:

- an `&expr` value: functions type-check it by its class name (`_Expression`, from the public
  `jmespath.functions.REVERSE_TYPES_MAP`) and evaluate it with
  `expref.visit(expref.expression, value)`; `to_string(&x)` prints its repr;
- the function table (`FUNCTION_TABLE[name] = {"function", "signature"}`, each parameter
  `{"types": [...], "variadic": bool}`) and the argument check behind `call_function`
  (`_validate_arguments`, then `_type_check`), which compiled code replaces with inline type
  tests only while a `Functions` subclass leaves those three methods alone;
- the parser's hooks (`_expression`, `_parse_index_expression`, `_lookahead_token`, the
  uncached `_do_parse`), through which `LocatingParser` notes where each node starts;
- the tree interpreter's truth and comparison rules, which jmespath keeps in private helpers
  (`jmespath.visitor._equals`, `_is_comparable`, `_is_actual_number`, `_is_false`): they
  are written out here, and the test holds them to `jmespath.search`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from numbers import Number
from typing import TypedDict, cast

import jmespath.functions
import jmespath.parser
import jmespath.visitor

__all__ = [
    "EXPREF_CLASS_NAME", "Expref", "FunctionSpec", "LocatingParser", "Parameter", "equals",
    "function_table", "is_actual_number", "is_comparable", "is_false", "not_",
    "stock_argument_checks",
]

Node = Mapping[str, object]
SearchFunction = Callable[[object], object]

# -- an `&expr` value ---------------------------------------------------------------------------

EXPREF_CLASS_NAME = "_Expression"


class _Expression:
    """What an `&expr` evaluates to in compiled code. Named like jmespath's own class, since
    the type checks go by class name; functions call `visit(expref.expression, value)`."""

    __slots__ = ("_functions", "_search", "expression")

    def __init__(self, expression: Node, search: SearchFunction, functions: object) -> None:
        self.expression = expression
        self._search = search
        self._functions = functions

    def __repr__(self) -> str:
        # to_string(&x) prints this; keep the package's text (only the address differs).
        return f"<jmespath.visitor._Expression object at {id(self):#x}>"

    def visit(self, node: Node, value: object, *args: object, **kwargs: object) -> object:
        if node is self.expression:
            return self._search(value)
        # A custom function that visits some other node gets the reference interpreter.
        options = jmespath.visitor.Options(custom_functions=self._functions)
        return cast(object, jmespath.visitor.TreeInterpreter(options).visit(node, value))


Expref = _Expression

# -- the function table and its argument check ------------------------------------------------


class Parameter(TypedDict, total=False):
    types: list[str]
    variadic: bool


class FunctionSpec(TypedDict):
    function: Callable[..., object]
    signature: Sequence[Parameter]


_ARGUMENT_CHECK = ("call_function", "_validate_arguments", "_type_check")
_MISSING = object()


def function_table(functions: jmespath.functions.Functions) -> Mapping[str, FunctionSpec]:
    """The functions `functions` resolves, by JMESPath name."""
    return cast(Mapping[str, FunctionSpec], functions.FUNCTION_TABLE)


def stock_argument_checks(functions: jmespath.functions.Functions) -> bool:
    """True when `functions` checks arguments exactly as `jmespath.functions.Functions` does,
    so an inline check of the declared types stands in for it."""
    base = jmespath.functions.Functions
    return all(getattr(type(functions), name, None) is getattr(base, name, _MISSING)
               for name in _ARGUMENT_CHECK)


# -- the parser --------------------------------------------------------------------------------

# Node types whose first child is their left operand (so they start where it starts).
_LEFT_SPINE = frozenset({
    "subexpression", "index_expression", "projection", "value_projection",
    "filter_projection", "flatten", "or_expression", "and_expression", "comparator", "pipe",
})


class LocatingParser(jmespath.parser.Parser):  # type: ignore[misc]
    """jmespath's own parser, also noting where each node starts (its AST has no positions).

        parser = LocatingParser()
        node = parser.parse_uncached("a.b || c")
        parser.starts[id(node)]   # 0
    """

    def __init__(self) -> None:
        super().__init__()
        self.starts: dict[int, int] = {}

    def parse_uncached(self, source: str) -> Node:
        """The AST of `source`, parsed now (the shared cache would skip the notes); raises
        jmespath.exceptions.ParseError."""
        with warnings.catch_warnings():
            # jmespath still accepts `text` (deprecated JSON-less literal) with a warning;
            # it is valid syntax, so it must not turn into an error under -W error.
            warnings.simplefilter("ignore", PendingDeprecationWarning)
            return cast(Node, self._do_parse(source).parsed)

    def _expression(self, binding_power: int = 0) -> Node:
        start = cast(int, self._lookahead_token(0)["start"])
        node = cast(Node, super()._expression(binding_power))
        # The node returned starts at its first token (a parenthesis included); so do the
        # left operands it was built on, unless a nested call already placed them.
        self.starts[id(node)] = start
        left = node
        while left["type"] in _LEFT_SPINE:
            left = cast(Sequence[Node], left["children"])[0]
            self.starts.setdefault(id(left), start)
        return node

    def _parse_index_expression(self) -> Node:
        start = cast(int, self._lookahead_token(0)["start"])
        node = cast(Node, super()._parse_index_expression())
        self.starts[id(node)] = start
        return node


# -- truth and comparison, as the tree interpreter has them ------------------------------------


def is_actual_number(value: object) -> bool:
    """A number that is not a bool (Python counts True and False as integers)."""
    return isinstance(value, Number) and not isinstance(value, bool)


def is_comparable(value: object) -> bool:
    """What `<`, `<=`, `>`, `>=` compare (anything else gives null): numbers and strings."""
    return is_actual_number(value) or isinstance(value, str)


def equals(left: object, right: object) -> bool:
    """`==`: Python's equality, except that 0 and 1 never equal false and true."""
    if is_actual_number(left) and left in (0, 1):
        if isinstance(right, bool):
            return False
    elif is_actual_number(right) and right in (0, 1) and isinstance(left, bool):
        return False
    return left == right


def is_false(value: object) -> bool:
    """JMESPath falseness (for `||`, `&&` and filters): "", [], {}, null and false; numbers,
    0 included, are true."""
    return bool(value == "" or value == [] or value == {} or value is None or value is False)


def not_(value: object) -> bool:
    """`!value`: Python's `not`, except that `!0` is false."""
    if is_actual_number(value) and value == 0:
        return False
    return not value
