"""Shared pieces of the worker tests: a scriptable fake target, events, rules and a runner."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from engine.actions import Action
from engine.rules.files import load_ruleset
from engine.rules.model import RuleSet
from engine.storage import NewEvent, Storage
from engine.targets.base import CallContext, Outcome
from tests.support.paths import REPO

ROOT = REPO

BASE_RULES = """\
version: 1
rules:
  - name: install-creates-lead
    on: install.tracked
    actions:
      - upsert_contact:
          identity: {deep_link_token: data.token}
          set: {deep_link_prefix: data.prefix}
      - set_stage: {identity: {deep_link_token: data.token}, stage: lead}
  - name: claim-needs-an-email
    on: deferred_link.claimed
    actions:
      - upsert_contact:
          identity: {email: data.email}
          set: {deep_link_prefix: data.prefix}
      - set_stage: {identity: {deep_link_token: data.token}, stage: lead}
"""


def write_rules(directory: Path, text: str = BASE_RULES) -> RuleSet:
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "rules" / "fields.yaml", directory / "fields.yaml")
    (directory / "rules.yaml").write_text(text, encoding="utf-8")
    return load_ruleset([directory])


def shipped_rules() -> RuleSet:
    return load_ruleset([ROOT / "rules"])


def new_event(event_type: str, data: dict[str, Any], timestamp: str = "2026-03-01T12:00:00Z",
              source: str = "tolinku") -> NewEvent:
    body = json.dumps({"event": event_type, "timestamp": timestamp, "data": data},
                      separators=(",", ":")).encode()
    return NewEvent(body=body, event_type=event_type, event_timestamp=timestamp,
                    dedupe_key=hashlib.sha256(body).hexdigest(),
                    received_at=datetime.now(UTC), source=source)


async def store(storage: Storage, event_type: str, **data: Any) -> int:
    return (await storage.inbox.store(new_event(event_type, data))).id


class FakeTarget:
    """A target that records every call and does what the test scripts.

    `errors` are raised one per call, in order, before calls succeed; `always` is raised on
    every call; a call for an event in `gates` waits until that gate opens; `delay` slows
    every call. `active`/`max_active` count calls in progress.
    """

    def __init__(self, name: str = "fake", *, errors: list[Exception] | None = None,
                 always: Exception | None = None, delay: float = 0.0) -> None:
        self.name = name
        self.errors = list(errors or [])
        self.always = always
        self.delay = delay
        self.gates: dict[int, asyncio.Event] = {}
        self.calls: list[tuple[int | None, Action, str]] = []
        self.started: list[int | None] = []
        self.active = 0
        self.max_active = 0

    async def execute(self, action: Action, context: CallContext) -> Outcome:
        event_id = context.event_id
        self.started.append(event_id)
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            gate = self.gates.get(event_id) if event_id is not None else None
            if gate is not None:
                await gate.wait()
            if self.delay:
                await asyncio.sleep(self.delay)
            self.calls.append((event_id, action, context.idempotency_key))
            if self.errors:
                raise self.errors.pop(0)
            if self.always is not None:
                raise self.always
            return Outcome(record_id=f"{self.name}-{len(self.calls)}", summary="done")
        finally:
            self.active -= 1

    async def aclose(self) -> None:
        pass

    def events(self) -> list[int]:
        """Event ids in call order."""
        return [event_id for event_id, _, _ in self.calls if event_id is not None]

    def kinds(self, event_id: int) -> list[str]:
        return [action.kind for e, action, _ in self.calls if e == event_id]


async def wait_until(condition: Callable[[], Any], timeout: float = 10.0,
                     what: str = "condition") -> None:
    """Poll `condition` (sync or async) until truthy, failing after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)
