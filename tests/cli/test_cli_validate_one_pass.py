"""`linkcrm validate` reports schema and semantic problems in one run; warnings exit 0 unless
--strict."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from tests.support.paths import REPO, TESTS


def linkcrm(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=60, check=False)


def test_one_run_lists_schema_and_semantic_problems_together(tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    shutil.copytree(REPO / "rules", rules)
    text = (TESTS / "rulefiles" / "one_pass.yaml").read_text(encoding="utf-8")
    (rules / "broken.yaml").write_text(text.replace("install-creates-lead", "new-rule"),
                                       encoding="utf-8")
    result = linkcrm("validate", "rules", "--format", "json", cwd=tmp_path)
    assert result.returncode == 1
    problems = json.loads(result.stdout)["problems"]
    codes = [p["code"] for p in problems if p["file"] == "rules/broken.yaml"]
    assert codes == ["unknown-event", "unknown-key", "unknown-field", "expression-syntax",
                     "wrong-type", "unknown-stage", "deal-without-key", "unknown-function"]
    assert {p["rule"] for p in problems} == {"new-rule"}


def test_warnings_exit_0_and_fail_with_strict(tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    shutil.copytree(REPO / "rules", rules)
    shutil.copy(TESTS / "rulefiles" / "on_yes.yaml", rules / "extra.yaml")
    (rules / "extra.yaml").write_text((rules / "extra.yaml").read_text(encoding="utf-8")
                                      .replace("install-creates-lead", "yes-rule")
                                      .replace("'t'", "data.token"), encoding="utf-8")
    relaxed = linkcrm("validate", "rules", cwd=tmp_path)
    assert relaxed.returncode == 0, relaxed.stdout
    assert "unknown-event (warning): rule 'yes-rule' at $.rules[0].on: no event type 'yes'" \
        in relaxed.stdout
    assert relaxed.stdout.splitlines()[-1] == "1 warning in 1 file"
    assert linkcrm("validate", "--strict", "rules", cwd=tmp_path).returncode == 1
