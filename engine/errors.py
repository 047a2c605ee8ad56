"""The exception tree and the `Problem` record that every user-facing check reports.

    LinkcrmError
    ├── ConfigError            a rule file, rule test or field map is wrong (carries Problems)
    ├── EvaluationError        one action could not be evaluated for one event
    ├── StorageError           the store could not commit or read
    │   └── UnstorableValueError   a value no store can keep (permanent: never retried)
    │       └── UnstorableEventError   this event can never be stored: refuse it (400)
    └── CRMError               a target refused or failed an action
        ├── RetryableCRMError  try again later (timeouts, 5xx, 429, expired tokens)
        └── PermanentCRMError  a fix is needed first (missing property, validation error)
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Severity = Literal["error", "warning"]


@dataclass(frozen=True, order=True)
class Location:
    """Where in which file: 1-based line and column, like compilers print them."""

    file: str
    line: int = 0
    column: int = 0

    def __str__(self) -> str:
        if not self.line:
            return self.file
        return f"{self.file}:{self.line}:{self.column}"


@dataclass(frozen=True)
class Problem:
    """One finding of `linkcrm validate`: `file:line:col: code: message`, then a hint."""

    location: Location
    code: str
    message: str
    hint: str = ""
    severity: Severity = "error"
    rule: str = ""
    path: str = ""
    detail: str = ""  # extra lines shown verbatim under the message (e.g. JMESPath's caret)

    def sort_key(self) -> tuple[str, int, int, str, str]:
        where = self.location
        return (where.file, where.line, where.column, self.code, self.message)

    def render(self) -> str:
        where = f"rule {self.rule!r} at {self.path}: " if self.rule else (
            f"at {self.path}: " if self.path else ""
        )
        label = self.code if self.severity == "error" else f"{self.code} (warning)"
        lines = [f"{self.location}: {label}: {where}{self.message}"]
        lines.extend(f"    {line}" for line in self.detail.splitlines())
        if self.hint:
            lines.append(f"    hint: {self.hint}")
        return "\n".join(lines)

    def as_json(self) -> dict[str, object]:
        return {
            "file": self.location.file,
            "line": self.location.line,
            "column": self.location.column,
            "severity": self.severity,
            "code": self.code,
            "message": self.message,
            "rule": self.rule or None,
            "path": self.path or None,
            "hint": self.hint or None,
            "detail": self.detail or None,
        }


class LinkcrmError(Exception):
    """Base of every error linkcrm raises on purpose."""


@dataclass
class ConfigError(LinkcrmError):
    """Rule files, rule tests or the field map have problems; nothing was loaded."""

    problems: list[Problem] = field(default_factory=list)

    def __str__(self) -> str:
        return "\n".join(p.render() for p in sorted(self.problems, key=Problem.sort_key))


class EvaluationError(LinkcrmError):
    """An action failed to evaluate for one event (a JMESPath type error, an empty identity).

    The message names the rule, the action, the expression and the event.
    """


class StorageError(LinkcrmError):
    """The store could not commit or read; the caller must not acknowledge."""


class UnstorableValueError(StorageError):
    """A value that no backend can keep as it is: a lone surrogate, a NUL character in a key
    or name, a number JSON cannot carry (1e400 overflows to infinity), a key too long to index.

    Both backends refuse the same values with the same message, before writing anything.
    Unlike its parent it is permanent: the action (or event) is dead at once, since retrying
    the same value can never succeed.
    """
class UnstorableEventError(UnstorableValueError):
    """One event holds a value no database column can take (a lone surrogate in its type);
    the rest of its batch is stored. Retrying cannot help: answer 400, not 503."""


class CRMError(LinkcrmError):
    """A CRM target failed an action."""


class RetryableCRMError(CRMError):
    """Transient: back off and try again (honour `retry_after` seconds when set)."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PermanentCRMError(CRMError):
    """The CRM refused the action for a reason that a retry cannot fix."""


def trace(error: BaseException) -> str:
    """The frames of `error`'s traceback (file, line, function, source line) without the
    error's message, which may quote event data."""
    return "".join(traceback.format_list(traceback.extract_tb(error.__traceback__))).rstrip()


def where(error: BaseException) -> str:
    """Where `error` was raised, as `file.py:line in function`, for a log line that must not
    carry the error's message (it may quote event data: emails, tokens)."""
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return "(unknown)"
    frame = frames[-1]
    return f"{Path(frame.filename).name}:{frame.lineno} in {frame.name}"
