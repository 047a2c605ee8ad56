"""The events page's query string: status, event type, time range, search, and the page.

    parse_filters({"status": "dead", "q": "sam@example.com"}, ...)

Every bad value gives a message that says what is wrong and what to write instead; the page
shows it above the (unfiltered by that value) list.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from engine.actions import TOUCHED, IdentityKey, identity_digest
from engine.storage import EVENT_STATUSES, EventFilter, EventStatus

PAGE_SIZE = 50
MAX_TEXT = 500


@dataclass(frozen=True)
class Query:
    """What the page was asked for: the storage filter, the event id searched for (an id
    jumps to that event), the keyset cursor, the form's values, and the problems."""

    where: EventFilter
    event_id: int | None = None
    before: int | None = None
    form: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def _time(name: str, raw: str, problems: list[str]) -> datetime | None:
    try:
        moment = datetime.fromisoformat(raw.replace(" ", "T") if "T" not in raw else raw)
    except ValueError:
        problems.append(f"{name} {raw!r} is not a time: write it as 2026-03-01T12:30 "
                        "(UTC) or with an offset, 2026-03-01T12:30+02:00")
        return None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def parse_filters(params: Mapping[str, str], *, identity_fields: Sequence[str]) -> Query:
    """The filter the query string asks for. A search that is a number is an event id;
    anything else is a token, an email or another identity value, matched exactly (or in
    lower case) against every identity field: the events whose actions touched it."""
    problems: list[str] = []
    form = {name: params.get(name, "").strip()[:MAX_TEXT]
            for name in ("status", "type", "from", "until", "q")}
    status: EventStatus | None = None
    if form["status"]:
        if form["status"] in EVENT_STATUSES:
            status = form["status"]
        else:
            problems.append(f"status {form['status']!r} is not a status: pick one of "
                            f"{', '.join(EVENT_STATUSES)}")
            form["status"] = ""
    received_from = _time("from", form["from"], problems) if form["from"] else None
    received_until = _time("until", form["until"], problems) if form["until"] else None
    if received_from and received_until and received_until <= received_from:
        problems.append("until must be later than from")
        received_until = None
    event_id: int | None = None
    touched: tuple[str, ...] | None = None
    search = form["q"]
    if search.isdigit() and len(search) < 19:
        event_id = int(search)
    elif search:
        touched = tuple(sorted({identity_digest(TOUCHED, IdentityKey(name, value))
                                for name in identity_fields
                                for value in {search, search.lower()}}))
    before: int | None = None
    raw_before = params.get("before", "").strip()
    if raw_before:
        if raw_before.isdigit() and len(raw_before) < 19:
            before = int(raw_before)
        else:
            problems.append(f"before {raw_before[:40]!r} is not an event id: use the page "
                            "links")
    where = EventFilter(status=status, event_type=form["type"] or None,
                        received_from=received_from, received_until=received_until,
                        touched=touched)
    return Query(where, event_id, before, form, problems)
