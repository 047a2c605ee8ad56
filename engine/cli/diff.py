"""`linkcrm diff OLD NEW`: what a rule change does to recorded events, before it ships."""

from __future__ import annotations

import sys
from collections import Counter
from datetime import timedelta
from typing import NoReturn

import click

from engine.config.fieldmap import TARGETS
from engine.errors import ConfigError
from engine.rules.comparable import incomparable
from engine.rules.diff import Differ, Recorded
from engine.rules.facets import canonical, target_lens
from engine.rules.model import RuleSet
from engine.storage import Storage, utc_now
from engine.targets.registry import dialect
from engine.worker.plan import action_problem

from .diffview import Report, render_markdown, render_text
from .eventlines import EventFileError, inbox_events, parse_body, read_event_file
from .output import emit_json, fail
from .params import LIMIT, duration
from .rulesets import UnknownRuleSetError, resolve_ruleset
from .runtime import database_label, iso, load_settings, show_problems, with_storage

DEFAULT_SINCE = "7d"
TROUBLE = 2  # the diff could not run; 1 is kept for "something changes" (--exit-code)


def _since(ctx: click.Context, param: click.Parameter, value: str | None) -> timedelta | None:
    return None if value is None else duration(ctx, param, value)


def _resolve(side: str, ref: str) -> RuleSet:
    try:
        return resolve_ruleset(ref)
    except UnknownRuleSetError as error:
        fail(f"{side}: {error}", TROUBLE)
    except ConfigError as error:
        show_problems(p for p in error.problems if p.severity == "error")
        fail(f"{side}: the rules in {ref} do not load; `linkcrm validate {ref}` lists why",
             TROUBLE)


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

    OLD and NEW are rule folders. The events are those the database recorded (--since,
    --limit) or a file from `linkcrm events export` (--events). Nothing is written anywhere.
    Exit 0, or with --exit-code 1 when anything changes (or an event could not be compared:
    the summary says which and why); 2 when the diff cannot run (bad
    usage, rules that do not load, an events file that is not JSON Lines, field maps that
    cannot be compared, a database that cannot be read).

    \b
    Example:
      linkcrm diff main-rules/ rules/ --since 7d
      linkcrm diff main-rules/ rules/ --events events.jsonl --format markdown --exit-code
    """
    if events_file is not None and since is not None:
        raise click.UsageError("--since reads the database; with --events the file holds "
                               "the events (use --limit to read fewer)")
    old_rules, new_rules = _resolve("OLD", old), _resolve("NEW", new)
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
    report = Report(old, new, "canonical" if target is None else target, source,
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

