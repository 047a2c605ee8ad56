"""The delivery log pages for tests: an app with them mounted, logging in, and forms.

    app = web_app(storage)                      # the receiver app with /ui/ (PASSWORD)
    await login(client, PASSWORD)               # an httpx.AsyncClient on it
"""

from __future__ import annotations

import re
from pathlib import Path

import httpx
from starlette.applications import Starlette
from starlette.routing import Mount

from engine.rules.files import load_ruleset
from engine.runtime.settings import Settings
from engine.service.app import create_app
from engine.storage import Storage
from engine.web import UI_PATH, UIConfig, create_ui
from tests.support.paths import REPO

PASSWORD = "correct horse battery staple"
RULES = REPO / "rules"
_CSRF = re.compile(r'name="csrf" value="([0-9a-f]+)"')


def web_app(storage: Storage, *, password: str = PASSWORD, rules: Path = RULES,
            targets: tuple[str, ...] = ("local",)) -> Starlette:
    ruleset = load_ruleset([rules])
    config = UIConfig(password, ruleset, "the shipped rules", targets)
    settings = Settings(webhook_secrets=("whsec_test",))
    return create_app(storage, settings, pages=[Mount(UI_PATH, app=create_ui(storage, config))])


def csrf_of(html: str) -> str:
    found = _CSRF.search(html)
    assert found is not None, "the page has no CSRF token"
    return found.group(1)


async def login(client: httpx.AsyncClient, password: str) -> httpx.Response:
    form = await client.get("/ui/login")
    return await client.post("/ui/login", data={
        "csrf": csrf_of(form.text), "password": password, "next": "/ui/"})
