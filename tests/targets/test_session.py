"""The one request loop every CRM adapter sends through: pacing, an httpx.Auth per CRM, the
"slow down" answers waited out here or handed to the worker, the CRM's own words."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from engine.errors import RetryableCRMError
from engine.targets.hubspot.api import HubSpotAPI
from engine.targets.pacing import Pacer
from engine.targets.pipedrive.api import PipedriveAPI
from engine.targets.salesforce.auth import ClientCredentials, TokenSource
from engine.targets.salesforce.rest import SalesforceAPI
from engine.targets.session import HeaderAuth, Lane, Session, Throttled

pytestmark = pytest.mark.anyio
Handler = Callable[[httpx.Request], httpx.Response]


class Buckets:
    """An unmetered rate limit that counts the requests it lets through."""

    def __init__(self) -> None:
        self.taken = 0

    async def take_tokens(self, bucket: str, cost: float, capacity: float,
                          refill_per_second: float) -> float:
        self.taken += 1
        return 0.0


class Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def salesforce(client: httpx.AsyncClient, pacer: Pacer) -> SalesforceAPI:
    tokens = TokenSource(client, "https://sf.test/services/oauth2/token",
                         ClientCredentials("id", "secret"))
    return SalesforceAPI(client, "https://sf.test", "v62.0", tokens, pacer)


def hubspot(client: httpx.AsyncClient, pacer: Pacer) -> HubSpotAPI:
    return HubSpotAPI(client, "pat-secret", base_url="https://hubspot.test", pacer=pacer)


def pipedrive(client: httpx.AsyncClient, pacer: Pacer) -> PipedriveAPI:
    return PipedriveAPI(client, api_token="pd-secret", base_url="https://pd.test", burst=pacer)


@pytest.mark.parametrize(("make", "header", "value"), [
    (hubspot, "authorization", "Bearer pat-secret"),
    (pipedrive, "x-api-token", "pd-secret"),
    (salesforce, "authorization", "Bearer t1"),
])
async def test_every_crm_sends_through_the_one_loop_with_its_own_auth(
        make: Callable[[httpx.AsyncClient, Pacer], Session], header: str, value: str) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path.endswith("/token"):
            return httpx.Response(200, json={"access_token": "t1"})
        return httpx.Response(200, json={"success": True, "data": {}})

    buckets = Buckets()
    pacer = Pacer(buckets, "b", 10, 1.0)
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        api = make(client, pacer)
        response = await api.send("GET", "/x", lane=Lane(pacer))
    assert isinstance(api, Session) and isinstance(api.auth, httpx.Auth)
    assert response.status_code == 200 and api.last_status == 200 and buckets.taken == 1
    assert seen[-1].headers[header] == value and "secret" not in str(seen[-1].url)
    assert "secret" not in repr(api.auth)


async def test_a_resend_after_a_token_refresh_waits_for_the_pacer_too() -> None:
    issued: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/token"):
            issued.append(f"t{len(issued) + 1}")
            return httpx.Response(200, json={"access_token": issued[-1]})
        if request.headers["authorization"] == "Bearer t1":  # expired
            return httpx.Response(401, json=[{"errorCode": "INVALID_SESSION_ID",
                                              "message": "Session expired or invalid"}])
        return httpx.Response(200, json={"done": True, "records": []})

    buckets = Buckets()
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        api = salesforce(client, Pacer(buckets, "b", 10, 1.0))
        assert await api.query("SELECT Id FROM Lead") == []
    assert issued == ["t1", "t2"] and buckets.taken == 2


class Throttling(Session):
    """A CRM whose 429 says how long to wait; `daily` ones go back to the worker."""

    crm = "example"

    def throttled(self, response: httpx.Response, lane: Lane) -> Throttled | None:
        if response.status_code != 429:
            return None
        wait = float(response.headers["retry-after"])
        return Throttled(wait, again=wait < 60, hold=wait < 60)


async def test_a_short_slow_down_is_waited_out_here_and_the_last_goes_to_the_worker() -> None:
    answers = [httpx.Response(429, headers={"retry-after": "2"}, json={"message": "busy"}),
               httpx.Response(200, json={})]
    clock = Clock()
    pacer = Pacer(Buckets(), "b", 10, 1.0, sleep=clock.sleep, clock=clock)
    async with httpx.AsyncClient(transport=httpx.MockTransport(
            lambda r: answers.pop(0))) as client:
        session = Throttling(client, "https://example.test", HeaderAuth("x-key", "k"),
                             attempts=2, sleep=clock.sleep)
        assert (await session.send("GET", "/a", lane=Lane(pacer))).status_code == 200
        assert clock.sleeps == [2.0] and session.throttles == 1  # the pacer held back
        answers[:] = [httpx.Response(429, headers={"retry-after": "2"},
                                     json={"message": "still busy"})] * 2
        with pytest.raises(RetryableCRMError, match=r"example: GET /a -> 429: still busy") \
                as tired:
            await session.send("GET", "/a")
        answers[:] = [httpx.Response(429, headers={"retry-after": "3600"},
                                     json={"message": "daily limit"})]
        with pytest.raises(RetryableCRMError, match="daily limit") as daily:
            await session.send("GET", "/a", lane=Lane(pacer))
    assert tired.value.retry_after == 2.0 and daily.value.retry_after == 3600.0
    assert clock.sleeps == [2.0, 2.0] and answers == []  # the daily one was not waited out
