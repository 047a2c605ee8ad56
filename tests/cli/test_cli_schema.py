"""`linkcrm schema` through the real command line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from tests.support.paths import REPO


def linkcrm(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=60, check=False)


def test_writes_the_schema_beside_the_field_map(tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    shutil.copytree(REPO / "rules", rules)
    result = linkcrm("schema", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "wrote rules/rules.schema.json; make it a rule file's first line to use it:",
        "# yaml-language-server: $schema=rules.schema.json"]
    schema = json.loads((rules / "rules.schema.json").read_text(encoding="utf-8"))
    assert schema["$defs"]["contact_stage"]["enum"] == ["lead", "customer"]
    # The written schema is not taken for a rule file, and the rules still validate.
    assert linkcrm("validate", "--strict", "rules", cwd=tmp_path).returncode == 0


def test_output_to_stdout_and_refusal_of_a_broken_field_map(tmp_path: Path) -> None:
    printed = linkcrm("schema", "rules", "--output", "-")
    assert printed.returncode == 0
    assert json.loads(printed.stdout)["$id"].endswith("rules.generated.schema.json")
    (tmp_path / "fields.yaml").write_text("version: 1\nfields: {}\n", encoding="utf-8")
    broken = linkcrm("schema", str(tmp_path))
    assert broken.returncode == 1
    assert "missing-key" in broken.stderr and "has errors" in broken.stderr


def test_eval_and_schema_have_help_with_an_example() -> None:
    for command in ("eval", "schema"):
        result = linkcrm(command, "--help")
        assert result.returncode == 0
        assert "Example:" in result.stdout and f"linkcrm {command}" in result.stdout
