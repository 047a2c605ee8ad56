"""Compiled rules: what the rule-file loader produces and the evaluator runs."""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from engine.actions import Action
from engine.config.fieldmap import FieldMap
from engine.errors import Location
from engine.rules.expressions import Expression

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
class Skip:
    """A rule that did not act on an event, and why."""

    rule: str
    reason: str


Dispatch = tuple[tuple[Rule, ...], tuple[Skip, ...]]

_DISPATCH_CACHE_LIMIT = 1024  # event types are few; a flood of made-up ones is not cached


@dataclass(frozen=True)
class RuleSet:
    rules: tuple[Rule, ...]
    field_map: FieldMap
    files: tuple[str, ...] = ()
    # The rule-set version (`engine.rules.versions`) when the loader knows it.
    version: str | None = None
    _dispatch: dict[str, Dispatch] = field(default_factory=dict, compare=False, repr=False)

    def rule(self, name: str) -> Rule | None:
        return next((r for r in self.rules if r.name == name), None)

    def dispatch(self, event_type: str) -> Dispatch:
        """The rules listening to `event_type`, in file order, and a `Skip` for each of the
        others; computed once per event type (a plan shares them: they are immutable)."""
        cached = self._dispatch.get(event_type)
        if cached is not None:
            return cached
        listening = tuple(r for r in self.rules if r.listens_to(event_type))
        others = tuple(
            Skip(r.name, f"listens to {', '.join(r.on)}, not {event_type or 'this event'}")
            for r in self.rules if r not in listening
        )
        result = (listening, others)
        if len(self._dispatch) < _DISPATCH_CACHE_LIMIT:
            self._dispatch[event_type] = result
        return result
