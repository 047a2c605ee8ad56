"""Service commands: `serve`, `worker` and `migrate`."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import NoReturn

import click

from engine.errors import ConfigError, StorageError
from engine.rules.files import load_ruleset
from engine.rules.model import RuleSet
from engine.runtime.collector import collect_cycles_seldom
from engine.runtime.gil import share_the_gil_promptly
from engine.runtime.logs import configure_logging
from engine.runtime.metrics import Metrics
from engine.runtime.settings import Settings
from engine.service.server import run
from engine.storage import Storage, open_storage
from engine.targets.registry import select_targets
from engine.worker.assembly import (
    InProcessWorker,
    StandaloneWorker,
    in_process_worker,
    open_worker,
)
from engine.worker.snapshot import Rules

from . import params
from .listen import bind
from .output import fail
from .pages import announce, page_routes
from .runtime import (
    database_label,
    load_settings,
    require_secret,
    rules_folder,
    rules_location,
    show_problems,
    storage_failed,
    with_storage,
)
from .startup import active_rules, hangup_handler, settle

CONCURRENCY = click.option(
    "--concurrency", type=params.CONCURRENCY, default=None,
    help="Events each target handles at once, 1 to 1000 [default: $LINKCRM_WORKER_CONCURRENCY "
         "or 4].",
)


def _check_targets() -> list[str]:
    try:
        return select_targets(os.environ)
    except ConfigError as error:
        show_problems(error.problems)
        fail("fix the target settings above", 2)


def _targets_quietly() -> list[str]:
    """The targets the delivery log searches, for `serve --no-worker` (which runs none)."""
    try:
        return select_targets(os.environ)
    except ConfigError:
        return ["local"]


def _rules_quietly(settings: Settings) -> RuleSet | None:
    """The rules that explain events on the delivery log, for `serve --no-worker`."""
    try:
        return load_ruleset([rules_location(settings)])
    except (ConfigError, OSError):
        return None


def _not_set_up(error: ConfigError) -> NoReturn:
    show_problems(error.problems)
    names = sorted({problem.location.file for problem in error.problems})
    if all(problem.code == "credentials-refused" for problem in error.problems):
        fail(f"{' and '.join(names)} refused the credentials: fix them as said above, then "
             "start again")
    verb = "is" if len(names) == 1 else "are"
    fail(f"{' and '.join(names)} {verb} not set up for the field map: fix the problems above, then "
         "start again (" + ", ".join(f"`linkcrm doctor {name}`" for name in names) +
         " checks)")


def _prepare(settings: Settings, location: Path, *, worker: bool,
             migrate: bool) -> Rules | None:
    """Before serving: create or upgrade the schema (unless --no-migrate), settle the rules
    folder with the published versions (`engine.cli.startup`) and, with the worker, start the
    targets once for the active version, so a CRM that is not set up for the field map (a
    Pipedrive field label that does not exist) stops `serve` with its fix instead of
    dead-lettering every action. Returns the active rules (None without the worker)."""

    async def prepare(storage: Storage) -> Rules | None:
        if migrate:
            await storage.migrate()  # the shared rate limits live in the database
        elif await storage.schema_version() == 0:
            raise StorageError("the database has no schema yet; run `linkcrm migrate` (or "
                               "start without --no-migrate)")
        active = await settle(storage, location)
        if not worker:
            return None
        rules = await active_rules(storage, active)
        async with open_worker(storage, rules.active, settings, os.environ, metrics=Metrics()):
            pass
        return rules

    try:
        return with_storage(settings, prepare, create=migrate)
    except ConfigError as error:
        _not_set_up(error)


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535),
              help="TCP port to listen on.")
@click.option("--no-worker", is_flag=True,
              help="Only receive and store; run `linkcrm worker` elsewhere.")
@click.option("--no-migrate", is_flag=True,
              help="Do not create or upgrade the database schema at start.")
@CONCURRENCY
def serve(host: str, port: int, no_worker: bool, no_migrate: bool,
          concurrency: int | None) -> None:
    """Receive Tolinku webhooks and apply the rules: the main job.

    Verifies and durably stores every event before answering (POST /webhooks/tolinku,
    POST /v1/identify), and runs the worker in the same process, which applies the rules
    to every enabled target (the embedded `local` CRM when no CRM credentials are set).
    Also serves GET /healthz, /readyz and /metrics, and the delivery log page at /ui/
    when LINKCRM_UI_PASSWORD is set. Needs WEBHOOK_SECRET; reads
    LINKCRM_DATABASE_URL (default sqlite:///linkcrm.db) and LINKCRM_RULES (default rules/).
    Stops on Ctrl-C or SIGTERM. Exit 3 when it cannot listen on HOST:PORT (the port is in
    use), before anything else starts.

    \b
    Example:
      export WEBHOOK_SECRET=whsec_...
      linkcrm serve --port 8000
    """
    settings = load_settings()
    require_secret(settings)
    location = rules_folder(settings)
    targets = _check_targets() if not no_worker else _targets_quietly()
    sockets = bind(host, port)  # before the database or a CRM is touched: a taken port is exit 3
    try:
        rules = _prepare(settings, location, worker=not no_worker, migrate=not no_migrate)
        workers: list[InProcessWorker] = [hangup_handler(location)]
        if rules is not None:
            workers.append(in_process_worker(rules, settings, os.environ, concurrency))
        announce(settings, host, port)
        shown = rules.active if rules is not None else _rules_quietly(settings)
        run(settings, host=host, port=port, migrate=False, workers=workers, sockets=sockets,
            pages=page_routes(settings, shown, targets))
    except KeyboardInterrupt:
        pass  # Ctrl-C: uvicorn has shut down gracefully and re-raised SIGINT; a clean stop
    except StorageError as error:
        storage_failed(settings, error)
    except ConfigError as error:
        show_problems(error.problems)
        fail("fix the settings above", 2)
    finally:
        for sock in sockets:
            sock.close()


@click.command()
@CONCURRENCY
def worker(concurrency: int | None) -> None:
    """Run only the worker: apply the rules to stored events (scale-out, or next to
    `linkcrm serve --no-worker`). Several workers may share one database.

    Stops on Ctrl-C or SIGTERM, letting in-flight events finish for a few seconds.

    \b
    Example:
      linkcrm worker --concurrency 8
    """
    settings = load_settings()
    location = rules_folder(settings)
    _check_targets()
    configure_logging(settings.log_level)
    share_the_gil_promptly()  # the SQLite writer thread hands commits back without waiting
    collect_cycles_seldom()  # thousands of events in flight make each walk long
    try:
        asyncio.run(_work(settings, location, concurrency))
    except StorageError as error:
        storage_failed(settings, error)
    except ConfigError as error:
        _not_set_up(error)


async def _work(settings: Settings, location: Path, concurrency: int | None) -> None:
    storage = open_storage(settings.database_url, create=False)
    try:
        if await storage.schema_version() == 0:
            raise StorageError("the database has no schema yet; run `linkcrm migrate`")
        rules = await active_rules(storage, await settle(storage, location))
        # Supervised: a crash is logged and the worker restarts; Ctrl-C or SIGTERM ends it.
        standalone = StandaloneWorker(storage, rules, settings, os.environ,
                                      concurrency=concurrency)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, standalone.stop)
        hangups = asyncio.create_task(hangup_handler(location)(storage, standalone.metrics))
        try:
            await standalone.run()
        finally:
            hangups.cancel()
            await asyncio.gather(hangups, return_exceptions=True)
    finally:
        await storage.close()


@click.command()
def migrate() -> None:
    """Create or upgrade the database schema (LINKCRM_DATABASE_URL). Safe to run twice;
    `linkcrm serve` runs it at start unless given --no-migrate.

    \b
    Example:
      LINKCRM_DATABASE_URL=sqlite:///linkcrm.db linkcrm migrate
    """
    settings = load_settings()
    version = with_storage(settings, lambda storage: storage.migrate(), create=True)
    click.echo(f"{database_label(settings.database_url)}: schema at version {version}")
