"""Compile rule expressions (JMESPath plus linkcrm's functions) once, with static checks."""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import cast

import jmespath.exceptions

from engine.rules.checks import Checker, ExpressionError, Node, child_nodes
from engine.rules.codegen import SearchFunction, compile_search, copy_json
from engine.rules.functions import FUNCTIONS, describe
from engine.rules.jmespath_internals import LocatingParser

__all__ = ["Expression", "ExpressionError", "compile_expression"]

_DOCS = {doc.name: doc for doc in describe()}
_SPEC_URL = "https://jmespath.org/specification.html"


@dataclass(frozen=True, slots=True)
class Expression:
    """A compiled expression; `search(document)` evaluates it exactly as `jmespath` would.

    >>> expression = compile_expression("data.token || data.referral_code")
    >>> expression.search({"data": {"referral_code": "r-1"}})
    'r-1'
    >>> expression.root_paths()
    (('data', 'token'), ('data', 'referral_code'))
    """

    source: str
    search: SearchFunction = field(repr=False, compare=False)
    is_literal: bool = field(compare=False)
    _literal: object = field(repr=False, compare=False)
    _paths: tuple[tuple[str, ...], ...] = field(repr=False, compare=False)

    @property
    def literal_value(self) -> object:
        """The constant an `is_literal` expression always gives (a fresh copy); else None."""
        return copy_json(self._literal)

    def root_paths(self) -> tuple[tuple[str, ...], ...]:
        """The field-name chains read from the root document, in source order.

        A chain stops at the first step that is not a field (`data.items[0].sku` reads
        `("data", "items")`); fields read relative to projected elements or inside `&expr`
        are not root paths; the whole document (`length(@)`, `*.a`) adds no chain.
        """
        return self._paths


@functools.lru_cache(maxsize=4096)
def compile_expression(source: str) -> Expression:
    """Parse, statically check and compile `source`; raise ExpressionError if it is unusable.

    >>> compile_expression("to_date(timestamp)").search({"timestamp": "2026-03-01T23:30:00-02:00"})
    '2026-03-02'
    """
    if not source.strip():
        raise ExpressionError("expression-syntax", "the expression is empty", source, 0,
                              "write a JMESPath expression such as data.token, or a literal"
                              " such as 'lead'")
    parser = LocatingParser()
    try:
        parsed = parser.parse_uncached(source)
        Checker(source, parser.starts).check(parsed)
        paths = _root_paths(parsed)
    except jmespath.exceptions.ParseError as exc:
        raise _syntax_error(source, exc) from exc
    except RecursionError:  # the parser and the checks recurse once per nesting level
        raise ExpressionError("expression-syntax", "the expression is nested too deeply",
                              source, 0, "split it, or simplify its nesting") from None
    literal = parsed["value"] if parsed["type"] == "literal" else None
    return Expression(source, compile_search(parsed, FUNCTIONS), parsed["type"] == "literal",
                      literal, paths)


def _syntax_error(source: str, exc: jmespath.exceptions.ParseError) -> ExpressionError:
    if _BARE_DATE.match(source):
        text = source.strip()
        return ExpressionError(
            "expression-syntax", f"invalid JMESPath syntax: a bare date ({text}) is not an "
            "expression", source, len(source) - len(source.lstrip()),
            f"a date is text to JMESPath: write it as a string literal inside YAML quotes, "
            f"\"'{text}'\"")
    if isinstance(exc, jmespath.exceptions.LexerError):
        offset, detail = exc.lexer_position, str(exc.message)
    elif isinstance(exc, jmespath.exceptions.IncompleteExpressionError) or (
            exc.token_type == "EOF"):
        offset, detail = len(source), "the expression ends too early"
        if not isinstance(exc, jmespath.exceptions.IncompleteExpressionError):
            offset = exc.lex_position
        unclosed = _unclosed_bracket(source)
        # `foo[` or `f(a ||` stop mid-way: "ends too early" says it better.
        if unclosed is not None and source.rstrip()[-1:] not in ".|&=<>!,:([{":
            opener = source[unclosed]
            return ExpressionError(
                "expression-syntax", f"invalid JMESPath syntax: this {opener!r} is never "
                "closed", source, unclosed,
                f"close it with {_CLOSERS[opener]!r} where its "
                f"{'arguments' if opener == '(' else 'contents'} end")
    else:
        offset, detail = exc.lex_position, str(exc.msg)
        if detail.startswith("Expecting: ['quoted_identifier', 'unquoted_identifier'"):
            detail = "a '.' must be followed by a field name, '[' or '{'"
        if exc.token_value and str(exc.token_value) not in detail:
            detail += f", found {exc.token_value!r}"
    detail = detail[:1].lower() + detail[1:]
    hint = _syntax_hint(source, detail, exc)
    return ExpressionError("expression-syntax", f"invalid JMESPath syntax: {detail}", source,
                           offset, hint)


