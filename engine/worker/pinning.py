"""Pinned rule versions: the rule set an event requeued by `linkcrm replay --rules-version`
is planned with.

A requeued event may name a published rule version (`InboxEvent.rules_version`). The worker
asks `ruleset_for(event, active)`: the active rule set when the event is not pinned or is
pinned to the active version, else the pinned version rebuilt from its stored files
(`engine.rules.versions.load_version`), kept in a small cache so a replay of many events loads
it once. A pin that no longer loads (not in the database, damaged files, rules this linkcrm
cannot load, or a field map other than the active one's, which the targets were built from)
is logged and the event planned with the active version: a replay never stops on it.

    pinned = PinnedRules(storage.rule_versions)
    ruleset = await pinned.ruleset_for(event, active)
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable

from engine.rules.model import RuleSet
from engine.rules.versions import load_version
from engine.storage import InboxEvent, RuleVersions
from engine.worker.snapshot import same_field_map

log = logging.getLogger("engine.worker.pinning")

CACHE_SIZE = 8
RETRY_SECONDS = 30.0  # how long a pin that did not load is not asked for again


class PinnedRules:
    """The rule set each event is planned with (see the module). `clock` is monotonic seconds."""

    def __init__(self, versions: RuleVersions, *, size: int = CACHE_SIZE,
                 retry_seconds: float = RETRY_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._versions = versions
        self._size = size
        self._retry = retry_seconds
        self._clock = clock
        self._loaded: OrderedDict[str, RuleSet] = OrderedDict()
        self._failed: dict[str, float] = {}  # version -> when it may be tried again
        self.fallbacks = 0  # events planned with the active version instead of their pin

    async def ruleset_for(self, event: InboxEvent, active: RuleSet) -> RuleSet:
        """The rule set to plan `event` with; never raises."""
        pin = event.rules_version
        if pin is None or pin == active.version:
            return active
        ruleset = self._loaded.get(pin)
        if ruleset is not None:
            self._loaded.move_to_end(pin)
        elif self._failed.get(pin, 0.0) > self._clock():
            ruleset = None
        else:
            ruleset = await self._load(event, pin)
        if ruleset is None or not same_field_map(ruleset, active):
            if ruleset is not None:
                log.warning("the pinned rule version maps fields unlike the active one; "
                            "planning with the active version", extra={
                                "event_id": event.id, "rules_version": pin,
                                "active_version": active.version})
            self.fallbacks += 1
            return active
        return ruleset

    async def _load(self, event: InboxEvent, pin: str) -> RuleSet | None:
        try:
            stored = await self._versions.get(pin)
            if stored is None:
                raise LookupError("the version is not published in this database")
            ruleset = await asyncio.to_thread(load_version, stored.files, stored.version)
        except Exception as error:
            log.warning("the pinned rule version does not load; planning with the active "
                        "version", extra={"event_id": event.id, "rules_version": pin,
                                          "error_type": type(error).__name__})
            self._failed[pin] = self._clock() + self._retry
            return None
        self._failed.pop(pin, None)
        self._loaded[pin] = ruleset
        while len(self._loaded) > self._size:
            self._loaded.popitem(last=False)
        return ruleset
