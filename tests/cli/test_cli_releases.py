"""`linkcrm rules publish|list|activate` through the real command line, on SQLite and
PostgreSQL."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.rules.versions import collect
from tests.support.paths import REPO
from tests.support.postgres import fresh_schema, require_postgres, schema_url
from tests.support.service_process import cli, cli_json, service_env, start_server, wait_for
from tests.support.shipped import SHIPPED_CASES

RULES = REPO / "rules"


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    env = service_env(tmp_path)
    done = cli("migrate", env=env)
    assert done.returncode == 0, done.stderr
    return env


@pytest.fixture
def rules_copy(tmp_path: Path) -> Path:
    target = tmp_path / "rules"
    shutil.copytree(RULES, target)
    return target


def listed(env: dict[str, str]) -> list[dict[str, Any]]:
    done = cli("rules", "list", "--format", "json", env=env)
    assert done.returncode == 0, done.stderr
    rows: list[dict[str, Any]] = json.loads(done.stdout)
    return rows


def publish(env: dict[str, str], *args: str) -> dict[str, Any]:
    done = cli("rules", "publish", *args, "--format", "json", env=env)
    assert done.returncode == 0, done.stderr
    document: dict[str, Any] = json.loads(done.stdout)
    return document


def edit_stage(folder: Path) -> None:
    """A real rule change: the install rule sets a different lifecycle stage."""
    rules = folder / "attribution.yaml"
    text = rules.read_text(encoding="utf-8")
    assert "stage: lead" in text
    rules.write_text(text.replace("stage: lead", "stage: customer", 1), encoding="utf-8")


def test_publish_list_and_roll_back(env: dict[str, str], rules_copy: Path) -> None:
    assert listed(env) == []
    first = publish(env, str(rules_copy), "--label", "v1")
    assert first["created"] and first["status"] == "active" and first["previous"] is None
    assert first["label"] == "v1" and first["files"] == ["attribution.yaml", "fields.yaml"]
    assert first["tests_passed"] == SHIPPED_CASES
    again = cli("rules", "publish", str(rules_copy), env=env)
    assert again.returncode == 0
    assert again.stdout.strip() == f"already published: {first['version']} (v1); it was " \
        "active already"

    edit_stage(rules_copy)
    for test in rules_copy.glob("*_test.yaml"):  # their expectations are the old ones
        test.unlink()
    second = cli("rules", "publish", str(rules_copy), "--label", "v2", env=env)
    assert second.returncode == 0, second.stderr
    rows = listed(env)
    assert [(r["label"], r["status"]) for r in rows] == [("v2", "active"), ("v1", "retired")]
    assert second.stdout.strip() == (
        f"published {rows[0]['version']} (v2); active now (was {first['version']})")

    back = cli("rules", "activate", first["version"][:6], env=env)
    assert back.returncode == 0, back.stderr
    assert back.stdout.strip() == f"{first['version']} is active now (was {rows[0]['version']})"
    assert [(r["label"], r["status"]) for r in listed(env)] == [("v2", "retired"),
                                                                 ("v1", "active")]
    text = cli("rules", "list", env=env)
    assert text.returncode == 0
    assert text.stdout.splitlines()[0].split() == ["VERSION", "STATUS", "PUBLISHED", "BY",
                                                   "LABEL"]
    assert text.stdout.splitlines()[2].split()[:2] == [first["version"], "active"]


def test_activating_an_unknown_version_is_an_error_and_changes_nothing(
    env: dict[str, str], rules_copy: Path
) -> None:
    publish(env, str(rules_copy))
    before = listed(env)
    unknown = cli("rules", "activate", "feedfacecafe", env=env)
    assert unknown.returncode == 1
    assert "unknown rule version 'feedfacecafe'" in unknown.stderr
    assert "`linkcrm rules list`" in unknown.stderr and "Nothing changed" in unknown.stderr
    assert listed(env) == before


def test_rules_with_errors_are_refused_and_the_active_version_stays(
    env: dict[str, str], rules_copy: Path
) -> None:
    active = publish(env, str(rules_copy))["version"]
    (rules_copy / "attribution.yaml").write_text(
        (rules_copy / "attribution.yaml").read_text(encoding="utf-8").replace(
            "upsert_contact", "upsert_kontact", 1), encoding="utf-8")
    refused = cli("rules", "publish", str(rules_copy), env=env)
    assert refused.returncode == 1
    assert "attribution.yaml:" in refused.stderr and "unknown-action" in refused.stderr
    assert "the rules are not published; the active version stays" in refused.stderr
    assert [(r["version"], r["status"]) for r in listed(env)] == [(active, "active")]


def test_rules_whose_tests_fail_are_refused(env: dict[str, str], rules_copy: Path) -> None:
    active = publish(env, str(rules_copy))["version"]
    edit_stage(rules_copy)  # the tests still expect `lead`
    refused = cli("rules", "publish", str(rules_copy), env=env)
    assert refused.returncode == 1
    assert "FAIL" in refused.stderr
    assert "rule tests failed; the rules are not published" in refused.stderr
    assert [(r["version"], r["status"]) for r in listed(env)] == [(active, "active")]


@pytest.fixture
def postgres_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    require_postgres()
    with fresh_schema() as schema:
        env = service_env(tmp_path, LINKCRM_DATABASE_URL=schema_url(schema))
        done = cli("migrate", env=env)
        assert done.returncode == 0, done.stderr
        yield env


def test_publish_and_activate_on_postgres(
    postgres_env: dict[str, str], rules_copy: Path
) -> None:
    first = publish(postgres_env, str(rules_copy), "--label", "one")
    edit_stage(rules_copy)
    for test in rules_copy.glob("*_test.yaml"):
        test.unlink()
    second = publish(postgres_env, str(rules_copy), "--label", "two")
    assert second["previous"] == first["version"] and second["tests_passed"] == 0
    assert cli("rules", "activate", first["version"], env=postgres_env).returncode == 0
    assert [(r["label"], r["status"]) for r in listed(postgres_env)] == [
        ("two", "retired"), ("one", "active")]


def test_every_outcome_records_the_rule_version_that_planned_it(env: dict[str, str]) -> None:
    """serve plans with the rules folder it loaded; each outcome names that folder's version,
    the one `rules publish` gives the same files, and `events show` prints it."""
    version = publish(env, env["LINKCRM_RULES"])["version"]
    assert version == collect([env["LINKCRM_RULES"]]).version
    server = start_server(env)
    try:
        sent = cli("send-samples", "--url", server.url, env=env)
        assert sent.returncode == 0, sent.stderr
        wait_for(lambda: len(cli_json("crm", "deals", env=env)) == 1, what="the worker")
    finally:
        server.stop()
    shown = [cli_json("events", "show", str(e["id"]), env=env)
             for e in cli_json("events", "list", env=env)]
    outcomes = [o for document in shown for o in document["outcomes"]]
    assert outcomes and {o["rules_version"] for o in outcomes} == {version}
    event_id = next(d["id"] for d in shown if d["outcomes"])
    text = cli("events", "show", str(event_id), env=env)
    assert f"planned by rules {version}" in text.stdout
