"""Every example of the README's "Rule tests" section runs: each YAML test file passes against
the shipped rules, each command exits 0 in a copy of the rules folder (a `--watch` one runs
until it watches, then Ctrl-C), and the coverage sample is what `--coverage` prints."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.paths import REPO
from tests.support.watched import Watched

README = (REPO / "README.md").read_text(encoding="utf-8")


def section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    return README[start:README.index("\n## ", start + 1)]


SECTION = section("Rule tests")
YAML_BLOCKS = re.findall(r"```yaml\n(.*?)```", SECTION, re.DOTALL)
COMMANDS = [line.split("  #")[0].strip()
            for block in re.findall(r"```sh\n(.*?)```", SECTION, re.DOTALL)
            for line in block.splitlines() if line.startswith("linkcrm ")]
SAMPLE = re.search(r"```\n(rules/attribution\.yaml: .*?)```", SECTION, re.DOTALL)


def linkcrm(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    shutil.copytree(REPO / "rules", tmp_path / "rules")
    return tmp_path


def test_the_section_shows_scenarios_coverage_update_and_watch() -> None:
    assert len(YAML_BLOCKS) == 2 and "expect_state:" in YAML_BLOCKS[1]
    flags = " ".join(COMMANDS)
    for flag in ("--coverage", "--fail-under", "--update", "test rules/ --watch",
                 "validate rules/ --watch"):
        assert flag in flags
    assert SAMPLE is not None


def test_the_scenario_example_passes_against_the_shipped_rules(workdir: Path) -> None:
    # The first example tests the README's own rule example (its plans are not the shipped
    # rules'): tests/cli/test_readme_rule_authoring.py runs the two together.
    number = 1
    rules = workdir / "rules"
    for old in rules.glob("*_test.yaml"):
        old.unlink()
    (rules / "readme_test.yaml").write_text(YAML_BLOCKS[number], encoding="utf-8")
    validated = linkcrm("validate", "--strict", "rules/", cwd=workdir)
    assert validated.returncode == 0, validated.stdout
    tested = linkcrm("test", "rules/", cwd=workdir)
    assert tested.returncode == 0, tested.stdout
    cases = YAML_BLOCKS[number].count("\n  - name: ")
    assert tested.stdout.splitlines()[-1] == f"{cases} passed, 0 failed"


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_runs(workdir: Path, command: str) -> None:
    before = {p.name: p.read_bytes() for p in (workdir / "rules").iterdir() if p.is_file()}
    args = shlex.split(command)[1:]
    if "--watch" in args:
        watched = Watched(*args, cwd=workdir)
        try:
            watched.until("watching ")
        finally:
            assert watched.stop() == 0
    else:
        done = linkcrm(*args, cwd=workdir)
        assert done.returncode == 0, done.stdout + done.stderr
    after = {p.name: p.read_bytes() for p in (workdir / "rules").iterdir() if p.is_file()}
    assert after == before  # the shipped tests pass: --update has nothing to rewrite


def test_the_coverage_sample_is_what_coverage_prints(workdir: Path) -> None:
    assert SAMPLE is not None
    printed = linkcrm("test", "rules/", "--coverage", cwd=workdir).stdout.splitlines()
    shown = [line for line in SAMPLE.group(1).splitlines() if line.strip() != "..."]
    assert shown and all(line in printed for line in shown), (shown, printed)
