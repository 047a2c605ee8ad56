"""What the Tolinku event schemas declare: known event types and the fields each one carries."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from engine.config.resources import event_schemas, load_schema


@dataclass(frozen=True)
class EventTypes:
    """The known event types a rule's `on` patterns reach; `complete` is False when a pattern
    names a type linkcrm has no schema for (then nothing can be said about its fields)."""

    names: tuple[str, ...]
    complete: bool


def known_types() -> tuple[str, ...]:
    return tuple(sorted(event_schemas()))


def types_for(patterns: Iterable[str]) -> EventTypes:
    known = known_types()
    names: list[str] = []
    complete = True
    for pattern in patterns:
        matched = [t for t in known if fnmatchcase(t, pattern)]
        if not any(ch in pattern for ch in "*?[") and not matched:
            complete = False
        names.extend(m for m in matched if m not in names)
    return EventTypes(tuple(names), complete)


def _properties(schema: dict[str, Any]) -> dict[str, Any] | None:
    props = schema.get("properties")
    return props if isinstance(props, dict) else None


def _root_properties(event_type: str) -> dict[str, Any]:
    envelope = _properties(load_schema("events/envelope.json")) or {}
    own = _properties(event_schemas()[event_type]) or {}
    return {**envelope, **own}


def declares(event_type: str, path: tuple[str, ...]) -> bool:
    """Whether the event type's schema declares `path` (an object without `properties` is
    opaque: anything below it counts as declared)."""
    props: dict[str, Any] | None = _root_properties(event_type)
    for name in path:
        if props is None:
            return True
        if name not in props:
            return False
        child = props[name]
        props = _properties(child) if isinstance(child, dict) else None
    return True


def siblings(event_types: Iterable[str], path: tuple[str, ...]) -> list[str]:
    """Dotted paths declared beside the last step of `path`, for did-you-mean hints."""
    found: list[str] = []
    for event_type in event_types:
        props: dict[str, Any] | None = _root_properties(event_type)
        for name in path[:-1]:
            child = (props or {}).get(name)
            props = _properties(child) if isinstance(child, dict) else None
        prefix = ".".join(path[:-1])
        for name in props or {}:
            dotted = f"{prefix}.{name}" if prefix else name
            if dotted not in found:
                found.append(dotted)
    return found
