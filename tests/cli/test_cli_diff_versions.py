"""`linkcrm diff OLD NEW` with published rule versions (an id, a unique prefix, `active`)
on either side, through the real command line, and the refs that name none."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from engine.rules.versions import collect
from tests.cli.test_cli_diff import STORY_CHANGES, changes
from tests.cli.test_cli_export import database, linkcrm
from tests.support.diff_story import RULES, edited_rules, record, recorded_story
from tests.support.service_process import service_env


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    env = service_env(tmp_path)
    record(database(env), recorded_story())
    return env


def edited(folder: Path) -> Path:
    """The story's rule change, without the shipped rule tests (which it breaks, and which
    `rules publish` runs)."""
    edited_rules(folder)
    for test in folder.glob("*_test.yaml"):
        test.unlink()
    return folder


def publish(env: dict[str, str], folder: Path) -> str:
    done = linkcrm("rules", "publish", str(folder), "--format", "json", env=env)
    assert done.returncode == 0, done.stderr
    version: str = json.loads(done.stdout)["version"]
    return version


def diffed(env: dict[str, str], old: str, new: str) -> dict[str, Any]:
    done = linkcrm("diff", old, new, "--format", "json", env=env)
    assert done.returncode == 0, done.stderr
    document: dict[str, Any] = json.loads(done.stdout)
    return document


def test_diff_takes_published_versions_and_active(env: dict[str, str], tmp_path: Path) -> None:
    new_rules = edited(tmp_path / "new")
    old_version = publish(env, RULES)
    new_version = publish(env, new_rules)  # active now
    assert old_version != new_version
    by_ids = diffed(env, old_version, new_version)
    assert changes(by_ids) == STORY_CHANGES
    assert (by_ids["old"], by_ids["new"]) == (f"version {old_version}",
                                              f"version {new_version}")
    by_prefix = diffed(env, old_version[:6], "active")
    assert changes(by_prefix) == STORY_CHANGES
    assert by_prefix["new"] == f"version {new_version} (active)"
    # the active version against the folder it was published from: nothing changes
    same = linkcrm("diff", "active", str(new_rules), "--exit-code", env=env)
    assert same.returncode == 0, same.stderr
    backwards = changes(diffed(env, "active", str(RULES)))
    assert backwards == changes(diffed(env, str(new_rules), str(RULES))) and backwards != []
    text = linkcrm("diff", "active", str(RULES), env=env)
    assert text.returncode == 0 and f"version {new_version} (active)" in text.stdout


def test_unknown_ambiguous_and_unpublished_versions_exit_2(env: dict[str, str],
                                                           tmp_path: Path) -> None:
    nothing = linkcrm("diff", "active", str(RULES), env=env)
    assert nothing.returncode == 2 and nothing.stdout == ""
    assert "error: OLD: no rule version is active: nothing is published" in nothing.stderr
    old_version = publish(env, RULES)
    new_version = publish(env, edited(tmp_path / "new"))
    unknown = linkcrm("diff", str(RULES), "0" * 12, env=env)
    assert unknown.returncode == 2 and unknown.stdout == ""
    assert ("error: NEW: unknown rule set '000000000000': there is no rule folder or file by "
            "that name, and no published rule version starts with it") in unknown.stderr
    twin = tmp_path / "twin"  # the shipped rules plus a comment, hashing to old_version[0]...
    shutil.copytree(RULES, twin)
    rules = twin / "attribution.yaml"
    text = rules.read_text(encoding="utf-8")
    for n in range(1000):
        rules.write_text(f"{text}# variant {n}\n", encoding="utf-8")
        if collect([twin]).version[0] == old_version[0]:
            break
    twin_version = publish(env, twin)
    assert twin_version != old_version and twin_version[0] == old_version[0]
    ambiguous = linkcrm("diff", old_version[0], str(RULES), env=env)
    assert ambiguous.returncode == 2 and ambiguous.stdout == ""
    assert (f"error: OLD: '{old_version[0]}' is the start of 2 rule versions (") in \
        ambiguous.stderr and "give more of it" in ambiguous.stderr
    assert linkcrm("diff", old_version, str(RULES), env=env).returncode == 0
    listed = linkcrm("rules", "list", "--format", "json", env=env)
    assert [(row["version"], row["status"]) for row in json.loads(listed.stdout)] == [
        (twin_version, "active"), (new_version, "retired"), (old_version, "retired")]
