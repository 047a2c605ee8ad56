"""The delivery log pages for `linkcrm serve`: built here, where the rules and the storage
meet, and passed to the service as routes (the service knows no rules)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import click
from starlette.routing import BaseRoute, Mount

from engine.rules.model import RuleSet
from engine.runtime.settings import Settings
from engine.storage import Storage
from engine.web import UI_PATH, UIConfig, create_ui, ui_off


def rules_label(settings: Settings, ruleset: RuleSet | None) -> str:
    """How the pages name the rules a replay uses."""
    if ruleset is None:
        return "the rules (which do not load now: `linkcrm validate` lists why)"
    version = f" (version {ruleset.version[:12]})" if ruleset.version else ""
    return f"the rules in {settings.rules_dir}{version} (no rule version is published yet)"


def page_routes(settings: Settings, ruleset: RuleSet | None,
                targets: Sequence[str]) -> Callable[[Storage], Sequence[BaseRoute]]:
    """The /ui/ mount, built once the storage is open: the pages, or a 404 saying how to
    turn them on while LINKCRM_UI_PASSWORD is not set."""
    label = rules_label(settings, ruleset)

    def build(storage: Storage) -> Sequence[BaseRoute]:
        if settings.ui_password is None:
            return [Mount(UI_PATH, app=ui_off())]
        config = UIConfig(settings.ui_password, ruleset, label, tuple(targets))
        return [Mount(UI_PATH, app=create_ui(storage, config))]

    return build


def announce(settings: Settings, host: str, port: int) -> None:
    """One line on stderr: where the page is, or how to turn it on."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    if ":" in shown:
        shown = f"[{shown}]"
    if settings.ui_password is None:
        click.echo("delivery log page: off (set LINKCRM_UI_PASSWORD to turn it on)", err=True)
    else:
        click.echo(f"delivery log page: http://{shown}:{port}{UI_PATH}/ "
                   "(log in with LINKCRM_UI_PASSWORD)", err=True)
