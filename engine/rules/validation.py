"""`linkcrm validate`: every problem in rule files, the field map and rule tests, sorted."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from engine.errors import Problem
from engine.rules.files import check_rules, discover
from engine.rules.ruletests import check_test_files


def check_paths(paths: Iterable[str | Path]) -> list[Problem]:
    sources = discover(list(paths))
    _, problems = check_rules(sources)
    problems.extend(check_test_files(sources.test_files))
    return sorted(problems, key=Problem.sort_key)
