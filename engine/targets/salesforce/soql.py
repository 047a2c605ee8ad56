"""SOQL built safely: the one string-escaping function and the few queries linkcrm sends."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TypeVar
from urllib.parse import quote

# One pass over the characters is the "backslash first" rule made structural: each input
# character maps once, so a backslash an earlier mapping wrote is never escaped again.
_ESCAPES = {
    "\\": "\\\\",
    "'": "\\'",
    '"': '\\"',
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
    "\b": "\\b",
    "\f": "\\f",
}
# What `escape` changes: the characters above, the other controls and lone surrogates.
_TO_ESCAPE = re.compile(r"[\\'\"\x00-\x1f\x7f\ud800-\udfff]")
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_SEPARATOR = len(quote(", ", safe=""))
Item = TypeVar("Item")


def escape(value: str) -> str:
    r"""The body of a SOQL string literal holding `value` exactly (quotes not included).

    Salesforce's rules: `\` is the escape character; `'` and `\` are reserved and must be
    escaped; the valid sequences are `\n \r \t \b \f \" \' \\ \uXXXX` (and `\_ \%` in
    LIKE only); any other backslash sequence is an error. Other control characters have no
    short escape, so they travel as `\uXXXX`; `%` and `_` are left alone because `\%` and `\_`
    are errors outside LIKE (and linkcrm never uses LIKE).
    """
    if _TO_ESCAPE.search(value) is None:  # most values (tokens, emails): as they are
        return value
    out = []
    for char in value:
        mapped = _ESCAPES.get(char)
        if mapped is not None:
            out.append(mapped)
        elif ord(char) < 0x20 or ord(char) == 0x7F or 0xD800 <= ord(char) <= 0xDFFF:
            # A lone surrogate (possible from JSON) cannot travel as UTF-8 in the URL.
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return "".join(out)


def literal(value: str) -> str:
    r"""`value` as a quoted SOQL string literal.

    >>> print(literal("O'Brien \\ co"))
    'O\'Brien \\ co'
    """
    return "'" + escape(value) + "'"


def name(value: str) -> str:
    """An object or field API name, checked: names cannot be escaped, only refused."""
    if not _NAME.match(value):
        raise ValueError(f"{value!r} is not a Salesforce API name")
    return value


def select_where(
    fields: Sequence[str], sobject: str, field: str, values: Sequence[str], limit: int | None = None
) -> str:
    """`SELECT f1, f2 FROM Obj WHERE Field = 'v'` (one value) or `... IN ('a', 'b')`.

    >>> select_where(["Id"], "Lead", "Email", ["a@b.co"], limit=2)
    "SELECT Id FROM Lead WHERE Email = 'a@b.co' LIMIT 2"
    """
    if not values:
        raise ValueError("select_where needs at least one value")
    return select_where_any(fields, sobject, {field: values}, limit)


def select_where_any(
    fields: Sequence[str], sobject: str, matches: Mapping[str, Sequence[str]],
    limit: int | None = None,
) -> str:
    """The records where any of the fields holds one of its values: `... WHERE A IN ('a',
    'b') OR B = 'c'` (a field with no values is left out; one value is `=`).

    >>> select_where_any(["Id"], "Lead", {"Token__c": ["t1", "t2"], "Email": ["a@b.co"]})
    "SELECT Id FROM Lead WHERE Token__c IN ('t1', 't2') OR Email = 'a@b.co'"
    """
    conditions = [_condition(field, values) for field, values in matches.items() if values]
    if not conditions:
        raise ValueError("select_where_any needs at least one value")
    columns = ", ".join(name(f) for f in dict.fromkeys(fields))
    query = f"SELECT {columns} FROM {name(sobject)} WHERE {' OR '.join(conditions)}"
    return query if limit is None else f"{query} LIMIT {int(limit)}"


def _condition(field: str, values: Sequence[str]) -> str:
    if len(values) == 1:
        return f"{name(field)} = {literal(values[0])}"
    return f"{name(field)} IN ({', '.join(literal(v) for v in values)})"


def select_all(fields: Sequence[str], sobject: str) -> str:
    """`SELECT f1, f2 FROM Obj` (small setup objects such as LeadStatus)."""
    return f"SELECT {', '.join(name(f) for f in fields)} FROM {name(sobject)}"


def encoded_length(query: str) -> int:
    """The length of `query` as a URL query value, at most (every reserved byte as `%XX`)."""
    return len(quote(query, safe=""))


def parts(items: Sequence[Item], values: Callable[[Item], Sequence[str]], frame: str, *,
          most: int, budget: int) -> Iterator[list[Item]]:
    """`items` in order, cut so that a part has at most `most` items and the query for it
    stays within `budget` once percent-encoded: `frame` is that query with no values of its
    own (measured once), and each of an item's `values` adds its literal and a separator.
    An item whose values alone pass `budget` still gets a part (the server says what is wrong).
    """
    size = base = encoded_length(frame)
    part: list[Item] = []
    for item in items:
        cost = sum(encoded_length(literal(v)) + _SEPARATOR for v in values(item))
        if part and (len(part) >= most or size + cost > budget):
            yield part
            part, size = [], base
        part.append(item)
        size += cost
    if part:
        yield part
