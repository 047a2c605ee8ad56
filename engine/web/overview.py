"""The overview page's numbers: events and action outcomes per minute over the last 24 hours
as server-drawn SVG bars, the backlog's age, and each target's state."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from engine.storage import ActionOutcome, ActivityCount

WINDOW = timedelta(hours=24)
RECENT = timedelta(minutes=15)
MINUTES = 24 * 60
HEIGHT = 120

EVENT_SERIES = ("processed", "ignored", "received", "failed", "dead")
OUTCOME_SERIES = ("ok", "retrying", "dead")
_RATE_LIMITED = ("429", "rate limit", "rate-limit", "request_limit_exceeded", "too many")


@dataclass
class Bar:
    x: int
    y: float
    height: float
    series: str
    title: str


@dataclass
class Chart:
    """Stacked bars, one a minute; `x` counts minutes from the window's start."""

    title: str
    series: Sequence[str]
    bars: list[Bar] = field(default_factory=list)
    peak: int = 0
    totals: dict[str, int] = field(default_factory=dict)
    width: int = MINUTES
    height: int = HEIGHT


def chart(title: str, counts: Iterable[ActivityCount], series: Sequence[str],
          start: datetime) -> Chart:
    per_minute: dict[int, dict[str, int]] = defaultdict(dict)
    totals = dict.fromkeys(series, 0)
    for count in counts:
        x = int((count.minute - start).total_seconds() // 60)
        if 0 <= x < MINUTES and count.status in totals:
            per_minute[x][count.status] = per_minute[x].get(count.status, 0) + count.count
            totals[count.status] += count.count
    peak = max((sum(v.values()) for v in per_minute.values()), default=0)
    drawn = Chart(title, series, peak=peak, totals=totals)
    for x in sorted(per_minute):
        base = float(HEIGHT)
        moment = (start + timedelta(minutes=x)).strftime("%H:%M")
        for name in series:
            n = per_minute[x].get(name, 0)
            if not n:
                continue
            height = max(HEIGHT * n / peak, 1.0)
            base -= height
            drawn.bars.append(Bar(x, round(base, 2), round(height, 2), name,
                                  f"{moment} UTC: {n} {name}"))
    return drawn


@dataclass
class TargetState:
    target: str
    state: str  # healthy, rate-limited, failing, idle
    why: str
    ok: int = 0
    retrying: int = 0
    dead: int = 0


def target_states(targets: Sequence[str], counts: Sequence[ActivityCount],
                  retries: Sequence[ActionOutcome], now: datetime) -> list[TargetState]:
    """Each target's state from its last 15 minutes: failing when actions died or waited for
    a retry more often than they succeeded, rate-limited when its retries say so (a 429,
    Salesforce's REQUEST_LIMIT_EXCEEDED), idle without actions in 24 hours, else healthy."""
    recent: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(OUTCOME_SERIES, 0))
    seen: set[str] = set()
    for count in counts:
        if count.target is None:
            continue
        seen.add(count.target)
        if count.minute >= now - RECENT and count.status in OUTCOME_SERIES:
            recent[count.target][count.status] += count.count
    limited = {r.target for r in retries if r.updated_at >= now - RECENT
               and any(word in (r.error or "").lower() for word in _RATE_LIMITED)}
    states = []
    for target in sorted({*targets, *seen}):
        n = recent[target]
        if target in limited:
            state, why = "rate-limited", "the CRM asked linkcrm to slow down (429) in the " \
                                         "last 15 minutes; actions wait and retry"
        elif n["dead"] or n["retrying"] > n["ok"]:
            state, why = "failing", "actions died or wait for a retry more often than they " \
                                    "succeed (last 15 minutes)"
        elif target not in seen:
            state, why = "idle", "no actions in the last 24 hours"
        else:
            state, why = "healthy", "actions succeed (last 15 minutes)" if sum(n.values()) \
                else "no failures in the last 15 minutes"
        states.append(TargetState(target, state, why, n["ok"], n["retrying"], n["dead"]))
    return states


def backlog_age(oldest: datetime | None, now: datetime) -> str:
    if oldest is None:
        return "none: no event is waiting"
    seconds = max((now - oldest).total_seconds(), 0)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
