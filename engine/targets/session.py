"""The one request loop every CRM adapter sends through, shaped like httpx's own `send`:

    pace (the lane's pacers) -> authenticate (an httpx.Auth per CRM: a header, or OAuth that
    refreshes and sends again) -> send -> learn the limits the answer states -> "slow down"?
    hold back and send again, or hand the wait to the worker -> the response, whatever its
    status, for the adapter to read

Each CRM's API subclasses `Session` and says what its answers mean; transport errors are
mapped by `engine.targets.http.send` (a timeout may have been committed: it is retried after
a wait as long as the timeout).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable, Generator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import httpx

from engine.errors import RetryableCRMError
from engine.targets.http import body_of, message_of, send
from engine.targets.pacing import Pacer


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
    answer pauses), then `shared`, one every request of the CRM counts against too
    (Pipedrive's burst limit, for its searches). Rolling windows (`window_pacer`) are taken
    together, all or none; otherwise the shared token is taken last, just before the request
    goes. Either way neither ages while the request waits for the other (the CRM would see the
    request arrive closer to the next ones than they were paced), and the shared limit is
    taken before any request of the shared limit alone, so the stricter limit is never left
    idle while those use up the shared one (Pipedrive's searches before its writes). `name`
    lets a session tell lanes apart (HubSpot's search answers carry no rate-limit headers to
    learn from)."""

    pacer: Pacer | None = None
    shared: Pacer | None = None
    name: str = "default"

    async def acquire(self) -> None:
        if self.pacer is not None and self.shared is not None \
                and self.pacer.rolling and self.shared.rolling:
            await self.shared.acquire(first=True, along=self.pacer)  # both at once
            return
        if self.pacer is not None:
            await self.pacer.acquire()
        if self.shared is not None:
            await self.shared.acquire(first=True)


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
            holding = lane.pacer if throttled.hold else None
            if holding is not None:
                holding.pause(throttled.wait)  # the next acquire waits it out
            if not throttled.again or attempt == self.attempts:
                raise RetryableCRMError(
                    f"{self.crm}: {method} {request.url.path} -> {response.status_code}: "
                    f"{self.message(body_of(response))}", retry_after=throttled.wait)
            if holding is None:
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
        return message_of(body)
