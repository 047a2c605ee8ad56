"""Touches (what each link-level event told linkcrm) and the attribution an identify event gets.

Both backends build the same `Attribution` from the same rows with `attribution_detail`, so the
`touch` object rules read, and the reasons `explain` and `events show` print, do not depend on
the backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from engine.actions import JSON

INSTALL = "install.tracked"


@dataclass(frozen=True)
class NewTouch:
    """One link-level event, kept for attribution (one touch per inbox event)."""

    event_id: int
    event_type: str
    token: str
    campaign: str | None
    prefix: str | None
    platform: str | None
    referrer: str | None
    per_person: bool
    occurred_at: datetime


@dataclass(frozen=True)
class Touch:
    id: int
    event_id: int
    event_type: str
    token: str
    campaign: str | None
    prefix: str | None
    platform: str | None
    referrer: str | None
    per_person: bool
    occurred_at: datetime
    claimed_by: int | None

    def as_rule_value(self) -> dict[str, JSON]:
        """What rules read under `touch.first`, `touch.last`, `touch.install`."""
        return {"event": self.event_type, "timestamp": iso(self.occurred_at),
                "token": self.token, "campaign": self.campaign, "prefix": self.prefix,
                "platform": self.platform, "referrer": self.referrer,
                "per_person": self.per_person, "event_id": self.event_id}


@dataclass(frozen=True)
class AttributionRequest:
    """An identify event asks for the touches of `token`.

    Touches count from `since` (the retention cutoff; None: all) up to `before` (the identify
    time). The install claimed is an unclaimed install of the token no later than `before`: on
    `platform` first when it is given, then the one closest to `anchor` (the install time the
    app sent, else `before`: the latest install before registration).
    """

    event_id: int
    token: str
    platform: str | None
    anchor: datetime
    before: datetime
    since: datetime | None


@dataclass(frozen=True)
class Attribution:
    """What an identify event was given, fixed when first attributed: a replay of the event
    gets the same touches (and keeps its install)."""

    event_id: int
    token: str
    detail: dict[str, Any]
    created_at: datetime

    @property
    def found(self) -> bool:
        return bool(self.detail.get("found"))


def iso(moment: datetime) -> str:
    """ISO 8601 UTC with a Z, seconds precision unless the time has a fraction."""
    moment = moment.astimezone(UTC)
    spec = "microseconds" if moment.microsecond else "seconds"
    return moment.replace(tzinfo=None).isoformat(timespec=spec) + "Z"


def attribution_detail(request: AttributionRequest, first: Touch | None, last: Touch | None,
                       install: Touch | None, latest: Touch | None, count: int, expired: int,
                       taken: int) -> dict[str, Any]:
    """The stored attribution: the `touch` object rules read, plus `why` (one line a reason).

    `count` touches of the token lie within the retention, `expired` before it; `taken` of its
    installs in the window were already claimed by other people. `latest` is the token's latest
    touch of any age: what kind of link it is does not expire with the attribution."""
    why: list[str] = []
    if count == 0:
        why.append(f"no touch found for token {request.token!r}"
                   + (f" ({expired} older than the retention)" if expired else ""))
    else:
        why.append(f"{count} touch(es) of token {request.token!r} within the retention"
                   + (f", {expired} older ignored" if expired else ""))
    if install is not None:
        on = (f"on platform {request.platform!r}" if request.platform
              and (install.platform or "").lower() == request.platform.lower()
              else "on another platform" if request.platform else "on any platform")
        why.append(f"claimed install event {install.event_id} at {iso(install.occurred_at)} "
                   f"{on}, the closest earlier unclaimed install to {iso(request.anchor)}")
    elif count:
        why.append("no unclaimed install of this token before the identify"
                   + (f" ({taken} already attributed to other people)" if taken else ""))
    return {
        "found": count > 0,
        "token": request.token,
        "count": count,
        "first": first.as_rule_value() if first else None,
        "last": last.as_rule_value() if last else None,
        "install": install.as_rule_value() if install else None,
        "per_person": latest.per_person if latest is not None else None,
        "link": None if latest is None else {"prefix": latest.prefix,
                                             "referrer": latest.referrer},
        "why": why,
    }
