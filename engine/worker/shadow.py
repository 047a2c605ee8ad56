"""Shadow mode: a candidate rule version planned on live events next to the active one.

While a shadow version exists, the worker calls `observe(event, active, shadow)` for each event
it claims. The observer plans the event under both rule sets with the comparison `linkcrm diff`
makes (`engine.rules.diff.Comparer`, with the worker's own check of storable values) and
records the outcome in `storage.shadow`: `same`, `changed` with the per-action, per-field
differences, or `uncompared` with the error that stopped the comparison. `linkcrm rules
shadow-report` sums them up.

No target is involved: the shadow plan is compared and dropped, it never reaches a CRM. And
`observe` never raises: a failure (the database, a bug) is logged with the event id and the
error type only (messages may quote event data), counted in `failures` and in the
`linkcrm_shadow_events_total{outcome="failed"}` metric, and the worker goes on.

    observer = ShadowObserver(storage, metrics=metrics)
    await observer.observe(event, active_rules, shadow_rules)
"""

from __future__ import annotations

import json
import logging
from typing import Any

from engine.actions import JSON
from engine.errors import where
from engine.rules.diff import Comparer, EventDiff
from engine.rules.model import RuleSet
from engine.runtime.metrics import Metrics
from engine.storage import InboxEvent, NewShadowResult, ShadowOutcome, Storage
from engine.worker.plan import action_problem

log = logging.getLogger("engine.worker.shadow")

OUTCOMES = ("same", "changed", "uncompared", "skipped", "failed")
ERROR_CHARS = 300


class ShadowObserver:
    """Records how each observed event plans under a shadow rule version (see the module).

    `counts` holds what happened to the events observed so far, by outcome: the three a
    result records, `skipped` (a body that is purged or not JSON: neither version can plan
    it, so there is nothing to compare) and `failed` (nothing recorded: see the log).
    """

    def __init__(self, storage: Storage, *, metrics: Metrics | None = None) -> None:
        self._storage = storage
        self._pair: tuple[RuleSet, RuleSet] | None = None
        self._comparer: Comparer | None = None
        self.counts: dict[str, int] = dict.fromkeys(OUTCOMES, 0)
        self._metric = None if metrics is None else metrics.counter(
            "linkcrm_shadow_events_total",
            "Events planned under the shadow rule version next to the active one, by outcome "
            "(same, changed, uncompared, skipped, failed).", ("outcome",))
        if self._metric is not None:
            for outcome in OUTCOMES:
                self._metric.inc(0, outcome=outcome)

    @property
    def failures(self) -> int:
        return self.counts["failed"]

    async def observe(self, event: InboxEvent, active: RuleSet, shadow: RuleSet) -> None:
        """Plan `event` under `active` and `shadow` and record how the plans compare. Never
        raises (but for cancellation)."""
        try:
            outcome = await self._observe(event, active, shadow)
        except Exception as error:
            log.warning("shadow planning failed; nothing recorded for the event", extra={
                "event_id": event.id, "shadow_version": shadow.version,
                "error_type": type(error).__name__, "where": where(error)})
            outcome = "failed"
        self.counts[outcome] += 1
        if self._metric is not None:
            self._metric.inc(outcome=outcome)

    async def _observe(self, event: InboxEvent, active: RuleSet, shadow: RuleSet) -> str:
        if shadow.version is None:
            raise ValueError("the shadow rule set has no version; only a published version "
                             "can run in shadow mode")
        envelope = _envelope(event)
        if envelope is None:
            return "skipped"
        outcome: ShadowOutcome
        changes: list[JSON]
        message: str | None
        try:
            diff = self._comparer_for(active, shadow).compare(envelope)
        except Exception as error:  # an input nobody foresaw: recorded as such
            log.info("an event could not be compared under the shadow rules", extra={
                "event_id": event.id, "shadow_version": shadow.version,
                "error_type": type(error).__name__, "where": where(error)})
            outcome, changes, message = "uncompared", [], f"{type(error).__name__}: {error}"
            diff = EventDiff(event.event_type, ())
        else:
            outcome = "changed" if diff.changed else "same"
            changes, message = [change.as_json() for change in diff.changes], None
        await self._storage.shadow.record(NewShadowResult(
            event.id, shadow.version, active.version, diff.event_type or event.event_type,
            outcome, changes, None if message is None else message[:ERROR_CHARS]))
        return outcome

    def _comparer_for(self, active: RuleSet, shadow: RuleSet) -> Comparer:
        """One comparer per (active, shadow) pair of rule sets, kept while they stay."""
        if self._comparer is None or self._pair is None or self._pair[0] is not active \
                or self._pair[1] is not shadow:
            self._comparer = Comparer(active, shadow, screen=action_problem)
            self._pair = (active, shadow)
        return self._comparer


def _envelope(event: InboxEvent) -> Any:
    """The stored body parsed as the worker parses it, or None when it cannot be."""
    if event.body is None:
        return None
    try:
        return json.loads(event.body)
    except (ValueError, RecursionError):
        return None
