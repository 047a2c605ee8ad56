"""Rule commands: `validate`, `explain` and `bench` (`test` is in `ruletesting`)."""

from __future__ import annotations

import sys
from collections import Counter
from typing import Any

import click

from engine.config.fieldmap import TARGETS
from engine.config.links import IDENTIFY_EVENT, link_of_event
from engine.errors import ConfigError, Problem
from engine.rules.evaluator import Plan, plan
from engine.rules.explain import target_view
from engine.rules.files import discover, load_ruleset
from engine.rules.model import RuleSet
from engine.rules.validation import check_paths
from engine.targets.registry import dialect

from .eventfile import read_event
from .output import FORMAT_OPTION, emit_json, fail, rules_paths, safe, safe_json
from .params import seconds
from .touchview import explain_touches, is_event_id, recorded_event
from .watch import watch as watch_paths

PATHS = click.argument("paths", nargs=-1, type=click.Path(exists=True))


def _summary(problems: list[Problem], files: int) -> str:
    counts = Counter(p.severity for p in problems)
    errors, warnings = counts["error"], counts["warning"]
    parts = []
    if errors:
        parts.append(f"{errors} error{'s' * (errors != 1)}")
    if warnings:
        parts.append(f"{warnings} warning{'s' * (warnings != 1)}")
    in_files = len({p.location.file for p in problems})
    return f"{' and '.join(parts)} in {in_files} file{'s' * (in_files != 1)}" if parts else (
        f"ok: {files} file{'s' * (files != 1)} checked, no problems")


@click.command()
@PATHS
@FORMAT_OPTION
@click.option("--strict", is_flag=True, help="Treat warnings as errors.")
@click.option("--watch", is_flag=True, help="Check again on every save under PATHS (Ctrl-C "
              "stops).")
def validate(paths: tuple[str, ...], output_format: str, strict: bool, watch: bool) -> None:
    """Check rule files, rule tests and the field map (schema and meaning).

    Prints every problem as `file:line:col: code: message` with a hint, sorted by place.
    Exit 0 when clean (warnings allowed unless --strict), 1 on errors, 2 on usage errors.

    \b
    Example:
      linkcrm validate rules/
    """
    chosen = rules_paths(paths)
    if watch:
        watch_paths(chosen, lambda: _validate_once(chosen, output_format, strict))
        return
    _validate_once(chosen, output_format, strict)


def _validate_once(chosen: list[str], output_format: str, strict: bool) -> None:
    problems = check_paths(chosen)
    sources = discover(chosen)
    checked = len(sources.rule_files) + len(sources.test_files) + bool(sources.field_map)
    failed = any(p.severity == "error" or strict for p in problems)
    if output_format == "json":
        emit_json({"ok": not failed, "problems": [p.as_json() for p in problems],
                   "files": checked})
    else:
        for problem in problems:
            click.echo(problem.render(), err=False)
        click.echo(_summary(problems, checked))
    sys.exit(1 if failed else 0)


def _load(paths: list[str]) -> RuleSet:
    try:
        return load_ruleset(paths)
    except ConfigError as error:
        errors = sorted((p for p in error.problems), key=Problem.sort_key)
        for problem in errors:
            click.echo(problem.render(), err=True)
        fail("the rules do not load; fix the errors above (`linkcrm validate` lists them)")




def _explain_text(event: Any, result: Plan, ruleset: RuleSet, target: str | None) -> None:
    """The plan for a terminal; every value from the event escaped."""
    click.echo(f"event: {safe(result.event_type) if result.event_type else '(no event type)'}")
    click.echo("matched: " + (", ".join(map(safe, result.matched)) or "no rule"))
    for skip in result.skipped:
        click.echo(f"  skipped {safe(skip.rule)}: {safe(skip.reason)}")
    if not result.actions and not result.failures:
        click.echo("actions: none (the event is recorded as ignored)")
    for number, action in enumerate(result.actions, 1):
        click.echo(f"{number}. {safe(action.kind)} (rule {safe(action.rule)})")
        shown = action.as_dict()
        if target is not None:
            view = target_view(action, ruleset.field_map, dialect(target)).as_dict()
            click.echo(f"   as sent to {target}:")
            shown = view
        for key, value in shown.items():
            if key in ("rule", "action", "target") or value in ({}, [], None):
                continue
            label = "defaults (only when it creates the record)" if key == "defaults" else key
            click.echo(f"   {safe(label)}: {safe_json(value)}")
    for failure in result.failures:
        click.echo(f"error: {safe(failure.message)}")
    for message in value_errors(result, ruleset, target):
        click.echo(f"error: {safe(message)}")


