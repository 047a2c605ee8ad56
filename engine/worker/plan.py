"""From an inbox event to keyed work: the plan, idempotency keys and per-identity ordering keys."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

from engine.actions import TOUCHED, Action, identity_digest
from engine.errors import where
from engine.rules.evaluator import ActionFailure, Plan, plan
from engine.rules.model import RuleSet
from engine.storage import InboxEvent
from engine.storage.values import MAX_KEY_CHARS, json_problem, number_problem, text_problem

log = logging.getLogger("engine.worker.loop")


@dataclass(frozen=True)
class KeyedAction:
    """A planned action with its place in its rule and its idempotency key."""

    action: Action
    ordinal: int  # the how-manieth action of this kind within its rule (0-based)
    key: str
    rules_version: str | None = None  # the rule-set version that planned it

    def describe(self) -> str:
        return f"rule {self.action.rule!r}, {self.action.kind} #{self.ordinal}"


@dataclass(frozen=True)
class Work:
    """What the worker does for one event. `error` is set when the event cannot be planned at
    all (its raw body was purged or is not JSON); `plan` is None then."""

    plan: Plan | None
    actions: tuple[KeyedAction, ...]
    error: str | None = None

    @property
    def failures(self) -> list[str]:
        return [failure.message for failure in self.plan.failures] if self.plan else []


# The JSON string quoting that `json.dumps(..., ensure_ascii=False)` itself uses (the C one).
_quote = json.encoder.encode_basestring


def idempotency_key(dedupe_key: str, action: Action, ordinal: int) -> str:
    """sha256 of the event's dedupe key, the rule name, the action kind, its ordinal among the
    rule's actions of that kind, and the identity.

    Field values, titles and stages are left out on purpose: editing them in a rule file and
    replaying keeps the key, so an action that already succeeded is not redone. The ordinal
    counts per kind so that adding an action of another kind to the rule shifts nothing.

    The material is the compact JSON text (no ASCII escaping) of `[dedupe_key, rule, kind,
    ordinal, [[field, value], ...]]`, written out here: half the time of the encoder.
    """
    identity = ",".join([f"[{_quote(key.field)},{_quote(key.value)}]" for key in action.identity])
    material = (f"[{_quote(dedupe_key)},{_quote(action.rule)},{_quote(action.kind)},"
                f"{ordinal:d},[{identity}]]")
    # surrogatepass: a key exists for any text (valid text encodes exactly as plain UTF-8).
    return hashlib.sha256(material.encode("utf-8", "surrogatepass")).hexdigest()


def ordering_keys(target: str, actions: Iterable[KeyedAction]) -> list[str]:
    """One key per identity the actions touch on `target`: two events sharing one are applied
    to that target in arrival order. Hashed, so identities (emails) are not copied into one
    more table that `purge` would have to clean."""
    keys = {identity_digest(target, key) for keyed in actions for key in keyed.action.identity}
    return sorted(keys)


def touched_keys(actions: Iterable[KeyedAction]) -> list[str]:
    """One key per identity the actions touch on any target (`engine.actions.TOUCHED`): kept
    after the event is done, so the delivery log finds the events that touched a person."""
    return sorted({identity_digest(TOUCHED, key) for keyed in actions
                   for key in keyed.action.identity})


def prepare(event: InboxEvent, ruleset: RuleSet,
            context: Mapping[str, Any] | None = None) -> Work:
    """Parse the stored raw body and plan it with the rules as they are now; `context` (an
    identify event's `link` and `touch`, from `engine.worker.attribution`) joins the envelope.

    Never raises: an event that cannot be planned at all gets `error` (it will be a dead
    letter), and an action holding a value that no store or CRM can take (see
    `engine.storage.values`) becomes one of the plan's failures, so one bad event can never
    stop the worker.
    """
    if event.body is None:
        return Work(None, (), "the raw body was purged; the event cannot be evaluated again")
    try:
        envelope: Any = json.loads(event.body)
    except RecursionError:
        return Work(None, (), "the stored body nests too deeply to be read (the receiver "
                              "refuses such bodies now); the event cannot be evaluated")
    except ValueError as error:
        return Work(None, (), f"the stored body is not JSON: {error}")
    if context and isinstance(envelope, dict):
        envelope = {**envelope, **context}
    try:
        result = _screen(plan(envelope, ruleset), ruleset)
        return Work(result, _keyed(event.dedupe_key, result, ruleset))
    except Exception as error:  # a bug or an input nobody foresaw: this event only
        # Type and place only: the message may quote event data.
        log.warning("an event could not be planned", extra={
            "event_id": event.id, "error_type": type(error).__name__, "where": where(error)})
        return Work(None, (), f"the event could not be planned: {type(error).__name__}: "
                              f"{error}")


def _screen(result: Plan, ruleset: RuleSet) -> Plan:
    """Move each action that holds a value no store or CRM can take into the plan's
    failures, under the index of the template it came from (so `_keyed` gives the others the
    same ordinals, and keys, as before)."""
    problems = [action_problem(action) for action in result.actions]
    if not any(problems):
        return result
    failed: dict[str, set[int]] = {}
    for failure in result.failures:
        failed.setdefault(failure.rule, set()).add(failure.index)
    kept: list[Action] = []
    failures = list(result.failures)
    indexes: dict[str, Iterator[int]] = {}
    for action, problem in zip(result.actions, problems, strict=True):
        if action.rule not in indexes:
            rule = ruleset.rule(action.rule)
            templates = rule.actions if rule is not None else ()
            indexes[action.rule] = iter([template.index for template in templates
                                         if template.index not in failed.get(action.rule, ())])
        index = next(indexes[action.rule], -1)
        if problem is None:
            kept.append(action)
            continue
        failures.append(ActionFailure(
            action.rule, action.kind, index,
            f"rule {action.rule!r}, action {index} ({action.kind}), event "
            f"{result.event_type}: {problem}: no store or CRM can take it; fix the value at "
            "its source, or map another field in the rule"))
    return replace(result, actions=tuple(kept), failures=tuple(failures))


def action_problem(action: Action) -> str | None:
    """What in a planned action no store or CRM can take, or None: a lone surrogate
    anywhere, a NUL in a key or name, a key longer than the identity map indexes, a number
    that is not finite, a value nested too deeply."""
    for key in action.identity:
        problem = text_problem(key.value, noun="key", limit=MAX_KEY_CHARS)
        if problem is not None:
            return f"identity {key.field} {problem}"
    for name, value in action.payload().items():
        if name in action.field_maps:
            found = json_problem(value)
            if found is not None:
                return f"{name}{found[0]} {found[1]}"
        elif isinstance(value, str):
            problem = text_problem(value, noun="key" if name == "key" else "name",
                                   limit=MAX_KEY_CHARS if name == "key" else None)
            if problem is not None:
                return f"{name} {problem}"
        elif isinstance(value, int | float) and not isinstance(value, bool):
            problem = number_problem(value)
            if problem is not None:
                return f"{name} {problem}"
    return None


def _keyed(dedupe_key: str, result: Plan, ruleset: RuleSet) -> tuple[KeyedAction, ...]:
    # Actions come rule by rule in template order, minus the templates that failed to
    # evaluate; the ordinal comes from the template list so a failure shifts nothing either.
    failed: dict[str, set[int]] = {}
    for failure in result.failures:
        failed.setdefault(failure.rule, set()).add(failure.index)
    slots: dict[str, list[int]] = {}
    for name in result.matched:
        rule = ruleset.rule(name)
        if rule is None:
            continue
        seen: dict[str, int] = {}
        ordinals = []
        for template in rule.actions:
            kind = template.kind.kind
            if template.index not in failed.get(name, set()):
                ordinals.append(seen.get(kind, 0))
            seen[kind] = seen.get(kind, 0) + 1
        slots[name] = ordinals
    keyed: list[KeyedAction] = []
    used: dict[str, int] = {}
    fallback: dict[tuple[str, str], int] = {}
    for action in result.actions:
        position = used.get(action.rule, 0)
        used[action.rule] = position + 1
        ordinals = slots.get(action.rule, [])
        if position < len(ordinals):
            ordinal = ordinals[position]
        else:  # a plan the rule set does not explain (never expected): count per kind
            ordinal = fallback.get((action.rule, action.kind), 0)
        fallback[(action.rule, action.kind)] = ordinal + 1
        keyed.append(KeyedAction(action, ordinal, idempotency_key(dedupe_key, action, ordinal),
                                 ruleset.version))
    return tuple(keyed)
