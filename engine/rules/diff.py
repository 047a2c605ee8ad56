"""Two rule sets on the same recorded events: what changes, per rule, action and field.

`Differ(old, new)` plans each event under both rule sets (`add`) and counts, per rule, action
and field, the events whose plan changes, keeping a few examples of each change (`result`).
It holds counts and examples only, never the events, so any number of events streams through.
Pure: no storage, no clock, no output; the caller reads the events and says where each is from.

An action is found in both plans by its place: rule, kind and ordinal among the rule's actions
of that kind (as idempotency keys count them), so editing one action never shows as another.
What is compared of an action are its facets (`engine.rules.facets`): its identity, each field
it writes, its stage, key, title and amount, as the rules write them (`canonical`) or as one
CRM receives them (`target_lens(dialect)`).

    differ = Differ(old_rules, new_rules)
    for event in events:            # Recorded(ref="event 42", envelope={...}, id=42)
        differ.add(event)
    differ.result().changes[0].as_dict()["field"]        # 'set_once.first_touch_platform'

The two steps also stand alone: `Comparer(old, new).compare(envelope)` gives one event's
differences (`EventDiff`, storable as JSON: shadow mode records them per live event), and
`Tally` counts such differences, however they were found, into the same `DiffResult`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Any, Literal

from engine.actions import JSON, Action
from engine.config.fieldmap import FieldMap
from engine.rules.evaluator import Plan, plan
from engine.rules.facets import Failed, Lens, Slot, canonical, identity_json, public, same
from engine.rules.model import RuleSet

ChangeKind = Literal["new-action", "dropped-action", "starts-failing", "stops-failing",
                     "error-changed", "changed", "added", "removed"]
CHANGE_KINDS: tuple[ChangeKind, ...] = ("new-action", "dropped-action", "starts-failing",
                                        "stops-failing", "error-changed", "changed", "added",
                                        "removed")

WHEN = "when"  # the action name of a rule's `when` condition, which fails like an action


@dataclass(frozen=True)
class Recorded:
    """One recorded event: `ref` says where it is from ("event 42", "events.jsonl:17"),
    `envelope` is its parsed body (`{"event", "timestamp", "data"}`), `id` its inbox id."""

    ref: str
    envelope: Any
    id: int | None = None


Screen = Callable[[Action], str | None]
SlotKey = tuple[str, str, int]  # rule, action kind (or WHEN), ordinal among that kind


@dataclass
class Example:
    """One event that shows a change: the value before and after (null: not planned, not
    written; `{"error": ...}`: the action fails)."""

    ref: str
    id: int | None
    event_type: str
    identity: JSON
    before: JSON
    after: JSON

    def as_dict(self) -> dict[str, JSON]:
        return {"event": self.ref, "id": self.id, "event_type": self.event_type,
                "identity": self.identity, "before": self.before, "after": self.after}


@dataclass
class Change:
    """Events in which one rule's action (or one field of it) changes one way."""

    rule: str
    action: str
    ordinal: int
    field: str | None  # None: the action as a whole (planned, dropped, failing)
    kind: ChangeKind
    events: int = 0
    examples: list[Example] = dataclass_field(default_factory=list)

    @property
    def label(self) -> str:
        """`create_deal`, or `create_deal#2` for a rule's second action of that kind."""
        return self.action if self.ordinal == 0 else f"{self.action}#{self.ordinal + 1}"

    def as_dict(self) -> dict[str, JSON]:
        return {"rule": self.rule, "action": self.action, "ordinal": self.ordinal,
                "field": self.field, "change": self.kind, "events": self.events,
                "examples": [example.as_dict() for example in self.examples]}


@dataclass
class DiffResult:
    """`events` compared, `changed_events` among them; `uncompared`: events that could not be
    compared at all (an error nobody foresaw), with up to `examples` of them."""

    events: int
    changed_events: int
    changes: list[Change]
    uncompared: int = 0
    uncompared_examples: list[dict[str, JSON]] = dataclass_field(default_factory=list)