@click.command()
@click.argument("event")
@click.option("--rules", "rules_dir", type=click.Path(exists=True), multiple=True,
              help="Rule files or folders (default: $LINKCRM_RULES or ./rules).")
@click.option("--target", type=click.Choice(TARGETS),
              help="Also show each field under that CRM's name with its coerced value.")
@FORMAT_OPTION
def explain(event: str, rules_dir: tuple[str, ...], target: str | None,
            output_format: str) -> None:
    """Show what the rules do with one event: matches, skips and why, the action plan.

    EVENT is a JSON (or YAML) file holding the event envelope, or - for standard input, or
    the id of a recorded event (an identify event then comes with the touches linkcrm attached
    to it). On an identify event it shows which touches were attached and why, and whether
    the link is per-person; a file can give them inline as `touch:`. No CRM is contacted.
    Exit 1 when an action fails to evaluate, a value does not fit its field (type, enum
    options), or EVENT is not an event; 2 when EVENT cannot be read.

    \b
    Example:
      linkcrm explain install.json --target hubspot
      linkcrm explain 42
    """
    ruleset = _load(rules_paths(rules_dir))
    envelope = recorded_event(event) if is_event_id(event) else read_event(event)
    result = plan(envelope, ruleset)
    errors = value_errors(result, ruleset, target)
    link = link_of_event(envelope, ruleset.field_map.links) if isinstance(envelope, dict) \
        else None
    if output_format == "json":
        document = result.as_dict(envelope)
        document["value_errors"] = list(errors)
        document["link"] = link
        if isinstance(envelope, dict) and envelope.get("event") == IDENTIFY_EVENT:
            document["touch"] = envelope.get("touch")
        if target is not None:
            actions = document["actions"]
            assert isinstance(actions, list)
            for shown, action in zip(actions, result.actions, strict=True):
                assert isinstance(shown, dict)
                shown["target"] = target_view(action, ruleset.field_map,
                                              dialect(target)).as_dict()
        emit_json(document)
    else:
        if isinstance(envelope, dict) and envelope.get("event") == IDENTIFY_EVENT:
            explain_touches(envelope, link)
        _explain_text(envelope, result, ruleset, target)
    sys.exit(1 if result.failures or errors else 0)


def value_errors(result: Plan, ruleset: RuleSet, target: str | None) -> list[str]:
    """Values the plan would write that the field map's types refuse (a date that is not
    one, an enum value not among the options), as `target` (default: linkcrm's own) coerces
    them; each names the rule and action."""
    found: list[str] = []
    for action in result.actions:
        view = target_view(action, ruleset.field_map, dialect(target or "local"))
        found.extend(f"rule {action.rule!r}, {action.kind}: {message}"
                     for message in view.errors)
    return found


@click.command()
@click.option("--events", "count", default=200, show_default=True,
              type=click.IntRange(1, 100_000),
              help="Distinct events to cycle through (both payload shapes; at least 100).")
@click.option("--seconds", default=3.0, show_default=True,
              type=seconds(0.1, 3600), help="Time per measurement (0.1 to 3600).")
@click.option("--rules", "rules_dir", type=click.Path(exists=True), multiple=True,
              help="The shipped rules folder (default: $LINKCRM_RULES or ./rules).")
def bench(count: int, seconds: float, rules_dir: tuple[str, ...]) -> None:
    """Measure rule evaluation: events/second for the shipped rules, single core, next to
    a hand-written Python function that produces the same action plans.

    \b
    Example:
      linkcrm bench --events 200 --seconds 3
    """
    from engine.rules.bench import run_benchmark

    ruleset = _load(rules_paths(rules_dir))
    for line in run_benchmark(ruleset, count, seconds):
        click.echo(line)
