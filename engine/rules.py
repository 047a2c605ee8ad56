"""Compiled rules: what the rule-file loader produces and the evaluator runs."""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from engine.actions import Action
from engine.errors import Location
from engine.expressions import Expression
from engine.fieldmap import FieldMap

FieldTemplates = tuple[tuple[str, Expression], ...]


@dataclass(frozen=True)
class ActionTemplate:
    """One action of a rule, its expressions compiled; `kind` is the planned Action class.

    `fields` holds the field maps the action kind declares (`set`, `set_once`), `expressions`
    its scalar expressions (`key`, `title`, `amount`), `stage` its stage name when it has one.
    """

    kind: type[Action]
    index: int
    identity: FieldTemplates
    fields: tuple[tuple[str, FieldTemplates], ...]
    expressions: tuple[tuple[str, Expression], ...]
    stage: str | None
    location: Location


@dataclass(frozen=True)
class Rule:
    name: str
    description: str
    on: tuple[str, ...]
    when: Expression | None
    actions: tuple[ActionTemplate, ...]
    location: Location

    def listens_to(self, event_type: str) -> bool:
        return any(fnmatchcase(event_type, pattern) for pattern in self.on)


@dataclass(frozen=True)
class RuleSet:
    rules: tuple[Rule, ...]
    field_map: FieldMap
    files: tuple[str, ...] = ()

    def rule(self, name: str) -> Rule | None:
        return next((r for r in self.rules if r.name == name), None)