class _Row:
    """One change being counted; keeps up to `wanted` examples, distinct values first."""

    def __init__(self, change: Change, wanted: int) -> None:
        self.change = change
        self.wanted = wanted
        self.distinct: list[tuple[int, Example]] = []  # (the how-manieth offer, example)
        self.seen: set[str] = set()
        self.first: list[tuple[int, Example]] = []

    def offer(self, event: Recorded, event_type: str, identity: JSON, before: JSON,
              after: JSON) -> None:
        self.change.events += 1
        if len(self.distinct) >= self.wanted:
            return
        example = Example(event.ref, event.id, event_type, identity, before, after)
        try:
            signature = json.dumps([before, after], sort_keys=True, default=repr)
        except (ValueError, RecursionError):  # too deep to tell apart: count it as distinct
            signature = f"#{self.change.events}"
        if signature not in self.seen:
            self.seen.add(signature)
            self.distinct.append((self.change.events, example))
        elif len(self.first) < self.wanted:
            self.first.append((self.change.events, example))

    def finish(self) -> Change:
        """The change with its examples: every distinct before/after up to `wanted`, topped
        up with repeats, in the order the events came."""
        shown = self.distinct + self.first[:self.wanted - len(self.distinct)]
        self.change.examples = [example for _, example in sorted(shown, key=lambda s: s[0])]
        return self.change


class _Side:
    """One rule set, ready to turn plans into slots."""

    def __init__(self, ruleset: RuleSet, lens: Lens, screen: Screen | None) -> None:
        self.ruleset = ruleset
        self.by_name = {rule.name: rule for rule in ruleset.rules}
        self.lens = lens
        self.screen = screen

    def slots(self, result: Plan) -> dict[SlotKey, Slot]:
        found: dict[SlotKey, Slot] = {}
        failed: dict[tuple[str, int], str] = {}
        for failure in result.failures:
            if failure.index < 0:
                found[(failure.rule, WHEN, 0)] = Failed(failure.message)
            failed[(failure.rule, failure.index)] = failure.message
        by_rule: dict[str, list[Action]] = {}
        for action in result.actions:
            by_rule.setdefault(action.rule, []).append(action)
        field_map = self.ruleset.field_map
        for name in result.matched:
            rule = self.by_name.get(name)
            if rule is None:
                continue
            actions = iter(by_rule.get(name, ()))
            seen: dict[str, int] = {}
            for template in rule.actions:
                kind = template.kind.kind
                ordinal = seen.get(kind, 0)
                seen[kind] = ordinal + 1
                message = failed.get((name, template.index))
                slot: Slot
                if message is not None:
                    slot = Failed(message)
                else:
                    planned = next(actions, None)
                    if planned is None:  # a plan its rule set does not explain: never expected
                        continue
                    problem = self.screen(planned) if self.screen is not None else None
                    slot = (Failed(f"{problem}: no store or CRM can take it") if problem
                            else self.lens(planned, field_map))
                found[(name, kind, ordinal)] = slot
        return found


def _identity(*slots: Slot | None) -> JSON:
    for slot in slots:
        if isinstance(slot, dict):
            return identity_json(slot["identity"])
    return None


Found = tuple[SlotKey, str | None, ChangeKind, Any, Any]  # slot, field, kind, before, after


def _compare(old: dict[SlotKey, Slot], new: dict[SlotKey, Slot]) -> Iterator[Found]:
    for key in (*old, *(k for k in new if k not in old)):
        before, after = old.get(key), new.get(key)
        if isinstance(before, Failed) or isinstance(after, Failed):
            if isinstance(before, Failed) and isinstance(after, Failed):
                if before.message != after.message:
                    yield key, None, "error-changed", public(before), public(after)
            elif isinstance(after, Failed):
                yield key, None, "starts-failing", public(before), public(after)
            else:
                yield key, None, "stops-failing", public(before), public(after)
        elif before is None:
            yield key, None, "new-action", None, public(after)
        elif after is None:
            yield key, None, "dropped-action", public(before), None
        else:
            for name in (*before, *(n for n in after if n not in before)):
                if name not in after:
                    yield key, name, "removed", _shown(name, before[name]), None
                elif name not in before:
                    yield key, name, "added", None, _shown(name, after[name])
                elif not same(before[name], after[name]):
                    yield key, name, "changed", _shown(name, before[name]), \
                        _shown(name, after[name])


