"""The delivery log as a Starlette app mounted under /ui/ by `linkcrm serve`.

    pages = create_ui(storage, UIConfig(password=..., ruleset=ruleset, targets=["local"]))

Every response carries the security headers of access.py; every page but the login form
needs a session; every POST needs the session's CSRF token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine.rules.model import RuleSet
from engine.storage import Clock, Storage, utc_now

from .access import HEADERS, Access
from .pages import Handlers
from .render import Pages

UI_PATH = "/ui"
STATIC = Path(__file__).parent / "static"


@dataclass(frozen=True)
class UIConfig:
    """What the pages need besides the storage: the password, the rules that explain an
    event (None when they do not load), how to name them, and the targets to search."""

    password: str
    ruleset: RuleSet | None = None
    rules_label: str = "the rules folder"
    targets: Sequence[str] = field(default_factory=lambda: ("local",))


class SecurityHeaders:
    """Adds the Content-Security-Policy and the other headers to every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                headers += [(name.encode(), value.encode()) for name, value in HEADERS.items()
                            if name.encode() not in present]
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, with_headers)


def create_ui(storage: Storage, config: UIConfig, *, clock: Clock = utc_now) -> Starlette:
    handlers = Handlers(storage, config.ruleset, config.rules_label, tuple(config.targets),
                        Access(config.password), Pages(), clock)
    routes = [
        Route("/", handlers.overview, methods=["GET"]),
        Route("/login", handlers.login_form, methods=["GET"]),
        Route("/login", handlers.login, methods=["POST"]),
        Route("/logout", handlers.logout, methods=["POST"]),
        Route("/events", handlers.events, methods=["GET"]),
        Route("/events/{event_id:int}", handlers.event, methods=["GET"]),
        Route("/events/{event_id:int}/replay", handlers.replay_event, methods=["POST"]),
        Route("/dead", handlers.dead, methods=["GET"]),
        Route("/dead/replay", handlers.replay_dead, methods=["POST"]),
        Route("/contacts", handlers.contacts, methods=["GET"]),
        Route("/contacts/{contact_id:int}", handlers.contact, methods=["GET"]),
        Route("/deals", handlers.deals, methods=["GET"]),
        Mount("/static", app=StaticFiles(directory=STATIC), name="static"),
    ]
    return Starlette(routes=routes, middleware=[Middleware(SecurityHeaders)],
                     exception_handlers={HTTPException: handlers.problem})


def ui_off() -> Starlette:
    """What /ui/ answers while LINKCRM_UI_PASSWORD is not set: 404 saying how to turn it on."""

    async def off(request: Request) -> Response:
        return PlainTextResponse(
            "the delivery log page is off: set LINKCRM_UI_PASSWORD (at least 12 characters) "
            "and restart `linkcrm serve`", status_code=404)

    return Starlette(routes=[Route("/{path:path}", off)],
                     middleware=[Middleware(SecurityHeaders)])
