"""The Jinja2 environment: templates shipped in the package, HTML autoescaped, and every
printed value passed through `text.visible` first (terminal escapes, NUL, lone surrogates
and bidirectional overrides spelled out)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from starlette.responses import HTMLResponse

from .text import visible


def _when(moment: datetime | None) -> str:
    if moment is None:
        return "-"
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _short(value: Any, length: int = 80) -> str:
    text = "" if value is None else str(value)
    first = text.split("\n", 1)[0]
    return first[:length] + ("…" if len(first) > length or "\n" in text else "")


def environment() -> Environment:
    env = Environment(
        loader=PackageLoader("engine.web", "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
        finalize=visible,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["when"] = _when
    env.filters["short"] = _short
    return env


class Pages:
    """Renders a template into an HTML response."""

    def __init__(self) -> None:
        self.env = environment()

    def render(self, name: str, code: int = 200, **context: Any) -> HTMLResponse:
        html = self.env.get_template(name).render(**context)
        return HTMLResponse(html, status_code=code)
