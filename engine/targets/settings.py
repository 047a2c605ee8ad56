"""Reading a target's settings from the environment, every problem at once, each with its fix.

Each CRM package declares its own settings (`engine.targets.hubspot.settings`, ...) and reads
them through a `Reader`:

    read = Reader(environ)
    return read.done(HubSpotSettings(token=read.required("HUBSPOT_ACCESS_TOKEN", "..."),
                                     rate_limit=read.optional("HUBSPOT_RATE_LIMIT", 100,
                                                              count("100 or 190"))))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeVar

from engine.errors import ConfigError, Location, Problem

T = TypeVar("T")


class Reader:
    """Reads variables, collecting every problem before `done` raises one ConfigError."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.environ = environ
        self.problems: list[Problem] = []

    def required(self, name: str, what: str) -> str:
        value = self.environ.get(name, "").strip()
        if not value:
            self.problem(name, f"{name} is not set", f"export {name}=...  ({what})",
                         code="missing-credentials")
        return value

    def optional(self, name: str, default: T, parse: Callable[[str], T]) -> T:
        raw = self.environ.get(name, "").strip()
        if not raw:
            return default
        try:
            return parse(raw)
        except ValueError as error:
            self.problem(name, f"{name} {error}", f"fix or unset {name}")
            return default

    def problem(self, name: str, message: str, hint: str, code: str = "bad-setting") -> None:
        self.problems.append(Problem(Location("environment"), code, message, hint))

    def done(self, settings: T) -> T:
        """`settings`, or ConfigError naming every problem found while reading them."""
        if self.problems:
            raise ConfigError(self.problems)
        return settings


def url(raw: str) -> str:
    if not raw.lower().startswith(("https://", "http://")):
        raise ValueError(f"must be an http(s) URL, got {raw!r}")
    return raw.rstrip("/")


def count(choices: str) -> Callable[[str], int]:
    """A parser of a positive whole number of requests; `choices` are the usual values."""

    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            value = 0
        if value <= 0:
            raise ValueError(f"must be a whole number of requests, e.g. {choices}; got {raw!r}")
        return value

    return parse


def seconds(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise ValueError(f"must be a number of seconds, got {raw!r}")
    return value
