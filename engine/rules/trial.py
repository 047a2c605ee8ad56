"""Try one expression against one document: its value and JMESPath type, or where it failed.

`linkcrm eval` prints this; it evaluates exactly as a rule does (same compiled code, same
functions), so what it shows is what the rule would write.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import cast

import jmespath.exceptions

from engine.actions import JSON
from engine.rules.checks import ExpressionError
from engine.rules.expressions import Expression

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
        caret = ExpressionError("", "", expression.source, offset, "").caret
        return Outcome(error=message, offset=offset, caret=caret)
    return Outcome(cast(JSON, value), type_name(value))


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
