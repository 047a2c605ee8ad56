"""Try one expression against one document: its value and JMESPath type, or where it failed.

`linkcrm eval` prints this; it evaluates exactly as a rule does (same compiled code, same
functions), so what it shows is what the rule would write.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast

import jmespath.exceptions
import jmespath.visitor

from engine.actions import JSON
from engine.rules.checks import ExpressionError, Node, child_nodes
from engine.rules.expressions import Expression
from engine.rules.functions import FUNCTIONS
from engine.rules.jmespath_internals import LocatingParser

# JMESPath's own interpreter lets TypeError/ValueError escape for some mismatches.
_EVALUATION_ERRORS = (jmespath.exceptions.JMESPathError, TypeError, ValueError)
_FUNCTION_IN_MESSAGE = re.compile(r"^(?:In function )?([a-z_]+)\(\)")


@dataclass(frozen=True)
class Outcome:
    """The value and its JMESPath type, or (`error` set) why evaluation failed and where."""

    value: JSON = None
    type: str = "null"
    error: str = ""
    offset: int = 0
    caret: str = ""

    @property
    def ok(self) -> bool:
        return not self.error

    def as_dict(self) -> dict[str, JSON]:
        if self.ok:
            return {"value": self.value, "type": self.type}
        return {"error": self.error, "column": self.offset + 1, "caret": self.caret}


def type_name(value: object) -> str:
    """JMESPath's name for the type of `value` (as `type()` in an expression gives it)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def evaluate(expression: Expression, document: JSON) -> Outcome:
    try:
        value = expression.search(document)
    except _EVALUATION_ERRORS as error:
        message = str(error)
        offset = _offset_of(expression.source, error, message)
        if isinstance(error, jmespath.exceptions.JMESPathTypeError):
            offset = _bad_argument(expression.source, error, document, offset)
            message = _type_message(error)
        caret = ExpressionError("", "", expression.source, offset, "").caret
        return Outcome(error=message, offset=offset, caret=caret)
    return Outcome(cast(JSON, value), type_name(value))


def _type_message(error: jmespath.exceptions.JMESPathTypeError) -> str:
    expected = " or ".join(str(t) for t in error.expected_types)
    got = "null" if error.current_value is None else (
        f"{error.actual_type} {json.dumps(error.current_value)[:60]}")
    text = f"{error.function_name}() wants {expected} here, got {got}"
    if error.current_value is None:
        text += " (a missing field is null: give a default with || '' or test it first)"
    return text


def _bad_argument(source: str, error: jmespath.exceptions.JMESPathTypeError,
                  document: JSON, call_offset: int) -> int:
    """Where the argument of the wrong type starts, when it reads from the event itself (an
    argument inside a projection has no single value to blame: then the call)."""
    parser = LocatingParser()
    try:
        root = parser.parse_uncached(source)
    except jmespath.exceptions.ParseError:
        return call_offset
    interpreter = jmespath.visitor.TreeInterpreter(
        jmespath.visitor.Options(custom_functions=FUNCTIONS))
    pending: list[Node] = [root]
    while pending:
        node = pending.pop()
        children = [c for c in child_nodes(node) if isinstance(c, Mapping)]
        pending.extend(children)
        if node["type"] != "function_expression" or node["value"] != error.function_name:
            continue
        if parser.starts.get(id(node)) != call_offset:
            continue
        for arg in children:
            try:
                value = interpreter.visit(arg, document)
            except _EVALUATION_ERRORS:
                continue
            if value is error.current_value or (
                    type_name(value) == error.actual_type and value == error.current_value):
                return parser.starts.get(id(arg), call_offset)
    return call_offset


def _offset_of(source: str, error: Exception, message: str) -> int:
    """Where the failing function call starts in `source` (0 when it cannot be told)."""
    name = getattr(error, "function_name", None)
    if not isinstance(name, str):
        match = _FUNCTION_IN_MESSAGE.match(message)
        name = match.group(1) if match else None
    if name is None:
        return 0
    call = re.search(rf"(?<![\w.]){re.escape(name)}\s*\(", source)
    return call.start() if call else 0
