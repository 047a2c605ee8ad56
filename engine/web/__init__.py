"""The delivery log in the browser: events, one event's trace, dead letters with replay, the
embedded CRM, and an overview, served by `linkcrm serve` under /ui/ once
LINKCRM_UI_PASSWORD is set.

    pages = create_ui(storage, UIConfig(password="...", ruleset=ruleset))
    app = create_app(storage, settings, mounts=[Mount(UI_PATH, app=pages)])

Server-rendered (Jinja2, autoescaped), no script at all, no external origin; see access.py
for the session cookie, CSRF tokens and the Content-Security-Policy.
"""

from __future__ import annotations

from engine.web.app import UI_PATH, UIConfig, create_ui, ui_off

__all__ = ["UI_PATH", "UIConfig", "create_ui", "ui_off"]
