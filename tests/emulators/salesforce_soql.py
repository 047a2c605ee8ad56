"""A strict parser and evaluator for the SOQL subset the Salesforce emulator answers."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

Record = Mapping[str, Any]
Predicate = Callable[[Record], bool]

_SIMPLE_ESCAPES = {"n": "\n", "N": "\n", "r": "\r", "R": "\r", "t": "\t", "T": "\t",
                   "b": "\b", "B": "\b", "f": "\f", "F": "\f", '"': '"', "'": "'", "\\": "\\"}
_KEYWORDS = {"SELECT", "FROM", "WHERE", "AND", "OR", "NOT", "IN", "LIKE", "LIMIT", "ORDER", "BY",
             "ASC", "DESC", "NULL", "TRUE", "FALSE"}
_TOKEN = re.compile(r"\s*(?:(?P<ident>[A-Za-z_][A-Za-z0-9_]*)|(?P<number>\d+(?:\.\d+)?)"
                    r"|(?P<op>!=|<>|<=|>=|=|<|>)|(?P<punct>[(),])|(?P<quote>'))")


class SOQLError(Exception):
    """MALFORMED_QUERY or INVALID_FIELD / INVALID_TYPE, with Salesforce-like wording."""

    def __init__(self, message: str, code: str = "MALFORMED_QUERY") -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Literal:
    """A string literal: (character, escaped wildcard?) pairs, so LIKE can tell `\\%` from `%`."""

    parts: tuple[tuple[str, bool], ...]

    @property
    def value(self) -> str:
        return "".join(char for char, _ in self.parts)

    @property
    def has_wildcard_escape(self) -> bool:
        return any(escaped for _, escaped in self.parts)

    def like_regex(self) -> re.Pattern[str]:
        pattern = "".join(
            re.escape(char) if escaped else ".*" if char == "%" else "." if char == "_"
            else re.escape(char) for char, escaped in self.parts)
        return re.compile(f"^{pattern}$", re.IGNORECASE | re.DOTALL)


@dataclass(frozen=True)
class Token:
    kind: str  # ident, keyword, number, op, punct, string, end
    text: str
    literal: Literal | None = None


def read_string(text: str, start: int) -> tuple[Literal, int]:
    """The literal opening at `text[start]` (a quote) and the index after its closing quote.

    Follows Salesforce's quoted-string rules: only the listed escapes are valid; any other
    backslash sequence, a raw control character, or a missing closing quote is an error."""
    parts: list[tuple[str, bool]] = []
    index = start + 1
    while True:
        if index >= len(text):
            raise SOQLError(f"unexpected end of query: unterminated string literal at {start}")
        char = text[index]
        if char == "'":
            return Literal(tuple(parts)), index + 1
        if char == "\\":
            follower = text[index + 1: index + 2]
            if follower in _SIMPLE_ESCAPES:
                parts.append((_SIMPLE_ESCAPES[follower], False))
                index += 2
            elif follower in ("%", "_"):
                parts.append((follower, True))
                index += 2
            elif follower == "u" and re.fullmatch(r"[0-9A-Fa-f]{4}", text[index + 2: index + 6]):
                parts.append((chr(int(text[index + 2: index + 6], 16)), False))
                index += 6
            else:
                raise SOQLError(f"Invalid string literal '{text[start:index + 2]}'. Illegal "
                                f"character sequence '\\{follower}' in string literal.")
        elif ord(char) < 0x20:
            raise SOQLError(f"Invalid string literal: raw control character U+{ord(char):04X}")
        else:
            parts.append((char, False))
            index += 1


def tokenize(text: str) -> list[Token]:
    tokens: list[Token] = []
    index = 0
    while True:
        while index < len(text) and text[index].isspace():
            index += 1
        if index >= len(text):
            tokens.append(Token("end", ""))
            return tokens
        match = _TOKEN.match(text, index)
        if match is None:
            raise SOQLError(f"unexpected token: '{text[index:index + 10]}'")
        if match["quote"]:
            literal, index = read_string(text, match.start("quote"))
            tokens.append(Token("string", literal.value, literal))
            continue
        kind = match.lastgroup or ""
        word = match[kind]
        if kind == "ident" and word.upper() in _KEYWORDS:
            kind, word = "keyword", word.upper()
        tokens.append(Token(kind, word))
        index = match.end()


@dataclass
class Query:
    sobject: str
    fields: list[str]
    where: Predicate | None
    order: list[tuple[str, bool]]  # (field, descending)
    limit: int | None


class _Parser:
    def __init__(self, text: str, objects: Mapping[str, Mapping[str, Any]]) -> None:
        self.tokens = tokenize(text)
        self.index = 0
        self.objects = objects
        self.columns: dict[str, str] = {}

    def peek(self) -> Token:
        return self.tokens[self.index]

    def take(self, kind: str, text: str | None = None) -> Token:
        token = self.peek()
        if token.kind != kind or (text is not None and token.text != text):
            shown = token.text or "end of query"
            raise SOQLError(f"unexpected token: '{shown}'")
        self.index += 1
        return token

    def accept(self, kind: str, text: str | None = None) -> bool:
        token = self.peek()
        if token.kind == kind and (text is None or token.text == text):
            self.index += 1
            return True
        return False

    def parse(self) -> Query:
        self.take("keyword", "SELECT")
        names = [self.take("ident").text]
        while self.accept("punct", ","):
            names.append(self.take("ident").text)
        self.take("keyword", "FROM")
        sobject = self._object(self.take("ident").text)
        fields = [self.column(name) for name in names]
        where = self.expression() if self.accept("keyword", "WHERE") else None
        order: list[tuple[str, bool]] = []
        if self.accept("keyword", "ORDER"):
            self.take("keyword", "BY")
            while True:
                column = self.column(self.take("ident").text)
                descending = self.accept("keyword", "DESC")
                if not descending:
                    self.accept("keyword", "ASC")
                order.append((column, descending))
                if not self.accept("punct", ","):
                    break
        limit = int(self.take("number").text) if self.accept("keyword", "LIMIT") else None
        self.take("end")
        return Query(sobject, fields, where, order, limit)

    def _object(self, name: str) -> str:
        for known, fields in self.objects.items():
            if known.lower() == name.lower():
                self.columns = {field.lower(): field for field in fields}
                return known
        raise SOQLError(f"sObject type '{name}' is not supported.", "INVALID_TYPE")

    def column(self, name: str) -> str:
        try:
            return self.columns[name.lower()]
        except KeyError:
            raise SOQLError(f"No such column '{name}' on entity. If you are attempting to use "
                            "a custom field, be sure to append the '__c' after the custom "
                            "field name.", "INVALID_FIELD") from None

    def expression(self) -> Predicate:
        # SOQL refuses AND and OR mixed at one level without parentheses.
        terms = [self.unary()]
        joiner = ""
        while self.peek().kind == "keyword" and self.peek().text in ("AND", "OR"):
            word = self.take("keyword").text
            if joiner and word != joiner:
                raise SOQLError(f"unexpected token: '{word}'")
            joiner = word
            terms.append(self.unary())
        if joiner == "OR":
            return lambda record: any(term(record) for term in terms)
        return lambda record: all(term(record) for term in terms)

    def unary(self) -> Predicate:
        if self.accept("keyword", "NOT"):
            inner = self.unary()
            return lambda record: not inner(record)
        if self.accept("punct", "("):
            inner = self.expression()
            self.take("punct", ")")
            return inner
        return self.comparison()

    def comparison(self) -> Predicate:
        column = self.column(self.take("ident").text)
        negate = self.accept("keyword", "NOT")
        if self.accept("keyword", "IN"):
            self.take("punct", "(")
            values = [self.value(like=False)]
            while self.accept("punct", ","):
                values.append(self.value(like=False))
            self.take("punct", ")")
            keys = {_key(v) for v in values}
            return lambda record: (_key(record.get(column)) in keys) != negate
        if negate:
            raise SOQLError("unexpected token: 'NOT'")
        if self.accept("keyword", "LIKE"):
            token = self.take("string")
            assert token.literal is not None
            regex = token.literal.like_regex()
            return lambda record: isinstance(record.get(column), str) \
                and regex.match(record[column]) is not None
        operator = self.take("op").text
        wanted = _key(self.value(like=False))
        if operator == "=":
            return lambda record: _key(record.get(column)) == wanted
        if operator in ("!=", "<>"):
            return lambda record: _key(record.get(column)) != wanted
        raise SOQLError(f"operator {operator} is not supported by this emulator")

    def value(self, *, like: bool) -> Any:
        token = self.peek()
        if token.kind == "string":
            self.index += 1
            assert token.literal is not None
            if token.literal.has_wildcard_escape and not like:
                raise SOQLError("Invalid string literal: \\% and \\_ are only valid in LIKE")
            return token.literal.value
        if token.kind == "number":
            self.index += 1
            return float(token.text)
        if token.kind == "keyword" and token.text in ("NULL", "TRUE", "FALSE"):
            self.index += 1
            return {"NULL": None, "TRUE": True, "FALSE": False}[token.text]
        raise SOQLError(f"unexpected token: '{token.text or 'end of query'}'")


def _key(value: Any) -> Any:
    """String comparisons in SOQL ignore case."""
    return value.casefold() if isinstance(value, str) else value


def parse(text: str, objects: Mapping[str, Mapping[str, Any]]) -> Query:
    """Parse `text` against `objects` (object name -> its fields); raises SOQLError."""
    return _Parser(text, objects).parse()
