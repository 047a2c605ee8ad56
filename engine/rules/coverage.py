"""Rule-test coverage: which rules, `when` branches and actions the tests exercised.

    coverage = Coverage(ruleset)
    run_tests(files, ruleset, replay, observe=coverage.observe)
    report = coverage.report()          # report.percent, report.as_dict(), render_text(report)

Counted items, per rule: the rule fired (matched an event); its `when` was false for an event
it listens to (when it has a `when`); each of its actions was planned. Beside them: the field
map's fields no rule writes (`set`/`set_once` of any action), and the fields rules write that
no test ever saw written.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from engine.actions import JSON
from engine.rules.evaluator import Plan
from engine.rules.model import Rule, RuleSet


@dataclass(frozen=True)
class ActionCoverage:
    index: int
    kind: str
    line: int
    planned: int

    def as_dict(self) -> dict[str, JSON]:
        return {"index": self.index, "action": self.kind, "line": self.line,
                "planned": self.planned}


@dataclass(frozen=True)
class RuleCoverage:
    name: str
    line: int
    fired: int
    when_false: int | None  # None: the rule has no `when`
    actions: tuple[ActionCoverage, ...]

    @property
    def items(self) -> tuple[bool, ...]:
        """Each counted item, covered or not: fired, when-false (if any), each action."""
        branch = () if self.when_false is None else (self.when_false > 0,)
        return (self.fired > 0, *branch, *(a.planned > 0 for a in self.actions))

    def as_dict(self) -> dict[str, JSON]:
        return {"rule": self.name, "line": self.line, "fired": self.fired,
                "when_false": self.when_false,
                "actions": [a.as_dict() for a in self.actions]}


@dataclass(frozen=True)
class FileCoverage:
    file: str
    rules: tuple[RuleCoverage, ...]

    @property
    def covered(self) -> int:
        return sum(sum(r.items) for r in self.rules)

    @property
    def total(self) -> int:
        return sum(len(r.items) for r in self.rules)

    def as_dict(self) -> dict[str, JSON]:
        return {"file": self.file, "covered": self.covered, "total": self.total,
                "percent": _percent(self.covered, self.total),
                "rules": [r.as_dict() for r in self.rules]}


@dataclass(frozen=True)
class CoverageReport:
    files: tuple[FileCoverage, ...]
    unwritten_fields: tuple[str, ...]  # in the field map, written by no rule
    untested_fields: tuple[str, ...]  # written by a rule, by no action a test planned

    @property
    def covered(self) -> int:
        return sum(f.covered for f in self.files)

    @property
    def total(self) -> int:
        return sum(f.total for f in self.files)

    @property
    def percent(self) -> float:
        return _percent(self.covered, self.total)

    def as_dict(self) -> dict[str, JSON]:
        return {"covered": self.covered, "total": self.total, "percent": self.percent,
                "files": [f.as_dict() for f in self.files],
                "unwritten_fields": list(self.unwritten_fields),
                "untested_fields": list(self.untested_fields)}


def _percent(covered: int, total: int) -> float:
    return 100.0 if total == 0 else round(100.0 * covered / total, 1)


class Coverage:
    """Counts what the plans it observes exercised, against the rule set's rules."""

    def __init__(self, ruleset: RuleSet) -> None:
        self.ruleset = ruleset
        self.fired: Counter[str] = Counter()
        self.when_false: Counter[str] = Counter()
        self.planned: Counter[tuple[str, int]] = Counter()
        self.written: set[str] = set()

    def observe(self, result: Plan) -> None:
        failed = {(f.rule, f.index) for f in result.failures}
        when_failed = {f.rule for f in result.failures if f.action == "when"}
        matched = set(result.matched)
        for rule in self.ruleset.rules:
            if rule.name in matched:
                self.fired[rule.name] += 1
                for template in rule.actions:
                    if (rule.name, template.index) not in failed:
                        self.planned[(rule.name, template.index)] += 1
            elif (rule.when is not None and rule.name not in when_failed
                  and rule.listens_to(result.event_type)):
                self.when_false[rule.name] += 1
        for action in result.actions:
            for map_name in action.field_maps:
                self.written.update(getattr(action, map_name))

    def _rule(self, rule: Rule) -> RuleCoverage:
        return RuleCoverage(
            rule.name, rule.location.line, self.fired[rule.name],
            None if rule.when is None else self.when_false[rule.name],
            tuple(ActionCoverage(t.index, t.kind.kind, t.location.line,
                                 self.planned[(rule.name, t.index)]) for t in rule.actions))

    def report(self) -> CoverageReport:
        by_file: dict[str, list[RuleCoverage]] = {}
        for rule in self.ruleset.rules:
            by_file.setdefault(rule.location.file, []).append(self._rule(rule))
        written_by_rules = {name for rule in self.ruleset.rules for template in rule.actions
                            for _, templates in template.fields for name, _ in templates}
        fields = self.ruleset.field_map.fields
        return CoverageReport(
            tuple(FileCoverage(file, tuple(rules)) for file, rules in by_file.items()),
            tuple(name for name in fields if name not in written_by_rules),
            tuple(name for name in fields
                  if name in written_by_rules and name not in self.written))


def render_text(report: CoverageReport) -> list[str]:
    """Per rule file, per rule: what fired and what never did; then the fields."""
    lines = []
    for file in report.files:
        lines.append(f"{file.file}: {file.covered}/{file.total} "
                     f"({file.as_dict()['percent']}%)")
        for rule in file.rules:
            mark = "ok " if all(rule.items) else "-- "
            lines.append(f"  {mark}{rule.name} (line {rule.line}): " + _rule_words(rule))
            for action in rule.actions:
                if not action.planned:
                    lines.append(f"       never planned: action {action.index} "
                                 f"({action.kind}, line {action.line})")
    if report.unwritten_fields:
        lines.append("fields no rule writes: " + ", ".join(report.unwritten_fields))
    if report.untested_fields:
        lines.append("fields rules write but no test saw written: "
                     + ", ".join(report.untested_fields))
    lines.append(f"coverage: {report.covered}/{report.total} ({report.percent}%)")
    return lines


def _rule_words(rule: RuleCoverage) -> str:
    words = [f"fired {rule.fired}x" if rule.fired else "never fired"]
    if rule.when_false is not None:
        words.append(f"when false {rule.when_false}x" if rule.when_false
                     else "when never false")
    return ", ".join(words)
