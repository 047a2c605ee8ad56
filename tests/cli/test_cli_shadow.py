"""Shadow mode through the real command line, on SQLite and PostgreSQL: `rules publish
--shadow`, the worker's observer on recorded events, `rules shadow-report` in every format,
a newer shadow replacing the one before, promotion by `rules activate`, and the errors."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.rules.versions import load_version
from engine.storage import open_storage
from engine.worker.shadow import ShadowObserver
from tests.support.diff_story import RULES, record, recorded_story
from tests.support.postgres import fresh_schema, require_postgres, schema_url
from tests.support.service_process import cli, service_env


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    environ = service_env(tmp_path)
    assert cli("migrate", env=environ).returncode == 0
    return environ


@pytest.fixture
def postgres_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    require_postgres()
    with fresh_schema() as schema:
        environ = service_env(tmp_path, LINKCRM_DATABASE_URL=schema_url(schema))
        assert cli("migrate", env=environ).returncode == 0
        yield environ


def candidate(folder: Path, old: str, new: str) -> Path:
    """The shipped rules with one edit, without the tests that expect the old plan."""
    shutil.copytree(RULES, folder)
    rules = folder / "attribution.yaml"
    text = rules.read_text(encoding="utf-8")
    assert text.count(old) >= 1
    rules.write_text(text.replace(old, new, 1), encoding="utf-8")
    for test in folder.glob("*_test.yaml"):  # they expect the old plans
        test.unlink()
    return folder


def run_json(env: dict[str, str], *args: str) -> Any:
    done = cli(*args, "--format", "json", env=env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def statuses(env: dict[str, str]) -> dict[str, str]:
    return {row["version"]: row["status"] for row in run_json(env, "rules", "list")}


def observe_recorded(url: str) -> None:
    """What the worker does with each claimed event while a shadow version exists."""

    async def run() -> None:
        storage = open_storage(url)
        try:
            listed = await storage.rule_versions.list_versions()
            [shadow] = [v for v in listed if v.status == "shadow"]
            [active] = [v for v in listed if v.status == "active"]
            observer = ShadowObserver(storage)
            active_rules = load_version(active.files, active.version)
            shadow_rules = load_version(shadow.files, shadow.version)
            for event in await storage.inbox.list_events():
                await observer.observe(event, active_rules, shadow_rules)
            assert observer.failures == 0
        finally:
            await storage.close()

    asyncio.run(run())


def test_shadow_publish_report_replace_and_promote(env: dict[str, str],
                                                   tmp_path: Path) -> None:
    url = env["LINKCRM_DATABASE_URL"]
    active = run_json(env, "rules", "publish", str(RULES), "--label", "v1")["version"]
    same = cli("rules", "publish", "--shadow", str(RULES), env=env)
    assert same.returncode == 0, same.stderr
    assert same.stdout.strip() == (f"already published: {active} (v1); it is the active "
                                   "version, so there is nothing to shadow (the shadow "
                                   "version is unchanged)")
    none = cli("rules", "shadow-report", env=env)
    assert none.returncode == 2
    assert "no shadow rule version: publish one with `linkcrm rules publish --shadow" \
        in none.stderr

    stage = candidate(tmp_path / "stage", "stage: lead", "stage: customer")
    published = cli("rules", "publish", "--shadow", str(stage), env=env)
    assert published.returncode == 0, published.stderr
    shadow = statuses(env)
    [first] = [v for v, s in shadow.items() if s == "shadow"]
    assert shadow == {active: "active", first: "shadow"}
    assert published.stdout.startswith(
        f"published {first}; shadow now (active version {active} stays).")
    listing = cli("rules", "list", env=env).stdout.splitlines()
    assert listing[1].split()[:2] == [first, "shadow"]

    story = recorded_story()
    record(url, story)
    observe_recorded(url)
    report = run_json(env, "rules", "shadow-report")
    assert (report["version"], report["status"]) == (first, "shadow")
    assert report["active_versions"] == [active]
    assert (report["events"], report["changed_events"], report["unchanged_events"]) == (
        len(story), 1, len(story) - 1)
    [change] = report["changes"]
    assert (change["rule"], change["action"], change["field"], change["change"],
            change["events"]) == ("install-creates-lead", "set_stage", "stage", "changed", 1)
    assert (change["examples"][0]["before"], change["examples"][0]["after"]) == (
        "lead", "customer")
    text = cli("rules", "shadow-report", first[:6], "--exit-code", env=env)
    assert text.returncode == 1
    lines = text.stdout.splitlines()
    assert lines[0] == (f"linkcrm rules shadow-report: OLD version {active} (active) -> NEW "
                        f"version {first} (shadow), comparing canonical fields")
    assert lines[1].startswith(f"{len(story)} events from live traffic in ")
    assert lines[1].endswith(f": 1 plan differently, {len(story) - 1} the same")
    assert "  set_stage stage: value changes in 1 event" in lines
    markdown = cli("rules", "shadow-report", "--format", "markdown", env=env)
    assert markdown.returncode == 0
    assert markdown.stdout.startswith(
        f"### linkcrm rules shadow-report: <code>version {active} (active)</code> → "
        f"<code>version {first} (shadow)</code>\n\n**1 of {len(story)} events plan "
        "differently**")
    assert "| install-creates-lead | set_stage | stage | value changes | 1 |" in markdown.stdout

    # A newer candidate replaces the shadow; the first one's results stay readable.
    deal = candidate(tmp_path / "deal", "          stage: new\n", "          stage: won\n")
    assert cli("rules", "publish", "--shadow", str(deal), env=env).returncode == 0
    second = next(v for v, s in statuses(env).items() if s == "shadow")
    assert statuses(env) == {active: "active", first: "retired", second: "shadow"}
    empty = run_json(env, "rules", "shadow-report")
    assert (empty["version"], empty["events"], empty["changes"]) == (second, 0, [])
    again = run_json(env, "rules", "shadow-report", first)
    assert (again["status"], again["changed_events"]) == ("retired", 1)

    # Promotion: the shadow becomes active, no shadow is left, its results stay.
    promoted = cli("rules", "activate", second, env=env)
    assert promoted.returncode == 0, promoted.stderr
    assert promoted.stdout.splitlines() == [
        f"{second} is active now (was {active})",
        f"it was the shadow version: promoted; its shadow results stay readable "
        f"(`linkcrm rules shadow-report {second}`)"]
    assert statuses(env) == {active: "retired", first: "retired", second: "active"}
    assert cli("rules", "shadow-report", env=env).returncode == 2
    assert run_json(env, "rules", "shadow-report", second)["status"] == "active"

    # Shadow results quote event values: `purge` drops them with the raw bodies.
    purged = run_json(env, "purge", "--older-than", "0m")
    assert purged["shadow_results_purged"] == len(story)
    assert run_json(env, "rules", "shadow-report", first)["events"] == 0

    unknown = cli("rules", "shadow-report", "feedfacecafe", env=env)
    assert unknown.returncode == 2
    assert "unknown rule version 'feedfacecafe'; `linkcrm rules list` shows the published " \
        "ones" in unknown.stderr


def test_shadow_mode_on_postgres(postgres_env: dict[str, str], tmp_path: Path) -> None:
    env = postgres_env
    active = run_json(env, "rules", "publish", str(RULES))["version"]
    stage = candidate(tmp_path / "stage", "stage: lead", "stage: customer")
    shadow = run_json(env, "rules", "publish", "--shadow", str(stage))
    assert (shadow["status"], shadow["active"]) == ("shadow", active)
    story = recorded_story()
    record(env["LINKCRM_DATABASE_URL"], story)
    observe_recorded(env["LINKCRM_DATABASE_URL"])
    report = run_json(env, "rules", "shadow-report")
    assert (report["version"], report["events"], report["changed_events"]) == (
        shadow["version"], len(story), 1)
    assert [(c["rule"], c["field"]) for c in report["changes"]] == [
        ("install-creates-lead", "stage")]
    assert cli("rules", "activate", shadow["version"], env=env).returncode == 0
    assert statuses(env) == {active: "retired", shadow["version"]: "active"}
