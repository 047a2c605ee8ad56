"""Recorded events in and out: the inbox read by `events export` and `diff`, and the JSON
Lines file between them.

One line of an export file is one recorded event:

    {"id": 42, "received_at": "2026-03-01T12:30:02Z", "source": "tolinku",
     "envelope": {"event": "install.tracked", "timestamp": "...", "data": {...}}}

(on one line). `diff --events FILE` reads those lines, and also lines that are a bare event
envelope (`{"event": ..., "timestamp": ..., "data": ...}`), so a hand-written file works too.
Blank lines are skipped. Any other line stops the read with an error naming the line.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from typing import IO, Any

from engine.rules.diff import Recorded
from engine.storage import InboxEvent, Storage

from .output import escape_json, json_line
from .runtime import iso

INBOX_PAGE = 1000


async def _inbox_page(storage: Storage, before_id: int | None) -> list[InboxEvent]:
    """The one storage read of `events export` and `diff`: a page of events, newest first."""
    return await storage.inbox.list_events(limit=INBOX_PAGE, before_id=before_id)


async def inbox_events(storage: Storage, since: datetime | None,
                       limit: int | None) -> AsyncIterator[InboxEvent]:
    """Recorded events received at or after `since`, newest first, at most `limit`."""
    before: int | None = None
    count = 0
    while limit is None or count < limit:
        page = await _inbox_page(storage, before)
        older = 0
        for event in page:
            if since is not None and event.received_at < since:
                older += 1  # ids follow arrival, so older events are all on the next pages
                continue
            yield event
            count += 1
            if limit is not None and count >= limit:
                return
        if len(page) < INBOX_PAGE or older == len(page):
            return
        before = page[-1].id


def parse_body(event: InboxEvent) -> tuple[Any, str | None]:
    """The stored body parsed as the worker parses it, or why it cannot be."""
    if event.body is None:
        return None, "body purged"
    try:
        return json.loads(event.body), None
    except RecursionError:
        return None, "body nested too deeply"
    except ValueError:
        return None, "body not JSON"


class UnexportableError(ValueError):
    """An event whose body JSON Lines cannot carry (a NaN, nesting too deep to write)."""


_NON_FINITE = re.compile(r'"(?:[^"\\]|\\.)*"|(-?Infinity|NaN)')


def _finite(match: re.Match[str]) -> str:
    token = match.group(1)
    if token is None:
        return match.group()
    if token == "NaN":
        raise UnexportableError("body holds NaN, which JSON cannot carry")
    return token.replace("Infinity", "1e999")  # reads back as the same infinity


def export_line(event: InboxEvent, envelope: Any) -> str:
    """One line of an export file (no newline). A number too large for a float (which JSON
    parsers read as infinity) is written as 1e999, which reads back the same."""
    document = {"id": event.id, "received_at": iso(event.received_at), "source": event.source,
                "envelope": envelope}
    try:
        try:
            return json_line(document)
        except ValueError:  # an infinity: the body held a number such as 1e400
            text = json.dumps(document, ensure_ascii=False, separators=(",", ":"))
            return escape_json(_NON_FINITE.sub(_finite, text))
    except RecursionError:
        raise UnexportableError("body nested too deeply to write") from None


class EventFileError(ValueError):
    """A line of an events file that is not a recorded event; says the file and the line."""

    def __init__(self, path: str, line: int, message: str) -> None:
        super().__init__(f"{path}:{line}: {message}" if line else f"{path}: {message}")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)
_SHAPE = ('each line is one event: a line of `linkcrm events export` '
          '({"id", "received_at", "envelope"}) or an event envelope '
          '({"event", "timestamp", "data"})')


def _kind(value: Any) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


def _line(path: str, number: int, raw: bytes) -> Recorded | None:
    text = raw.rstrip(b"\r\n")
    if number == 1 and text.startswith(b"\xef\xbb\xbf"):  # a byte-order mark
        text = text[3:]
    if not text.strip():
        return None
    try:
        decoded = text.decode("utf-8")
    except UnicodeDecodeError as error:
        raise EventFileError(path, number, f"not UTF-8 text (byte {error.start + 1})") from None
    try:
        document = _DECODER.decode(decoded)
    except json.JSONDecodeError as error:
        raise EventFileError(path, number, f"not JSON: {error.msg} at column {error.colno}; "
                                           f"{_SHAPE}") from None
    except RecursionError:
        raise EventFileError(path, number, "not readable: JSON nested too deeply") from None
    except ValueError as error:  # an integer past Python's digit limit, NaN, Infinity
        raise EventFileError(path, number, f"not JSON: {str(error)[:120]}") from None
    if not isinstance(document, dict):
        raise EventFileError(path, number, f"{_kind(document)}, not an object; {_SHAPE}")
    if "envelope" in document:
        envelope = document["envelope"]
        if not isinstance(envelope, dict):
            raise EventFileError(path, number, f'"envelope" is {_kind(envelope)}, not an '
                                               'object {"event", "timestamp", "data"}')
        event_id = document.get("id")
        known = event_id if isinstance(event_id, int) and not isinstance(event_id, bool) \
            else None
        return Recorded(f"{path}:{number}", envelope, known)
    if isinstance(document.get("event"), str):
        return Recorded(f"{path}:{number}", document)
    raise EventFileError(path, number, f'an object with neither "envelope" nor "event"; '
                                       f"{_SHAPE}")


def read_event_file(path: str, limit: int | None = None) -> Iterator[Recorded]:
    """The events in a JSON Lines file (`-`: standard input), in file order, at most `limit`.
    Raises EventFileError for the first line that is not an event, naming it."""
    stream: IO[bytes]
    name = "standard input" if path == "-" else path
    if path == "-":
        stream = sys.stdin.buffer
    else:
        try:
            stream = open(path, "rb")  # closed below, also when the reader stops early
        except OSError as error:
            raise EventFileError(path, 0, f"cannot read it: {error.strerror}") from None
    count = 0
    try:
        for number, raw in enumerate(stream, 1):
            recorded = _line(name, number, raw)
            if recorded is None:
                continue
            yield recorded
            count += 1
            if limit is not None and count >= limit:
                return
    except OSError as error:
        raise EventFileError(name, 0, f"cannot read it: {error.strerror}") from None
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()
