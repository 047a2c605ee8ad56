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
from .shadowreport import shadow_report

REFUSED = "the rules are not published; the active version stays"


@click.group("rules")
def rules_group() -> None:
    """Publish rule sets as versions, list them, and choose the active one.

    Versions live in the database (LINKCRM_DATABASE_URL). A running `serve` or `worker`
    still runs the rules folder it loaded at start: restart it to apply a change.

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


def _refuse_problems(problems: Sequence[Problem]) -> None:
    errors = [p for p in problems if p.severity == "error"]
    if errors:
        for problem in errors:
            click.echo(problem.render(), err=True)
        fail(f"{len(errors)} error{'s' * (len(errors) != 1)} in the rules; {REFUSED} "
             "(`linkcrm validate` lists every problem)")


def _check(paths: list[str]) -> int:
    """Validate the rules and run their tests; exit 1 with the errors unless all is well.
    Returns the number of rule tests that passed."""
    _refuse_problems(check_paths(paths))
    try:
        ruleset = load_ruleset(paths)
    except ConfigError as error:
        _refuse_problems(error.problems)
        raise
    results = run_tests(discover(paths).test_files, ruleset)
    failed = [r for r in results if not r.passed]
    for result in failed:
        click.echo(f"{result.location}: FAIL {result.name}", err=True)
        for block in (result.diff, result.error):
            for line in block.splitlines():
                click.echo(f"    {line}", err=True)
    if failed:
        fail(f"{len(failed)} of {len(results)} rule tests failed; {REFUSED}")
    return len(results)


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
        files = collect(chosen)
    except (RuleFilesError, OSError) as error:
        fail(f"{error}; {REFUSED}")
    new = NewRuleVersion(files.version, files.files, _publisher(),
                         label if label is not None and label.strip() else git_label(chosen))
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
