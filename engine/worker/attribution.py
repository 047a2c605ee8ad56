"""Touches before planning: keep what link-level events say, and give identify events theirs.

    contexts = await attach_all(storage.touches, claimed, ruleset.field_map.links, 90)
    work = prepare(event, ruleset, context)   # each claimed event with its context

A link-level event (the field map's `links.touch_events`: installs and deferred-link claims by
default) with a token is kept as a touch. An `app.user_identified` event with a token gets the
attribution of that token (`touch`: first, last, and an install claimed for this person), which
rules read beside `data` (and `link`, per-person or shared, from those touches). The
attribution is stored with the event, so a replay plans with the same touches. No CRM is called.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from engine.config.links import LinkPolicy, link_fields, link_of_event
from engine.errors import UnstorableValueError, where
from engine.storage import InboxEvent, Touches
from engine.storage.touchrecords import AttributionRequest, NewTouch

log = logging.getLogger(__name__)

IDENTIFY = "app.user_identified"


def parse_time(value: object) -> datetime | None:
    """An ISO 8601 time as an aware UTC datetime (naive: UTC), or None."""
    if not isinstance(value, str) or not value.strip():
        return None
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).astimezone(UTC)


def _envelope(event: InboxEvent) -> dict[str, Any] | None:
    if event.body is None:
        return None
    try:
        envelope = json.loads(event.body)
    except (ValueError, RecursionError):
        return None
    return envelope if isinstance(envelope, dict) else None


def no_token_touch() -> dict[str, Any]:
    return {"found": False, "token": None, "count": 0, "first": None, "last": None,
            "install": None, "per_person": None, "why": ["the identify call sent no token"]}


async def attach(touches: Touches, event: InboxEvent, policy: LinkPolicy, *,
                 retention_days: int | None) -> dict[str, Any] | None:
    """Record the event's touch, or attribute an identify event; the context to plan it with
    (None: plan the event as it is). StorageError propagates (the event is tried again);
    a value no store can keep only costs the touch."""
    envelope = _envelope(event)
    if envelope is None:
        return None
    event_type = envelope.get("event")
    data = envelope.get("data")
    if not isinstance(data, dict) or not isinstance(event_type, str):
        return None
    happened = parse_time(envelope.get("timestamp")) or event.received_at
    try:
        if event_type == IDENTIFY:
            return await _identify(touches, event, data, happened, retention_days)
        if event_type in policy.touch_events:
            await _record(touches, event, envelope, happened, policy)
    except UnstorableValueError as error:
        log.warning("touch not kept: a value cannot be stored", extra={
            "event_id": event.id, "event_type": event_type, "where": where(error)})
    return None


async def attach_all(touches: Touches, events: Sequence[InboxEvent], policy: LinkPolicy,
                     retention_days: int | None) -> list[dict[str, Any] | None]:
    """`attach` for a claimed batch, in two steps: the batch's touches are kept before any of
    its identify events is attributed, so an install and the registration that follows it,
    claimed together, still pair up."""
    contexts: list[dict[str, Any] | None] = [None] * len(events)

    async def one(index: int) -> None:
        contexts[index] = await attach(touches, events[index], policy,
                                       retention_days=retention_days)

    identify = [i for i, event in enumerate(events) if event.event_type == IDENTIFY]
    others = [i for i, event in enumerate(events) if event.event_type != IDENTIFY]
    await asyncio.gather(*(one(i) for i in others))
    await asyncio.gather(*(one(i) for i in identify))
    return contexts


async def _record(touches: Touches, event: InboxEvent, envelope: dict[str, Any],
                  happened: datetime, policy: LinkPolicy) -> None:
    fields = link_fields(envelope["data"])
    token = fields["token"]
    if token is None:
        return
    link = link_of_event(envelope, policy)
    await touches.record(NewTouch(
        event_id=event.id, event_type=str(envelope["event"]), token=token,
        campaign=fields["campaign"], prefix=fields["prefix"], platform=fields["platform"],
        referrer=fields["referrer"], per_person=bool(link["per_person"]), occurred_at=happened))


async def _identify(touches: Touches, event: InboxEvent, data: dict[str, Any],
                    happened: datetime, retention_days: int | None) -> dict[str, Any]:
    token = link_fields(data)["token"]
    if token is None:
        return {"touch": no_token_touch()}
    platform = data.get("platform")
    installed = parse_time(data.get("installed_at"))
    attribution = await touches.attribute(AttributionRequest(
        event_id=event.id, token=token,
        platform=platform.strip() if isinstance(platform, str) and platform.strip() else None,
        anchor=min(installed, happened) if installed else happened, before=happened,
        since=happened - timedelta(days=retention_days) if retention_days else None))
    return {"touch": attribution.detail}
