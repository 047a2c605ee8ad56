"""Reading and checking request bodies: size cap, read deadline, auth, envelope, identify schema.

Every check raises `Rejected` with the metrics reason, the HTTP status and a message for the
client; the receiver turns it into the response.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import types
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from jsonschema.exceptions import ValidationError, best_match
from jsonschema.protocols import Validator
from starlette.requests import ClientDisconnect
from starlette.types import Message, Receive, Scope

from engine.storage.records import lone_surrogate

# Headers kept with the event: enough to debug a delivery, nothing secret (no signature).
KEPT_HEADERS = ("content-type", "user-agent", "x-webhook-event")
_KEPT = {name.encode(): name for name in KEPT_HEADERS}


class Rejected(Exception):
    """A request answered with an error; `reason` is the metrics label."""

    def __init__(self, reason: str, status: int, message: str = "") -> None:
        super().__init__(message)
        self.reason = reason
        self.status = status
        self.message = message


@dataclass(slots=True)
class Head:
    """The headers linkcrm looks at, taken in one pass over the raw ASGI headers.

    Values stay bytes where they are compared (the signature, the bearer key): they are never
    decoded, so a non-ASCII value is just a mismatch. Not frozen: a frozen dataclass costs
    several microseconds more to build, once per request.
    """

    content_length: bytes | None = None
    signature: bytes | None = None
    authorization: bytes | None = None
    event: str | None = None
    kept: dict[str, str] = field(default_factory=dict)


def read_head(scope: Scope) -> Head:
    content_length = signature = authorization = None
    kept: dict[str, str] = {}
    for raw_name, value in scope["headers"]:
        name = raw_name.lower()
        kept_name = _KEPT.get(name)
        if kept_name is not None:
            kept[kept_name] = value[:200].decode("latin-1")
        elif name == b"x-webhook-signature":
            signature = value
        elif name == b"content-length":
            content_length = value
        elif name == b"authorization":
            authorization = value
    return Head(content_length, signature, authorization, kept.get("x-webhook-event"), kept)


def check_declared_size(head: Head, limit: int) -> None:
    """413 before reading anything when Content-Length already says the body is too big."""
    if head.content_length is None:
        return
    if not head.content_length.isdigit():
        raise Rejected("bad_json", 400, "Content-Length is not a number")
    if int(head.content_length) > limit:
        raise Rejected("too_large", 413, f"the body is larger than {limit} bytes")


async def read_body(receive: Receive, limit: int, timeout: float) -> bytes:
    """The raw body, read under a size cap and a whole-body deadline.

    The cap is checked on every chunk, so a chunked body without Content-Length is stopped as
    soon as it passes the cap, and memory never holds more than the cap plus one chunk.
    Raises ClientDisconnect when the client goes away.

    A body that had arrived whole before the app asked for it (nearly every delivery: a small
    body comes in the same packet as the headers) is taken without starting the deadline,
    whose timer cost as much as parsing the body.
    """
    steps = receive().__await__()
    try:
        waiting = steps.send(None)
    except StopIteration as done:  # the first message was there: no wait
        ready: Message | None = done.value
        if ready is not None and not ready.get("more_body", False):
            return _chunk(ready, 0, limit)  # the whole body, and no deadline to keep
        pending = None
    else:
        ready, pending = None, (steps, waiting)
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout):
            more = True
            while more:
                if ready is not None:
                    message, ready = ready, None
                elif pending is not None:
                    message, pending = await _resume(*pending), None
                else:
                    message = await receive()
                chunk = _chunk(message, size, limit)
                more = message.get("more_body", False)
                size += len(chunk)
                chunks.append(chunk)
    except TimeoutError:
        raise Rejected(
            "timeout", 408, f"the request body did not arrive within {timeout:g} seconds"
        ) from None
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _chunk(message: Message, size: int, limit: int) -> bytes:
    """The body bytes of one ASGI receive message, when `size` bytes came before it."""
    if message["type"] == "http.disconnect":
        raise ClientDisconnect()
    chunk: bytes = message.get("body", b"")
    if size + len(chunk) > limit:
        raise Rejected("too_large", 413, f"the body is larger than {limit} bytes")
    return chunk


@types.coroutine
def _resume(steps: Generator[Any, Any, Message], waiting: Any) -> Generator[Any, Any, Message]:
    """Go on awaiting an awaitable whose `__await__` iterator `steps` has just yielded
    `waiting` (the future it waits on) outside any task: hand that to the task, and pass
    what the task sends or throws back (a cancellation at the deadline) to `steps`, as
    `await` would have."""
    while True:
        try:
            sent = yield waiting
        except BaseException as error:
            try:
                waiting = steps.throw(error)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]
        else:
            try:
                waiting = steps.send(sent)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]


def authorized(head: Head, keys: Sequence[bytes]) -> bool:
    """A `Bearer` key equal to one of `keys`; every key is compared, in constant time."""
    header = head.authorization or b""
    scheme, _, token = header.partition(b" ")
    if scheme.lower() != b"bearer" or not token.strip():
        return False
    token = token.strip()
    matched = False
    for key in keys:  # every key is compared, so timing does not tell which one matched
        matched |= hmac.compare_digest(key, token)
    return matched


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# One shared decoder: json.loads with any option builds a new decoder on every call.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def parse_json(body: bytes) -> Any:
    try:
        return _DECODER.decode(body.decode("utf-8"))
    except (ValueError, RecursionError) as error:
        detail = str(error) if isinstance(error, ValueError) else "nested too deeply"
        raise Rejected("bad_json", 400, f"the body is not valid JSON: {detail}") from None


_ENVELOPE = 'a JSON object {"event": string, "timestamp": string, "data": object}'


def parse_envelope(body: bytes) -> dict[str, Any]:
    document = parse_json(body)
    if not isinstance(document, dict):
        raise Rejected("bad_envelope", 400,
                        f"the body must be {_ENVELOPE}, not {_json_type(document)}")
    problems = []
    for name, wanted in (("event", str), ("timestamp", str), ("data", dict)):
        if name not in document:
            problems.append(f'"{name}" is missing')
        elif not isinstance(document[name], wanted) or document[name] in ("", None):
            kind = "a non-empty string" if wanted is str else "an object"
            problems.append(f'"{name}" must be {kind}, not {_json_type(document[name])}')
    if problems:
        raise Rejected("bad_envelope", 400,
                        f"the body must be {_ENVELOPE}: {'; '.join(problems)}")
    for name in ("event", "timestamp"):  # stored as text columns; `data` stays raw bytes
        where = lone_surrogate(document[name])
        if where is not None:
            raise Rejected("bad_envelope", 400, _surrogate_message(f'"{name}"', where))
    return document


def _surrogate_message(what: str, where: str) -> str:
    return (f"{what} holds a lone surrogate ({where}), which is not valid Unicode and can "
            "never be stored; send text as UTF-8, with no unpaired \\ud800-\\udfff escape")


def find_lone_surrogate(value: Any, path: str = "$") -> tuple[str, str] | None:
    """(what, where) for the first string in `value` (a key or a value, depth first) holding a
    lone surrogate, e.g. ("$.token", "U+D800 at character 2"); None when there is none."""
    stack: list[tuple[str, Any]] = [(path, value)]
    while stack:
        here, item = stack.pop()
        if isinstance(item, str):
            where = lone_surrogate(item)
            if where is not None:
                return here, where
        elif isinstance(item, dict):
            for key in item:
                where = lone_surrogate(key)
                if where is not None:
                    return f"a key of {here}", where
            stack.extend((f"{here}.{key}", child) for key, child in reversed(item.items()))
        elif isinstance(item, list):
            stack.extend((f"{here}[{i}]", child) for i, child in reversed(list(enumerate(item))))
    return None


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "an empty string" if not value else "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def validate_identify(schema: Validator, envelope: dict[str, Any]) -> None:
    """400 unless the shipped identify rule can apply the body: text the database can hold,
    and a token or an email that is not blank (the rule finds the contact by one of them)."""
    found = find_lone_surrogate(envelope["data"])
    if found is not None:
        raise Rejected("bad_envelope", 400, _surrogate_message(f"the identify body at {found[0]}",
                                                                found[1]))
    error = best_match(schema.iter_errors(envelope))
    if error is None:
        return
    if error.parent is not None and _alternatives(error.parent):
        error = error.parent
    path = error.absolute_path
    body_path = list(path)[1:] if path and path[0] == "data" else list(path)
    where = "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in body_path)
    names = _alternatives(error)
    if names:
        message = f"needs at least one of {', '.join(names)}"
    elif error.validator == "pattern" or (isinstance(error.instance, str)
                                          and not error.instance.strip()):
        message = "must not be empty or blank; send the value, or leave the field out"
    else:
        message = error.message
    raise Rejected("bad_envelope", 400, f"invalid identify body at {where}: {message}")


def _alternatives(error: ValidationError) -> list[str]:
    """The names of an `anyOf` of `required` branches ("one of token, email, user_id")."""
    branches = error.validator_value if error.validator == "anyOf" else None
    if not isinstance(branches, list) or not all(
        isinstance(b, dict) and set(b) == {"required"} for b in branches
    ):
        return []
    return [name for branch in branches for name in branch["required"]]


def iso_utc(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
