"""What of a planned action a diff compares: its facets, in canonical or one CRM's terms.

An action's facets are `identity` (its keys in priority order, as `((field, value), ...)`),
each written field as `set.<field>` / `set_once.<field>`, and `stage`, `key`, `title`,
`amount`. A `Lens` turns an action into facets, or into `Failed` when the action cannot be
sent: `canonical` (the plan as the rules write it) or `target_lens(dialect)` (what that CRM
receives: its field names, coerced values; a value it cannot take fails the action).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engine.actions import JSON, Action
from engine.config.fieldmap import Dialect, FieldMap
from engine.rules.explain import target_view


@dataclass(frozen=True)
class Failed:
    """An action that fails: at evaluation, by a value no store can take, or for one CRM."""

    message: str


Facets = dict[str, Any]  # identity as ((field, value), ...); the others JSON values
Slot = Facets | Failed
Lens = Callable[[Action, FieldMap], Slot]


def canonical(action: Action, _field_map: FieldMap) -> Slot:
    """The action's facets as the rules plan them, in canonical field names."""
    facets: Facets = {"identity": tuple((key.field, key.value) for key in action.identity)}
    for name, value in action.payload().items():
        if name in action.field_maps and isinstance(value, dict):
            for field_name, written in value.items():
                facets[f"{name}.{field_name}"] = written
        elif value is not None:
            facets[name] = value
    return facets


def target_lens(dialect: Dialect) -> Lens:
    """Facets as `dialect`'s target receives the action: its field names, coerced values; a
    field it does not map is not written; a value it cannot take fails the action."""

    def facets(action: Action, field_map: FieldMap) -> Slot:
        view = target_view(action, field_map, dialect)
        if view.errors:
            return Failed(f"{dialect.target}: " + "; ".join(view.errors))
        found: Facets = {"identity": tuple(view.identity.items())}
        for map_name, values in view.fields.items():
            for name, value in values.items():
                found[f"{map_name}.{name}"] = value
        found.update(view.scalars)
        if view.stage is not None:
            found["stage"] = view.stage["value"]
        return found

    return facets


def identity_json(pairs: Any) -> JSON:
    """The identity facet as JSON: `{field: value}` in priority order."""
    return {str(name): value for name, value in pairs}


def public(slot: Slot | None) -> JSON:
    """A slot as JSON for examples: its facets, `{"error": message}`, or null (not planned)."""
    if slot is None:
        return None
    if isinstance(slot, Failed):
        return {"error": slot.message}
    return {name: identity_json(value) if name == "identity" else value
            for name, value in slot.items()}


def same(a: Any, b: Any) -> bool:
    """JSON equality that tells `1`, `1.0` and `true` apart (Python's == does not)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(value, b[key]) for key, value in a.items())
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(map(same, a, b))
    return bool(a == b) or (a != a and b != b)  # a NaN is the same as itself here
