"""Rule files -> `RuleSet`: discovery, YAML 1.2 parsing, schema and semantic checks.

Every problem is collected (never just the first), located at `file:line:col`, and given a
code and a hint; `load_ruleset` raises `ConfigError` when any is an error. Expressions are
compiled here, once, so a bad expression is a load error and never a run-time surprise.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from engine.actions import ACTIONS
from engine.config.fieldmap import FieldMap, FieldSpec, field_map_outline, load_field_map
from engine.config.schemacheck import json_path, schema_problems, suggest
from engine.config.yamlsource import Path as NodePath
from engine.config.yamlsource import YamlDocument, YamlError, load_yaml
from engine.errors import ConfigError, Location, Problem
from engine.rules.constants import constant_problem
from engine.rules.eventschemas import EventTypes, declares, known_types, siblings, types_for
from engine.rules.expressions import Expression, ExpressionError, compile_expression
from engine.rules.model import ActionTemplate, FieldTemplates, Rule, RuleSet
from engine.rules.nullcheck import nullable_arguments

FIELD_MAP_NAME = "fields.yaml"
TEST_SUFFIX = "_test"
# Event fixtures for rule tests and `explain` live here; they are events, not rule files.
EVENTS_FOLDER = "events"


@dataclass
class Sources:
    """The files a set of paths holds, sorted so output is stable."""

    rule_files: list[Path] = field(default_factory=list)
    test_files: list[Path] = field(default_factory=list)
    field_map: Path | None = None


def is_test_file(path: Path) -> bool:
    return path.stem.endswith(TEST_SUFFIX)


def discover(paths: Sequence[str | Path]) -> Sources:
    """Rule files, rule tests and the field map under `paths` (files or folders)."""
    sources = Sources()
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            candidates = sorted(p for p in path.rglob("*") if p.suffix in (".yaml", ".yml")
                                and EVENTS_FOLDER not in p.relative_to(path).parts[:-1])
            maps = [path / FIELD_MAP_NAME] if (path / FIELD_MAP_NAME).is_file() else []
        elif path.is_file():
            candidates = [path]
            sibling = path.parent / FIELD_MAP_NAME
            maps = [sibling] if sibling.is_file() else []
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
        for candidate in candidates:
            if candidate.name == FIELD_MAP_NAME:
                continue
            target = sources.test_files if is_test_file(candidate) else sources.rule_files
            if candidate not in target:
                target.append(candidate)
        if sources.field_map is None and maps:
            sources.field_map = maps[0]
    if sources.field_map is None and sources.test_files:
        sibling = sources.test_files[0].parent / FIELD_MAP_NAME
        sources.field_map = sibling if sibling.is_file() else None
    return sources


def load_ruleset(paths: Sequence[str | Path]) -> RuleSet:
    """Load the rules under `paths`; raise ConfigError listing every error."""
    ruleset, problems = check_rules(discover(paths))
    if ruleset is None or any(p.severity == "error" for p in problems):
        raise ConfigError(problems)
    return ruleset


def check_rules(sources: Sources) -> tuple[RuleSet | None, list[Problem]]:
    """Load what can be loaded and return it with every problem found (errors and warnings)."""
    problems: list[Problem] = []
    field_map: FieldMap | None = None
    if sources.field_map is None:
        where = sources.rule_files[0].parent if sources.rule_files else Path(".")
        problems.append(Problem(Location(str(where / FIELD_MAP_NAME)), "missing-field-map",
                                "no fields.yaml beside the rule files",
                                "the field map declares every canonical field and stage the "
                                "rules may use; copy rules/fields.yaml from linkcrm"))
    else:
        try:
            field_map = load_field_map(sources.field_map)
        except ConfigError as error:
            problems.extend(error.problems)
    # A field map with errors still names its fields and stages: check the rules against
    # that too (nothing loads until it is fixed), so no problem waits for a second run.
    checking = field_map or (field_map_outline(sources.field_map) if sources.field_map
                             else None)
    if not sources.rule_files:
        problems.append(Problem(Location(str(sources.field_map or ".")), "no-rules",
                                "no rule files found", "rule files are *.yaml files beside "
                                "fields.yaml, other than *_test.yaml"))
    loader = _Loader(checking)
    for path in sources.rule_files:
        loader.load_file(path)
    problems.extend(loader.problems)
    if field_map is None:
        return None, problems
    return RuleSet(tuple(loader.rules), field_map, tuple(map(str, sources.rule_files))), problems


class _Loader:
    def __init__(self, field_map: FieldMap | None) -> None:
        self.field_map = field_map
        self.rules: list[Rule] = []
        self.problems: list[Problem] = []
        self.seen: dict[str, Location] = {}

    def load_file(self, path: Path) -> None:
        file = str(path)
        try:
            document = load_yaml(path.read_text(encoding="utf-8"), file)
        except YamlError as error:
            self.problems.append(Problem(error.location, "yaml-syntax", error.message, error.hint))
            return
        except (OSError, UnicodeDecodeError) as error:
            self.problems.append(Problem(Location(file), "unreadable", str(error)))
            return
        data = document.data
        raw_rules = data.get("rules") if isinstance(data, dict) else None
        rules = raw_rules if isinstance(raw_rules, list) else []
        schema = [_name_rule(p, rules) for p in schema_problems(document, "rules.schema.json")]
        self.problems.extend(schema)
        # Schema and meaning in one pass: every part of a rule the schema accepts is checked
        # for meaning too, so fixing the schema errors never reveals a second round.
        broken = {p.path for p in schema}
        for index, raw in enumerate(rules):
            prefix = json_path(("rules", index))
            if isinstance(raw, dict):
                builder = _RuleBuilder(document, index, raw, self.field_map, broken).build()
                self.problems.extend(builder.problems)
                if builder.rule is not None and not _under(broken, prefix):
                    self.rules.append(builder.rule)
            self._note_name(raw, document, index)

    def _note_name(self, raw: Any, document: YamlDocument, index: int) -> None:
        name = raw.get("name") if isinstance(raw, dict) else None
        if not isinstance(name, str):
            return
        location = document.location(("rules", index, "name"))
        if name in self.seen:
            self.problems.append(Problem(location, "duplicate-rule",
                                         f"rule name {name!r} is already used",
                                         f"names are unique across all rule files; the first is "
                                         f"at {self.seen[name]}", rule=name,
                                         path=json_path(("rules", index, "name"))))
        else:
            self.seen[name] = location


_RULE_PATH = re.compile(r"^\$\.rules\[(\d+)\]")


def _name_rule(problem: Problem, rules: list[Any]) -> Problem:
    """A schema problem inside a rule names the rule, as semantic problems do."""
    match = _RULE_PATH.match(problem.path)
    if match is None or problem.rule or int(match.group(1)) >= len(rules):
        return problem
    raw = rules[int(match.group(1))]
    name = raw.get("name") if isinstance(raw, dict) else None
    return replace(problem, rule=name) if isinstance(name, str) and name else problem


def _under(broken: set[str], prefix: str) -> bool:
    """Whether any schema problem sits at `prefix` or inside it."""
    return any(b == prefix or b.startswith((prefix + ".", prefix + "[")) for b in broken)


class _RuleBuilder:
    """Compile one rule and check it against the field map and event schemas; parts the
    schema rejected (`broken` JSON paths) are left to the schema's own problems."""

    def __init__(self, document: YamlDocument, index: int, raw: dict[str, Any],
                 field_map: FieldMap | None, broken: set[str] | None = None) -> None:
        self.document, self.index, self.raw, self.field_map = document, index, raw, field_map
        self.broken = broken or set()
        name = raw.get("name")
        self.name: str = name if isinstance(name, str) else ""
        self.problems: list[Problem] = []
        on = raw.get("on")
        patterns = [on] if isinstance(on, str) else on if isinstance(on, list) else []
        self.on: tuple[str, ...] = tuple(p for p in patterns if isinstance(p, str))
        self.event_types = types_for(self.on) if self.on else EventTypes((), False)
        self.guarded: tuple[tuple[str, ...], ...] = ()
        self.rule: Rule | None = None

    def ok(self, path: NodePath) -> bool:
        """Whether the schema accepted the value at `path` (and everything inside it)."""
        return not _under(self.broken, json_path(path))

    def problem(self, path: NodePath, code: str, message: str, hint: str = "", *,
                location: Location | None = None, severity: str = "error",
                detail: str = "") -> None:
        self.problems.append(Problem(location or self.document.location(path), code, message,
                                     hint, "warning" if severity == "warning" else "error",
                                     rule=self.name, path=json_path(path), detail=detail))

    def build(self) -> _RuleBuilder:
        base: NodePath = ("rules", self.index)
        if self.on and self.ok((*base, "on")):
            self._check_on(base)
        when = None
        if isinstance(self.raw.get("when"), str) and self.ok((*base, "when")):
            when = self.expression((*base, "when"))
            self.guarded = when.root_paths() if when is not None else ()
        raw_actions = self.raw.get("actions")
        actions = [self.action((*base, "actions", i), item)
                   for i, item in enumerate(raw_actions if isinstance(raw_actions, list) else [])]
        if self.name and not any(p.severity == "error" for p in self.problems):
            self.rule = Rule(self.name, self.raw.get("description", ""), self.on, when,
                             tuple(a for a in actions if a is not None),
                             self.document.location(base))
        return self

    def _check_on(self, base: NodePath) -> None:
        single = isinstance(self.raw["on"], str)
        for i, pattern in enumerate(self.on):
            path = (*base, "on") if single else (*base, "on", i)
            if any(ch in pattern for ch in "*?[") or pattern in known_types():
                continue
            close = suggest(pattern, known_types())
            if not close.startswith("did you mean"):
                close = ("known event types: " + ", ".join(known_types()) + "; a glob such as "
                         "'referral.*' matches several")
            self.problem(path, "unknown-event", f"no event type {pattern!r} is known",
                         close + " (custom event types are fine; this is only a warning)",
                         severity="warning")

    def expression(self, path: NodePath) -> Expression | None:
        source = self.document.data
        for step in path:
            source = source[step]
        try:
            compiled = compile_expression(source)
        except ExpressionError as error:
            self.problem(path, error.code, error.message, error.hint,
                         location=self.document.expression_location(path, error.offset),
                         detail=error.caret)
            return None
        self._check_paths(path, compiled)
        self._check_nullable(path, compiled)
        return compiled

    def _check_nullable(self, path: NodePath, compiled: Expression) -> None:
        """Warn where a function that refuses null reads an event field that may be absent."""
        for found in nullable_arguments(compiled.source, self.guarded):
            field_text = ".".join(found.path)
            guard = (f"test it first: {field_text} && {found.function}(...)" if path[-1] == "when"
                     else f"add `when: {field_text}` to the rule so it applies only to events "
                     "that carry it")
            self.problem(path, "nullable-argument",
                         f"{found.function}() fails on every event without {field_text}: "
                         f"argument {found.position} must be {found.expected}, and a missing "
                         "field is null",
                         f"give a default with {field_text} || {found.default}, or {guard}",
                         severity="warning",
                         location=self.document.expression_location(path, found.offset),
                         detail=found.caret)

    def _check_paths(self, path: NodePath, compiled: Expression) -> None:
        types = self.event_types
        if not types.complete or not types.names:
            return
        for root_path in compiled.root_paths():
            if any(declares(t, root_path) for t in types.names):
                continue
            dotted = ".".join(root_path)
            if len(root_path) == 1:
                hint = (f"expressions read the event; to write the text {dotted!r} use the "
                        f"JMESPath literal \"'{dotted}'\"")
            else:
                hint = suggest(dotted, siblings(types.names, root_path))
            self.problem(path, "undeclared-path",
                         f"{compiled.source!r} reads {dotted!r}, which no event schema for "
                         f"{', '.join(types.names)} declares", hint, severity="warning")

    def field_templates(self, path: NodePath, values: Any, object_: str) -> FieldTemplates:
        compiled = []
        for name in values if isinstance(values, dict) else {}:
            if not self.ok((*path, name)):
                continue
            self._check_field(path, name, object_)
            expression = self.expression((*path, name))
            if expression is not None:
                compiled.append((name, expression))
                self._check_constant((*path, name), name, expression)
        return tuple(compiled)

    def _check_constant(self, path: NodePath, name: str, expression: Expression) -> None:
        """A constant must be a value the field can hold (its type, its options)."""
        if not expression.is_literal or self.field_map is None:
            return
        spec = self.field_map.fields.get(name)
        if spec is None:
            return
        found = constant_problem(spec, expression.literal_value)
        if found is not None:
            message, hint = found
            self.problem(path, "wrong-constant", message, hint)

    def _check_field(self, path: NodePath, name: str, object_: str | None) -> None:
        """`name` must be a field in the field map: a field of `object_`, or with `object_`
        None, a field marked identity."""
        if self.field_map is None:
            return
        fields = self.field_map.fields
        spec = fields.get(name)
        location = self.document.location((*path, name), key=True)
        if spec is None and object_ is None:
            self.problem((*path, name), "unknown-field",
                         f"identity field {name!r} is not in the field map",
                         suggest(name, [n for n, f in fields.items() if f.identity]),
                         location=location)
        elif spec is None:
            self.problem((*path, name), "unknown-field",
                         f"{name!r} is not a field in the field map",
                         suggest(name, fields) + f" (or declare it in "
                         f"{self.field_map.file})", location=location)
        elif object_ is None and not spec.identity:
            self.problem((*path, name), "not-identity-field",
                         f"{name!r} cannot identify a record",
                         "identity fields are unique in every CRM; mark it "
                         "identity: true in the field map only if it is",
                         location=location)
        elif object_ is not None and spec.object != object_:
            self.problem((*path, name), "wrong-object-field",
                         f"{name!r} is a {spec.object} field, not a {object_} field",
                         f"declare it with object: {object_} in the field map",
                         location=location)

    def identity(self, path: NodePath, raw: Any) -> FieldTemplates:
        keys = [raw] if isinstance(raw, dict) else list(raw) if isinstance(raw, list) else []
        templates: list[tuple[str, Expression]] = []
        for i, key in enumerate(keys):
            key_path = path if isinstance(raw, dict) else (*path, i)
            if not self.ok(key_path) or not isinstance(key, dict) or len(key) != 1:
                continue
            ((name, _),) = key.items()
            self._check_field(key_path, name, None)
            expression = self.expression((*key_path, name))
            if expression is not None:
                templates.append((name, expression))
        return tuple(templates)

    def stage(self, path: NodePath, name: str, deal: bool) -> None:
        if self.field_map is None:
            return
        stages = self.field_map.deal_stages if deal else self.field_map.contact_stages
        if all(s.name != name for s in stages):
            kind = "deal" if deal else "contact"
            self.problem(path, "unknown-stage", f"{name!r} is not a {kind} stage",
                         suggest(name, [s.name for s in stages]))

    def action(self, path: NodePath, item: Any) -> ActionTemplate | None:
        if not isinstance(item, dict) or len(item) != 1:
            return None
        ((yaml_name, body),) = item.items()
        if yaml_name not in ACTIONS or not isinstance(body, dict):
            return None
        kind = ACTIONS[yaml_name]
        body_path = (*path, yaml_name)
        identity = (self.identity((*body_path, "identity"), body["identity"])
                    if "identity" in body else ())
        object_ = "deal" if "key" in {f.name for f in fields(kind)} else "contact"
        field_sets: list[tuple[str, FieldTemplates]] = []
        for map_name in kind.field_maps:
            field_sets.append((map_name, self.field_templates((*body_path, map_name),
                                                              body.get(map_name) or {},
                                                              object_)))
        both = body.get("set"), body.get("set_once")
        if isinstance(both[0], dict) and isinstance(both[1], dict):
            for name in sorted(set(both[0]) & set(both[1])):
                self.problem((*body_path, "set_once", name), "set-and-set-once",
                             f"{name!r} is in both set and set_once",
                             "keep it in set to write it every time, or in set_once to keep "
                             "the first value", location=self.document.location(
                                 (*body_path, "set_once", name), key=True))
        scalars = []
        for key in ("key", "title", "amount"):
            if isinstance(body.get(key), str) and self.ok((*body_path, key)):
                expression = self.expression((*body_path, key))
                if expression is not None:
                    scalars.append((key, expression))
                if expression is not None and key == "amount" and expression.is_literal:
                    self._check_amount((*body_path, key), expression)
        stage = body.get("stage")
        if isinstance(stage, str) and self.ok((*body_path, "stage")):
            self.stage((*body_path, "stage"), stage, deal=object_ == "deal")
        return ActionTemplate(kind, path[-1] if isinstance(path[-1], int) else 0, identity,
                              tuple(field_sets), tuple(scalars),
                              stage if isinstance(stage, str) else None,
                              self.document.location(path))

    def _check_amount(self, path: NodePath, expression: Expression) -> None:
        found = constant_problem(_AMOUNT, expression.literal_value)
        if found is not None:
            self.problem(path, "wrong-constant", found[0].replace(
                "amount is a number", "a deal's amount is a number"), found[1])


_AMOUNT = FieldSpec("amount", "number", object="deal")
