"""Which links are per-person, and what linkcrm keeps of link-level events (touches).

The field map's `links:` section declares it (schema: `schemas/fields.schema.json`):

    links:
      per_person:                 # a link is per-person (one person's link) when ...
        prefixes: [invite]        # ... its prefix is one of these, or
        referrer: true            # ... its event names a referrer (referrer_token/referrer_id)
      shared:
        prefixes: [promo]         # links with these prefixes are shared campaign links
        tokens: [summer-promo]    # and so are these tokens
      default: per_person         # a link nothing above decides (per_person or shared)
      touch_events: [install.tracked, deferred_link.claimed]   # kept as touches

Rules read the decision as `link.per_person` and `link.person_token` (the token when the link is
per-person, else null: a contact key that is safe for both kinds). An identify event carries only
the token: its `link` follows the token's latest touch (of any age: the kind of a link does not
expire with its attribution), and a token never seen is decided by the declarations alone. The
functions here are pure:
the worker, `explain` and the rule tests compute the same `link` object from the same event.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

LinkKind = Literal["per_person", "shared"]

DEFAULT_TOUCH_EVENTS = ("install.tracked", "deferred_link.claimed")
IDENTIFY_EVENT = "app.user_identified"


@dataclass(frozen=True)
class LinkPolicy:
    per_person_prefixes: tuple[str, ...] = ()
    per_person_with_referrer: bool = False
    shared_prefixes: tuple[str, ...] = ()
    shared_tokens: tuple[str, ...] = ()
    default: LinkKind = "per_person"
    touch_events: tuple[str, ...] = DEFAULT_TOUCH_EVENTS

    @classmethod
    def from_document(cls, raw: Mapping[str, Any] | None) -> LinkPolicy:
        """From the field map's (schema-checked) `links:` mapping; defaults when absent."""
        if not raw:
            return cls()
        per_person = raw.get("per_person") or {}
        shared = raw.get("shared") or {}
        return cls(
            per_person_prefixes=tuple(per_person.get("prefixes", ())),
            per_person_with_referrer=bool(per_person.get("referrer", False)),
            shared_prefixes=tuple(shared.get("prefixes", ())),
            shared_tokens=tuple(shared.get("tokens", ())),
            default="shared" if raw.get("default") == "shared" else "per_person",
            touch_events=tuple(raw.get("touch_events", DEFAULT_TOUCH_EVENTS)),
        )

    def classify(self, token: str, prefix: str | None, referrer: str | None) -> tuple[bool, str]:
        """(per-person?, why) for one link. Shared declarations win over per-person ones: a
        shared link taken for a per-person one merges every installer into one contact."""
        if token in self.shared_tokens:
            return False, "its token is declared shared (links.shared.tokens)"
        if prefix is not None and prefix in self.shared_prefixes:
            return False, f"prefix {prefix!r} is declared shared (links.shared.prefixes)"
        if prefix is not None and prefix in self.per_person_prefixes:
            return True, f"prefix {prefix!r} is declared per-person (links.per_person.prefixes)"
        if referrer is not None and self.per_person_with_referrer:
            return True, "the event names a referrer (links.per_person.referrer)"
        return self.default == "per_person", f"nothing declares it; links.default is {self.default}"


def _text(value: object) -> str | None:
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return None


def link_fields(data: Mapping[str, Any]) -> dict[str, str | None]:
    """The link-level fields of an event's data, across both payload shapes Tolinku's docs
    describe (token/referral_code, campaign/utm_campaign, platform/device_type,
    referrer_token/referrer_id)."""

    def first(*names: str) -> str | None:
        for name in names:
            found = _text(data.get(name))
            if found is not None:
                return found
        return None

    return {
        "token": first("token", "referral_code"),
        "campaign": first("campaign", "utm_campaign"),
        "prefix": first("prefix"),
        "platform": first("platform", "device_type"),
        "referrer": first("referrer_token", "referrer_id"),
    }


def link_object(token: str | None, per_person: bool, why: str) -> dict[str, Any]:
    return {"token": token, "per_person": per_person,
            "person_token": token if per_person else None, "why": why}


def _first(data: dict[str, Any], *names: str) -> str | None:
    for name in names:
        value = data.get(name)
        if value is not None:
            found = _text(value)
            if found is not None:
                return found
    return None


def link_of_event(envelope: Mapping[str, Any], policy: LinkPolicy) -> dict[str, Any]:
    """The `link` object rules read on an event: from the event's own data, or on an identify
    event (which carries only the token) from the token's latest touch in `touch`. Runs for
    every event planned, so it reads only the fields it needs."""
    data = envelope.get("data")
    if not isinstance(data, dict):
        return link_object(None, False, "the event carries no token")
    token = _first(data, "token", "referral_code")
    if token is None:
        return link_object(None, False, "the event carries no token")
    touch = envelope.get("touch")
    if isinstance(touch, dict) and envelope.get("event") == IDENTIFY_EVENT:
        # The token's latest touch says what kind of link it is, even past the retention.
        known = touch.get("last") or touch.get("link")
        if isinstance(known, dict):
            per_person, why = policy.classify(token, _text(known.get("prefix")),
                                              _text(known.get("referrer")))
            return link_object(token, per_person, f"from its touches: {why}")
        per_person, why = policy.classify(token, None, None)
        return link_object(token, per_person, f"no touch of the token: {why}")
    per_person, why = policy.classify(token, _first(data, "prefix"),
                                      _first(data, "referrer_token", "referrer_id"))
    return link_object(token, per_person, why)
