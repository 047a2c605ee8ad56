"""Following the published rules: every running worker picks up a new active version.

    follower = RuleFollower(storage, Rules(active=ruleset), metrics=metrics)
    follower.announce()                       # "rules version X active (was none)"
    async for candidate in follower.changes():    # loaded, and other than follower.current
        follower.adopt(candidate)             # or follower.refuse(candidate, why)

The follower learns of a change through `RuleVersions.wait_for_change` (PostgreSQL: the NOTIFY a
publish or activation sends on commit; SQLite: a quarter-second poll), reads the ids with
`current()`, and loads the version from its stored files. A version that does not load with
this linkcrm (or whose field map the CRM does not fit, see `engine.worker.assembly`) is logged
and refused: the process keeps running what it had, and tries again only when the published
versions change once more. The snapshot it hands out (`current`) never changes in place, so an
event finishes with the rules it was claimed with.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable

from engine.errors import ConfigError, StorageError
from engine.rules.model import RuleSet
from engine.rules.versions import RuleFilesError, load_version
from engine.runtime.metrics import Metrics, Sample
from engine.storage import Storage
from engine.worker.snapshot import Rules

log = logging.getLogger("engine.worker.rules")

# How long one wait for a change lasts before `current()` is read anyway (a lost NOTIFY).
RECHECK_SECONDS = 1.0
MAX_PROBLEMS_LOGGED = 10
# Loaded versions kept (a version's files never change): a rollback to a recent one is instant.
CACHED_VERSIONS = 4


class RuleFollower:
    """Hands out the rules snapshot this process runs, and finds the published changes."""

    def __init__(self, storage: Storage, initial: Rules, *, metrics: Metrics | None = None,
                 recheck: float = RECHECK_SECONDS) -> None:
        self.storage = storage
        self.current = initial
        self.recheck = recheck
        self._handled = initial.versions  # the published ids last adopted or refused
        self._pending = initial.versions  # the published ids of the last candidate
        self._loaded: dict[str, RuleSet] = {}
        for ruleset in (initial.active, initial.shadow):
            if ruleset is not None and ruleset.version is not None:
                self._loaded[ruleset.version] = ruleset
        metrics = metrics or Metrics()
        self.reloads = metrics.counter(
            "linkcrm_rules_reloads_total",
            "Switches of this process to another published rule version (active or shadow).",
            ())
        self.failures = metrics.counter(
            "linkcrm_rules_reload_failures_total",
            "Published rule versions this process refused (they did not load with this "
            "linkcrm, or the CRM does not fit their field map); it kept its rules.", ())
        self.reloads.inc(0)
        self.failures.inc(0)
        metrics.gauge("linkcrm_rules_info",
                      "1 for each rule version this process runs, by role (active, shadow).",
                      self._collect)

    def announce(self) -> None:
        """Log the version this process starts with."""
        log.info(f"rules version {self.current.active.version} active (was none)",
                 extra={"rules_version": self.current.active.version,
                        "shadow_version": self.current.versions[1]})

    async def changes(self) -> AsyncIterator[Rules]:
        """Each loaded snapshot that differs from `current`, as soon as it is published; the
        caller adopts or refuses it before asking for the next."""
        while True:
            candidate = await self.check()
            if candidate is not None:
                yield candidate
                continue
            try:
                await self.storage.rule_versions.wait_for_change(self.recheck)
            except StorageError as error:  # a lost LISTEN: read current() on a timer
                log.warning("waiting for rule changes failed", extra={"error": str(error)})
                await asyncio.sleep(self.recheck)

    async def check(self) -> Rules | None:
        """The snapshot to switch to when the published versions are not the ones this
        process last adopted or refused; None when nothing changed, no version is active, or
        it does not load (refused here). A storage failure is logged; the next check retries."""
        try:
            ids = await self.storage.rule_versions.current()
        except StorageError as error:
            log.warning("could not read the published rule versions",
                        extra={"error": str(error)})
            return None
        active_id, shadow_id = ids
        if ids == self._handled or active_id is None:
            return None
        try:
            active = await self._load(active_id, self.current.active)
        except (StorageError, OSError) as error:  # transient: the next check tries again
            log.warning("could not read the published rule version",
                        extra={"rules_version": active_id, "error": str(error)})
            return None
        except (ConfigError, RuleFilesError, LookupError) as error:
            self._refuse_ids(ids, active_id, _problems(error))
            return None
        shadow: RuleSet | None = None
        if shadow_id is not None:
            try:
                shadow = await self._load(shadow_id, self.current.shadow)
            except (StorageError, OSError) as error:
                log.warning("could not read the shadow rule version",
                            extra={"rules_version": shadow_id, "error": str(error)})
                return None
            except (ConfigError, RuleFilesError, LookupError) as error:
                # The active version still runs; only the shadow comparison is left out.
                self.failures.inc()
                log.error(f"shadow rules version {shadow_id} does not load with this linkcrm; "
                          "no shadow comparison runs", extra={
                              "rules_version": shadow_id, "problems": _problems(error)})
        candidate = Rules(active, shadow)
        if candidate.versions == self.current.versions:
            self._handled = ids
            return None
        self._pending = ids
        return candidate

    def adopt(self, rules: Rules) -> None:
        """Run `rules` from the next claim on; logged and counted."""
        was = self.current
        self.current = rules
        self._handled = self._pending
        self.reloads.inc()
        if rules.active.version != was.active.version:
            log.info(f"rules version {rules.active.version} active (was "
                     f"{was.active.version})", extra={
                         "rules_version": rules.active.version,
                         "previous_version": was.active.version})
        if rules.versions[1] != was.versions[1]:
            log.info(f"shadow rules version {rules.versions[1] or 'none'} (was "
                     f"{was.versions[1] or 'none'})",
                     extra={"shadow_version": rules.versions[1]})

    def refuse(self, rules: Rules, problems: Iterable[str]) -> None:
        """Keep the current rules: `rules` cannot run here (its field map does not fit the
        CRM). Logged and counted; tried again only when the published versions change."""
        self._refuse_ids(self._pending, rules.active.version,
                         list(problems))

    def _refuse_ids(self, ids: tuple[str | None, str | None], version: str | None,
                    problems: list[str]) -> None:
        self._handled = ids
        self.failures.inc()
        log.error(f"rules version {version} cannot run in this process; it keeps running "
                  f"{self.current.active.version}", extra={
                      "rules_version": version, "running_version": self.current.active.version,
                      "problems": problems[:MAX_PROBLEMS_LOGGED]})

    async def _load(self, version: str, running: RuleSet | None) -> RuleSet:
        if running is not None and running.version == version:
            return running
        cached = self._loaded.pop(version, None)
        if cached is None:
            stored = await self.storage.rule_versions.get(version)
            if stored is None:
                raise LookupError(f"rule version {version} is not stored any more")
            cached = await asyncio.to_thread(load_version, dict(stored.files), version)
        self._loaded[version] = cached  # the most recently used last
        while len(self._loaded) > CACHED_VERSIONS:
            del self._loaded[next(iter(self._loaded))]
        return cached

    async def _collect(self) -> Iterable[Sample]:
        active, shadow = self.current.versions
        samples = [Sample({"version": str(active), "role": "active"}, 1.0)]
        if shadow is not None:
            samples.append(Sample({"version": shadow, "role": "shadow"}, 1.0))
        return samples


def _problems(error: Exception) -> list[str]:
    """What is wrong with a stored version, from its rule files (never event data)."""
    if isinstance(error, ConfigError):
        return [problem.render() for problem in error.problems
                if problem.severity == "error"][:MAX_PROBLEMS_LOGGED]
    return [str(error)]
