"""How an emulator's front end reads request paths before routing: dot segments resolved."""

from __future__ import annotations

from urllib.parse import unquote

from starlette.types import ASGIApp, Receive, Scope, Send


class PathFrontEnd:
    """The emulator's front end: resolves dot segments (`.`, `..`) before routing, as web
    servers do (RFC 3986 §5.2.4); with `rerouted`, also those that arrive percent-encoded
    (`%2E%2E`), since it decodes the path first."""

    def __init__(self, app: ASGIApp, *, rerouted: bool) -> None:
        self.app, self.rerouted = app, rerouted

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            raw = bytes(scope.get("raw_path") or scope["path"].encode())
            resolved = resolve_dot_segments(raw, decoded=self.rerouted)
            scope = {**scope, "raw_path": resolved,
                     "path": unquote(resolved.decode("ascii", "replace"))}
        await self.app(scope, receive, send)


def resolve_dot_segments(raw_path: bytes, *, decoded: bool) -> bytes:
    """`raw_path` with its `.` and `..` segments resolved; with `decoded`, a segment counts as
    a dot segment by its percent-decoded text."""
    kept: list[bytes] = []
    segments = raw_path.split(b"/")[1:]
    for index, segment in enumerate(segments):
        text = segment.decode("ascii", "replace")
        name = unquote(text) if decoded else text
        if name in (".", ".."):
            if name == ".." and kept:
                kept.pop()
            if index == len(segments) - 1:
                kept.append(b"")  # "/a/b/.." is "/a/"
            continue
        kept.append(segment)
    return b"/" + b"/".join(kept)
