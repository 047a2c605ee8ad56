"""`linkcrm diff OLD NEW`: what a rule change does to recorded events, before it ships."""

from __future__ import annotations

import asyncio
import sys
from collections import Counter
from datetime import timedelta
from typing import NoReturn

import click

from engine.config.fieldmap import TARGETS
from engine.errors import ConfigError, StorageError
from engine.rules.comparable import incomparable
from engine.rules.diff import Differ, Recorded
from engine.rules.facets import canonical, target_lens
from engine.rules.model import RuleSet
from engine.rules.versions import RuleFilesError
from engine.storage import RuleVersion, Storage, open_storage, utc_now
from engine.targets.registry import dialect
from engine.worker.plan import action_problem

from .diffview import Report, render_markdown, render_text
from .eventlines import EventFileError, inbox_events, parse_body, read_event_file
from .output import emit_json, fail, safe
from .params import LIMIT, duration
from .rulesets import UnknownRuleSetError, find_version, is_path, resolve_ruleset
from .runtime import database_label, iso, load_settings, show_problems, with_storage

DEFAULT_SINCE = "7d"
TROUBLE = 2  # the diff could not run; 1 is kept for "something changes" (--exit-code)


def _since(ctx: click.Context, param: click.Parameter, value: str | None) -> timedelta | None:
    return None if value is None else duration(ctx, param, value)


def _stored_versions(refs: dict[str, str]) -> dict[str, RuleVersion]:
    """The published versions the refs that are no path name (by side), read from the
    database in one visit; an unknown or ambiguous one exits 2, before anything runs."""
    wanted = {side: ref for side, ref in refs.items() if not is_path(ref)}
    if not wanted:
        return {}
    settings = load_settings()

    async def lookup() -> dict[str, RuleVersion | str]:
        storage = open_storage(settings.database_url, create=False)
        try:
            found: dict[str, RuleVersion | str] = {}
            for side, ref in wanted.items():
                try:
                    found[side] = await find_version(storage.rule_versions, ref)
                except UnknownRuleSetError as error:
                    found[side] = str(error)
            return found
        finally:
            await storage.close()

    try:
        found = asyncio.run(lookup())
    except StorageError as error:
        side, ref = next(iter(wanted.items()))
        label = database_label(settings.database_url)
        where = "" if label in str(error) else f" ({label})"
        fail(f"{side}: unknown rule set {safe(ref)!r}: there is no rule folder or file by that "
             f"name, and the published rule versions cannot be read{where}: {error}", TROUBLE)
    for side, value in found.items():
        if isinstance(value, str):
            fail(f"{side}: {value}", TROUBLE)
    return {side: value for side, value in found.items() if isinstance(value, RuleVersion)}


def _resolve(side: str, ref: str, stored: dict[str, RuleVersion]) -> tuple[RuleSet, str]:
    """The rule set of one side and how the report names it (a version by its id)."""
    version = stored.get(side)
    name = ref if version is None else f"version {version.version}" + (
        " (active)" if ref.strip().lower() == "active" else "")
    try:
        return resolve_ruleset(ref, lambda _ref: stored[side]), name
    except UnknownRuleSetError as error:
        fail(f"{side}: {error}", TROUBLE)
    except RuleFilesError as error:
        fail(f"{side}: {error}", TROUBLE)
    except ConfigError as error:
        show_problems(p for p in error.problems if p.severity == "error")
        how = (f"`linkcrm validate {ref}` lists why" if version is None else
               "it was published with another linkcrm; publish the rules again")
        fail(f"{side}: the rules in {name} do not load; {how}", TROUBLE)


def _not_comparable(reasons: list[str], target: str | None) -> NoReturn:
    lines = ["the field maps of OLD and NEW cannot be compared:"]
    lines += [f"  - {reason}" for reason in reasons]
    if target is None and not all("forward order" in reason for reason in reasons):
        lines.append("  a diff compares canonical fields, so it cannot tell what a changed "
                     "field or stage mapping does; compare what one CRM receives with "
                     "--target hubspot (or salesforce, pipedrive, local)")
    else:
        lines.append("  change the stage order in a pull request of its own")
    fail("\n".join(lines), TROUBLE)


