"""`linkcrm bench`: rule evaluation speed next to hand-written Python doing the same job.

The hand-written function is what an engineer would write instead of rules for the shipped
rule set; the benchmark first checks that both produce identical plans for every event, then
times each on the same events, one core, and prints absolute rates and their ratio.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from engine.actions import Action, CreateDeal, IdentityKey, SetStage, UpsertContact
from engine.rules.evaluator import plan
from engine.rules.model import RuleSet


def sample_events(count: int) -> list[dict[str, Any]]:
    """`count` distinct events over every shipped event type, in both payload shapes."""
    start = datetime(2026, 3, 1, tzinfo=UTC)
    events: list[dict[str, Any]] = []
    for i in range(count):
        at = (start + timedelta(minutes=37 * i)).isoformat().replace("+00:00", "Z")
        kind = i % 11
        shape_b = (i // 11) % 2 == 1
        token = f"tok_{i:05d}"
        data: dict[str, Any]
        if kind in (0, 1):
            name = "install.tracked"
            data = ({"token": token, "hostname": "go.example.com", "device_type": "Android",
                     "ip": "203.0.113.7", "utm_campaign": f"c{i % 7}"} if shape_b else
                    {"token": token, "prefix": "invite", "campaign": f"spring-{i % 5}",
                     "platform": "iOS"})
        elif kind in (2, 3):
            name = "referral.created"
            data = ({"referral_code": f"REF-{i}", "referrer_id": f"user_{i % 13}",
                     "referred_user_id": f"user_{i}"} if shape_b else
                    {"token": token, "referrer_token": f"tok_{i % 13:05d}", "campaign": "r"})
        elif kind in (4, 5):
            name = "referral.completed"
            data = ({"referral_code": f"REF-{i}", "referrer_id": f"user_{i % 13}",
                     "milestone": "first_purchase"} if shape_b else
                    {"token": token, "referrer_token": f"tok_{i % 13:05d}"})
        elif kind in (6, 7):
            name = "deferred_link.claimed"
            data = ({"token": token, "hostname": "go.example.com", "device_type": "Web",
                     "utm_campaign": "winter"} if shape_b else
                    {"token": token, "prefix": "p", "campaign": "spring", "platform": "android"})
        elif kind == 8:
            name = "app.user_identified"
            data = {"token": token, "email": f" User{i}@Example.com ", "first_name": "Ada",
                    "last_name": None if shape_b else "Lovelace", "user_id": f"u_{i}"}
        elif kind == 9:
            name = "link.clicked"
            data = {"token": token, "campaign": "spring", "ip": "203.0.113.9"}
        else:
            name = "test"
            data = {"message": f"hello {i}"}
        events.append({"event": name, "timestamp": at, "data": data})
    return events


def _or(*values: Any) -> Any:
    # JMESPath `a || b`: the first truthy value (0 is truthy, "" and null are not).
    for value in values:
        if value is not None and value is not False and value != "" and value != [] \
                and value != {}:
            return value
    return values[-1]


def _date(ts: str) -> str:
    parsed = datetime.fromisoformat(ts.replace("Z", "+00:00"))
    return parsed.astimezone(UTC).date().isoformat()


def _clean(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None and v != ""}


def hand_written(event: dict[str, Any]) -> list[Action]:
    """The shipped rules, written as plain Python."""
    kind, data, ts = event["event"], event["data"], event["timestamp"]
    get = data.get
    if kind == "install.tracked":
        token = get("token")
        if not token:
            return []
        ident = (IdentityKey("deep_link_token", token),)
        platform = _or(get("platform"), get("device_type"))
        return [
            UpsertContact("install-creates-lead", ident,
                          _clean({"deep_link_token": token, "deep_link_prefix": get("prefix")}),
                          _clean({"first_touch_campaign": _or(get("campaign"),
                                                              get("utm_campaign")),
                                  "first_touch_platform": platform.lower() if platform else None,
                                  "install_date": _date(ts)})),
            SetStage("install-creates-lead", ident, "lead"),
        ]
    if kind in ("referral.created", "referral.completed"):
        token = _or(get("token"), get("referral_code"))
        if not token:
            return []
        ident = (IdentityKey("deep_link_token", token),)
        source = _or(get("referrer_token"), get("referrer_id"))
        if kind == "referral.created":
            return [
                UpsertContact("referral-signup-creates-lead", ident, {"deep_link_token": token},
                              _clean({"referral_source": source, "referral_date": _date(ts),
                                      "app_user_id": get("referred_user_id")})),
                SetStage("referral-signup-creates-lead", ident, "lead"),
            ]
        return [
            UpsertContact("referral-converts", ident, {"deep_link_token": token},
                          _clean({"conversion_date": _date(ts), "referral_source": source})),
            SetStage("referral-converts", ident, "customer"),
            CreateDeal("referral-converts", ident, f"referral-{token}", f"Referral: {token}",
                       "new", None, _clean({"referral_code": _or(get("referral_code"),
                                                                 get("token"))})),
        ]
    if kind == "deferred_link.claimed":
        token = get("token")
        if not token:
            return []
        platform = _or(get("platform"), get("device_type"))
        return [UpsertContact(
            "deferred-link-enriches-contact", (IdentityKey("deep_link_token", token),),
            _clean({"deep_link_token": token, "deep_link_prefix": get("prefix"),
                    "last_deep_link_claimed_at": ts}),
            _clean({"first_touch_campaign": _or(get("campaign"), get("utm_campaign")),
                    "first_touch_platform": platform.lower() if platform else None}))]
    if kind == "app.user_identified":
        email = get("email")
        email = email.strip().lower() if isinstance(email, str) else None
        keys = [IdentityKey(n, v) for n, v in (("deep_link_token", get("token")),
                                                ("email", email)) if v]
        names = [n for n in (get("first_name"), get("last_name")) if n]
        return [UpsertContact("app-identifies-user", tuple(keys), _clean({
            "email": email, "first_name": get("first_name"), "last_name": get("last_name"),
            "name": " ".join(names), "app_user_id": get("user_id")}), {})]
    return []


def _rate(function: Callable[[dict[str, Any]], object], events: list[dict[str, Any]],
          seconds: float) -> float:
    done = 0
    deadline = time.perf_counter() + seconds
    started = time.perf_counter()
    while time.perf_counter() < deadline:
        for event in events:
            function(event)
        done += len(events)
    return done / (time.perf_counter() - started)


def run_benchmark(ruleset: RuleSet, count: int, seconds: float) -> Iterator[str]:
    events = sample_events(max(count, 100))
    for event in events:
        ours = list(plan(event, ruleset).actions)
        theirs = hand_written(event)
        if ours != theirs:
            raise AssertionError(f"plans differ for {event}:\n{ours}\n{theirs}")
    yield f"{len(events)} distinct events, plans identical for both; {seconds:.1f} s each"
    # Alternate short rounds so that noise from other processes hits both sides alike; report
    # the median round of each.
    rounds = 5
    ours_rates, hand_rates = [], []
    for _ in range(rounds):
        ours_rates.append(_rate(lambda e: plan(e, ruleset), events, seconds / rounds))
        hand_rates.append(_rate(hand_written, events, seconds / rounds))
    rules_rate = statistics.median(ours_rates)
    hand_rate = statistics.median(hand_rates)
    yield f"rules engine:  {rules_rate:12,.0f} events/s (median of {rounds} rounds)"
    yield f"hand-written:  {hand_rate:12,.0f} events/s (median of {rounds} rounds)"
    yield f"ratio:         {rules_rate / hand_rate:12.1%} of hand-written"
