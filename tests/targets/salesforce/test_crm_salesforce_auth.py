"""Salesforce tokens, API limits and transport failures: refresh once, back off, never leak."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine.actions import IdentityKey, UpsertContact
from engine.config.fieldmap import load_field_map
from engine.errors import PermanentCRMError, RetryableCRMError
from engine.storage import Storage
from engine.targets.base import CallContext, CredentialsRefused
from engine.targets.salesforce.auth import ClientCredentials, JwtBearer, SalesforceSettings
from engine.targets.salesforce.target import SalesforceTarget
from tests.emulators.salesforce import SalesforceEmulator
from tests.emulators.salesforce_oauth import (
    OAuthError,
    new_rsa_key,
    public_key_of,
    verify_assertion,
)
from tests.support.paths import REPO

pytestmark = pytest.mark.anyio
FIELD_MAP = load_field_map(REPO / "rules" / "fields.yaml")
INSTANCE = "http://sf.test"


TOKEN = IdentityKey("deep_link_token", "tok_A1")


def upsert(key: IdentityKey = TOKEN, **fields: Any) -> UpsertContact:
    return UpsertContact(rule="r", identity=(key,), set=fields)


@pytest.fixture
def emulator() -> SalesforceEmulator:
    return SalesforceEmulator()


@pytest.fixture
async def make(emulator: SalesforceEmulator,
               storage: Storage) -> AsyncIterator[Callable[..., SalesforceTarget]]:
    transport = httpx.ASGITransport(app=emulator.app())
    async with httpx.AsyncClient(transport=transport) as client:
        def build(**options: Any) -> SalesforceTarget:
            credentials = options.pop("credentials", ClientCredentials(
                emulator.client_id, emulator.client_secret))
            return SalesforceTarget(options.pop("client", client), instance_url=INSTANCE,
                                    credentials=credentials, field_map=FIELD_MAP,
                                    identities=storage.identities,
                                    rate_limits=storage.rate_limits, **options)

        yield build
    assert emulator.schema_violations == []


async def test_concurrent_requests_share_one_refresh(
        emulator: SalesforceEmulator, make: Callable[..., SalesforceTarget]) -> None:
    target = make(requests_per_second=1000.0)
    await target.execute(upsert(), CallContext("k"))
    emulator.revoke_all()
    emulator.latency = 0.01  # every request is in flight while the others fail
    keys = [IdentityKey("deep_link_token", f"t{n}") for n in range(20)]
    await asyncio.gather(*(target.execute(upsert(key), CallContext("k")) for key in keys))
    assert emulator.counters["token_issued"] == 2 and len(emulator.leads) == 21
    assert emulator.counters["unauthorized"] == 20


async def test_a_fresh_token_refused_again_is_retryable_and_bad_credentials_permanent(
        emulator: SalesforceEmulator, make: Callable[..., SalesforceTarget]) -> None:
    emulator.token_lifetime = 0
    with pytest.raises(RetryableCRMError, match="401 again"):
        await make().execute(upsert(), CallContext("k"))
    assert emulator.counters["token_issued"] == 2
    bad = ClientCredentials(emulator.client_id, "wrong-secret")
    with pytest.raises(PermanentCRMError, match="invalid_client") as caught:
        await make(credentials=bad).execute(upsert(), CallContext("k"))
    assert "wrong-secret" not in str(caught.value)


async def test_an_exhausted_daily_allocation_is_retryable_with_the_backoff(
        emulator: SalesforceEmulator, make: Callable[..., SalesforceTarget]) -> None:
    emulator.api_limit = emulator.api_usage = 500
    with pytest.raises(RetryableCRMError, match="REQUEST_LIMIT_EXCEEDED") as caught:
        await make(limit_backoff=42.0).execute(upsert(), CallContext("k"))
    assert caught.value.retry_after == 42.0


async def test_near_the_allocation_requests_slow_to_its_refill_rate(
        emulator: SalesforceEmulator, make: Callable[..., SalesforceTarget]) -> None:
    emulator.api_limit, emulator.api_usage = 100, 80
    target = make(usage_window=50.0)
    sleeps: list[float] = []

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        target.api.pacer.clock = lambda: now + sum(sleeps)

    now = 1000.0
    target.api.pacer.sleep, target.api.pacer.clock = sleep, lambda: now
    await target.execute(upsert(), CallContext("k"))  # 82/100 after: not near yet
    assert sleeps == [] and target.api.usage == (82, 100)
    emulator.api_usage = 95
    await target.execute(upsert(deep_link_prefix="x"), CallContext("k"))
    assert sleeps and sleeps[0] == pytest.approx(0.5)  # 50 s / 100 requests


@pytest.mark.parametrize("failure", ["503", "timeout", "reset"])
async def test_server_errors_and_timeouts_are_retryable(
        make: Callable[..., SalesforceTarget], failure: str) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/token"):
            return httpx.Response(200, json={"access_token": "t", "instance_url": INSTANCE})
        if failure == "timeout":
            raise httpx.ReadTimeout("slow", request=request)
        if failure == "reset":
            raise httpx.RemoteProtocolError("reset", request=request)
        return httpx.Response(503, json=[{"errorCode": "SERVER_UNAVAILABLE", "message": "down"}])

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as mock:
        with pytest.raises(RetryableCRMError):
            await make(client=mock).execute(upsert(), CallContext("k"))


async def test_a_token_endpoint_asking_for_a_retry_is_retryable(
        make: Callable[..., SalesforceTarget]) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, json={"error": "unknown_error",
                                         "error_description": "retry your request"})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as mock:
        with pytest.raises(RetryableCRMError, match="retry your request"):
            await make(client=mock).execute(upsert(), CallContext("k"))


@pytest.mark.parametrize(("status", "body", "expected"), [
    (400, {"error": "invalid_client", "error_description": "invalid client credentials"},
     CredentialsRefused),
    (403, [{"message": "TotalRequests Limit exceeded.", "errorCode": "REQUEST_LIMIT_EXCEEDED"}],
     RetryableCRMError),
    (403, "<html>Forbidden by the proxy</html>", PermanentCRMError),
])
async def test_only_an_oauth_refusal_blames_the_credentials(
        make: Callable[..., SalesforceTarget], status: int, body: Any,
        expected: type[Exception]) -> None:
    """At start-up a CredentialsRefused stops `serve`: only the token endpoint's own OAuth
    answer says the credentials are wrong, not a spent allocation or a proxy in the way."""
    def handler(request: httpx.Request) -> httpx.Response:
        if isinstance(body, str):
            return httpx.Response(status, text=body)
        return httpx.Response(status, json=body)

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as mock:
        with pytest.raises((PermanentCRMError, RetryableCRMError)) as caught:
            await make(client=mock).start()
    assert type(caught.value) is expected


def test_the_jwt_assertion_is_rs256_with_the_claims_salesforce_checks() -> None:
    pem = new_rsa_key()
    bearer = JwtBearer("consumer", "user@example.com", pem)
    form = bearer.form(now=time.time())
    assert form["grant_type"] == "urn:ietf:params:oauth:grant-type:jwt-bearer"
    verify_assertion(form["assertion"], public_key_of(pem), "consumer", "user@example.com",
                     ["https://login.salesforce.com"])
    with pytest.raises(OAuthError, match="invalid assertion"):
        verify_assertion(form["assertion"], public_key_of(new_rsa_key()), "consumer",
                         "user@example.com", ["https://login.salesforce.com"])
    with pytest.raises(OAuthError, match="exp"):
        verify_assertion(bearer.form(now=time.time() + 600)["assertion"], public_key_of(pem),
                         "consumer", "user@example.com", ["https://login.salesforce.com"])
    assert pem not in repr(bearer)
    with pytest.raises(ValueError, match="not an unencrypted PEM key") as caught:
        JwtBearer("consumer", "user", "-----BEGIN PRIVATE KEY-----\nsecretstuff\n")
    assert "secretstuff" not in str(caught.value)


def test_settings_from_the_usual_environment_variables(tmp_path: Path) -> None:
    assert SalesforceSettings.from_env({}) is None
    settings = SalesforceSettings.from_env({"SF_INSTANCE_URL": "https://acme.my.salesforce.com/",
                                            "SF_CLIENT_ID": "id", "SF_CLIENT_SECRET": "s"})
    assert settings is not None and isinstance(settings.credentials, ClientCredentials)
    assert settings.resolved_token_url() == "https://acme.my.salesforce.com/services/oauth2/token"
    assert "s" not in repr(settings.credentials).replace("ClientCredentials", "")
    with pytest.raises(ValueError, match="SF_USERNAME"):
        SalesforceSettings.from_env({"SF_INSTANCE_URL": "https://x", "SF_CLIENT_ID": "id"})
