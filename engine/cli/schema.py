"""`linkcrm schema`: write the rule-file JSON Schema generated from the field map."""

from __future__ import annotations

import json
from pathlib import Path

import click

from engine.config.fieldmap import load_field_map
from engine.errors import ConfigError, Problem
from engine.rules.files import discover
from engine.rules.ruleschema import rule_schema

from .output import fail, rules_paths

SCHEMA_NAME = "rules.schema.json"


@click.command("schema")
@click.argument("paths", nargs=-1, type=click.Path(exists=True))
@click.option("--output", "-o", "output", type=click.Path(dir_okay=False, allow_dash=True),
              help=f"Where to write it (default: {SCHEMA_NAME} beside fields.yaml; - for "
                   "standard output).")
def schema_command(paths: tuple[str, ...], output: str | None) -> None:
    """Write the rule-file JSON Schema generated from the field map, for editors.

    It lists the field map's fields (per action, with label and type), identity fields,
    contact and deal stages, and the known event types, so the YAML language server
    completes them and underlines a typo as you type. Point a rule file at it with its
    first line: # yaml-language-server: $schema=rules.schema.json
    Run it again after changing fields.yaml. Exit 1 when the field map has errors.

    \b
    Example:
      linkcrm schema rules/
    """
    sources = discover(rules_paths(paths))
    if sources.field_map is None:
        fail("no fields.yaml found beside the rules; the schema is generated from it")
    try:
        field_map = load_field_map(sources.field_map)
    except ConfigError as error:
        for problem in sorted(error.problems, key=Problem.sort_key):
            click.echo(problem.render(), err=True)
        fail(f"{sources.field_map} has errors; fix them first (`linkcrm validate` lists them)")
    text = json.dumps(rule_schema(field_map), indent=2, ensure_ascii=False) + "\n"
    if output == "-":
        click.echo(text, nl=False)
        return
    target = Path(output) if output else sources.field_map.parent / SCHEMA_NAME
    try:
        target.write_text(text, encoding="utf-8")
    except OSError as error:
        fail(f"cannot write {target}: {error.strerror}", 2)
    click.echo(f"wrote {target}; make it a rule file's first line to use it:")
    relative = target.name if target.parent == sources.field_map.parent else str(target)
    click.echo(f"# yaml-language-server: $schema={relative}")
