"""CLI plumbing for the service commands: settings, rules and storage, with errors that exit."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import NoReturn, TypeVar

import click

from engine.config.resources import data_dir
from engine.errors import ConfigError, Problem, StorageError
from engine.rules.files import load_ruleset
from engine.rules.model import RuleSet
from engine.rules.versions import RuleFilesError, collect
from engine.runtime.redact import redact_url
from engine.runtime.settings import Settings
from engine.storage import Storage, open_storage

from .output import fail

T = TypeVar("T")

NEW_SECRET = (
    "export WEBHOOK_SECRET=whsec_$(python3 -c 'import secrets; print(secrets.token_hex(24))')"
)


def show_problems(problems: Iterable[Problem]) -> None:
    for problem in sorted(problems, key=Problem.sort_key):
        click.echo(problem.render(), err=True)


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """The settings from the environment; exit 2 (a usage problem) listing every bad one."""
    try:
        return Settings.from_env(os.environ if environ is None else environ)
    except ConfigError as error:
        show_problems(error.problems)
        fail("fix the environment variables above", 2)


def require_secret(settings: Settings) -> None:
    if not settings.webhook_secrets:
        fail(
            "WEBHOOK_SECRET is not set, so no webhook could be verified.\n"
            "  Use the signing secret from Tolinku's webhook settings:\n"
            "    export WEBHOOK_SECRET=whsec_...   (comma-separate two during a rotation)\n"
            "  or, to try linkcrm locally, make one:\n"
            f"    {NEW_SECRET}",
            2,
        )


def rules_location(settings: Settings, environ: Mapping[str, str] | None = None) -> Path:
    """$LINKCRM_RULES, else ./rules, else the rules shipped with linkcrm."""
    environ = os.environ if environ is None else environ
    if environ.get("LINKCRM_RULES", "").strip() or settings.rules_dir.exists():
        return settings.rules_dir
    return data_dir("rules")


def rules_folder(settings: Settings) -> Path:
    """The rules folder `serve` and `worker` publish at start; exit 2 when there is none."""
    location = rules_location(settings)
    if not location.exists():
        fail(f"no rules folder at {str(location)!r}; set LINKCRM_RULES to your rules folder", 2)
    return location


def load_rules(settings: Settings) -> RuleSet:
    location = rules_folder(settings)
    try:
        ruleset = load_ruleset([location])
    except ConfigError as error:
        show_problems(p for p in error.problems if p.severity == "error")
        fail(f"the rules in {location} do not load; `linkcrm validate {location}` lists why")
    try:  # the version its outcomes record (`linkcrm rules list` names published ones)
        return replace(ruleset, version=collect([location]).version)
    except (RuleFilesError, OSError):
        return ruleset


def with_storage(settings: Settings, work: Callable[[Storage], Awaitable[T]], *,
                 create: bool = False, failure_code: int = 1) -> T:
    """Open the database, run `work`, close it; a StorageError exits 1 (or `failure_code`)
    naming the database. Only `create` (serve, migrate) makes a SQLite file that does not
    exist yet."""

    async def run() -> T:
        storage = open_storage(settings.database_url, create=create)
        try:
            return await work(storage)
        finally:
            await storage.close()

    try:
        return asyncio.run(run())
    except StorageError as error:
        storage_failed(settings, error, failure_code)


def database_label(url: str) -> str:
    """The database for messages: a SQLite path, or the URL without its password."""
    if url.lower().startswith("sqlite:///"):
        return url[len("sqlite:///"):]
    return redact_url(url)


def storage_failed(settings: Settings, error: StorageError, code: int = 1) -> NoReturn:
    """Exit 1 (or `code`) with the error, naming the database unless the message already
    does."""
    label = database_label(settings.database_url)
    message = str(error)
    fail(message if label in message else f"{label}: {message}", code)


def iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat().replace("+00:00", "Z")
