"""`linkcrm rules shadow-report [VERSION]`: what a shadow rule version would change on live
traffic, summed up from the per-event differences the worker recorded (`storage.shadow`) and
shown as `linkcrm diff` shows a diff (text, JSON, Markdown)."""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass

import click

from engine.errors import ConfigError
from engine.rules.diff import EventDiff, FoundChange, Recorded, Tally
from engine.rules.model import RuleSet
from engine.rules.versions import RuleFilesError, load_version
from engine.storage import RuleVersion, ShadowCounts, Storage

from .diffview import Report, render_markdown, render_text
from .output import emit_json, fail, safe
from .rulesets import UnknownRuleSetError, find_published
from .runtime import database_label, iso, load_settings, with_storage

TROUBLE = 2  # the report cannot be made; 1 is kept for "something changes" (--exit-code)
PAGE = 1000


@dataclass
class _Found:
    version: RuleVersion
    active: RuleVersion | None
    counts: ShadowCounts
    tally: Tally


def _ruleset(version: RuleVersion | None) -> RuleSet | None:
    """The version's rule set for ordering the report, or None when it does not load."""
    if version is None:
        return None
    try:
        return load_version(version.files, version.version)
    except (ConfigError, RuleFilesError, OSError):
        return None


async def _current_shadow(storage: Storage) -> RuleVersion:
    shadows = [v for v in await storage.rule_versions.list_versions() if v.status == "shadow"]
    if not shadows:
        raise UnknownRuleSetError(
            "no shadow rule version: publish one with `linkcrm rules publish --shadow rules/`, "
            "or name a version that was shadow (`linkcrm rules list`)")
    found = await storage.rule_versions.get(shadows[0].version)
    assert found is not None
    return found


async def _read(storage: Storage, ref: str | None, examples: int) -> _Found | str:
    await storage.migrate()
    try:
        version = await (_current_shadow(storage) if ref is None
                         else find_published(storage.rule_versions, ref))
    except UnknownRuleSetError as error:
        return safe(str(error))
    active = await storage.rule_versions.active()
    order = [r for r in (_ruleset(version), _ruleset(active)) if r is not None]
    tally = Tally(examples=examples, order=order)
    counts = await storage.shadow.counts(version.version)
    tally.add_same(counts.same)
    after: int | None = None
    while page := await storage.shadow.differences(version.version, after_event_id=after,
                                                   limit=PAGE):
        for result in page:
            event = Recorded(f"event {result.event_id}", None, result.event_id)
            if result.outcome == "uncompared":
                tally.add_uncompared(event, result.error or "(no error recorded)")
                continue
            try:
                changes = tuple(FoundChange.from_json(item) for item in result.changes)
            except ValueError as error:
                tally.add_uncompared(event, f"the recorded differences do not read: {error}")
                continue
            tally.add(event, EventDiff(result.event_type, changes))
        after = page[-1].event_id
    return _Found(version, active, counts, tally)


def _compared_with(found: _Found) -> str:
    versions = found.counts.active_versions
    named = [f"version {v}" if v else "unpublished rules" for v in versions]
    if not named:
        return (f"version {found.active.version} (active)" if found.active is not None
                else "the active rules")
    return ", ".join(named) + (" (active)" if len(versions) == 1 and found.active is not None
                               and versions[0] == found.active.version else "")


@click.command("shadow-report")
@click.argument("version", required=False)
@click.option("--examples", default=3, show_default=True, type=click.IntRange(0, 100),
              help="Example events per change.")
@click.option("--format", "output_format", type=click.Choice(["text", "json", "markdown"]),
              default="text", show_default=True,
              help="For people (text), machines (json) or a pull-request comment (markdown).")
@click.option("--exit-code", is_flag=True,
              help="Exit 1 when any observed event plans differently (or could not be "
                   "compared).")
def shadow_report(version: str | None, examples: int, output_format: str,
                  exit_code: bool) -> None:
    """Sum up what the shadow rule VERSION (default: the current shadow version) plans
    differently from the active rules on the live events the worker observed, as `linkcrm
    diff` shows a diff: per rule, action and field, how many events change and a few
    examples.

    VERSION is a version id or a unique prefix of one; a version stays readable after it is
    promoted (`linkcrm rules activate`) or replaced. Exit 0, or with --exit-code 1 when
    anything changes; 2 when there is no shadow version, VERSION is unknown, or the database
    cannot be read.

    \b
    Example:
      linkcrm rules publish --shadow rules/
      linkcrm rules shadow-report
      linkcrm rules shadow-report 3f9a1c2e7b40 --format markdown --exit-code
    """
    settings = load_settings()
    found = with_storage(settings, lambda storage: _read(storage, version, examples),
                         failure_code=TROUBLE)
    if isinstance(found, str):
        fail(f"{found}. Nothing to report", TROUBLE)
    counts = found.counts
    status = "" if found.version.status == "retired" else f" ({found.version.status})"
    observed = (f"observed {iso(counts.first_at)} to {iso(counts.last_at)}"
                if counts.first_at is not None else "none observed yet")
    report = Report(_compared_with(found), f"version {found.version.version}{status}",
                    "canonical", f"live traffic in {database_label(settings.database_url)} "
                    f"({observed})", found.tally.result(), Counter(),
                    command="linkcrm rules shadow-report")
    if output_format == "json":
        emit_json({**report.as_dict(), "version": found.version.version,
                   "status": found.version.status,
                   "active_versions": list(counts.active_versions),
                   "first_observed_at": iso(counts.first_at),
                   "last_observed_at": iso(counts.last_at)})
    elif output_format == "markdown":
        click.echo(render_markdown(report), nl=False)
    else:
        click.echo(render_text(report))
    if not counts.events and output_format == "text":
        click.echo(f"note: no live event has been planned under {safe(found.version.version)} "
                   "yet: a running worker observes each event it claims while the version "
                   "is shadow", err=True)
    result = report.result
    sys.exit(1 if exit_code and (result.changed_events or result.uncompared) else 0)
