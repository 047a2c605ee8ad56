"""Operations commands: `events list|show`, `replay`, `crm contacts|deals` and `purge`."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import click

from engine.actions import JSON
from engine.errors import ConfigError
from engine.rules.evaluator import plan
from engine.rules.files import load_ruleset
from engine.runtime.settings import Settings
from engine.storage import (
    EVENT_STATUSES,
    ActionOutcome,
    EventStatus,
    InboxEvent,
    LocalContact,
    LocalDeal,
    Storage,
    utc_now,
)
from engine.storage.touchrecords import Attribution

from .output import FORMAT_OPTION, emit_json, fail, safe, safe_json
from .params import LIMIT, ROW_ID, duration
from .pinning import Pin, PinRefused, choose_pin
from .runtime import iso, load_settings, rules_location, with_storage
from .touchview import show_touches

STATUS = click.Choice(EVENT_STATUSES)

Row = dict[str, JSON]


def _listing(rows: list[Row], output_format: str, *, empty: str,
             show: Callable[[list[Row]], None]) -> None:
    """`rows` as JSON; for people, `show(rows)`, or `empty` when there are none."""
    if output_format == "json":
        emit_json(rows)
    elif not rows:
        click.echo(empty)
    else:
        show(rows)


def _event_row(event: InboxEvent) -> Row:
    return {
        "id": event.id, "event": event.event_type, "source": event.source,
        "status": event.status, "attempts": event.attempts,
        "received_at": iso(event.received_at), "event_timestamp": event.event_timestamp,
        "next_attempt_at": iso(event.next_attempt_at), "last_error": event.last_error,
        "body_purged": event.body is None, "pinned_rules_version": event.rules_version,
    }


def _outcome_row(outcome: ActionOutcome) -> Row:
    return {
        "rule": outcome.rule, "action": outcome.action_kind, "target": outcome.target,
        "status": outcome.status, "attempts": outcome.attempts, "error": outcome.error,
        "next_attempt_at": iso(outcome.next_attempt_at), "response": outcome.response,
        "request": outcome.request_summary, "idempotency_key": outcome.idempotency_key,
        "updated_at": iso(outcome.updated_at), "rules_version": outcome.rules_version,
    }


@click.group()
def events() -> None:
    """Inspect the delivery log: every stored event, its status and its actions' outcomes.

    \b
    Example:
      linkcrm events list --status dead
      linkcrm events show 42
    """


@events.command("list")
@click.option("--status", type=STATUS, help="Only events in this status (dead: dead letters).")
@click.option("--limit", default=50, show_default=True, type=LIMIT)
@FORMAT_OPTION
def list_events(status: EventStatus | None, limit: int, output_format: str) -> None:
    """List events, newest first.

    \b
    Example:
      linkcrm events list --status dead --format json
    """
    settings = load_settings()
    found = with_storage(settings, lambda s: s.inbox.list_events(status=status, limit=limit))
    rows = [_event_row(event) for event in found]
    _listing(rows, output_format, empty="no events" + (f" with status {status}" if status else ""),
             show=_show_events)


def _show_events(rows: list[Row]) -> None:
    click.echo(f"{'ID':>6}  {'RECEIVED':<20}  {'STATUS':<9}  {'TRIES':>5}  EVENT")
    for row in rows:
        received = str(row["received_at"])[:19].replace("T", " ")
        line = (f"{row['id']:>6}  {received:<20}  {row['status']!s:<9}  "
                f"{row['attempts']:>5}  {safe(row['event'])}")
        error = row["last_error"]
        if isinstance(error, str) and error:
            first = error.split("\n", 1)[0]
            line += f"  ({safe(first[:70])}{'...' if len(first) > 70 else ''})"
        click.echo(line)


@events.command("show")
@click.argument("event_id", type=ROW_ID)
@FORMAT_OPTION
def show_event(event_id: int, output_format: str) -> None:
    """Show one event: its body, which rules match it (with the rules as they are now),
    each planned action, and each target's recorded outcome.

    \b
    Example:
      linkcrm events show 42
    """
    settings = load_settings()

    async def read(storage: Storage) -> tuple[InboxEvent | None, list[ActionOutcome],
                                              Attribution | None]:
        return (await storage.inbox.get(event_id), await storage.outcomes.of_event(event_id),
                await storage.touches.attribution(event_id))

    event, outcomes, attribution = with_storage(settings, read)
    if event is None:
        fail(f"no event {event_id}; `linkcrm events list` shows the ids")
    body: Any = None
    if event.body is not None:
        try:
            body = json.loads(event.body)
        except (ValueError, RecursionError):  # not JSON, or nested past the parser's limit
            body = event.body.decode("utf-8", "replace")
    document: dict[str, Any] = {**_event_row(event), "body": body,
                                "outcomes": [_outcome_row(o) for o in outcomes]}
    touch = attribution.detail if attribution is not None else None
    document["touches"] = touch
    document["plan"] = _current_plan(
        {**body, "touch": touch} if touch is not None and isinstance(body, dict) else body,
        settings)
    if output_format == "json":
        emit_json(document)
        return
    _show_text(document)


def _current_plan(body: Any, settings: Settings) -> dict[str, Any] | None:
    if not isinstance(body, dict):
        return None
    try:
        ruleset = load_ruleset([rules_location(settings)])
    except (ConfigError, OSError):
        return {"error": "the rules do not load; `linkcrm validate` lists why"}
    result = plan(body, ruleset).as_dict()
    result.pop("event", None)
    return result


def _show_text(document: dict[str, Any]) -> None:
    """The event for a terminal; every value that came with it (or from a CRM) escaped."""
    click.echo(f"event {document['id']}: {safe(document['event'])} "
               f"({safe(document['source'])})")
    click.echo(f"  status: {document['status']} after {document['attempts']} attempt(s)")
    click.echo(f"  received: {document['received_at']}   happened: "
               f"{safe(document['event_timestamp'])}")
    if document["next_attempt_at"]:
        click.echo(f"  next attempt: {document['next_attempt_at']}")
    if document["pinned_rules_version"]:
        click.echo(f"  replayed with rules {safe(document['pinned_rules_version'])} "
                   "(`replay --rules-version`)")
    # One problem a line (the worker joins them with "\n"), each escaped and prefixed.
    for line in (document["last_error"] or "").split("\n"):
        if line:
            click.echo(f"  error: {safe(line)}")
    show_touches(document["touches"])
    current = document["plan"]
    if document["body_purged"]:
        click.echo("  body: purged (the event cannot be replayed)")
    elif current is not None and "error" in current:
        click.echo(f"  plan: {safe(current['error'])}")
    elif current is not None:
        click.echo("  rules matched (as the rules are now): "
                   + (", ".join(map(safe, current["matched"])) or "none"))
        for number, action in enumerate(current["actions"], 1):
            click.echo(f"    {number}. {safe(action['action'])} (rule {safe(action['rule'])})")
        for error in current["errors"]:
            click.echo(f"    error: {safe(error['error'])}")
    if not document["outcomes"]:
        click.echo("  outcomes: none recorded")
    for outcome in document["outcomes"]:
        click.echo(f"  {safe(outcome['target'])}: {safe(outcome['action'])} "
                   f"(rule {safe(outcome['rule'])}) -> {safe(outcome['status'])} after "
                   f"{outcome['attempts']} attempt(s)")
        if outcome["rules_version"]:
            click.echo(f"      planned by rules {safe(outcome['rules_version'])}")
        response = outcome["response"]
        if isinstance(response, dict) and response.get("summary"):
            click.echo(f"      {safe(response['summary'])}")
        if outcome["error"]:
            click.echo(f"      error: {safe(outcome['error'])}")


@click.command()
@click.argument("event_ids", nargs=-1, type=ROW_ID)
@click.option("--status", type=STATUS, help="Re-queue every event in this status.")
@click.option("--all-dead", is_flag=True,
              help="Re-queue every dead event and every event with a dead action.")
@click.option("--rules-version", metavar="VERSION",
              help="Plan the events with this published rule version (its id, a unique prefix "
                   "or `active`) instead of the version active when the worker gets to them. "
                   "It must map fields as the active version does.")
@FORMAT_OPTION
def replay(event_ids: tuple[int, ...], status: EventStatus | None, all_dead: bool,
           rules_version: str | None, output_format: str) -> None:
    """Re-queue events so the worker applies them again, with the active rule version (or
    the one --rules-version names); it says which.

    Actions that already succeeded on a target are not redone (their idempotency keys are
    kept when a rule's values change); dead actions are retried. Exit 1 when an event could
    not be re-queued (unknown, its body purged, or being worked on right now), or, before
    anything is re-queued, when --rules-version names an unknown version or one whose field
    map differs from the active version's (activate that one instead).

    \b
    Examples:
      linkcrm replay 42 43
      linkcrm replay --all-dead
      linkcrm replay --all-dead --rules-version 3f9a1c2e7b40
    """
    if not event_ids and status is None and not all_dead:
        raise click.UsageError("name event ids, --status S or --all-dead")
    settings = load_settings()

    async def requeue(storage: Storage) -> tuple[list[int], list[int], Pin] | str:
        try:
            pin = await choose_pin(storage, rules_version)
        except PinRefused as error:
            return str(error)
        chosen = pin.version if pin.pinned else None
        done: list[int] = []
        refused: list[int] = []
        for event_id in event_ids:
            (done if await storage.inbox.requeue(event_id, chosen) else refused).append(event_id)
        if all_dead:
            done += await storage.inbox.requeue_dead(chosen)
        if status is not None:
            before: int | None = None
            while page := await storage.inbox.list_events(status=status, limit=500,
                                                          before_id=before):
                for event in page:
                    (done if await storage.inbox.requeue(event.id, chosen)
                     else refused).append(event.id)
                before = page[-1].id
        return sorted(set(done)), refused, pin

    outcome = with_storage(settings, requeue)
    if isinstance(outcome, str):
        fail(f"{safe(outcome)}. Nothing was re-queued")
    done, refused, pin = outcome
    if output_format == "json":
        emit_json({"requeued": list(done), "refused": list(refused),
                   "rules_version": pin.version, "pinned": pin.pinned})
    else:
        click.echo(f"requeued {len(done)} event(s)" + (f": {_ids(done)}" if done else "")
                   + (f"; the worker applies them with {pin.describe()}" if done else ""))
    for event_id in refused:
        click.echo(f"error: event {event_id} was not re-queued (unknown, body purged, "
                   "or being worked on right now)", err=True)
    sys.exit(1 if refused else 0)


def _ids(ids: list[int]) -> str:
    shown = ", ".join(str(i) for i in ids[:20])
    return shown + (f" and {len(ids) - 20} more" if len(ids) > 20 else "")


@click.group()
def crm() -> None:
    """What the embedded CRM (the `local` target) holds.

    \b
    Example:
      linkcrm crm contacts --format json
    """


def _contact_row(contact: LocalContact) -> Row:
    return {
        "id": contact.id,
        "identities": [{"field": k.field, "value": k.value} for k in contact.identities],
        "fields": dict(contact.fields),
        "stage": contact.stage,
        "stage_history": [
            {"from": c.from_stage, "to": c.to_stage, "at": iso(c.at), "event_id": c.event_id}
            for c in contact.stage_history
        ],
        "created_at": iso(contact.created_at),
        "updated_at": iso(contact.updated_at),
    }


@crm.command()
@click.option("--limit", type=LIMIT, help="At most this many contacts.")
@FORMAT_OPTION
def contacts(limit: int | None, output_format: str) -> None:
    """List contacts with their identities, fields, stage and stage history, oldest first.

    \b
    Example:
      linkcrm crm contacts --format json
    """
    settings = load_settings()
    rows = [_contact_row(c) for c in with_storage(settings, lambda s: s.local_crm.contacts(limit))]
    _listing(rows, output_format, show=_show_contacts,
             empty="no contacts yet (send some events: `linkcrm send-samples`)")


def _show_contacts(rows: list[Row]) -> None:
    for row in rows:
        identities = row["identities"]
        assert isinstance(identities, list)
        names = ", ".join(f"{safe(i['field'])}={safe(i['value'])}" for i in identities
                          if isinstance(i, dict))
        click.echo(f"contact {row['id']}  stage: {safe(row['stage'] or '-')}  ({names})")
        fields = row["fields"]
        assert isinstance(fields, dict)
        for name, value in sorted(fields.items()):
            click.echo(f"    {safe(name)}: {safe_json(value)}")
        history = row["stage_history"]
        assert isinstance(history, list)
        for change in history:
            assert isinstance(change, dict)
            click.echo(f"    stage {safe(change['from'] or '(none)')} -> {safe(change['to'])} "
                       f"at {change['at']}")


@crm.command()
@click.option("--limit", type=LIMIT, help="At most this many deals.")
@FORMAT_OPTION
def deals(limit: int | None, output_format: str) -> None:
    """List deals (one per deal key, ever), oldest first.

    \b
    Example:
      linkcrm crm deals --format json
    """
    settings = load_settings()
    found: list[LocalDeal] = with_storage(settings, lambda s: s.local_crm.deals(limit))
    rows = [_deal_row(d) for d in found]
    _listing(rows, output_format, empty="no deals yet", show=_show_deals)


def _deal_row(deal: LocalDeal) -> Row:
    return {"id": deal.id, "key": deal.key, "title": deal.title, "stage": deal.stage,
            "amount": deal.amount, "contact_id": deal.contact_id, "fields": dict(deal.fields),
            "created_at": iso(deal.created_at)}


def _show_deals(rows: list[Row]) -> None:
    for row in rows:
        click.echo(f"deal {row['id']}  {safe(row['title'])}  stage: {safe(row['stage'] or '-')}"
                   f"  contact: {row['contact_id'] or '-'}  key: {safe(row['key'])}")


@click.command()
@click.option("--older-than", "older_than", required=True, callback=duration,
              help="Age, e.g. 30d, 12h, 2w.")
@FORMAT_OPTION
def purge(older_than: timedelta, output_format: str) -> None:
    """Drop the raw bodies of processed and ignored events older than the given age, and
    the shadow-mode results observed before then (they quote event values too).

    Dedupe keys, statuses and outcomes are kept, so a late retry of a purged delivery is
    still answered as a duplicate; a purged event can no longer be replayed. Touches older
    than LINKCRM_TOUCH_RETENTION_DAYS, which identify events no longer get, are dropped too.

    \b
    Example:
      linkcrm purge --older-than 30d
    """
    settings = load_settings()
    now = utc_now()
    cutoff = now - older_than
    touch_cutoff = now - timedelta(days=settings.touch_retention_days)

    async def work(storage: Storage) -> tuple[int, int, int]:
        return (await storage.inbox.purge_raw_bodies(cutoff),
                await storage.shadow.purge(cutoff),
                await storage.touches.forget(touch_cutoff))

    dropped, shadow, forgotten = with_storage(settings, work)
    if output_format == "json":
        emit_json({"purged": dropped, "received_before": iso(cutoff),
                   "shadow_results_purged": shadow,
                   "touches_forgotten": forgotten, "touches_before": iso(touch_cutoff)})
    else:
        click.echo(f"dropped the raw body of {dropped} event(s) received before {iso(cutoff)}"
                   + (f", and {shadow} shadow result(s) observed before then" if shadow
                      else ""))
        click.echo(f"forgot {forgotten} touch(es) older than LINKCRM_TOUCH_RETENTION_DAYS "
                   f"({iso(touch_cutoff)})")
