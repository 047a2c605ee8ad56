"""Rule-set versions: a content hash of the normalised rule files and field map, and a label."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from engine.rules.files import load_ruleset
from engine.rules.versions import (
    VERSION_PATTERN,
    RuleFilesError,
    collect,
    git_label,
    load_version,
    normalise,
    version_of,
)

RULES = Path(__file__).resolve().parents[2] / "rules"


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    copy = tmp_path / "rules"
    shutil.copytree(RULES, copy)
    return copy


def test_version_is_a_hash_of_rule_files_and_field_map_only(folder: Path) -> None:
    first = collect([folder])
    assert VERSION_PATTERN.fullmatch(first.version)
    assert set(first.files) == {"attribution.yaml", "fields.yaml"}  # tests and events left out
    (folder / "attribution_test.yaml").write_text("cases: []\n", encoding="utf-8")
    assert collect([folder]).version == first.version
    fields = folder / "fields.yaml"
    fields.write_text(fields.read_text(encoding="utf-8") + "# a change\n", encoding="utf-8")
    assert collect([folder]).version != first.version


def test_line_endings_and_trailing_whitespace_do_not_change_the_version(folder: Path) -> None:
    before = collect([folder]).version
    rules = folder / "attribution.yaml"
    text = rules.read_text(encoding="utf-8")
    rules.write_bytes(text.replace("\n", "  \r\n").encode("utf-8") + b"\r\n\r\n")
    assert collect([folder]).version == before
    assert normalise("a \r\nb\t\r\n\n") == "a\nb\n"


def test_a_folder_without_rule_files_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RuleFilesError, match="no rule files"):
        collect([tmp_path])


def test_label_is_the_git_commit_of_the_folder(folder: Path, tmp_path: Path) -> None:
    assert git_label([folder]) is None  # tmp_path is not in a git work tree

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(folder), *args], check=True,
                              capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qm", "rules")
    head = git("rev-parse", "HEAD")
    assert git_label([folder]) == head
    (folder / "attribution.yaml").write_text("rules: []\n", encoding="utf-8")
    assert git_label([folder]) == head + "-dirty"


def test_a_published_versions_files_load_as_the_same_rules(folder: Path) -> None:
    collected = collect([folder])
    ruleset = load_version(collected.files, collected.version)
    assert ruleset.version == collected.version
    original = load_ruleset([folder])
    assert [(r.name, r.on, r.when, len(r.actions)) for r in ruleset.rules] == [
        (r.name, r.on, r.when, len(r.actions)) for r in original.rules]
    assert [a.fields for r in ruleset.rules for a in r.actions] == [
        a.fields for r in original.rules for a in r.actions]
    assert ruleset.field_map.fields == original.field_map.fields


def test_damaged_or_escaping_files_are_refused(folder: Path) -> None:
    files = dict(collect([folder]).files)
    with pytest.raises(RuleFilesError, match="do not hash"):
        load_version({**files, "fields.yaml": "fields: {}\n"}, collect([folder]).version)
    escaping = {**files, "../outside.yaml": "rules: []\n"}
    with pytest.raises(RuleFilesError, match="outside its folder"):
        load_version(escaping, version_of(escaping))
