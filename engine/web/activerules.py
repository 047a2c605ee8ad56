"""The rules the delivery log explains events with: the active published version, as the
workers run it, or the rules `serve` loaded when no version is published (or the active one
cannot be loaded here)."""

from __future__ import annotations

import logging

from engine.errors import ConfigError, StorageError
from engine.rules.model import RuleSet
from engine.rules.versions import RuleFilesError, load_version
from engine.storage import RuleVersions

log = logging.getLogger(__name__)


class ActiveRules:
    """`await rules.current()` → (rule set or None, how the page names it). One cheap read
    of the active version per call; a version is loaded once and kept until another is
    active.

        rules = ActiveRules(storage.rule_versions, folder_rules, "the rules in rules/")
    """

    def __init__(self, versions: RuleVersions, fallback: RuleSet | None,
                 fallback_label: str) -> None:
        self._versions = versions
        self._fallback = fallback
        self._fallback_label = fallback_label
        self._loaded: RuleSet | None = None

    async def current(self) -> tuple[RuleSet | None, str]:
        try:
            version = await self._versions.active_version()
        except StorageError:
            version = None
        if version is None:
            return self._fallback, self._fallback_label
        if self._fallback is not None and self._fallback.version == version:
            return self._fallback, f"rules version {version} (active now)"
        if self._loaded is None or self._loaded.version != version:
            loaded = await self._load(version)
            if loaded is None:
                return self._fallback, self._fallback_label
            self._loaded = loaded
        return self._loaded, f"rules version {version} (active now)"

    async def _load(self, version: str) -> RuleSet | None:
        try:
            stored = await self._versions.get(version)
            if stored is None:
                return None
            return load_version(stored.files, version)
        except (ConfigError, RuleFilesError, StorageError, OSError) as error:
            log.warning("the delivery log cannot load the active rule version; it explains "
                        "events with the rules serve started with", extra={
                            "rules_version": version, "error_type": type(error).__name__})
            return None
