"""Rule releases: `linkcrm rules publish|list|activate|shadow-report`.

A rule set is published as a version (the content hash of its rule files and field map, see
`engine.rules.versions`) into the database every linkcrm process shares; exactly one version
is active. `publish` checks the rules and runs their tests first and refuses a set with any
error or failing test, leaving the active version as it was. `publish --shadow` stores a
candidate as the shadow version instead: the worker plans live events with it next to the
active one and records the differences (`shadow-report`), writing nothing to any CRM.
"""

from __future__ import annotations

import getpass
import sys
from collections.abc import Sequence

import click

from engine.actions import JSON
from engine.errors import ConfigError, Problem
from engine.rules.files import discover, load_ruleset
from engine.rules.ruletests import run_tests
from engine.rules.validation import check_paths
from engine.rules.versions import RuleFilesError, collect, git_label
from engine.storage import NewRuleVersion, PublishResult, RuleVersion, Storage

from .output import FORMAT_OPTION, emit_json, fail, rules_paths, safe
from .runtime import iso, load_settings, with_storage
from .scenariocrm import replay_into_local_crm
from .shadowreport import shadow_report

REFUSED = "the rules are not published; the active version stays"


@click.group("rules")
def rules_group() -> None:
    """Publish rule sets as versions, list them, and choose the active one.

    Versions live in the database (LINKCRM_DATABASE_URL). Running `serve` and `worker`
    processes pick up a new active version within 2 s, without a restart; an event in flight
    finishes with the version it started with. At start they publish their rules folder when
    it was never published (or nothing is active); `kill -HUP` makes them publish it again.

    \b
    Example:
      linkcrm rules publish rules/
      linkcrm rules list
      linkcrm rules activate 3f9a1c2e7b40
      linkcrm rules publish --shadow rules/ && linkcrm rules shadow-report
    """


def _publisher() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no user name in the environment or the password database
        return "unknown"


class RulesRefused(Exception):
    """The rules failed validation or their tests: `lines` say what (rule files and test
    names, never event data), `summary` how many."""

    def __init__(self, lines: Sequence[str], summary: str) -> None:
        super().__init__(summary)
        self.lines = list(lines)
        self.summary = summary


def _problem_refusal(problems: Sequence[Problem]) -> RulesRefused | None:
    errors = [p for p in problems if p.severity == "error"]
    if not errors:
        return None
    return RulesRefused([problem.render() for problem in errors],
                        f"{len(errors)} error{'s' * (len(errors) != 1)} in the rules")


def check_rules(paths: Sequence[str]) -> int:
    """Validate the rules and run their tests, as `rules publish` does before storing them.
    Returns the number of rule tests that passed; raises RulesRefused listing every error or
    failing test."""
    refusal = _problem_refusal(check_paths(paths))
    if refusal is not None:
        raise refusal
    try:
        ruleset = load_ruleset(paths)
    except ConfigError as error:
        raise _problem_refusal(error.problems) or RulesRefused(
            [], "the rules do not load") from error
    results = run_tests(discover(paths).test_files, ruleset, replay_into_local_crm)
    failed = [r for r in results if not r.passed]
    lines = []
    for result in failed:
        lines.append(f"{result.location}: FAIL {result.name}")
        lines.extend(f"    {line}" for block in (result.diff, result.error)
                     for line in block.splitlines())
    if failed:
        raise RulesRefused(lines, f"{len(failed)} of {len(results)} rule tests failed")
    return len(results)


def _check(paths: list[str]) -> int:
    """Validate the rules and run their tests; exit 1 with the errors unless all is well.
    Returns the number of rule tests that passed."""
    try:
        return check_rules(paths)
    except RulesRefused as refusal:
        for line in refusal.lines:
            click.echo(line, err=True)
        more = " (`linkcrm validate` lists every problem)" if "error" in refusal.summary else ""
        fail(f"{refusal.summary}; {REFUSED}{more}")


def release_of(paths: Sequence[str], label: str | None = None) -> NewRuleVersion:
    """The rule files under `paths` as a version to publish: content hash, files, the
    publisher, and `label` (default: their folder's git commit). Raises RuleFilesError or
    OSError when the files do not make one rule set."""
    files = collect(paths)
    return NewRuleVersion(files.version, files.files, _publisher(),
                          label if label is not None and label.strip() else git_label(paths))


def _version_row(version: RuleVersion) -> dict[str, JSON]:
    names: list[JSON] = [name for name in sorted(version.files)]
    return {"version": version.version, "status": version.status, "label": version.label,
            "published_by": version.published_by, "published_at": iso(version.published_at),
            "activated_at": iso(version.activated_at), "files": names}


@rules_group.command("publish")
@click.argument("paths", nargs=-1, type=click.Path(exists=True))
@click.option("--label", help="Where the rules come from (default: the git commit of their "
              "folder, when it is in a git work tree).")
@click.option("--shadow", is_flag=True,
              help="Store the version as the shadow one instead of activating it: live events "
                   "are planned with it next to the active version and the differences "
                   "recorded (`linkcrm rules shadow-report`); nothing of it reaches a CRM.")
