"""Parameter types with ranges: every number a command takes is checked before it is used, so
a value out of range is a usage error (exit 2) that says the range, never a traceback."""

from __future__ import annotations

import math
import re
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import click

ROW_ID = click.IntRange(1, 2**63 - 1)  # what SQLite's and PostgreSQL's ids can hold
LIMIT = click.IntRange(1, 1_000_000)
CONCURRENCY = click.IntRange(1, 1000)


class FiniteFloatRange(click.FloatRange):
    """A FloatRange that also refuses `nan` (which compares as inside every range)."""

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


def seconds(minimum: float, maximum: float) -> FiniteFloatRange:
    """Seconds from `minimum` to `maximum`, both included."""
    return FiniteFloatRange(minimum, maximum)


def http_url(_ctx: click.Context | None, _param: click.Parameter | None, value: str) -> str:
    """An http(s) URL with a host, e.g. http://127.0.0.1:8000."""
    try:
        parts = urlsplit(value)
        valid = parts.scheme in ("http", "https") and bool(parts.hostname)
        parts.port  # noqa: B018 (raises ValueError for a port out of range)
    except ValueError:
        valid = False
    if not valid:
        raise click.BadParameter(f"{value!r} is not an http(s) URL; use e.g. "
                                 "http://127.0.0.1:8000")
    return value


def not_blank(_ctx: click.Context | None, param: click.Parameter | None, value: str) -> str:
    if not value.strip():
        raise click.BadParameter("must not be empty")
    return value


_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
_LONGEST = timedelta(days=36_500)
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def duration(_ctx: click.Context | None, _param: click.Parameter | None,
             value: str) -> timedelta:
    """An age such as 30d, 12h, 90m or 2w (at most 100 years)."""
    match = _DURATION.match(value)
    if match is None:
        raise click.BadParameter(f"{value!r} is not a duration; use e.g. 30d, 12h, 90m or 2w")
    try:
        age = timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
    except OverflowError:  # more days than a timedelta holds
        age = _LONGEST * 2
    if age > _LONGEST:
        raise click.BadParameter(f"{value!r} is more than 100 years; use at most 36500d")
    return age
