"""Rule tests (`rules/*_test.yaml`): an event and the action plan the rules must produce.

    version: 1
    cases:
      - name: install creates a lead
        event: {event: install.tracked, timestamp: "2026-03-01T12:00:00Z", data: {token: t1}}
        expect:
          - upsert_contact: {identity: {deep_link_token: t1}, set: {...}, set_once: {...}}
          - set_stage: {identity: {deep_link_token: t1}, stage: lead}

`match: subset` checks only that the listed actions appear, in order. A failure names the
case's `file:line` and shows a diff of expected against actual.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.actions import ACTIONS, JSON, Action
from engine.config.schemacheck import schema_problems
from engine.config.yamlsource import YamlDocument, YamlError, load_yaml
from engine.errors import Location, Problem
from engine.rules.evaluator import plan
from engine.rules.model import RuleSet


@dataclass(frozen=True)
class CaseResult:
    file: str
    name: str
    location: Location
    passed: bool
    diff: str = ""
    error: str = ""

    def as_dict(self) -> dict[str, JSON]:
        return {"file": self.file, "line": self.location.line, "name": self.name,
                "passed": self.passed, "diff": self.diff or None, "error": self.error or None}


def _read(path: Path) -> tuple[YamlDocument | None, list[Problem]]:
    try:
        document = load_yaml(path.read_text(encoding="utf-8"), str(path))
    except YamlError as error:
        return None, [Problem(error.location, "yaml-syntax", error.message, error.hint)]
    except (OSError, UnicodeDecodeError) as error:
        return None, [Problem(Location(str(path)), "unreadable", str(error))]
    return document, schema_problems(document, "rule-tests.schema.json")


def check_test_files(paths: Sequence[Path]) -> list[Problem]:
    """Schema problems of rule-test files, plus expectations naming unknown actions."""
    problems: list[Problem] = []
    for path in paths:
        document, found = _read(path)
        problems.extend(found)
        if document is None or found:
            continue
        for index, case in enumerate(document.data.get("cases", [])):
            event_file = case.get("event_file")
            if event_file and not (path.parent / event_file).is_file():
                problems.append(Problem(document.location(("cases", index, "event_file")),
                                        "missing-event-file", f"{event_file!r} does not exist",
                                        "event_file is relative to the test file",
                                        path=f"$.cases[{index}].event_file"))
    return problems


def _load_event(base: Path, case: dict[str, Any]) -> Any:
    if "event" in case:
        return case["event"]
    path = base / case["event_file"]
    text = path.read_text(encoding="utf-8")
    return json.loads(text) if path.suffix == ".json" else load_yaml(text, str(path)).data


def _expected(item: dict[str, Any]) -> dict[str, JSON]:
    """An expectation in the rule-file shape -> the `Action.as_dict()` shape (defaults filled)."""
    rule = item.get("rule")
    ((kind, body),) = ((k, v) for k, v in item.items() if k != "rule")
    defaults = {k: v for k, v in ACTIONS[kind](rule="", identity=()).payload().items()}
    result: dict[str, JSON] = {"action": kind, "identity": body.get("identity", {})}
    result.update({k: body.get(k, v) for k, v in defaults.items()})
    if rule is not None:
        result = {"rule": rule, **result}
    return result


def _actual(action: Action, with_rule: bool) -> dict[str, JSON]:
    shown = action.as_dict()
    if not with_rule:
        shown.pop("rule")
    return shown


def _render(items: list[dict[str, JSON]]) -> list[str]:
    return json.dumps(items, indent=2, sort_keys=False).splitlines()


def _compare(expected: list[dict[str, JSON]], actions: Sequence[Action],
             subset: bool) -> str:
    with_rule = [("rule" in e) for e in expected]
    if subset:
        position = 0
        for want, named in zip(expected, with_rule, strict=True):
            while position < len(actions) and _actual(actions[position], named) != want:
                position += 1
            if position == len(actions):
                break
            position += 1
        else:
            return ""
    named_all = all(with_rule) if with_rule else False
    actual = [_actual(a, named_all) for a in actions]
    if not subset and actual == expected:
        return ""
    if not subset and not named_all and any(with_rule):
        actual = [a.as_dict() if i < len(with_rule) and with_rule[i] else _actual(a, False)
                  for i, a in enumerate(actions)]
        if actual == expected:
            return ""
    return "\n".join(difflib.unified_diff(_render(expected), _render(actual),
                                          "expected", "actual", lineterm=""))


def run_test_file(path: Path, ruleset: RuleSet) -> list[CaseResult]:
    document, problems = _read(path)
    if document is None or problems:
        return [CaseResult(str(path), "(file)", p.location, False, error=p.render())
                for p in problems]
    results = []
    for index, case in enumerate(document.data["cases"]):
        location = document.location(("cases", index))
        name = case["name"]
        try:
            event = _load_event(path.parent, case)
        except (OSError, ValueError, YamlError) as error:
            results.append(CaseResult(str(path), name, location, False,
                                      error=f"cannot read the event: {error}"))
            continue
        result = plan(event, ruleset)
        expected = [_expected(item) for item in case["expect"]]
        diff = _compare(expected, result.actions, case.get("match") == "subset")
        errors = [f.message for f in result.failures]
        wanted = case.get("expect_errors", [])
        missing = [w for w in wanted if not any(w in e for e in errors)]
        unexpected = [e for e in errors if not any(w in e for w in wanted)]
        report = "\n".join([f"expected an error containing {w!r}" for w in missing]
                           + [f"unexpected error: {e}" for e in unexpected])
        results.append(CaseResult(str(path), name, location, not diff and not report, diff,
                                  report))
    return results


def run_tests(paths: Sequence[Path], ruleset: RuleSet) -> list[CaseResult]:
    results: list[CaseResult] = []
    for path in paths:
        results.extend(run_test_file(path, ruleset))
    return results
