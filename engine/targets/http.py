"""HTTP plumbing every CRM adapter shares: the one request loop (`Session`), the credential
header (`HeaderAuth`), transport errors and status codes mapped to the two errors the worker
understands, and Retry-After parsing.

Like httpx's own `map_httpcore_exceptions`, this is the one place where httpx exceptions are
translated; adapters add only their CRM's own rules (Salesforce's 403 REQUEST_LIMIT_EXCEEDED,
HubSpot's 409 duplicates, ...) before falling back to `raise_for_status`.

    pace (the lane's pacers) -> authenticate (an httpx.Auth per CRM) -> send -> learn the
    limits the answer states -> "slow down"? hold back and send again, or hand the wait to
    the worker -> the response, whatever its status, for the adapter to read
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable, Generator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, ClassVar
from urllib.parse import quote

import httpx

from engine.errors import PermanentCRMError, RetryableCRMError
from engine.targets.pacing import Pacer

RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
DOT_SEGMENTS = frozenset({".", ".."})


def path_segment(value: str) -> str:
    """`value` as exactly one URL path segment: everything but letters, digits and `-._~`
    percent-encoded (`/`, `?`, `#`, `%`, spaces, non-ASCII), so it can neither end the path
    nor add a segment.

    Raises ValueError for a value that no encoding keeps in its place: empty, or a dot
    segment (`.`, `..`), which httpx and servers resolve (RFC 3986 §5.2.4), so the request
    would reach another resource (and `%2E` is the same as `.`, RFC 3986 §2.3); and a lone
    surrogate, which has no UTF-8 form. Callers send such values another way (a query
    parameter, a body), or refuse them.

        >>> path_segment("a/b?c")
        'a%2Fb%3Fc'
    """
    if not value or value in DOT_SEGMENTS:
        raise ValueError(f"{value!r} cannot be a URL path segment")
    try:
        return quote(value, safe="")
    except UnicodeEncodeError:
        raise ValueError("a value with a lone surrogate cannot be a URL path segment") from None


def retry_after(headers: Mapping[str, str], now: datetime | None = None) -> float | None:
    """Seconds to wait from a `Retry-After` header (delta seconds or an HTTP date)."""
    value = headers.get("retry-after") or headers.get("Retry-After")
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    current = now or datetime.now(UTC)
    return max(0.0, (when - current).total_seconds())


async def send(client: httpx.AsyncClient, crm: str, request: httpx.Request,
               auth: httpx.Auth | None = None) -> httpx.Response:
    """Send `request` (through `auth`'s flow when given); a timeout or a broken connection
    becomes RetryableCRMError.

    The response is returned whatever its status: the caller decides what a status means.
    A read timeout asks for a wait as long as the timeout before the retry: the CRM may still
    be working on the request, and a write that lands after its retry was sent could make a
    second record in a CRM without idempotent creates (Pipedrive).
    """
    try:
        if auth is None:
            return await client.send(request)
        return await client.send(request, auth=auth)
    except httpx.ReadTimeout:
        timeout = request.extensions.get("timeout")
        read = timeout.get("read") if isinstance(timeout, dict) else None
        raise RetryableCRMError(
            f"{crm}: {request.method} {request.url.path} timed out waiting for the answer",
            retry_after=float(read) if isinstance(read, int | float) else None) from None
    except httpx.TimeoutException as error:
        raise RetryableCRMError(f"{crm}: {request.method} {request.url.path} timed out "
                                f"({type(error).__name__})") from None
    except httpx.TransportError as error:
        raise RetryableCRMError(f"{crm}: {request.method} {request.url.path} failed: "
                                f"{type(error).__name__}") from None


def body_of(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text[:500]


def raise_for_status(crm: str, response: httpx.Response, message: str = "") -> None:
    """Map a non-2xx status: retryable ones to RetryableCRMError (with Retry-After), the rest
    to PermanentCRMError carrying the CRM's own message."""
    if response.is_success:
        return
    what = f"{crm}: {response.request.method} {response.request.url.path} -> " \
           f"{response.status_code}: {message or _message(body_of(response))}"
    if response.status_code in RETRYABLE_STATUS:
        raise RetryableCRMError(what, retry_after=retry_after(response.headers))
    raise PermanentCRMError(what)


def _message(body: Any) -> str:
    """The CRM's own words from the usual error body shapes (object, Salesforce's array)."""
    if isinstance(body, list) and body and isinstance(body[0], dict):
        return "; ".join(f"{e.get('errorCode', '')}: {e.get('message', '')}" for e in body)
    if isinstance(body, dict):
        for key in ("message", "error", "error_description", "error_info"):
            if isinstance(body.get(key), str):
                return str(body[key])
    return str(body)[:300]


class HeaderAuth(httpx.Auth):
    """A credential sent as one header on every request (HubSpot's `Authorization: Bearer`,
    Pipedrive's `x-api-token`); never in the URL, and never in its repr."""

    def __init__(self, header: str, value: str) -> None:
        self._header, self._value = header, value

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers[self._header] = self._value
        yield request

    def __repr__(self) -> str:
        return f"HeaderAuth({self._header!r}, <hidden>)"


@dataclass(frozen=True)
class Lane:
    """The limits one kind of request counts against: `pacer`, its own (the one a "slow down"
    answer pauses), after `shared`, one every request of the CRM counts against too
    (Pipedrive's burst limit, for its searches). `name` lets a session tell lanes apart
    (HubSpot's search answers carry no rate-limit headers to learn from)."""

    pacer: Pacer | None = None
    shared: Pacer | None = None
    name: str = "default"

    async def acquire(self) -> None:
        if self.shared is not None:
            await self.shared.acquire()
        if self.pacer is not None:
            await self.pacer.acquire()


@dataclass(frozen=True)
class Throttled:
    """A CRM's "slow down" (a 429, Salesforce's REQUEST_LIMIT_EXCEEDED): `wait` seconds;
    `again`: wait here and send again (a short window), or hand the wait to the worker at
    once (a daily allocation); `hold`: pause the lane's pacer for the wait, so this process's
    other requests hold back too."""

    wait: float
    again: bool = True
    hold: bool = True


class _Paced(httpx.Auth):
    """`auth`'s flow with every request it sends waiting for `lane` first, a re-send after
    a token refresh too."""

    def __init__(self, auth: httpx.Auth, lane: Lane) -> None:
        self.auth, self.lane = auth, lane

    async def async_auth_flow(self, request: httpx.Request
                              ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        flow = self.auth.async_auth_flow(request)
        try:
            request = await flow.__anext__()
            while True:
                await self.lane.acquire()
                response = yield request
                try:
                    request = await flow.asend(response)
                except StopAsyncIteration:
                    return
        finally:
            await flow.aclose()


class Session:
    """The one request loop every CRM adapter sends through (see the module's docstring).

    A CRM's adapter subclasses it and says what its answers mean: `observe` (limits stated
    in headers), `throttled` (which answers say slow down, and for how long), `message`
    (the CRM's own words in an error body) and `check` (a reason not to send at all, such as
    Pipedrive's spent daily budget). A "slow down" answer is sent again at most `attempts`
    times in all; the last one, or one the worker must wait out, raises RetryableCRMError
    with the wait. `last_status` is the status of the last answer (None: the last request
    got no answer at all), for `doctor` to blame the right thing.
    """

    crm: ClassVar[str]

    def __init__(self, client: httpx.AsyncClient, base_url: str, auth: httpx.Auth, *,
                 attempts: int = 1, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
                 ) -> None:
        self.client = client
        self.base_url = base_url.rstrip("/")
        self.auth = auth
        self.attempts = max(1, attempts)
        self.sleep = sleep
        self.sent = 0
        self.throttles = 0
        self.last_status: int | None = None

    def url(self, path: str) -> str:
        return self.base_url + path

    async def send(self, method: str, path: str, *, lane: Lane = Lane(),
                   params: Mapping[str, str | int] | None = None,
                   json: object = None) -> httpx.Response:
        """The answer to `method path`, whatever its status but a "slow down"."""
        for attempt in range(1, self.attempts + 1):
            self.check(method, path)
            request = self.client.build_request(method, self.url(path), params=params,
                                                json=json, headers={"Accept": "application/json"})
            self.sent += 1
            self.last_status = None
            response = await send(self.client, self.crm, request, _Paced(self.auth, lane))
            self.last_status = response.status_code
            self.observe(response, lane)
            throttled = self.throttled(response, lane)
            if throttled is None:
                return response
            self.throttles += 1
            if throttled.hold and lane.pacer is not None:
                lane.pacer.pause(throttled.wait)
            if not throttled.again or attempt == self.attempts:
                raise RetryableCRMError(
                    f"{self.crm}: {method} {request.url.path} -> {response.status_code}: "
                    f"{self.message(body_of(response))}", retry_after=throttled.wait)
            if lane.pacer is None:
                await self.sleep(throttled.wait)
        raise AssertionError("unreachable")  # pragma: no cover

    def check(self, method: str, path: str) -> None:
        """Raise RetryableCRMError instead of sending, when the CRM would refuse anyway."""

    def observe(self, response: httpx.Response, lane: Lane) -> None:
        """Learn from an answer's rate-limit headers (pause or reshape the lane's pacer)."""

    def throttled(self, response: httpx.Response, lane: Lane) -> Throttled | None:
        """Whether the answer says slow down; None for every other answer."""
        return None

    def message(self, body: Any) -> str:
        """The CRM's own words from an error body."""
        return _message(body)