@click.command("diff")
@click.argument("old")
@click.argument("new")
@click.option("--events", "events_file", metavar="FILE",
              help="Read the events from a JSON Lines file (`linkcrm events export`; - for "
                   "standard input) instead of the database.")
@click.option("--since", callback=_since, metavar="AGE",
              help=f"Events received this recently (default {DEFAULT_SINCE}): 30d, 12h, 2w. "
                   "Database only.")
@click.option("--limit", type=LIMIT,
              help="At most this many events (from the database the newest, from a file the "
                   "first).")
@click.option("--target", type=click.Choice(TARGETS),
              help="Compare what this CRM receives (its field names, coerced values) instead "
                   "of canonical fields.")
@click.option("--examples", default=3, show_default=True, type=click.IntRange(0, 100),
              help="Example events per change.")
@click.option("--format", "output_format", type=click.Choice(["text", "json", "markdown"]),
              default="text", show_default=True,
              help="For people (text), machines (json) or a pull-request comment (markdown).")
@click.option("--exit-code", is_flag=True,
              help="Exit 1 when any event plans differently (or cannot be compared).")
def diff(old: str, new: str, events_file: str | None, since: timedelta | None,
         limit: int | None, target: str | None, examples: int, output_format: str,
         exit_code: bool) -> None:
    """Show what changing the rules from OLD to NEW does to recorded events: per rule, action
    and field, how many events change and a few examples (values before -> after, stages,
    deals created or no longer created, actions that start or stop failing).

    OLD and NEW are rule folders, or (when no path has that name) a published rule version:
    its id, a unique prefix of it, or `active`, read from the database. The events are those
    the database recorded (--since, --limit) or a file from `linkcrm events export`
    (--events). Nothing is written anywhere. Exit 0, or with --exit-code 1 when anything
    changes (or an event could not be compared: the summary says which and why); 2 when the
    diff cannot run (bad usage, an unknown rule version, rules that do not load, an events
    file that is not JSON Lines, field maps that cannot be compared, a database that cannot
    be read).

    \b
    Example:
      linkcrm diff main-rules/ rules/ --since 7d
      linkcrm diff main-rules/ rules/ --events events.jsonl --format markdown --exit-code
      linkcrm diff active rules/ --since 7d
    """
    if events_file is not None and since is not None:
        raise click.UsageError("--since reads the database; with --events the file holds "
                               "the events (use --limit to read fewer)")
    stored = _stored_versions({"OLD": old, "NEW": new})
    (old_rules, old_name), (new_rules, new_name) = (_resolve("OLD", old, stored),
                                                    _resolve("NEW", new, stored))
    reasons = incomparable(old_rules, new_rules, canonical=target is None)
    if reasons:
        _not_comparable(reasons, target)
    differ = Differ(old_rules, new_rules, examples=examples, screen=action_problem,
                    lens=canonical if target is None else target_lens(dialect(target)))
    skipped: Counter[str] = Counter()
    if events_file is not None:
        try:
            for event in read_event_file(events_file, limit):
                differ.add(event)
        except EventFileError as error:
            fail(str(error), TROUBLE)
        source = "standard input" if events_file == "-" else events_file
    else:
        settings = load_settings()
        cutoff = utc_now() - (since or duration(None, None, DEFAULT_SINCE))

        async def work(storage: Storage) -> None:
            async for event in inbox_events(storage, cutoff, limit):
                envelope, problem = parse_body(event)
                if problem is not None:
                    skipped[problem] += 1
                else:
                    differ.add(Recorded(f"event {event.id}", envelope, event.id))

        with_storage(settings, work, failure_code=TROUBLE)
        source = (f"{database_label(settings.database_url)} (received since "
                  f"{iso(cutoff)})")
    report = Report(old_name, new_name, "canonical" if target is None else target, source,
                    differ.result(), skipped)
    _emit(report, output_format)
    result = report.result
    sys.exit(1 if exit_code and (result.changed_events or result.uncompared) else 0)


def _emit(report: Report, output_format: str) -> None:
    if output_format == "json":
        emit_json(report.as_dict())
    elif output_format == "markdown":
        click.echo(render_markdown(report), nl=False)
    else:
        click.echo(render_text(report))

