"""Scenario rule tests: a sequence of events and the CRM state they must leave behind.

    - name: stages never move backwards
      events:
        - {event: referral.completed, timestamp: "2026-03-20T08:00:00Z", data: {token: t1}}
        - {event: install.tracked, timestamp: "2026-03-21T08:00:00Z", data: {token: t1}}
      expect_state:
        contacts:
          - identity: {deep_link_token: t1}
            stage: customer
            stage_history: [customer]

Each event is planned by the real planner; the plans are then applied, in order, to the
embedded CRM by a `Replay` the caller passes in (the `local` target on a scratch database:
`engine.cli.scenariocrm`), so set vs set_once, forward-only stages and one deal per key are
the embedded CRM's own rules, not a copy. The rule language knows no target or storage; this
module only plans, and compares the state the replay reports.

`match: exact` (the default) compares the whole state: every contact (oldest first) with its
identity, fields, stage and stage history, and every deal; a key left out means empty (no
fields, no stage). `match: subset` checks only the contacts (found by the identity keys given)
and deals (by key) listed, and only the keys and fields written.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from engine.actions import JSON, Action
from engine.config.fieldmap import FieldMap
from engine.rules.evaluator import Plan, plan
from engine.rules.model import RuleSet


@dataclass(frozen=True)
class ContactState:
    """A contact as a scenario sees it: identity keys (field -> value, or a list of values
    when one field holds several), fields, stage and the stages it moved through."""

    identity: Mapping[str, JSON]
    fields: Mapping[str, JSON]
    stage: str | None
    stage_history: tuple[str, ...]

    def as_dict(self) -> dict[str, JSON]:
        return {"identity": dict(self.identity), "fields": dict(self.fields),
                "stage": self.stage, "stage_history": list(self.stage_history)}


@dataclass(frozen=True)
class DealState:
    key: str
    title: str
    stage: str | None
    amount: float | None
    contact: Mapping[str, JSON] | None  # the linked contact's identity
    fields: Mapping[str, JSON]

    def as_dict(self) -> dict[str, JSON]:
        return {"key": self.key, "title": self.title, "stage": self.stage,
                "amount": self.amount,
                "contact": None if self.contact is None else dict(self.contact),
                "fields": dict(self.fields)}


@dataclass(frozen=True)
class CRMState:
    contacts: tuple[ContactState, ...]
    deals: tuple[DealState, ...]

    def as_dict(self) -> dict[str, JSON]:
        return {"contacts": [c.as_dict() for c in self.contacts],
                "deals": [d.as_dict() for d in self.deals]}


@dataclass(frozen=True)
class Replayed:
    """What a replay left: the CRM's state, and the errors of actions the CRM refused
    (each naming the event's position, e.g. `event 2: set_stage: ...`)."""

    state: CRMState
    errors: tuple[str, ...] = ()


# Applies each event's actions, in order, to a fresh embedded CRM and reports its state.
Replay = Callable[[Sequence[Sequence[Action]], FieldMap], Replayed]


@dataclass(frozen=True)
class ScenarioResult:
    plans: tuple[Plan, ...]
    diff: str
    errors: tuple[str, ...]
    actual: dict[str, JSON] = field(default_factory=dict)  # the state in the test-file shape


_CONTACT_DEFAULTS: dict[str, JSON] = {"fields": {}, "stage": None, "stage_history": []}
_DEAL_DEFAULTS: dict[str, JSON] = {"title": "", "stage": None, "amount": None, "contact": None,
                                   "fields": {}}


def run_scenario(events: Sequence[Any], expected: Mapping[str, Any], subset: bool,
                 ruleset: RuleSet, replay: Replay) -> ScenarioResult:
    """Plan every event, replay the plans into a fresh CRM, compare its state."""
    plans = tuple(plan(event, ruleset) for event in events)
    errors = [f"event {number}: {failure.message}"
              for number, result in enumerate(plans, 1) for failure in result.failures]
    replayed = replay([result.actions for result in plans], ruleset.field_map)
    errors.extend(replayed.errors)
    actual = shown_state(replayed.state)
    diff = compare_state(expected, replayed.state, subset)
    return ScenarioResult(plans, diff, tuple(errors), actual)


def shown_state(state: CRMState) -> dict[str, JSON]:
    """The state in the shape `expect_state` is written in, empty keys left out."""
    contacts: list[JSON] = [_trim(c.as_dict(), _CONTACT_DEFAULTS) for c in state.contacts]
    deals: list[JSON] = [_trim(d.as_dict(), _DEAL_DEFAULTS) for d in state.deals]
    shown: dict[str, JSON] = {"contacts": contacts}
    if deals:
        shown["deals"] = deals
    return shown


def _trim(values: dict[str, JSON], defaults: Mapping[str, JSON]) -> dict[str, JSON]:
    return {k: v for k, v in values.items() if k not in defaults or v != defaults[k]}


def compare_state(expected: Mapping[str, Any], state: CRMState, subset: bool) -> str:
    """A unified diff of expected against actual, or "" when they agree."""
    if subset:
        want, got = _subset_views(expected, state)
    else:
        want = _ordered({"contacts": [{**_CONTACT_DEFAULTS, **c}
                                      for c in expected.get("contacts", [])],
                         "deals": [{**_DEAL_DEFAULTS, **d} for d in expected.get("deals", [])]})
        got = _ordered(state.as_dict())
    if _normal(want) == _normal(got):
        return ""
    return "\n".join(difflib.unified_diff(_render(want), _render(got), "expected", "actual",
                                          lineterm=""))


_CONTACT_KEYS = ("identity", "fields", "stage", "stage_history")
_DEAL_KEYS = ("key", "title", "stage", "amount", "contact", "fields")


def _ordered(state: dict[str, Any]) -> dict[str, JSON]:
    """Both sides of an exact diff in one key order, fields sorted, so the diff shows only
    what differs."""
    def each(item: dict[str, Any], keys: tuple[str, ...]) -> JSON:
        known = {k: _sorted(item.get(k)) for k in keys if k in item}
        return {**known, **{k: v for k, v in item.items() if k not in keys}}

    return {"contacts": [each(c, _CONTACT_KEYS) for c in state["contacts"]],
            "deals": [each(d, _DEAL_KEYS) for d in state["deals"]]}


def _sorted(value: Any) -> Any:
    return dict(sorted(value.items())) if isinstance(value, dict) else value


def _subset_views(expected: Mapping[str, Any], state: CRMState
                  ) -> tuple[dict[str, JSON], dict[str, JSON]]:
    """Expected as written; actual cut down to the same contacts, deals, keys and fields."""
    want: dict[str, JSON] = {}
    got: dict[str, JSON] = {}
    if "contacts" in expected:
        contacts = [_owner(c.get("identity", {}), state) for c in expected["contacts"]]
        want["contacts"] = list(expected["contacts"])
        got["contacts"] = [_project(w, None if c is None else c.as_dict())
                           for w, c in zip(expected["contacts"], contacts, strict=True)]
    if "deals" in expected:
        by_key = {d.key: d for d in state.deals}
        want["deals"] = list(expected["deals"])
        deals: list[JSON] = []
        for wanted in expected["deals"]:
            deal = by_key.get(str(wanted.get("key")))
            deals.append(_project(wanted, None if deal is None else deal.as_dict()))
        got["deals"] = deals
    return want, got


def _owner(identity: Mapping[str, Any], state: CRMState) -> ContactState | None:
    """The contact holding every key of `identity` (the first, oldest, if several do)."""
    for contact in state.contacts:
        if all(_holds(contact.identity.get(k), v) for k, v in identity.items()):
            return contact
    return None


def _holds(values: JSON, wanted: Any) -> bool:
    wanted_values = wanted if isinstance(wanted, list) else [wanted]
    have = values if isinstance(values, list) else [values]
    return all(str(w) in have for w in wanted_values)


def _project(wanted: Mapping[str, Any], actual: dict[str, JSON] | None) -> JSON:
    """`actual` with only the keys of `wanted` (and only the fields it lists); None stays."""
    if actual is None:
        return None
    projected: dict[str, JSON] = {}
    for key, value in wanted.items():
        have = actual.get(key)
        if key == "fields" and isinstance(value, dict) and isinstance(have, dict):
            have = {name: have.get(name) for name in value}
        elif key in ("identity", "contact") and isinstance(value, dict) and isinstance(
                have, dict):
            # A key given is one the record holds (a field may hold several values).
            have = {name: wanted if _holds(have.get(name), wanted) else have.get(name)
                    for name, wanted in value.items()}
        projected[key] = have
    return projected


def _normal(value: Any) -> str:
    """Compared as JSON text, every number as a float (an amount of 10 is 10.0)."""
    return json.dumps(_floats(value), sort_keys=True, default=str)


def _floats(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _floats(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_floats(v) for v in value]
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return value


def _render(value: JSON) -> list[str]:
    return json.dumps(value, indent=2, default=str).splitlines()
