"""Static checks of a parsed JMESPath expression: function names, arity, argument types.

These are the errors every evaluation would hit, so linkcrm reports them when the rule file
loads, located at the character where they are.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Mapping, Sequence
from typing import cast

import jmespath.exceptions
import jmespath.functions

from engine.rules.functions import FUNCTIONS, describe, format_signature

Node = Mapping[str, object]
_DOCS = {doc.name: doc for doc in describe()}


class ExpressionError(ValueError):
    """A rule expression that cannot be compiled, located in its source.

    `code` is one of `expression-syntax`, `unknown-function`, `wrong-argument-count`,
    `argument-type`; `offset` is the 0-based character offset of the problem in `source`;
    `caret` is the source with a `^` under that offset; `hint` says what to do next.

    >>> compile_expression("lowr(data.email)")
    Traceback (most recent call last):
    ...
    engine.rules.checks.ExpressionError: unknown-function: unknown function lowr()
    lowr(data.email)
    ^
        hint: did you mean lower()?
    """

    def __init__(self, code: str, message: str, source: str, offset: int, hint: str) -> None:
        self.code = code
        self.message = message
        self.source = source
        self.offset = offset
        self.hint = hint
        # Tabs and newlines (YAML block scalars) would push the caret off its column.
        flat = re.sub(r"[\t\r\n]", " ", source)
        self.caret = f"{flat}\n{' ' * offset}^"
        super().__init__(f"{code}: {message}\n{self.caret}\n    hint: {hint}")


class Checker:
    """Static checks of function calls and slices (errors every evaluation would hit)."""

    def __init__(self, source: str, starts: Mapping[int, int]) -> None:
        self.source = source
        self.starts = starts
        self.table = cast(Mapping[str, Mapping[str, object]], FUNCTIONS.FUNCTION_TABLE)
        self.free_exprefs = False

    def check(self, root: Node) -> None:
        self.free_exprefs = self._has_free_expref(root)
        self._visit(root)

    def _error(self, code: str, message: str, node: Node, hint: str) -> ExpressionError:
        return ExpressionError(code, message, self.source, self.starts.get(id(node), 0), hint)

    def _visit(self, node: Node) -> None:
        kind = node["type"]
        children = child_nodes(node)
        # Evaluation order (arguments before the call, a filter's condition before what it
        # projects), so that of several problems the one reported is the one jmespath hits.
        order = [children[0], children[2], children[1]] if kind == "filter_projection" else children
        for child in order:
            if isinstance(child, Mapping):
                self._visit(child)
        if kind == "function_expression":
            self._check_call(node, cast(str, node["value"]), children)
        elif kind == "slice" and cast(Sequence[object], children)[2] == 0:
            raise self._error("expression-syntax", "a slice step cannot be 0", node,
                              "use a step of 1 or more ([::2]) or negative ([::-1])")

    def _has_free_expref(self, node: Node) -> bool:
        """Whether an `&expr` appears anywhere but as the direct argument of a function
        parameter that wants one; otherwise no value at run time can be an expref."""
        children = [c for c in child_nodes(node) if isinstance(c, Mapping)]
        if node["type"] == "expref":
            return True
        if node["type"] == "function_expression":
            spec = self.table.get(cast(str, node["value"]))
            params = cast(Sequence[Mapping[str, object]], spec["signature"]) if spec else ()
            for index, child in enumerate(children):
                if child["type"] == "expref":
                    types = cast(Sequence[str], params[index]["types"]) if index < len(
                        params) else ()
                    if types == ["expref"]:
                        children[index] = child_nodes(child)[0]
        return any(self._has_free_expref(child) for child in children)

    def _check_call(self, node: Node, name: str, args: Sequence[Node]) -> None:
        spec = self.table.get(name)
        if spec is None:
            close = difflib.get_close_matches(name, list(self.table), n=1)
            hint = (f"did you mean {close[0]}()?" if close
                    else f"known functions: {', '.join(sorted(self.table))}")
            raise self._error("unknown-function", f"unknown function {name}()", node, hint)
        params = cast(Sequence[Mapping[str, object]], spec["signature"])
        variadic = bool(params) and bool(params[-1].get("variadic"))
        if (len(args) < len(params)) if variadic else (len(args) != len(params)):
            least = "at least " if variadic else ""
            plural = "" if len(params) == 1 else "s"
            raise self._error(
                "wrong-argument-count",
                f"{name}() takes {least}{len(params)} argument{plural}, got {len(args)}",
                node, _usage(name))
        for index, arg in enumerate(args):
            # A variadic parameter's type applies to every extra argument too: the package
            # only checks the declared ones and then fails inside the function instead.
            param = params[min(index, len(params) - 1)]
            problem = self._argument_problem(name, arg, cast(Sequence[str], param["types"]))
            if problem is not None:
                got, hint, where = problem
                message = f"argument {index + 1} of {name}() must be {_expected(param)}"
                raise self._error("argument-type", f"{message}, got {got}", where, hint)

    def _argument_problem(self, name: str, arg: Node,
                          types: Sequence[str]) -> tuple[str, str, Node] | None:
        """(what the argument is, hint, node to point at) when it can never satisfy `types`."""
        if not types:
            return None
        example = _DOCS[name].example if name in _DOCS else format_signature(name)
        if arg["type"] == "expref":
            if "expref" in types:
                return None
            return "an expression reference (&...)", f"remove the &; for example {example}", arg
        if list(types) == ["expref"] and not self.free_exprefs:
            return ("a value", f"prefix the argument with & to pass an expression, as in"
                               f" {example}", arg)
        if arg["type"] == "literal":
            try:
                FUNCTIONS._type_check_single(arg["value"], types, name)
            except jmespath.exceptions.JMESPathTypeError as exc:
                got = _type_name(exc.current_value)
                if exc.current_value is not arg["value"]:  # an element failed
                    got = f"an {_type_name(arg['value'])} containing {_a(got)}"
                return f"{got} {_show_literal(arg['value'])}", _usage(name), arg
            except Exception:  # the package's own check can crash on odd signatures
                return None
            return None
        possible = _static_types(arg)
        if possible is None or any(_can_pass(kind, arg, types) for kind in possible):
            return None
        if "array" in possible and arg["type"] == "multi_select_list" and any(
                t.startswith("array") for t in types):
            # Arrays are allowed but some element can never have the element type.
            wanted = {t.partition("-")[2] for t in types}
            for child in child_nodes(arg):
                child_types = _static_types(child)
                if child_types and not child_types & wanted:
                    shown = " or ".join(sorted(child_types))
                    return f"an array containing {_a(shown)}", _usage(name), child
        shown = " or ".join(sorted(possible - {"null"}) or ["null"])
        return shown, _usage(name), arg


def child_nodes(node: Node) -> Sequence[Node]:
    return cast(Sequence[Node], node.get("children", ()))


def _a(noun: str) -> str:
    return f"{'an' if noun[:1] in tuple('aeiou') else 'a'} {noun}"


def _type_name(value: object) -> str:
    return str(jmespath.functions.TYPES_MAP.get(type(value).__name__, type(value).__name__))


def _usage(name: str) -> str:
    doc = _DOCS.get(name)
    usage = f"usage: {format_signature(name)}"
    return f"{usage}, e.g. {doc.example}" if doc else usage


def _expected(param: Mapping[str, object]) -> str:
    names = ["an expression reference (&...)" if t == "expref" else t
             for t in cast(Sequence[str], param["types"])]
    return " or ".join(names)


def _show_literal(value: object) -> str:
    text = repr(value) if isinstance(value, str) else json.dumps(value)
    return f"({text[:40]}{'...' if len(text) > 40 else ''})"


_NONE_OR = frozenset({"null"})
_STATIC_TYPES: dict[str, frozenset[str]] = {
    "expref": frozenset({"expref"}),
    "not_expression": frozenset({"boolean"}),
    # Multi-selects give null when the current value is null; projections when the base
    # is not a list (or object).
    "multi_select_list": _NONE_OR | {"array"},
    "multi_select_dict": _NONE_OR | {"object"},
    "projection": _NONE_OR | {"array"},
    "value_projection": _NONE_OR | {"array"},
    "filter_projection": _NONE_OR | {"array"},
    "flatten": _NONE_OR | {"array"},
}


def _static_types(node: Node) -> frozenset[str] | None:
    """The JMESPath types `node` can evaluate to, or None when any type is possible."""
    kind = cast(str, node["type"])
    if kind in _STATIC_TYPES:
        return _STATIC_TYPES[kind]
    if kind == "literal":
        return frozenset({_type_name(node["value"])})
    if kind == "comparator":
        ordering = node["value"] not in ("eq", "ne")
        return frozenset({"boolean", "null"} if ordering else {"boolean"})
    children = child_nodes(node)
    if kind in ("or_expression", "and_expression"):
        left, right = _static_types(children[0]), _static_types(children[1])
        return None if left is None or right is None else left | right
    if kind in ("pipe", "subexpression"):
        return _static_types(children[-1])
    return None


def _can_pass(kind: str, arg: Node, types: Sequence[str]) -> bool:
    """Whether a value of JMESPath type `kind` produced by `arg` may satisfy `types`."""
    for allowed in types:
        base, _, element = allowed.partition("-")
        if base != kind:
            continue
        if not element or arg["type"] != "multi_select_list":
            return True
        # Every element of a multi-select list must be able to be of the element type.
        element_types = [_static_types(child) for child in child_nodes(arg)]
        if all(t is None or element in t for t in element_types):
            return True
    return False
