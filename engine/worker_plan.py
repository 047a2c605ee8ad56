"""From an inbox event to keyed work: the plan, idempotency keys and per-identity ordering keys."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from engine.actions import Action
from engine.evaluator import Plan, plan
from engine.rules import RuleSet
from engine.storage import InboxEvent


@dataclass(frozen=True)
class KeyedAction:
    """A planned action with its place in its rule and its idempotency key."""

    action: Action
    ordinal: int  # the how-manieth action of this kind within its rule (0-based)
    key: str

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


def idempotency_key(dedupe_key: str, action: Action, ordinal: int) -> str:
    """sha256 of the event's dedupe key, the rule name, the action kind, its ordinal among the
    rule's actions of that kind, and the identity.

    Field values, titles and stages are left out on purpose: editing them in a rule file and
    replaying keeps the key, so an action that already succeeded is not redone. The ordinal
    counts per kind so that adding an action of another kind to the rule shifts nothing.
    """
    identity = [[key.field, key.value] for key in action.identity]
    material = json.dumps([dedupe_key, action.rule, action.kind, ordinal, identity],
                          ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(material.encode("utf-8")).hexdigest()


def ordering_keys(target: str, actions: Iterable[KeyedAction]) -> list[str]:
    """One key per identity the actions touch on `target`: two events sharing one are applied
    to that target in arrival order. Hashed, so identities (emails) are not copied into one
    more table that `purge` would have to clean."""
    keys = {
        f"{target}:" + hashlib.sha256(f"{key.field}\0{key.value}".encode()).hexdigest()[:32]
        for keyed in actions for key in keyed.action.identity
    }
    return sorted(keys)


def prepare(event: InboxEvent, ruleset: RuleSet) -> Work:
    """Parse the stored raw body and plan it with the rules as they are now."""
    if event.body is None:
        return Work(None, (), "the raw body was purged; the event cannot be evaluated again")
    try:
        envelope: Any = json.loads(event.body)
    except ValueError as error:
        return Work(None, (), f"the stored body is not JSON: {error}")
    result = plan(envelope, ruleset)
    return Work(result, _keyed(event.dedupe_key, result, ruleset))


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
        keyed.append(KeyedAction(action, ordinal, idempotency_key(dedupe_key, action, ordinal)))
    return tuple(keyed)
