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


async def attach_all(touches: Touches, events: Sequence[InboxEvent], policy: LinkPolicy,
                     retention_days: int | None) -> list[dict[str, Any] | None]:
    """Each claimed event's context to plan it with (None: plan the event as it is), in two
    steps: the batch's touches are kept (in one write) before any of its identify events is
    attributed, so an install and the registration that follows it, claimed together, still
    pair up. StorageError propagates (the events are tried again); a value no store can keep
    only costs that event's touch or attribution."""
    contexts: list[dict[str, Any] | None] = [None] * len(events)
    kept: list[tuple[InboxEvent, str, NewTouch]] = []
    identify: list[tuple[int, dict[str, Any], datetime]] = []
    for index, event in enumerate(events):
        read = _read(event)
        if read is None:
            continue
        envelope, event_type, data, happened = read
        if event_type == IDENTIFY:
            identify.append((index, data, happened))
            continue
        touch = _touch(event, envelope, event_type, happened, policy)
        if touch is not None:
            kept.append((event, event_type, touch))
    await _keep(touches, kept)

    async def attribute(index: int, data: dict[str, Any], happened: datetime) -> None:
        try:
            contexts[index] = await _identify(touches, events[index], data, happened,
                                              retention_days)
        except UnstorableValueError as error:
            _not_kept(events[index], IDENTIFY, error)

    await asyncio.gather(*(attribute(*item) for item in identify))
    return contexts


async def _keep(touches: Touches, kept: list[tuple[InboxEvent, str, NewTouch]]) -> None:
    """The claim's touches in one write; when a value in one of them cannot be stored, each
    alone, so only that touch is lost."""
    if not kept:
        return
    try:
        await touches.record_many([touch for _, _, touch in kept])
        return
    except UnstorableValueError:
        pass
    for event, event_type, touch in kept:
        try:
            await touches.record(touch)
        except UnstorableValueError as error:
            _not_kept(event, event_type, error)


def _read(event: InboxEvent) -> tuple[dict[str, Any], str, dict[str, Any], datetime] | None:
    """The envelope, its event type, its data and when it happened; None when the body is no
    envelope with data."""
    envelope = _envelope(event)
    if envelope is None:
        return None
    event_type = envelope.get("event")
    data = envelope.get("data")
    if not isinstance(data, dict) or not isinstance(event_type, str):
        return None
    return envelope, event_type, data, parse_time(envelope.get("timestamp")) or event.received_at


def _not_kept(event: InboxEvent, event_type: str, error: Exception) -> None:
    log.warning("touch not kept: a value cannot be stored", extra={
        "event_id": event.id, "event_type": event_type, "where": where(error)})


def _touch(event: InboxEvent, envelope: dict[str, Any], event_type: str, happened: datetime,
           policy: LinkPolicy) -> NewTouch | None:
    """The touch a link-level event with a token leaves, or None."""
    if event_type not in policy.touch_events:
        return None
    fields = link_fields(envelope["data"])
    token = fields["token"]
    if token is None:
        return None
    link = link_of_event(envelope, policy)
    return NewTouch(
        event_id=event.id, event_type=event_type, token=token,
        campaign=fields["campaign"], prefix=fields["prefix"], platform=fields["platform"],
        referrer=fields["referrer"], per_person=bool(link["per_person"]), occurred_at=happened)


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
