"""`linkcrm eval EXPR [EVENT]`: try one expression against events, without editing a rule."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import click

from engine.rules.expressions import Expression, ExpressionError, compile_expression
from engine.rules.nullcheck import nullable_arguments
from engine.rules.trial import Outcome, evaluate

from .eventfile import read_document
from .eventlines import EventFileError, read_event_file
from .output import FORMAT_OPTION, emit_json, fail, json_line, safe, safe_json


def _compile(source: str, output_format: str) -> Expression:
    try:
        return compile_expression(source)
    except ExpressionError as error:
        if output_format == "json":
            emit_json({"error": {"code": error.code, "message": error.message,
                                 "column": error.offset + 1, "caret": error.caret,
                                 "hint": error.hint}})
            sys.exit(2)
        click.echo(f"{error.code}: {safe(error.message)}", err=True)
        for line in error.caret.splitlines():
            click.echo(f"    {safe(line)}", err=True)
        click.echo(f"    hint: {safe(error.hint)}", err=True)
        sys.exit(2)


def _warn(source: str) -> None:
    """The static warnings a rule file would get for this expression (to stderr)."""
    for found in nullable_arguments(source):
        field = ".".join(found.path)
        click.echo(f"warning: {found.function}() fails when {field} is missing (null); "
                   f"give a default: {field} || {found.default}", err=True)


def _events(event: str | None) -> Iterator[tuple[int, Any]]:
    """(line, document): the one document in file EVENT (line 0), else each JSON Line on
    standard input."""
    if event is not None and event != "-":
        yield 0, read_document(event)
        return
    try:
        for recorded in read_event_file("-"):
            yield int(recorded.ref.rpartition(":")[2]), recorded.envelope
    except EventFileError as error:
        fail(str(error), 2)


def _show(line: int, outcome: Outcome) -> None:
    prefix = f"line {line}: " if line else ""
    if outcome.ok:
        click.echo(f"{prefix}{safe_json(outcome.value)}  ({outcome.type})")
        return
    click.echo(f"{prefix}error: {safe(outcome.error)}")
    for caret_line in outcome.caret.splitlines():
        click.echo(f"    {safe(caret_line)}")


@click.command("eval")
@click.argument("expression")
@click.argument("event", required=False)
@FORMAT_OPTION
def eval_command(expression: str, event: str | None, output_format: str) -> None:
    """Evaluate one JMESPath EXPRESSION (with linkcrm's functions) against an event.

    EVENT is a JSON (or YAML) file; without it (or with -), events are read from standard
    input as JSON Lines (event envelopes, or lines of `linkcrm events export`), one result
    per line. Prints the value and its JMESPath type, or the error with a caret under the
    failing call. Exit 0 when every evaluation worked, 1 when one failed, 2 for a bad
    expression or unreadable input.

    \b
    Example:
      linkcrm eval "starts_with(data.token || '', 'inv')" rules/events/referral_completed_b.json
      linkcrm events export --limit 20 | linkcrm eval "lower(data.platform)"
    """
    compiled = _compile(expression, output_format)
    if output_format == "text":
        _warn(expression)
    single = event is not None and event != "-"
    failed = False
    for line, document in _events(event):
        outcome = evaluate(compiled, document)
        failed = failed or not outcome.ok
        if output_format == "json" and single:
            emit_json(outcome.as_dict())
        elif output_format == "json":
            click.echo(json_line({"line": line, **outcome.as_dict()}))
        else:
            _show(line, outcome)
    sys.exit(1 if failed else 0)

