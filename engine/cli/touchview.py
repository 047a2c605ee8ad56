"""Touches for a terminal: which were attached to an identify event, and why (`events show`,
`explain`), and `explain ID` reading a recorded event. Every value from an event is escaped."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click

from engine.storage import InboxEvent, Storage
from engine.storage.touchrecords import Attribution

from .output import fail, safe
from .runtime import load_settings, with_storage


def _one(touch: Any) -> str:
    if not isinstance(touch, Mapping):
        return "none"
    parts = [f"{safe(touch.get('event'))} at {safe(touch.get('timestamp'))}"]
    for name in ("campaign", "platform", "prefix", "referrer"):
        if touch.get(name) is not None:
            parts.append(f"{name} {safe(touch.get(name))}")
    if touch.get("event_id") is not None:
        parts.append(f"event {safe(touch.get('event_id'))}")
    return ", ".join(parts)


def show_touches(touch: Any, link: Any = None) -> None:
    """`touch` (what an identify event was given) and, when known, the `link` decision."""
    if not isinstance(touch, Mapping):
        return
    found = "found" if touch.get("found") else "no touch found"
    click.echo(f"  touches: {found} for token {safe(touch.get('token'))}")
    for name in ("first", "last", "install"):
        click.echo(f"    {name}: {_one(touch.get(name))}")
    for reason in touch.get("why") or []:
        click.echo(f"    why: {safe(reason)}")
    if isinstance(link, Mapping):
        kind = "per-person" if link.get("per_person") else "shared"
        click.echo(f"    link: {kind} ({safe(link.get('why'))})")


def is_event_id(argument: str) -> bool:
    """`explain 42`: a recorded event's id (a file of that name still wins)."""
    return argument.isdigit() and not Path(argument).exists()


def recorded_event(argument: str) -> Any:
    """A recorded event's envelope, with the touches attached to it when it is an identify
    event (`touch`); exit 1 when there is no such event or its body was purged."""
    event_id = int(argument)
    settings = load_settings()

    async def read(storage: Storage) -> tuple[InboxEvent | None, Attribution | None]:
        return await storage.inbox.get(event_id), await storage.touches.attribution(event_id)

    event, attribution = with_storage(settings, read)
    if event is None:
        fail(f"no event {event_id}; `linkcrm events list` shows the ids")
    if event.body is None:
        fail(f"event {event_id}'s body was purged; it cannot be explained")
    try:
        envelope = json.loads(event.body)
    except (ValueError, RecursionError):
        fail(f"event {event_id}'s stored body is not JSON")
    if isinstance(envelope, dict) and attribution is not None:
        envelope["touch"] = attribution.detail
    return envelope


def explain_touches(envelope: Mapping[str, Any], link: Any) -> None:
    """The touches an identify event is explained with, or that it has none."""
    touch = envelope.get("touch")
    if isinstance(touch, Mapping):
        show_touches(touch, link)
        return
    click.echo("  touches: none given (the worker attaches the token's touches; explain a "
               "recorded event by its id, or give `touch:` in the event)")
    if isinstance(link, Mapping):
        kind = "per-person" if link.get("per_person") else "shared"
        click.echo(f"    link: {kind} ({safe(link.get('why'))})")