@FORMAT_OPTION
def publish(paths: tuple[str, ...], label: str | None, shadow: bool,
            output_format: str) -> None:
    """Check the rules, run their tests, then store them as a version and activate it (with
    --shadow: make it the shadow version; the active one stays, a shadow version before is
    retired).

    Any error or failing test refuses the whole set (exit 1) and the active version stays.
    Publishing content that is published already activates that version again.

    \b
    Example:
      linkcrm rules publish rules/ --label "fix referral stage"
      linkcrm rules publish --shadow rules/
    """
    chosen = rules_paths(paths)
    passed = _check(chosen)
    try:
        new = release_of(chosen, label)
    except (RuleFilesError, OSError) as error:
        fail(f"{error}; {REFUSED}")
    settings = load_settings()

    async def work(storage: Storage) -> tuple[str | None, str | None, PublishResult]:
        await storage.migrate()
        before = await storage.rule_versions.active_version()
        shadow_before = next((v.version for v in await storage.rule_versions.list_versions()
                              if v.status == "shadow"), None)
        return before, shadow_before, await storage.rule_versions.publish(
            new, "shadow" if shadow else "active")

    before, shadow_before, result = with_storage(settings, work)
    stored = result.version
    previous = shadow_before if shadow else before
    if output_format == "json":
        emit_json({**_version_row(stored), "created": result.created, "previous": previous,
                   "active": before, "tests_passed": passed})
        return
    if not passed:
        click.echo("warning: no rule tests found (*_test.yaml beside the rules)", err=True)
    what = "published" if result.created else "already published:"
    label_text = f" ({safe(stored.label)})" if stored.label else ""
    if shadow:
        _said_shadow(what, label_text, stored, before, shadow_before)
    elif before == stored.version:
        click.echo(f"{what} {stored.version}{label_text}; it was active already")
    else:
        was = f" (was {before})" if before else ""
        click.echo(f"{what} {stored.version}{label_text}; active now{was}")


def _said_shadow(what: str, label_text: str, stored: RuleVersion, active: str | None,
                 shadow_before: str | None) -> None:
    if stored.status == "active":
        click.echo(f"{what} {stored.version}{label_text}; it is the active version, so there "
                   "is nothing to shadow (the shadow version is unchanged)")
        return
    if shadow_before == stored.version:
        click.echo(f"{what} {stored.version}{label_text}; it was the shadow version already")
        return
    replaced = f"; it replaces shadow version {shadow_before}" if shadow_before else ""
    stays = f"active version {active} stays" if active else "no version is active yet"
    click.echo(f"{what} {stored.version}{label_text}; shadow now ({stays}{replaced}). Live "
               "events are planned with it next to the active version and nothing of it "
               "reaches a CRM; see `linkcrm rules shadow-report`, promote it with "
               f"`linkcrm rules activate {stored.version}`")


@rules_group.command("list")
@FORMAT_OPTION
def list_versions(output_format: str) -> None:
    """Published rule versions, the most recent first, with status, label and who/when.

    \b
    Example:
      linkcrm rules list
    """
    settings = load_settings()

    async def work(storage: Storage) -> list[RuleVersion]:
        await storage.migrate()
        return await storage.rule_versions.list_versions()

    rows = [_version_row(v) for v in with_storage(settings, work)]
    if output_format == "json":
        emit_json(rows)
        return
    if not rows:
        click.echo("no rule versions published yet (`linkcrm rules publish rules/`)")
        return
    click.echo(f"{'VERSION':<12}  {'STATUS':<7}  {'PUBLISHED':<20}  {'BY':<12}  LABEL")
    for row in rows:
        published = str(row["published_at"])[:19] + "Z"
        click.echo(f"{row['version']!s:<12}  {row['status']!s:<7}  {published:<20}  "
                   f"{safe(str(row['published_by'])):<12}  {safe(str(row['label'] or '-'))}")


@rules_group.command("activate")
@click.argument("version")
def activate(version: str) -> None:
    """Make a published VERSION the active one (roll back or forward, or promote the shadow
    version). VERSION may be shortened to a unique prefix; an unknown one is an error (exit
    1) and changes nothing.

    \b
    Example:
      linkcrm rules activate 3f9a1c2e7b40
    """
    settings = load_settings()
    wanted = version.strip().lower()

    async def work(storage: Storage) -> tuple[str | None, list[str], RuleVersion | None, bool]:
        await storage.migrate()
        before = await storage.rule_versions.active_version()
        listed = await storage.rule_versions.list_versions()
        matches = [v.version for v in listed if wanted and v.version.startswith(wanted)]
        if len(matches) != 1:
            return before, matches, None, False
        was_shadow = any(v.version == matches[0] and v.status == "shadow" for v in listed)
        return before, matches, await storage.rule_versions.activate(matches[0]), was_shadow

    before, matches, activated, was_shadow = with_storage(settings, work)
    if activated is None:
        if len(matches) > 1:
            fail(f"{safe(version)!r} is the start of {len(matches)} versions "
                 f"({', '.join(matches)}); give more of it. Nothing changed")
        fail(f"unknown rule version {safe(version)!r}; `linkcrm rules list` shows the "
             "published ones. Nothing changed")
    if before == activated.version:
        click.echo(f"{activated.version} was active already")
    else:
        was = f" (was {before})" if before else ""
        click.echo(f"{activated.version} is active now{was}")
    if was_shadow:
        click.echo(f"it was the shadow version: promoted; its shadow results stay readable "
                   f"(`linkcrm rules shadow-report {activated.version}`)")
    sys.exit(0)


rules_group.add_command(shadow_report)
