"""What every part of the storage contract uses: a clock the test moves, events, outcomes."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

from engine.actions import IdentityKey
from engine.storage import NewEvent, NewOutcome

STAGES = ("subscriber", "lead", "opportunity", "customer")
TOKEN = IdentityKey("deep_link_token", "tok_1")
EMAIL = IdentityKey("email", "ada@example.com")


class FakeClock:
    """A clock the test moves by hand, so leases and retries are tested without sleeping."""

    def __init__(self) -> None:
        self.now = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def event(n: int = 0, *, body: bytes | None = None, received_at: datetime | None = None,
          event_type: str = "install.tracked") -> NewEvent:
    raw = body if body is not None else (
        b'{"event":"%s","timestamp":"2026-03-01T00:00:00Z","data":{"n":%d}}'
        % (event_type.encode(), n)
    )
    return NewEvent(
        body=raw,
        event_type=event_type,
        event_timestamp="2026-03-01T00:00:00Z",
        dedupe_key=hashlib.sha256(raw).hexdigest(),
        received_at=received_at or datetime(2026, 3, 1, 11, 0, tzinfo=UTC),
        headers={"user-agent": "Tolinku/1.0"},
    )


def outcome(event_id: int, status: str, *, target: str = "hubspot", key: str = "k1",
            error: str | None = None) -> NewOutcome:
    return NewOutcome(
        event_id=event_id, rule="install-creates-lead", action_kind="upsert_contact",
        target=target, idempotency_key=key, status=status,  # type: ignore[arg-type]
        request_summary={"identity": {"deep_link_token": "tok_1"}},
        response={"id": "101"} if status == "ok" else None, error=error,
    )
