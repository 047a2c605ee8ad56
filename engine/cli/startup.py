"""What `serve` and `worker` run at start, and `kill -HUP`: the rules folder meets the
published versions.

At start the rules folder is published (after the checks `linkcrm rules publish` makes) when
its content was never published, or when no version is active yet, so editing the folder and
restarting keeps working. A folder whose version is published but not active (someone rolled
back or forward since) is not activated again: the process runs the active version and says
how to activate the folder's. SIGHUP re-reads the folder and publishes and activates it when it
differs from the active version (an explicit wish, so even a retired version comes back).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import click

from engine.errors import ConfigError, StorageError
from engine.rules.versions import RuleFilesError, load_version
from engine.runtime.metrics import Metrics
from engine.storage import NewRuleVersion, Storage
from engine.worker.snapshot import Rules

from .output import fail
from .releases import RulesRefused, check_rules, release_of
from .runtime import show_problems

log = logging.getLogger("engine.worker.rules")


def _release(location: Path) -> NewRuleVersion:
    try:
        return release_of([str(location)])
    except (RuleFilesError, OSError) as error:
        fail(f"the rules in {location} cannot be published: {error}")


def _checked(location: Path) -> None:
    """Exit 1 listing every error or failing test unless the folder passes `rules publish`'s
    checks; nothing is published then."""
    try:
        check_rules([str(location)])
    except RulesRefused as refusal:
        for line in refusal.lines:
            click.echo(line, err=True)
        fail(f"{refusal.summary} in {location}, so they are not published and nothing "
             f"changed; fix them (`linkcrm validate {location}`, `linkcrm test {location}`) "
             "and start again")


async def settle(storage: Storage, location: Path) -> str:
    """Publish the folder when it was never published or nothing is active; print a notice
    when its version is published but another is active. Returns the active version id."""
    new = _release(location)
    versions = storage.rule_versions
    stored = await versions.get(new.version)
    active = await versions.active_version()
    if stored is None or active is None:
        _checked(location)
        result = await versions.publish(new)
        if active != new.version:
            was = f" (was {active})" if active else ""
            click.echo(f"published the rules in {location} as {new.version}; active now{was}",
                       err=True)
        return result.version.version
    if active != new.version:
        click.echo(f"notice: running the active rule version {active}, not {new.version} from "
                   f"{location} (published before, then rolled back or forward); to run the "
                   f"folder's rules: linkcrm rules activate {new.version}", err=True)
    return active


async def active_rules(storage: Storage, active: str) -> Rules:
    """The active version, loaded; exit 1 when it does not load with this linkcrm."""
    stored = await storage.rule_versions.get(active)
    if stored is None:  # activated elsewhere and then removed: cannot happen, but say so
        fail(f"the active rule version {active} is not stored; `linkcrm rules list`")
    try:
        return Rules(load_version(dict(stored.files), active))
    except ConfigError as error:
        show_problems(p for p in error.problems if p.severity == "error")
        fail(f"the active rule version {active} does not load with this linkcrm; activate one "
             "that does (`linkcrm rules list`, `linkcrm rules activate VERSION`)")
    except RuleFilesError as error:
        fail(str(error))


async def publish_on_hangup(storage: Storage, location: Path) -> None:
    """SIGHUP: publish and activate the folder when it differs from the active version.
    Errors are logged (rule files and test names only) and the running version stays."""
    try:
        new = await asyncio.to_thread(release_of, [str(location)])
        active = await storage.rule_versions.active_version()
        if active == new.version:
            log.info(f"SIGHUP: the rules in {location} are the active version {active} already",
                     extra={"rules_version": active})
            return
        await asyncio.to_thread(check_rules, [str(location)])
        await storage.rule_versions.publish(new)
    except RulesRefused as refusal:
        log.error(f"SIGHUP: the rules in {location} are not published: {refusal.summary}; "
                  "the running version stays", extra={"problems": refusal.lines[:20]})
        return
    except (RuleFilesError, OSError, StorageError) as error:
        log.error(f"SIGHUP: the rules in {location} are not published; the running version "
                  "stays", extra={"error": str(error)})
        return
    log.info(f"SIGHUP: published the rules in {location} as {new.version} (was {active})",
             extra={"rules_version": new.version, "previous_version": active})


def hangup_handler(location: Path) -> Callable[[Storage, Metrics], Coroutine[Any, Any, None]]:
    """A background task for `serve` (storage, metrics): SIGHUP publishes the rules folder
    (see `publish_on_hangup`), one at a time."""

    async def rules_reload(storage: Storage, metrics: Metrics) -> None:
        loop = asyncio.get_running_loop()
        wanted = asyncio.Event()
        loop.add_signal_handler(signal.SIGHUP, wanted.set)
        try:
            while True:
                await wanted.wait()
                wanted.clear()
                await publish_on_hangup(storage, location)
        finally:
            loop.remove_signal_handler(signal.SIGHUP)

    return rules_reload