_KEYWORD_OPERATORS = {"and": "&&", "or": "||", "not": "!"}
_CLOSERS = {"(": ")", "[": "]", "{": "}"}
_BARE_DATE = re.compile(r"^\s*\d{4}-\d{2}-\d{2}([T ][0-9:.]+(Z|[+-]\d{2}:?\d{2})?)?\s*$")


def _unclosed_bracket(source: str) -> int | None:
    """The offset of the innermost bracket left open at the end (quotes skipped), if any."""
    stack: list[int] = []
    quote = ""
    index = 0
    while index < len(source):
        char = source[index]
        if quote:
            if char == "\\":
                index += 1
            elif char == quote:
                quote = ""
        elif char in "'\"`":
            quote = char
        elif char in _CLOSERS:
            stack.append(index)
        elif char in ")]}" and stack and _CLOSERS[source[stack[-1]]] == char:
            stack.pop()
        index += 1
    return stack[-1] if stack and not quote else None


def _syntax_hint(source: str, detail: str, exc: jmespath.exceptions.ParseError) -> str:
    hint = _specific_syntax_hint(detail, exc)
    quoted = re.search(r'"([^"\\]*)"?', source)
    if quoted:
        # Double quotes name a field in JMESPath; people coming from YAML or JSON expect text.
        text = quoted.group(1)
        quotes = (f"JMESPath string literals use single quotes: '{text}'"
                  f' ("{text}" names a field)')
        hint = f"{hint}; and {quotes}" if hint else quotes
    return hint or f"check the expression at the caret against the JMESPath grammar: {_SPEC_URL}"


def _specific_syntax_hint(detail: str, exc: jmespath.exceptions.ParseError) -> str:
    if detail == "unknown token '='":
        return "compare with ==, as in event == 'install.tracked'"
    if detail == "unknown token '-'":
        return 'double-quote a field name that contains "-", as in data."first-name"'
    if detail.startswith("unclosed ' delimiter"):
        return "close the string literal with a single quote: 'lead'"
    if detail.startswith("unclosed ` delimiter"):
        return "close the JSON literal with a backtick: `42`"
    if detail.startswith("bad token"):
        return "a backtick literal must be JSON (`42`, `true`, `null`); write text as 'lead'"
    if detail.startswith("unknown token"):
        return 'double-quote a field name with unusual characters, as in data."$ref"'
    word = str(exc.token_value) if exc.token_value is not None else ""
    if word in _KEYWORD_OPERATORS:
        return f"JMESPath writes '{word}' as {_KEYWORD_OPERATORS[word]}"
    if detail == "the expression ends too early":
        return "complete the expression: it stops after an operator, a dot or an open bracket"
    return ""


def _root_paths(root: Node) -> tuple[tuple[str, ...], ...]:
    found: list[tuple[str, ...]] = []

    def use(path: tuple[str, ...] | None) -> None:
        if path and path not in found:
            found.append(path)

    def walk(node: Node, current: tuple[str, ...] | None) -> tuple[str, ...] | None:
        """Record what `node` reads when the current value is root.<current> (None: not
        from the root); return the path its own value comes from, still to be `use`d."""
        kind = node["type"]
        children = child_nodes(node)
        if kind == "field":
            return None if current is None else (*current, cast(str, node["value"]))
        if kind in ("current", "identity"):
            return current
        if kind in ("subexpression", "pipe"):
            for child in children:
                current = walk(child, current)
            return current
        if kind in ("projection", "value_projection", "filter_projection", "flatten",
                    "index_expression"):
            use(walk(children[0], current))
            for child in children[1:]:
                if isinstance(child, Mapping):
                    walk(child, None)  # evaluated against projected elements
            return None
        if kind == "expref":
            walk(children[0], None)
            return None
        for child in children:
            if isinstance(child, Mapping):
                use(walk(child, current))
        return None

    use(walk(root, ()))
    return tuple(found)
