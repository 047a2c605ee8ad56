"""linkcrm's custom JMESPath functions (string helpers and timestamp conversion)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TypeVar, cast

import jmespath.exceptions
import jmespath.functions

__all__ = [
    "CUSTOM_FUNCTION_NAMES",
    "FUNCTIONS",
    "FunctionDoc",
    "InvalidValueError",
    "LinkcrmFunctions",
    "describe",
    "format_signature",
]


_Method = TypeVar("_Method", bound=Callable[..., object])


def signature(*params: dict[str, object]) -> Callable[[_Method], _Method]:
    """`jmespath.functions.signature`, typed (the package ships no annotations)."""
    return cast(Callable[[_Method], _Method], jmespath.functions.signature(*params))


class InvalidValueError(jmespath.exceptions.JMESPathError):  # type: ignore[misc]
    """A function got a value of the right type that it cannot use (a malformed timestamp)."""


# ISO 8601 extended format as Tolinku and RFC 3339 write it. The regex decides what is
# accepted: datetime.fromisoformat alone would also take week dates, ordinal dates and the
# basic format (and, from Python 3.12 on, 24:00), so a rule that happened to work on those
# would break on the next sender or the next Python.
_TIMESTAMP = re.compile(
    r"\d{4}-\d{2}-\d{2}"
    r"(?:[Tt ](?:[01]\d|2[0-3]):[0-5]\d(?::[0-5]\d(?:[.,]\d+)?)?"
    r"(?:[Zz]|[+-](?:[01]\d|2[0-3])(?::?[0-5]\d)?)?)?"
)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS = timedelta(milliseconds=1)


def _parse_timestamp(function_name: str, text: str) -> datetime:
    """Return the aware UTC instant of an ISO 8601 timestamp; a missing offset means UTC."""
    if _TIMESTAMP.fullmatch(text) is None:
        raise _bad_timestamp(function_name, text)
    try:
        # Past the regex only the calendar can be wrong (2026-02-30). Upper-case because
        # Python 3.11 rejects RFC 3339's lower-case t and z. Digits past microseconds are
        # truncated, never rounded up into the next millisecond.
        instant = datetime.fromisoformat(text.upper())
        if instant.tzinfo is None:
            return instant.replace(tzinfo=UTC)
        return instant.astimezone(UTC)
    except (ValueError, OverflowError) as exc:  # overflow: an offset past year 1 or 9999
        raise _bad_timestamp(function_name, text) from exc


def _bad_timestamp(function_name: str, text: str) -> InvalidValueError:
    return InvalidValueError(
        f"{function_name}(): {text!r} is not an ISO 8601 timestamp"
        " (expected e.g. '2026-03-01T12:30:00Z' or '2026-03-01')"
    )


class LinkcrmFunctions(jmespath.functions.Functions):  # type: ignore[misc]
    """The standard JMESPath functions plus linkcrm's; string helpers pass `null` through.

    Only the subject (first argument) may be null, so a missing event field flows through a
    fallback chain; separators and patterns are literals in practice, and keeping them
    `string` lets the static checker reject a mistyped one at load time.

    >>> import jmespath
    >>> jmespath.search("lower(name)", {"name": "Ada"},
    ...                 jmespath.Options(custom_functions=FUNCTIONS))
    'ada'
    """

    @signature({"types": ["string", "null"]})
    def _func_lower(self, subject: str | None) -> str | None:
        return None if subject is None else subject.lower()

    @signature({"types": ["string", "null"]})
    def _func_upper(self, subject: str | None) -> str | None:
        return None if subject is None else subject.upper()

    @signature({"types": ["string", "null"]})
    def _func_trim(self, subject: str | None) -> str | None:
        return None if subject is None else subject.strip()

    @signature({"types": ["string", "null"]}, {"types": ["string"]})
    def _func_split(self, subject: str | None, separator: str) -> list[str] | None:
        if subject is None:
            return None
        if not separator:
            # str.split raises a bare ValueError here; rules need a JMESPath error.
            raise InvalidValueError("split(): the separator must not be empty")
        return subject.split(separator)

    @signature({"types": ["string", "null"]}, {"types": ["string"]}, {"types": ["string"]})
    def _func_replace(self, subject: str | None, old: str, new: str) -> str | None:
        return None if subject is None else subject.replace(old, new)

    @signature({"types": ["string", "null"]})
    def _func_to_date(self, timestamp: str | None) -> str | None:
        if timestamp is None:
            return None
        return _parse_timestamp("to_date", timestamp).date().isoformat()

    @signature({"types": ["string", "null"]})
    def _func_to_epoch_ms(self, timestamp: str | None) -> int | None:
        if timestamp is None:
            return None
        # timedelta // timedelta is exact integer arithmetic; a float timestamp() is not.
        return (_parse_timestamp("to_epoch_ms", timestamp) - _EPOCH) // _ONE_MS


#: The one functions object every compiled expression uses (it holds no state).
FUNCTIONS = LinkcrmFunctions()


@dataclass(frozen=True)
class FunctionDoc:
    """One function as documented: `example` evaluated against `{}` gives `result`."""

    name: str
    signature: str
    returns: str
    summary: str
    example: str
    result: object
    custom: bool


# name: (returns, summary, example, result); the signature comes from the code itself.
_DOCS: dict[str, tuple[str, str, str, object]] = {
    "lower": ("string|null", "lower-case a string", "lower('Ada@Example.COM')",
              "ada@example.com"),
    "upper": ("string|null", "upper-case a string", "upper('fr')", "FR"),
    "trim": ("string|null", "strip leading and trailing whitespace", "trim('  Ada ')", "Ada"),
    "split": ("array[string]|null", "split a string on every separator",
              "split('a,b,c', ',')", ["a", "b", "c"]),
    "replace": ("string|null", "replace every occurrence of old with new",
                "replace('+1 555 0100', ' ', '')", "+15550100"),
    "to_date": ("string|null", "the UTC calendar date (YYYY-MM-DD) of an ISO 8601 timestamp",
                "to_date('2026-03-01T23:30:00-02:00')", "2026-03-02"),
    "to_epoch_ms": ("number|null", "milliseconds since 1970-01-01T00:00:00Z, as an integer",
                    "to_epoch_ms('2026-03-01T12:30:00.250Z')", 1772368200250),
    "abs": ("number", "absolute value", "abs(`-3`)", 3),
    "avg": ("number|null", "mean of an array of numbers", "avg(`[1, 2, 3]`)", 2.0),
    "ceil": ("number", "round up to an integer", "ceil(`1.2`)", 2),
    "contains": ("boolean", "whether an array has an element or a string a substring",
                 "contains('install.tracked', 'install')", True),
    "ends_with": ("boolean", "whether a string ends with a suffix",
                  "ends_with('referral.completed', '.completed')", True),
    "floor": ("number", "round down to an integer", "floor(`1.8`)", 1),
    "join": ("string", "join an array of strings with a separator",
             "join('-', ['referral', 'abc123'])", "referral-abc123"),
    "keys": ("array[string]", "the keys of an object", "keys(`{\"a\": 1}`)", ["a"]),
    "length": ("number", "length of a string, array or object", "length('abc')", 3),
    "map": ("array", "apply an expression to each element", "map(&a, `[{\"a\": 1}]`)", [1]),
    "max": ("number|string|null", "largest number or string", "max(`[1, 3, 2]`)", 3),
    "max_by": ("object|null", "element with the largest key",
               "max_by(`[{\"n\": 1}, {\"n\": 2}]`, &n)", {"n": 2}),
    "merge": ("object", "merge objects; later keys win", "merge(`{\"a\": 1}`, `{\"b\": 2}`)",
              {"a": 1, "b": 2}),
    "min": ("number|string|null", "smallest number or string", "min(`[1, 3, 2]`)", 1),
    "min_by": ("object|null", "element with the smallest key",
               "min_by(`[{\"n\": 1}, {\"n\": 2}]`, &n)", {"n": 1}),
    "not_null": ("any", "first argument that is not null", "not_null(`null`, 'x')", "x"),
    "reverse": ("string|array", "reverse a string or array", "reverse('abc')", "cba"),
    "sort": ("array", "sort numbers or strings", "sort(['b', 'a'])", ["a", "b"]),
    "sort_by": ("array", "sort by an expression", "sort_by(`[{\"n\": 2}, {\"n\": 1}]`, &n)",
                [{"n": 1}, {"n": 2}]),
    "starts_with": ("boolean", "whether a string starts with a prefix",
                    "starts_with('referral.created', 'referral.')", True),
    "sum": ("number", "sum of an array of numbers", "sum(`[1, 2]`)", 3),
    "to_array": ("array", "wrap a non-array in an array", "to_array('a')", ["a"]),
    "to_number": ("number|null", "parse a number, null when impossible", "to_number('42')", 42),
    "to_string": ("string", "JSON text of a non-string", "to_string(`[1]`)", "[1]"),
    "type": ("string", "the JMESPath type name", "type(`true`)", "boolean"),
    "values": ("array", "the values of an object", "values(`{\"a\": 1}`)", [1]),
}

#: The functions linkcrm adds to standard JMESPath.
CUSTOM_FUNCTION_NAMES = ("lower", "upper", "trim", "split", "replace", "to_date", "to_epoch_ms")


def format_signature(name: str) -> str:
    """`join(string, array-string)`: a function's parameters as its @signature declares them."""
    params = []
    for spec in FUNCTIONS.FUNCTION_TABLE[name]["signature"]:
        param = "|".join(spec["types"]) or "any"
        params.append(param + ("..." if spec.get("variadic") else ""))
    return f"{name}({', '.join(params)})"


def describe() -> tuple[FunctionDoc, ...]:
    """Every function an expression may call, sorted by name, with one checked example."""
    docs = []
    for name in sorted(FUNCTIONS.FUNCTION_TABLE):
        returns, summary, example, result = _DOCS[name]
        docs.append(FunctionDoc(name, format_signature(name), returns, summary, example, result,
                                name in CUSTOM_FUNCTION_NAMES))
    return tuple(docs)