def _shown(name: str, value: Any) -> JSON:
    shown: JSON = identity_json(value) if name == "identity" else value
    return shown


def _identical(before: Plan, after: Plan) -> bool:
    """The two plans are the same, value types included (so no slot can differ)."""
    if before.actions != after.actions or before.failures != after.failures \
            or before.matched != after.matched:
        return False
    # == holds; only a `1` against a `true` or `1.0` could still differ.
    return all(same(a.payload(), b.payload())
               for a, b in zip(before.actions, after.actions, strict=True))


@dataclass(frozen=True)
class FoundChange:
    """One way one event's plan changes: the slot (rule, action kind, ordinal), the field (None:
    the action as a whole), the kind of change, the value before and after, and the identity
    the action is for. `as_json`/`from_json` carry it through storage (shadow results)."""

    rule: str
    action: str
    ordinal: int
    field: str | None
    kind: ChangeKind
    before: JSON
    after: JSON
    identity: JSON

    @property
    def key(self) -> SlotKey:
        return self.rule, self.action, self.ordinal

    def as_json(self) -> dict[str, JSON]:
        return {"rule": self.rule, "action": self.action, "ordinal": self.ordinal,
                "field": self.field, "change": self.kind, "before": self.before,
                "after": self.after, "identity": self.identity}

    @classmethod
    def from_json(cls, value: Any) -> FoundChange:
        """The change `as_json` gave; ValueError for anything else."""
        if not isinstance(value, dict):
            raise ValueError(f"a plan change is a JSON object, not {type(value).__name__}")
        rule, action, ordinal = value.get("rule"), value.get("action"), value.get("ordinal")
        field, kind = value.get("field"), value.get("change")
        if not (isinstance(rule, str) and isinstance(action, str) and isinstance(ordinal, int)
                and (field is None or isinstance(field, str)) and kind in CHANGE_KINDS):
            raise ValueError("a plan change needs rule, action, ordinal, field and change")
        return cls(rule, action, ordinal, field, kind, value.get("before"),
                   value.get("after"), value.get("identity"))


@dataclass(frozen=True)
class EventDiff:
    """How one event's plan differs between two rule sets (no changes: it plans the same)."""

    event_type: str
    changes: tuple[FoundChange, ...]

    @property
    def changed(self) -> bool:
        return bool(self.changes)


class Comparer:
    """Plans one event under `old` and `new` and says what differs (`compare`): the per-event
    step of `Differ`, also what shadow mode runs on each live event.

    `lens` says what of an action is compared (`canonical`, or `target_lens(dialect)`);
    `screen(action)` says why no store could take a planned action (the worker's own check),
    so an action the worker would refuse counts as failing.
    """

    def __init__(self, old: RuleSet, new: RuleSet, *, lens: Lens = canonical,
                 screen: Screen | None = None) -> None:
        self.old = _Side(old, lens, screen)
        self.new = _Side(new, lens, screen)
        # Equal plans give equal slots unless the lens reads the two field maps differently.
        self._shortcut = lens is canonical or same_field_map(old.field_map, new.field_map)

    def compare(self, envelope: Any) -> EventDiff:
        """The differences of one event (its parsed body). Raises whatever planning raises for
        an input nobody foresaw (a value nested past Python's recursion limit)."""
        before = plan(envelope, self.old.ruleset)
        after = plan(envelope, self.new.ruleset)
        if self._shortcut and _identical(before, after):
            return EventDiff(before.event_type, ())
        old_slots, new_slots = self.old.slots(before), self.new.slots(after)
        return EventDiff(before.event_type, tuple(
            FoundChange(*key, name, kind, was, now,
                        _identity(new_slots.get(key), old_slots.get(key)))
            for key, name, kind, was, now in _compare(old_slots, new_slots)))


