"""One event's full story for its page: the body, how it was verified, what the rules made of
it and why, and what every target did with every action."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engine.rules.evaluator import plan
from engine.rules.model import RuleSet
from engine.storage import ActionOutcome, InboxEvent

from .text import as_json, pretty_body

SIGNATURE = {
    "tolinku": "verified: X-Webhook-Signature matched a WEBHOOK_SECRET (HMAC-SHA256 of the raw "
               "body) before the event was stored; linkcrm stores no unverified delivery",
    "identify": "authenticated: the bearer key was one of LINKCRM_API_KEYS (POST /v1/identify)",
}

# A dead letter's error, read for the step that fixes it (first match wins).
_HINTS = (
    (("identity", "entirely null", "no identity"),
     "the event lacks the identity the rule asks for: fix the rule's identity (or the sender's "
     "data), then replay"),
    (("property", "does not exist", "no such field", "invalid_field", "unknown field",
      "custom field"),
     "the CRM lacks a field the field map names: `linkcrm provision {target}` creates it, "
     "`linkcrm doctor {target}` checks; then replay"),
    (("401", "403", "unauthorized", "invalid_session", "token"),
     "the CRM refused the credentials: fix them in the environment, restart, then replay"),
    (("validation", "invalid", "400", "422"),
     "the CRM refused a value: check the field map's type for it (`linkcrm explain` shows "
     "what is sent), fix the rule or the map, then replay"),
)


def fix_hint(error: str | None, target: str | None) -> str:
    text = (error or "").lower()
    for words, hint in _HINTS:
        if any(word in text for word in words):
            return hint.format(target=target or "TARGET")
    return ("read the error above; fix the rule, the field map or the CRM, then replay "
            "(actions that already succeeded are not redone)")


@dataclass
class TargetTrace:
    target: str
    outcomes: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Trace:
    event: InboxEvent
    body: str
    signature: str
    headers: list[tuple[str, str]]
    rules_label: str
    matched: list[str] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    planned: list[dict[str, Any]] = field(default_factory=list)
    plan_errors: list[str] = field(default_factory=list)
    plan_note: str | None = None
    targets: list[TargetTrace] = field(default_factory=list)
    versions: list[str] = field(default_factory=list)


def _seconds(outcome: ActionOutcome) -> str:
    took = (outcome.updated_at - outcome.created_at).total_seconds()
    return f"{took:.3f} s from the first attempt to the latest"


def _record(outcome: ActionOutcome) -> str | None:
    """The CRM record the action touched, when its reply names one."""
    reply = outcome.response
    if isinstance(reply, dict):
        for name in ("record_id", "id", "contact_id", "deal_id", "record"):
            value = reply.get(name)
            if isinstance(value, str | int) and not isinstance(value, bool):
                return f"{name} {value}"
    return None


def _outcome(outcome: ActionOutcome) -> dict[str, Any]:
    return {
        "rule": outcome.rule, "action": outcome.action_kind, "status": outcome.status,
        "attempts": outcome.attempts, "request": as_json(outcome.request_summary),
        "response": as_json(outcome.response), "record": _record(outcome),
        "error": outcome.error, "hint": fix_hint(outcome.error, outcome.target)
        if outcome.status == "dead" else None,
        "first": outcome.created_at, "latest": outcome.updated_at, "took": _seconds(outcome),
        "next_attempt_at": outcome.next_attempt_at, "rules_version": outcome.rules_version,
    }


def build_trace(event: InboxEvent, outcomes: list[ActionOutcome], ruleset: RuleSet | None,
                rules_label: str) -> Trace:
    body, envelope = pretty_body(event.body)
    trace = Trace(event=event, body=body,
                  signature=SIGNATURE.get(event.source, f"received from {event.source}"),
                  headers=sorted(event.headers.items()), rules_label=rules_label)
    if event.body is None:
        trace.plan_note = "the raw body was purged: the rules cannot be evaluated again"
    elif not isinstance(envelope, dict):
        trace.plan_note = "the stored body is not a JSON object: no rule can read it"
    elif ruleset is None:
        trace.plan_note = "the rules do not load: `linkcrm validate` lists why"
    else:
        result = plan(envelope, ruleset)
        trace.matched = list(result.matched)
        trace.skipped = [{"rule": s.rule, "reason": s.reason} for s in result.skipped]
        trace.planned = [{"rule": a.rule, "action": a.kind,
                          "detail": as_json({k: v for k, v in a.as_dict().items()
                                             if k not in ("action", "rule")})}
                         for a in result.actions]
        trace.plan_errors = [f.message for f in result.failures]
    by_target: dict[str, TargetTrace] = {}
    for outcome in outcomes:
        by_target.setdefault(outcome.target, TargetTrace(outcome.target)).outcomes.append(
            _outcome(outcome))
    trace.targets = [by_target[name] for name in sorted(by_target)]
    trace.versions = sorted({o.rules_version for o in outcomes if o.rules_version})
    if event.status == "dead" and not outcomes:
        trace.plan_errors.append(f"fix: {fix_hint(event.last_error, None)}")
    return trace
