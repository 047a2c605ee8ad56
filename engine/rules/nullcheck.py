"""Static warning: a function that refuses null, fed an event field that may be absent.

`starts_with(data.referrer_id, 'partner-')` compiles, and then fails on every event that lacks
`data.referrer_id` (a missing field is null in JMESPath). linkcrm's own string helpers pass null
through; most of JMESPath's built-ins do not. A read is guarded (no warning) when the rule's
`when` reads it, or when it sits on the right of an `&&` whose left side reads it.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import cast

import jmespath.exceptions

from engine.rules.checks import ExpressionError, Node, child_nodes
from engine.rules.functions import FUNCTIONS, describe
from engine.rules.jmespath_internals import LocatingParser

FieldPath = tuple[str, ...]
# linkcrm's string helpers: a null subject gives null (their first parameter takes null).
_PASS_NULL = frozenset(doc.name for doc in describe() if doc.custom
                       and doc.signature.split("(", 1)[1].startswith("string|null"))
# Projections, filters and &expr evaluate their right side against elements, not the event.
_NOT_ROOTED = frozenset({"projection", "value_projection", "filter_projection", "flatten",
                         "expref"})


@dataclass(frozen=True)
class NullableArgument:
    function: str
    position: int  # 1-based
    expected: str
    path: FieldPath
    offset: int  # where the argument starts in the source
    caret: str
    default: str  # a literal of the expected type, for the hint


def nullable_arguments(source: str, guarded: Iterable[FieldPath] = ()) -> list[NullableArgument]:
    """Every argument in `source` that may be null where its function refuses null."""
    return list(_find(source, tuple(guarded)))


@functools.lru_cache(maxsize=4096)
def _find(source: str, guarded: tuple[FieldPath, ...]) -> tuple[NullableArgument, ...]:
    parser = LocatingParser()
    try:
        root = parser.parse_uncached(source)
    except (jmespath.exceptions.ParseError, RecursionError):
        return ()
    found: list[NullableArgument] = []
    table = cast(Mapping[str, Mapping[str, object]], FUNCTIONS.FUNCTION_TABLE)

    def visit(node: Node, rooted: bool, safe: tuple[FieldPath, ...]) -> None:
        kind = node["type"]
        children = [c for c in child_nodes(node) if isinstance(c, Mapping)]
        if kind == "function_expression" and rooted:
            check_call(node, children, safe)
        if kind == "and_expression":
            visit(children[0], rooted, safe)
            left = tuple(_reads(children[0])) if rooted else ()
            visit(children[1], rooted, safe + left)
            return
        for index, child in enumerate(children):
            inner = rooted and not (kind in _NOT_ROOTED and index > 0) and kind != "expref"
            if kind in ("subexpression", "pipe") and index > 0:
                inner = False  # the right side reads what the left side gave
            visit(child, inner, safe)

    def check_call(node: Node, args: Sequence[Node], safe: tuple[FieldPath, ...]) -> None:
        name = cast(str, node["value"])
        spec = table.get(name)
        if spec is None:
            return
        params = cast(Sequence[Mapping[str, object]], spec["signature"])
        for index, arg in enumerate(args):
            if not params:
                return
            types = cast(Sequence[str], params[min(index, len(params) - 1)]["types"])
            if not types or "null" in types or "any" in types or "expref" in types:
                continue
            path = _may_be_null(arg)
            if path is None or any(g[: len(path)] == path for g in safe):
                continue
            offset = parser.starts.get(id(arg), 0)
            caret = ExpressionError("", "", source, offset, "").caret
            found.append(NullableArgument(name, index + 1, " or ".join(types), path, offset,
                                          caret, _default(types)))

    visit(root, True, guarded)
    return tuple(found)


def _field_chain(node: Node) -> FieldPath | None:
    """`a.b.c` read from the current value, or None when `node` is something else."""
    if node["type"] == "field":
        return (cast(str, node["value"]),)
    if node["type"] == "subexpression":
        parts: list[str] = []
        for child in child_nodes(node):
            chain = _field_chain(child)
            if chain is None:
                return None
            parts.extend(chain)
        return tuple(parts)
    return None


def _may_be_null(node: Node) -> FieldPath | None:
    """The event field that makes `node` null when absent, or None when it cannot be null
    that way (a literal, a comparison, a multi-select, `x || 'default'`, ...)."""
    kind = node["type"]
    children = child_nodes(node)
    if kind in ("field", "subexpression"):
        return _field_chain(node)
    if kind == "or_expression":
        return _may_be_null(children[1])
    if kind == "and_expression":
        return _may_be_null(children[0]) or _may_be_null(children[1])
    if kind == "function_expression" and node["value"] in _PASS_NULL and children:
        return _may_be_null(children[0])
    return None


def _reads(node: Node) -> list[FieldPath]:
    """The field chains an expression reads from the event (for `x && f(x)` guards)."""
    chain = _field_chain(node)
    if chain is not None:
        return [chain]
    if node["type"] in _NOT_ROOTED:
        return []
    found: list[FieldPath] = []
    for child in child_nodes(node):
        if isinstance(child, Mapping):
            found.extend(_reads(child))
    return found


def _default(types: Sequence[str]) -> str:
    if "string" in types:
        return "''"
    if any(t.startswith("array") for t in types):
        return "`[]`"
    if "number" in types:
        return "`0`"
    if "object" in types:
        return "`{}`"
    return "''"
