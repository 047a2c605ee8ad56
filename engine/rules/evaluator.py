"""Event + rules -> action plan. Pure and deterministic: no clock, no I/O, no randomness.

`plan(event, ruleset)` says which rules matched, why each other rule did not, the planned
actions in rule order, and the actions that failed to evaluate (a run-time JMESPath type error,
an identity that is entirely null). A failed action never hides the others.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from jmespath.exceptions import JMESPathError

from engine.actions import JSON, Action, IdentityKey
from engine.config.links import link_of_event
from engine.rules.expressions import Expression
from engine.rules.model import ActionTemplate, Rule, RuleSet, Skip


@dataclass(frozen=True)
class ActionFailure:
    """An action that could not be planned; `message` names rule, action and expression."""

    rule: str
    action: str
    index: int
    message: str

    def as_dict(self) -> dict[str, JSON]:
        return {"rule": self.rule, "action": self.action, "index": self.index,
                "error": self.message}


@dataclass(frozen=True)
class Plan:
    event_type: str
    matched: tuple[str, ...]
    skipped: tuple[Skip, ...]
    actions: tuple[Action, ...]
    failures: tuple[ActionFailure, ...] = field(default=())

    def as_dict(self, event: JSON = None) -> dict[str, JSON]:
        return {
            "event": event,
            "matched": list(self.matched),
            "skipped": [{"rule": s.rule, "reason": s.reason} for s in self.skipped],
            "actions": [a.as_dict() for a in self.actions],
            "errors": [f.as_dict() for f in self.failures],
        }


class _ActionError(Exception):
    pass


def _is_false(value: object) -> bool:
    # JMESPath truthiness: false, null, "", [], {} are false; 0 is true.
    return value is None or value is False or value == "" or value == [] or value == {}


# JMESPath's own interpreter lets Python's TypeError/ValueError escape for some type mismatches
# (`'a' < `1``, a zero slice step); they fail the action like any JMESPath error.
EVALUATION_ERRORS = (JMESPathError, TypeError, ValueError)


def _search(expression: Expression, event: Any, what: str) -> Any:
    try:
        return expression.search(event)
    except EVALUATION_ERRORS as error:
        raise _ActionError(f"{what}: {expression.source!r} failed: {error}") from None


def _identity(template: ActionTemplate, event: Any) -> tuple[IdentityKey, ...]:
    keys = []
    for name, expression in template.identity:
        value = _search(expression, event, f"identity {name}")
        if value is None or value == "":
            continue
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise _ActionError(f"identity {name}: {expression.source!r} gave "
                               f"{type(value).__name__} {value!r}, expected text")
        keys.append(IdentityKey(name, value if isinstance(value, str) else str(value)))
    if not keys:
        sources = ", ".join(f"{n}: {e.source}" for n, e in template.identity)
        raise _ActionError(f"identity is entirely null ({sources})")
    return tuple(keys)


def _fields(templates: tuple[tuple[str, Expression], ...], event: Any) -> dict[str, JSON]:
    values = {}
    for name, expression in templates:
        value = _search(expression, event, name)
        # null and "" leave the CRM field untouched: never clear a value by accident.
        if value is not None and value != "":
            values[name] = value
    return values


def _scalar(name: str, expression: Expression, event: Any) -> JSON:
    value = _search(expression, event, name)
    if name == "amount":
        if value is None or value == "":
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _ActionError(f"amount: {expression.source!r} gave {value!r}, expected a number")
        return value
    if value is None or value == "":
        raise _ActionError(f"{name}: {expression.source!r} evaluated to {value!r}")
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise _ActionError(f"{name}: {expression.source!r} gave {type(value).__name__} "
                           f"{value!r}, expected text")
    return value if isinstance(value, str) else str(value)


def plan_action(rule: Rule, template: ActionTemplate, event: Any) -> Action:
    """Evaluate one action template; raises EvaluationError-worthy `_ActionError`."""
    kwargs: dict[str, Any] = {"rule": rule.name, "identity": _identity(template, event)}
    for map_name, templates in template.fields:
        kwargs[map_name] = _fields(templates, event)
    for name, expression in template.expressions:
        kwargs[name] = _scalar(name, expression, event)
    if template.stage is not None:
        kwargs["stage"] = template.stage
    return template.kind(**kwargs)


def plan(event: Any, ruleset: RuleSet) -> Plan:
    """The action plan for one event envelope (`{"event", "timestamp", "data"}`). Rules also
    read `link` (the event's link, per-person or shared: `engine.config.links`), computed here
    unless the caller gives it (the worker does for identify events, with `touch`)."""
    if isinstance(event, dict) and "link" not in event:
        event = {**event, "link": link_of_event(event, ruleset.field_map.links)}
    event_type = event.get("event") if isinstance(event, dict) else None
    if not isinstance(event_type, str):
        event_type = ""
    listening, others = ruleset.dispatch(event_type)
    matched: list[str] = []
    skipped: list[Skip] = list(others)
    actions: list[Action] = []
    failures: list[ActionFailure] = []
    for rule in listening:
        if rule.when is not None:
            try:
                condition = rule.when.search(event)
            except EVALUATION_ERRORS as error:
                failures.append(ActionFailure(
                    rule.name, "when", -1,
                    f"rule {rule.name!r}, event {event_type}: when {rule.when.source!r} "
                    f"failed: {error}"))
                continue
            if _is_false(condition):
                skipped.append(Skip(rule.name, f"when {rule.when.source!r} was "
                                               f"{_describe(condition)}"))
                continue
        matched.append(rule.name)
        for template in rule.actions:
            try:
                actions.append(plan_action(rule, template, event))
            except _ActionError as error:
                failures.append(ActionFailure(
                    rule.name, template.kind.kind, template.index,
                    f"rule {rule.name!r}, action {template.index} ({template.kind.kind}), "
                    f"event {event_type}: {error}"))
    return Plan(event_type, tuple(matched), tuple(skipped), tuple(actions), tuple(failures))


def _describe(value: object) -> str:
    if value is None:
        return "null"
    if value is False:
        return "false"
    return repr(value)
