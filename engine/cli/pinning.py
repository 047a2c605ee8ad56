"""`linkcrm replay --rules-version`: which published version re-queued events are pinned to,
checked before anything is re-queued.

The worker builds its CRM targets from the active version's field map, so a pinned version
must map fields exactly as the active one does; one that does not is refused (activate it
instead). The check loads both versions from their stored files.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.errors import ConfigError
from engine.rules.diff import same_field_map
from engine.rules.model import RuleSet
from engine.rules.versions import RuleFilesError, load_version
from engine.storage import RuleVersion, Storage

from .rulesets import UnknownRuleSetError, find_published


class PinRefused(ValueError):
    """The version cannot be pinned; the message says why and what to do instead."""


@dataclass(frozen=True)
class Pin:
    """What replayed events are planned with: `version` (None: no version is published, the
    worker's rules folder), `active` (the active version's id), and whether the events are
    pinned to `version` rather than left to whatever is active when the worker gets to
    them."""

    version: str | None
    active: str | None
    pinned: bool

    def describe(self) -> str:
        if self.version is None:
            return "the rules the worker loaded (no rule version is published)"
        if not self.pinned:
            return f"rules version {self.version} (active)"
        if self.version == self.active:
            return f"rules version {self.version} (active, pinned)"
        return f"rules version {self.version} (pinned; the active version is {self.active})"


def _load(version: RuleVersion) -> RuleSet:
    try:
        return load_version(version.files, version.version)
    except (ConfigError, RuleFilesError) as error:
        detail = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise PinRefused(f"rule version {version.version} does not load with this linkcrm "
                         f"({detail}); publish its rules again") from None


async def choose_pin(storage: Storage, ref: str | None) -> Pin:
    """The pin for `replay --rules-version ref` (None: no option, the active version).
    Raises PinRefused for an unknown version, one that does not load, one whose field map
    differs from the active version's, or any version while none is active."""
    active = await storage.rule_versions.active()
    if ref is None:
        return Pin(None if active is None else active.version,
                   None if active is None else active.version, False)
    try:
        chosen = await find_published(storage.rule_versions, ref)
    except UnknownRuleSetError as error:
        raise PinRefused(str(error)) from None
    if active is None:
        raise PinRefused("no rule version is active, so the worker plans with the rules folder "
                         "it loaded and cannot check a pin against it; publish the rules "
                         "(`linkcrm rules publish rules/`), then replay")
    if chosen.version != active.version and not same_field_map(
            _load(chosen).field_map, _load(active).field_map):
        raise PinRefused(
            f"rule version {chosen.version} maps fields unlike the active version "
            f"{active.version}; the worker's CRM targets are built from the active field map, "
            f"so it cannot plan with {chosen.version} alone. Activate it instead (`linkcrm "
            f"rules activate {chosen.version}`), then replay")
    return Pin(chosen.version, active.version, True)
