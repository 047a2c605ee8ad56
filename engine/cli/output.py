"""Shared CLI plumbing: the rules folder default, JSON output, and error exits."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any, NoReturn

import click

DEFAULT_RULES = "rules"


def rules_paths(paths: tuple[str, ...]) -> list[str]:
    """PATHS as given, else $LINKCRM_RULES, else ./rules; a usage error when none exists."""
    if paths:
        return list(paths)
    default = os.environ.get("LINKCRM_RULES", DEFAULT_RULES)
    if not Path(default).exists():
        raise click.UsageError(
            f"no rules folder at {default!r}; pass the rule files or folders as PATHS "
            "or set LINKCRM_RULES"
        )
    return [default]


# Characters a terminal acts on or a reader cannot see: C0 controls (newline, ESC), DEL, C1
# controls (CSI), line and paragraph separators, bidi overrides, and lone surrogates (which
# cannot even be written as UTF-8). Event data may hold any of them.
_UNSAFE_RAW = r"\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff"
_UNSAFE = re.compile(rf"[\x00-\x1f\\{_UNSAFE_RAW}]")
_UNSAFE_IN_JSON = re.compile(f"[{_UNSAFE_RAW}]")  # json.dumps escapes C0 and backslashes
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    return _NAMED.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def safe(value: object) -> str:
    r"""`value` as text a terminal shows as it is: control characters, line breaks, bidi
    overrides and lone surrogates escaped Python-style (backslashes doubled), so data from a
    webhook can neither move the cursor nor forge a line.

        >>> print(safe("ok\x1b[2J\nforged"))
        ok\x1b[2J\nforged
    """
    return _UNSAFE.sub(_escape, value if isinstance(value, str) else str(value))


def safe_json(value: Any, indent: int | None = None) -> str:
    r"""`json.dumps` (non-ASCII kept readable) with what a terminal acts on escaped as JSON
    `\uXXXX`: still valid JSON, loading to the same value."""
    text = json.dumps(value, indent=indent, ensure_ascii=False)
    return _UNSAFE_IN_JSON.sub(lambda match: f"\\u{ord(match.group()):04x}", text)


def escape_json(text: str) -> str:
    r"""JSON text from `json.dumps(..., ensure_ascii=False)` with lone surrogates, line
    separators and other invisible characters as `\uXXXX` escapes: still the same JSON, and
    valid UTF-8 that no line-splitter splits."""
    return _UNSAFE_IN_JSON.sub(lambda match: f"\\u{ord(match.group()):04x}", text)


def json_line(value: Any) -> str:
    """`value` as one line of JSON Lines: compact, non-ASCII kept readable, invisible
    characters escaped. Raises ValueError for a NaN or infinite number."""
    return escape_json(json.dumps(value, ensure_ascii=False, allow_nan=False,
                                  separators=(",", ":")))


def emit_json(value: Any) -> None:
    click.echo(safe_json(value, indent=2))


def fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


FORMAT_OPTION = click.option(
    "--format",
    "output_format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="Output for people (text) or machines (json).",
)
