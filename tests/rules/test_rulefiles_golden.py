"""Golden cases: each bad rule file (or folder of files) and the exact report it must get.

`tests/rulefiles/<case>.yaml` (or `<case>/`) is checked against `tests/rulefiles/fields.yaml`;
the report must equal `<case>.txt`. Each expected file was read and checked by hand; regenerate
with `LINKCRM_UPDATE_GOLDEN=1 pytest tests/rules/test_rulefiles_golden.py` only to review the diff.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from engine.errors import Problem
from engine.rules.files import Sources, check_rules
from tests.support.paths import TESTS

HERE = TESTS / "rulefiles"
CASES = sorted(p for p in HERE.iterdir() if p.suffix == ".yaml" and p.name != "fields.yaml"
               or p.is_dir())


def report(case: Path) -> str:
    files = sorted(case.glob("*.yaml")) if case.is_dir() else [case]
    sources = Sources(rule_files=[f.relative_to(HERE) for f in files],
                      field_map=Path("fields.yaml"))
    _, problems = check_rules(sources)
    return "\n".join(p.render() for p in sorted(problems, key=Problem.sort_key)) + "\n"


@pytest.mark.parametrize("case", CASES, ids=lambda p: p.stem)
def test_golden_report(case: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(HERE)
    actual = report(case)
    expected_file = HERE / f"{case.stem}.txt"
    if os.environ.get("LINKCRM_UPDATE_GOLDEN"):
        expected_file.write_text(actual, encoding="utf-8")
    assert actual == expected_file.read_text(encoding="utf-8")


def test_there_are_at_least_thirty_five_distinct_cases() -> None:
    # 20 cases, then 17 for issue 11 (mistakes that passed or misled); the set only grows.
    assert len(CASES) >= 35
    assert all((HERE / f"{c.stem}.txt").is_file() for c in CASES)