class Tally:
    """Counts per-event differences into a `DiffResult`: per change, the events and a few
    `examples`. `order` are the rule sets whose rule-file order the changes are listed in
    (none: by rule name). Holds counts and examples only, never the events."""

    def __init__(self, *, examples: int = 3, order: Sequence[RuleSet] = ()) -> None:
        self._examples = examples
        self._order = order
        self._rows: dict[tuple[SlotKey, str | None, ChangeKind], _Row] = {}
        self.events = 0
        self.changed_events = 0
        self.uncompared = 0
        self.uncompared_examples: list[dict[str, JSON]] = []

    def add(self, event: Recorded, diff: EventDiff) -> None:
        self.events += 1
        for change in diff.changes:
            row = self._rows.get((change.key, change.field, change.kind))
            if row is None:
                row = _Row(Change(change.rule, change.action, change.ordinal, change.field,
                                  change.kind), self._examples)
                self._rows[(change.key, change.field, change.kind)] = row
            row.offer(event, diff.event_type, change.identity, change.before, change.after)
        self.changed_events += diff.changed

    def add_uncompared(self, event: Recorded, error: str) -> None:
        """An event that could not be compared, and why (kept for the first few)."""
        self.events += 1
        self.uncompared += 1
        if len(self.uncompared_examples) < self._examples:
            self.uncompared_examples.append({"event": event.ref, "id": event.id,
                                             "error": error[:300]})

    def add_same(self, count: int) -> None:
        """`count` events that planned the same (known by number only)."""
        self.events += count

    def result(self) -> DiffResult:
        """The changes, rule by rule in rule-file order, each action's in template order."""
        order = _order(*self._order)
        kinds = {kind: index for index, kind in enumerate(CHANGE_KINDS)}

        def position(item: tuple[tuple[SlotKey, str | None, ChangeKind], _Row]) -> Any:
            (key, name, kind), _ = item
            return (order.get(key, (len(order), 0, 0)), key, name is not None, name or "",
                    kinds[kind])

        changes = [row.finish() for _, row in sorted(self._rows.items(), key=position)]
        return DiffResult(self.events, self.changed_events, changes, self.uncompared,
                          list(self.uncompared_examples))


class Differ:
    """Counts what changes between `old` and `new` over the events given to `add`.

    `lens` and `screen` as for `Comparer`; `examples` per change.
    """

    def __init__(self, old: RuleSet, new: RuleSet, *, lens: Lens = canonical,
                 screen: Screen | None = None, examples: int = 3) -> None:
        self._comparer = Comparer(old, new, lens=lens, screen=screen)
        self._tally = Tally(examples=examples, order=(new, old))

    def add(self, event: Recorded) -> None:
        """Plan `event` under both rule sets and count what differs. An event that cannot be
        compared (an error nobody foresaw, such as a value nested past Python's recursion
        limit) is counted as such and never ends the diff."""
        try:
            diff = self._comparer.compare(event.envelope)
        except Exception as error:
            self._tally.add_uncompared(event, f"{type(error).__name__}: {error}")
            return
        self._tally.add(event, diff)

    def result(self) -> DiffResult:
        """The changes, rule by rule in rule-file order, each action's in template order."""
        return self._tally.result()


def _order(*rulesets: RuleSet) -> dict[SlotKey, tuple[int, int, int]]:
    """Each slot's place: its rule's position (in the first rule set that has the rule), its
    template's index, and which rule set's template list that index is from."""
    order: dict[SlotKey, tuple[int, int, int]] = {}
    positions: dict[str, int] = {}
    for side, ruleset in enumerate(rulesets):
        for rule in ruleset.rules:
            position = positions.setdefault(rule.name, len(positions))
            order.setdefault((rule.name, WHEN, 0), (position, -1, 0))
            seen: dict[str, int] = {}
            for template in rule.actions:
                kind = template.kind.kind
                order.setdefault((rule.name, kind, seen.get(kind, 0)),
                                 (position, template.index, side))
                seen[kind] = seen.get(kind, 0) + 1
    return order


def same_field_map(old: FieldMap, new: FieldMap) -> bool:
    """Whether two field maps say the same (fields, stages, stage field, pipeline)."""
    return (old.fields, old.contact_stages, old.deal_stages, old.contact_stage_field,
            old.deal_pipeline) == (new.fields, new.contact_stages, new.deal_stages,
                                   new.contact_stage_field, new.deal_pipeline)

