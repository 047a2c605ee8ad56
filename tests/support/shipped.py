"""The shipped rules' own tests, counted from their files, so a test of a command's summary
line does not break each time a rule test is added to rules/."""

from __future__ import annotations

from typing import Any

import yaml

from tests.support.paths import REPO


def shipped_cases() -> int:
    """How many rule-test cases the *_test.yaml files in rules/ hold."""
    total = 0
    for path in sorted((REPO / "rules").glob("*_test.yaml")):
        document: Any = yaml.safe_load(path.read_text(encoding="utf-8"))
        total += len(document["cases"])
    return total


SHIPPED_CASES = shipped_cases()
