"""The rules a worker plans with, as one snapshot, and the hook that sees a shadow version.

    rules = Rules(active=ruleset)                 # what `Worker` plans each claimed event with
    rules = Rules(active=ruleset, shadow=candidate)  # a candidate evaluated next to it

A snapshot never changes: a new published version makes a new one (`engine.worker.follow`), and
an event keeps the snapshot it was claimed with until it is done.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

from engine.rules.model import RuleSet
from engine.storage import InboxEvent


@dataclass(frozen=True)
class Rules:
    """The active rule set, and the shadow one when a version is published with --shadow."""

    active: RuleSet
    shadow: RuleSet | None = None

    @property
    def versions(self) -> tuple[str | None, str | None]:
        """(active version, shadow version), as `RuleVersions.current()` names them."""
        return self.active.version, None if self.shadow is None else self.shadow.version


def same_field_map(one: RuleSet, other: RuleSet) -> bool:
    """Whether two rule sets map fields alike, so the targets built for one serve the other
    (the file each was read from does not count)."""
    return replace(one.field_map, file="") == replace(other.field_map, file="")


class ShadowHook(Protocol):
    """Sees each claimed event while a shadow version is published: evaluates `shadow` next to
    `active` and records what differs. It runs as its own task; it must never write to a CRM,
    and whatever it raises is logged and counted, never failing or delaying the event."""

    async def observe(self, event: InboxEvent, active: RuleSet, shadow: RuleSet) -> None:
        ...
