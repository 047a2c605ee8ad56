"""Whether a rule's constant (a JMESPath literal) is a value its field can hold.

A constant is the same for every event, so a constant of the wrong type or outside an enum's
options would fail every action that writes it: that is a load error, not a run-time one.
"""

from __future__ import annotations

import json
from typing import cast

from engine.actions import JSON
from engine.config.fieldmap import CANONICAL, CoercionError, FieldSpec, coerce_value
from engine.config.schemacheck import suggest

_NUMBER_TYPES = ("number", "integer")


def _literal(value: object) -> str:
    return f"'{value}'" if isinstance(value, str) else f"`{json.dumps(value)}`"


def constant_problem(spec: FieldSpec, value: object) -> tuple[str, str] | None:
    """(message, hint) when the constant `value` cannot be written to field `spec`; None when
    it can (null, which leaves the field untouched, always can)."""
    if value is None:
        return None
    if spec.type in _NUMBER_TYPES and isinstance(value, str):
        hint = (f'write the number as a JMESPath number literal: "`{value}`"'
                if _is_number(value) else "write a number literal such as \"`42`\"")
        return f"{spec.name} is a {spec.type}, but the constant {_literal(value)} is text", hint
    if spec.type == "boolean" and isinstance(value, str):
        return (f"{spec.name} is a boolean, but the constant {_literal(value)} is text",
                'write "`true`" or "`false`"')
    if spec.type == "enum" and isinstance(value, str) and spec.options and (
            value not in spec.options):
        same = [o for o in spec.options if o.casefold() == value.casefold()]
        hint = (f"did you mean {same[0]!r}? options are case-sensitive, as the field map "
                "declares them" if same else
                suggest(value, spec.options) + " (the options are declared in the field map)")
        return f"{_literal(value)} is not an option of {spec.name}", hint
    try:
        coerce_value(CANONICAL, spec.type, cast(JSON, value), spec)
    except CoercionError as error:
        reason = str(error).partition(": ")[2] or str(error)
        return (f"the constant {_literal(value)} cannot be written to {spec.name} "
                f"({spec.type}): {reason}", _type_hint(spec))
    return None


def _type_hint(spec: FieldSpec) -> str:
    examples = {
        "date": "\"'2026-03-01'\"", "datetime": "\"'2026-03-01T12:00:00Z'\"",
        "email": "\"'ada@example.com'\"", "boolean": '"`true`"', "number": '"`42`"',
        "integer": '"`42`"',
    }
    example = examples.get(spec.type)
    article = "an" if spec.type[:1] in "aeiou" else "a"
    return f"write {article} {spec.type} constant such as {example}" if example else (
        f"write {article} {spec.type} value")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
