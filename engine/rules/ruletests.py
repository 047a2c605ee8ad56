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

A scenario case gives `events:` (each inline, or `{event_file: path}`) and `expect_state:`,
the embedded CRM's state after all of them (`engine.rules.scenarios`); the caller passes the
`replay` that applies the plans to the embedded CRM. `observe` sees every plan made (coverage).
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.actions import ACTIONS, JSON, Action, identity_as_dict
from engine.config.schemacheck import schema_problems
from engine.config.yamlsource import YamlDocument, YamlError, load_yaml
from engine.errors import Location, Problem
from engine.rules.evaluator import Plan, plan
from engine.rules.model import RuleSet
from engine.rules.scenarios import Replay, run_scenario

Observer = Callable[[Plan], None]


@dataclass(frozen=True)
class CaseResult:
    file: str
    name: str
    location: Location
    passed: bool
    diff: str = ""
    error: str = ""
    index: int = -1  # the case's position in `cases`; -1 for a file that does not load
    # What the rules produced, in the case's own shape (`expect` items or `expect_state`) and
    # the errors they gave: what `linkcrm test --update` writes back.
    actual: JSON = None
    actual_errors: tuple[str, ...] = field(default=())

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
    """Schema problems of rule-test files, plus event files that do not exist and
    expectations that do not fit the case (a plan in a scenario, a state beside one event)."""
    problems: list[Problem] = []
    for path in paths:
        document, found = _read(path)
        problems.extend(found)
        if document is None or found:
            continue
        for index, case in enumerate(document.data.get("cases", [])):
            problems.extend(_case_problems(document, path, index, case))
    return problems


def _case_problems(document: YamlDocument, path: Path, index: int,
                   case: dict[str, Any]) -> list[Problem]:
    problems = []
    files: list[tuple[tuple[str | int, ...], Any]] = [(("event_file",), case.get("event_file"))]
    files.extend(((("events", n, "event_file")), item.get("event_file"))
                 for n, item in enumerate(case.get("events", [])) if isinstance(item, dict))
    for where, event_file in files:
        if event_file and not (path.parent / event_file).is_file():
            problems.append(Problem(document.location(("cases", index, *where)),
                                    "missing-event-file", f"{event_file!r} does not exist",
                                    "event_file is relative to the test file",
                                    path=f"$.cases[{index}]" + "".join(
                                        f"[{p}]" if isinstance(p, int) else f".{p}"
                                        for p in where)))
    return problems + _misplaced(document, index, case)


def _misplaced(document: YamlDocument, index: int, case: dict[str, Any]) -> list[Problem]:
    """`expect:` in a scenario, or `expect_state:` beside a single event."""
    wrong = (("expect", "events", "a scenario (events:) checks expect_state:, the CRM's state "
              "after all its events; check one event's plan in a case of its own")
             if "events" in case else
             ("expect_state", "event_file" if "event_file" in case else "event",
              "expect_state: belongs to scenarios: give the events "
              "as a list under events:, or check this event's plan with expect:"))
    if wrong[0] not in case:
        return []
    return [Problem(document.location(("cases", index, wrong[0]), key=True),
                    "misplaced-expectation", f"{wrong[0]!r} does not go with {wrong[1]!r}",
                    wrong[2], path=f"$.cases[{index}].{wrong[0]}")]


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


def _as_expectation(action: Action, with_rule: bool) -> dict[str, JSON]:
    """An action in the test-file shape: defaults (empty maps, no amount) left out."""
    defaults = ACTIONS[action.kind](rule="", identity=()).payload()
    body: dict[str, JSON] = {"identity": identity_as_dict(action.identity)}
    body.update({k: v for k, v in action.payload().items() if v != defaults[k]})
    return {"rule": action.rule, action.kind: body} if with_rule else {action.kind: body}


def _errors_report(errors: Sequence[str], wanted: Sequence[str]) -> str:
    missing = [w for w in wanted if not any(w in e for e in errors)]
    unexpected = [e for e in errors if not any(w in e for w in wanted)]
    return "\n".join([f"expected an error containing {w!r}" for w in missing]
                     + [f"unexpected error: {e}" for e in unexpected])


def _run_plan_case(path: Path, index: int, case: dict[str, Any], location: Location,
                   ruleset: RuleSet, observe: Observer | None) -> CaseResult:
    event = _load_event(path.parent, case)
    result = plan(event, ruleset)
    if observe is not None:
        observe(result)
    expected = [_expected(item) for item in case["expect"]]
    diff = _compare(expected, result.actions, case.get("match") == "subset")
    errors = tuple(f.message for f in result.failures)
    report = _errors_report(errors, case.get("expect_errors", []))
    named = bool(case["expect"]) and all("rule" in item for item in case["expect"])
    actual: JSON = [_as_expectation(a, named) for a in result.actions]
    return CaseResult(str(path), case["name"], location, not diff and not report, diff, report,
                      index, actual, errors)


def _run_scenario_case(path: Path, index: int, case: dict[str, Any], location: Location,
                       ruleset: RuleSet, replay: Replay | None,
                       observe: Observer | None) -> CaseResult:
    if replay is None:
        return CaseResult(str(path), case["name"], location, False,
                          error="scenario cases need the embedded CRM; run them with "
                                "`linkcrm test`", index=index)
    events = [_load_event(path.parent, item) if "event_file" in item else item
              for item in case["events"]]
    result = run_scenario(events, case["expect_state"], case.get("match") == "subset",
                          ruleset, replay)
    if observe is not None:
        for each in result.plans:
            observe(each)
    report = _errors_report(result.errors, case.get("expect_errors", []))
    return CaseResult(str(path), case["name"], location, not result.diff and not report,
                      result.diff, report, index, result.actual, result.errors)


def run_test_file(path: Path, ruleset: RuleSet, replay: Replay | None = None,
                  observe: Observer | None = None) -> list[CaseResult]:
    document, problems = _read(path)
    if document is not None and not problems:
        problems = [p for index, case in enumerate(document.data["cases"])
                    for p in _misplaced(document, index, case)]
    if document is None or problems:
        return [CaseResult(str(path), "(file)", p.location, False, error=p.render())
                for p in problems]
    results = []
    for index, case in enumerate(document.data["cases"]):
        location = document.location(("cases", index))
        try:
            if "events" in case:
                results.append(_run_scenario_case(path, index, case, location, ruleset, replay,
                                                  observe))
            else:
                results.append(_run_plan_case(path, index, case, location, ruleset, observe))
        except (OSError, ValueError, YamlError) as error:
            results.append(CaseResult(str(path), case["name"], location, False,
                                      error=f"cannot read the event: {error}", index=index))
    return results


def run_tests(paths: Sequence[Path], ruleset: RuleSet, replay: Replay | None = None,
              observe: Observer | None = None) -> list[CaseResult]:
    """Every case of every test file; scenario cases replay into the CRM `replay` gives."""
    results: list[CaseResult] = []
    for path in paths:
        results.extend(run_test_file(path, ruleset, replay, observe))
    return results
