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


_SURROGATE = re.compile("[\ud800-\udfff]")


def emit_json(value: Any) -> None:
    text = json.dumps(value, indent=2, ensure_ascii=False)
    # A lone surrogate (an event's "\ud800" escape) has no UTF-8 form; it only occurs inside
    # JSON strings, where its escape is valid JSON for the same value.
    click.echo(_SURROGATE.sub(lambda found: f"\\u{ord(found.group()):04x}", text))


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
