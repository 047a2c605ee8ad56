"""Turn JSON Schema errors into located, readable `Problem`s with a code and a hint."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

from jsonschema import ValidationError
from jsonschema.exceptions import best_match

from engine.actions import ACTIONS
from engine.config.resources import validator
from engine.config.yamlsource import Path, YamlDocument
from engine.errors import Problem

_JSON_TYPES = {
    dict: "a mapping",
    list: "a list",
    str: "a string",
    bool: "a boolean",
    int: "a number",
    float: "a number",
    type(None): "empty (null)",
}
_TYPE_WORDS = {
    "object": "a mapping",
    "array": "a list",
    "string": "a string",
    "number": "a number",
    "integer": "an integer",
    "boolean": "a boolean",
    "null": "null",
}


def json_path(path: Iterable[str | int]) -> str:
    """`$.rules[1].actions[0]` style, as people read it in messages."""
    text = "$"
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text


def describe(value: Any) -> str:
    kind = _JSON_TYPES.get(type(value), type(value).__name__)
    if isinstance(value, dict | list) or value is None:
        return kind
    if isinstance(value, bool):  # as YAML and JSON write it
        return f"{kind} ({str(value).lower()})"
    return f"{kind} ({value!r})"


def suggest(name: str, choices: Iterable[str]) -> str:
    """A did-you-mean hint, or the list of choices when nothing is close."""
    options = sorted(choices)
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    if close:
        return f"did you mean {close[0]!r}?"
    return "expected one of: " + ", ".join(repr(option) for option in options) if options else ""


def schema_problems(document: YamlDocument, schema: str) -> list[Problem]:
    """Every schema violation in `document`, located at the offending key or value."""
    problems = []
    for error in validator(schema).iter_errors(document.data):
        problems.extend(_convert(document, error))
    return problems


def _convert(document: YamlDocument, error: ValidationError) -> list[Problem]:
    if error.validator in ("anyOf", "oneOf") and error.context:
        return _alternatives(document, error)
    path: Path = tuple(error.absolute_path)
    kind = error.validator
    schema = error.schema if isinstance(error.schema, dict) else {}
    where = json_path(path)
    instance: Any = error.instance
    expected: Any = error.validator_value
    if kind == "additionalProperties":
        allowed = set(schema.get("properties", {}))
        extras = sorted(set(instance) - allowed)
        is_action = "upsert_contact" in allowed
        nested = [_nested_action(document, path, extra) for extra in extras
                  if extra in _ACTION_NAMES and not is_action]
        extras = [extra for extra in extras if extra not in _ACTION_NAMES or is_action]
        return nested + [
            Problem(
                document.location((*path, extra), key=True),
                "unknown-action" if is_action else "unknown-key",
                f"{extra!r} is not a known action" if is_action else f"unknown key {extra!r}",
                suggest(extra, allowed),
                path=where,
            )
            for extra in extras
        ]
    if kind == "required":
        missing = [name for name in expected if name not in instance]
        return [_missing(document, path, name) for name in missing]
    if kind == "propertyNames":
        name = str(instance)
        return [
            Problem(
                document.location((*path, name), key=True),
                "invalid-name",
                f"{name!r} is not a valid name",
                "names use lowercase letters, digits and '_', starting with a letter",
                path=where,
            )
        ]
    return [_single(document, path, error, schema)]


_ACTION_NAMES = tuple(ACTIONS)  # an action nested where a key belongs


def _nested_action(document: YamlDocument, path: Path, name: str) -> Problem:
    """An action indented under another action (or under a rule's key)."""
    if path and isinstance(path[-1], int):  # directly in a rule
        message = f"{name!r} is an action, but it sits in the rule itself"
        hint = f"actions go in the rule's list: actions: then '- {name}:' under it"
    else:
        message = f"{name!r} is an action, but it sits inside {str(path[-1])!r}"
        hint = (f"make it its own list item under actions: '- {name}:' at the same "
                "indentation as the '- ' of the action above")
    return Problem(document.location((*path, name), key=True), "nested-action", message, hint,
                   path=json_path(path))


def _missing(document: YamlDocument, path: Path, name: str) -> Problem:
    where = json_path(path)
    if name == "key" and len(path) >= 1 and path[-1] == "create_deal":
        return Problem(
            document.location(path, key=True),
            "deal-without-key",
            "create_deal has no 'key'",
            "add key: an expression unique per deal, e.g. join('-', ['referral', data.token]); "
            "it makes retries and replays find the deal instead of creating a second one",
            path=where,
        )
    return Problem(
        document.location(path, key=True),
        "missing-key",
        f"missing required key {name!r}",
        f"add '{name}:'",
        path=where,
    )


def _single(
    document: YamlDocument, path: Path, error: ValidationError, schema: dict[str, Any]
) -> Problem:
    kind, where = error.validator, json_path(path)
    value: Any = error.instance
    expected: Any = error.validator_value
    location = document.location(path)
    if kind == "type":
        words = (
            " or ".join(str(_TYPE_WORDS.get(t, t)) for t in expected)
            if isinstance(expected, list)
            else _TYPE_WORDS.get(expected, expected)
        )
        hint = ""
        is_expression = "JMESPath" in str(schema.get("description", ""))
        if expected == "string" and is_expression and isinstance(value, bool | int | float):
            literal = "true" if value is True else "false" if value is False else value
            hint = f'JMESPath constants go inside YAML quotes: "`{literal}`"'
        elif value is None:
            hint = "the value is empty: write a value or remove the key"
        return Problem(location, "wrong-type", f"expected {words}, got {describe(value)}", hint,
                       path=where)
    if kind == "minLength":
        return Problem(location, "empty-expression", "the expression is empty",
                       "write a JMESPath expression, or remove the key", path=where)
    if kind in ("const", "enum"):
        allowed = [expected] if kind == "const" else list(expected)
        hint = suggest(str(value), [str(a) for a in allowed]) if isinstance(value, str) else (
            "expected " + " or ".join(repr(a) for a in allowed)
        )
        return Problem(location, "invalid-value", f"{value!r} is not allowed here", hint,
                       path=where)
    if kind == "pattern" and path and path[-1] == "stage" and isinstance(value, str):
        bare = value.strip("'\"`")
        return Problem(location, "invalid-stage", f"{value!r} is not a stage name",
                       f"stages are names from the field map, not JMESPath: write "
                       f"stage: {bare} (no inner quotes)" if bare != value else
                       "stage names use lowercase letters, digits, '-' and '_', as declared "
                       "in the field map", path=where)
    if kind == "pattern":
        return Problem(location, "invalid-name", f"{value!r} is not a valid name",
                       "use lowercase letters, digits, '-' and '_'", path=where)
    if kind == "maxProperties" and "upsert_contact" in schema.get("properties", {}):
        return Problem(location, "invalid-action",
                       "an action item holds exactly one action, found " + ", ".join(value),
                       "start each action on its own '- ' list item", path=where)
    if kind == "maxProperties":
        return Problem(location, "invalid-identity",
                       "an identity key names one field, found " + ", ".join(value),
                       "list several keys in priority order: "
                       "identity: [{email: data.email}, {deep_link_token: data.token}]",
                       path=where)
    if kind == "minProperties" and "upsert_contact" in schema.get("properties", {}):
        return Problem(location, "invalid-action", "the action is empty",
                       "write one of: upsert_contact, set_stage, create_deal", path=where)
    if kind in ("minProperties", "minItems") and "identity" in path[-2:]:
        return Problem(location, "empty-identity", "the identity names no field",
                       "identity is required: it says which record the action applies to, "
                       "e.g. identity: {deep_link_token: data.token}", path=where)
    if kind in ("minProperties", "minItems"):
        return Problem(location, "empty-value", f"{describe(value)} must not be empty",
                       "fill it in or remove the key", path=where)
    return Problem(location, "schema", error.message, path=where)


def _alternatives(document: YamlDocument, error: ValidationError) -> list[Problem]:
    """anyOf/oneOf: report the branch whose type the value has, or the shapes allowed."""
    path: Path = tuple(error.absolute_path)
    branches: dict[int, list[ValidationError]] = {}
    for sub in error.context or []:
        branches.setdefault(int(sub.relative_schema_path[0]), []).append(sub)
    wrong_type = {
        index for index, errors in branches.items()
        if any(e.validator == "type" and tuple(e.absolute_path) == path for e in errors)
    }
    fitting = [errors for index, errors in sorted(branches.items()) if index not in wrong_type]
    if len(fitting) == 1 or (fitting and error.validator == "anyOf"):
        return [p for sub in fitting[0] for p in _convert(document, sub)]
    kinds = []
    for sub in error.context or []:
        if sub.validator == "type" and isinstance(sub.validator_value, str):
            kinds.append(_TYPE_WORDS.get(sub.validator_value, sub.validator_value))
        if sub.validator == "required" and error.validator == "oneOf":
            names: Any = sub.validator_value
            kinds.append("'" + "' or '".join(names) + "'")
    if error.validator == "oneOf" and isinstance(error.instance, dict):
        return [Problem(document.location(path), "invalid-value",
                        "give exactly one of " + " or ".join(dict.fromkeys(kinds)),
                        path=json_path(path))]
    if kinds:
        hint = ""
        if path and path[-1] == "on" and isinstance(error.instance, bool | int | float):
            hint = ("name an event type, a list of them, or a glob: on: install.tracked, "
                    "on: [referral.created, referral.completed], on: 'referral.*'")
        return [Problem(document.location(path), "wrong-type",
                        f"expected {' or '.join(dict.fromkeys(kinds))}, got "
                        f"{describe(error.instance)}", hint, path=json_path(path))]
    deepest = best_match(error.context)
    return _convert(document, deepest) if deepest is not None else []
