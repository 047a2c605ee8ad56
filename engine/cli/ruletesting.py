"""`linkcrm test`: run the rule tests, with coverage, --update and --watch."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from engine.actions import JSON
from engine.rules.coverage import Coverage, render_text
from engine.rules.files import discover
from engine.rules.ruletests import CaseResult, run_tests
from engine.rules.updating import Updated, update_file

from .output import FORMAT_OPTION, emit_json, rules_paths, safe
from .params import FiniteFloatRange
from .rules import _load
from .scenariocrm import replay_into_local_crm
from .watch import watch as watch_paths

PATHS = click.argument("paths", nargs=-1, type=click.Path(exists=True))


def _print_failures(results: list[CaseResult]) -> None:
    for result in results:
        if result.passed:
            continue
        click.echo(f"{result.location}: FAIL {safe(result.name)}")
        for line in result.diff.splitlines():  # JSON: control characters escaped already
            click.echo(f"    {line}")
        for line in result.error.splitlines():
            click.echo(f"    {safe(line)}")


def _update(results: list[CaseResult]) -> list[Updated]:
    by_file: dict[str, list[CaseResult]] = {}
    for result in results:
        if not result.passed:
            by_file.setdefault(result.file, []).append(result)
    return [done for file, failed in by_file.items() for done in update_file(Path(file), failed)]


def _updated_json(done: Updated) -> dict[str, JSON]:
    return {"file": done.result.file, "line": done.result.location.line,
            "name": done.result.name, "updated": done.updated, "reason": done.reason or None}


def run_once(chosen: list[str], output_format: str, coverage: bool, fail_under: float | None,
             update: bool) -> int:
    """One run of the tests; the exit code (1: a failure, no tests, or coverage too low)."""
    ruleset = _load(chosen)
    test_files = discover(chosen).test_files
    updated: list[Updated] = []
    if update:
        updated = _update(run_tests(test_files, ruleset, replay_into_local_crm))
    counted = Coverage(ruleset) if coverage or fail_under is not None else None
    results = run_tests(test_files, ruleset, replay_into_local_crm,
                        None if counted is None else counted.observe)
    passed = sum(r.passed for r in results)
    failed = len(results) - passed
    report = None if counted is None else counted.report()
    too_low = report is not None and fail_under is not None and report.percent < fail_under
    if output_format == "json":
        document: dict[str, JSON] = {"passed": passed, "failed": failed,
                                     "cases": [r.as_dict() for r in results]}
        if report is not None:
            document["coverage"] = report.as_dict()
        if update:
            document["updated"] = [_updated_json(done) for done in updated]
        emit_json(document)
    else:
        for done in updated:
            where = done.result.location
            name = safe(done.result.name)
            click.echo(f"{where}: updated {name}" if done.updated
                       else f"{where}: not updated {name}: {safe(done.reason)}")
        _print_failures(results)
        if report is not None:
            for line in render_text(report):
                click.echo(line)
        if not results:
            click.echo("no rule tests found (rule tests are *_test.yaml files beside the rules)")
        click.echo(f"{passed} passed, {failed} failed")
        if too_low and report is not None:
            click.echo(f"coverage {report.percent}% is under --fail-under {fail_under:g}: "
                       "add cases for the rules, `when` branches and actions listed as never "
                       "exercised")
    return 1 if failed or not results or too_low else 0


@click.command()
@PATHS
@FORMAT_OPTION
@click.option("--coverage", is_flag=True,
              help="Also list, per rule file, the rules, `when` branches and actions the "
                   "tests exercised and those they never did, and the field map's fields no "
                   "rule writes.")
@click.option("--fail-under", type=FiniteFloatRange(0, 100), metavar="PERCENT",
              help="Exit 1 when coverage is under PERCENT (0 to 100); implies --coverage.")
@click.option("--update", is_flag=True,
              help="Rewrite the expectations of failing cases from what the rules produce "
                   "now, keeping the files' comments and layout; then run the tests again.")
@click.option("--watch", is_flag=True,
              help="Run again on every save under PATHS (Ctrl-C stops).")
def test(paths: tuple[str, ...], output_format: str, coverage: bool, fail_under: float | None,
         update: bool, watch: bool) -> None:
    """Run the rule tests (`*_test.yaml`) against the rules beside them.

    A case gives an event and the expected action plan, or (a scenario) a list of events and
    the embedded CRM's state they must leave. A failure shows the case's `file:line` and a
    diff. Prints `N passed, N failed`; exit 1 on any failure (or coverage under --fail-under).

    \b
    Example:
      linkcrm test rules/ --coverage --fail-under 90
    """
    chosen = rules_paths(paths)
    if watch and update:
        raise click.UsageError("--update rewrites files; run it once, without --watch")
    if watch:
        watch_paths(chosen, lambda: run_once(chosen, output_format, coverage, fail_under, False))
        return
    sys.exit(run_once(chosen, output_format, coverage, fail_under, update))

