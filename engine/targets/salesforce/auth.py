"""Salesforce OAuth: client-credentials and JWT-bearer token flows, one shared cached token."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import httpx
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from engine.errors import PermanentCRMError, RetryableCRMError
from engine.targets.base import CredentialsRefused
from engine.targets.http import body_of, raise_for_status, send

CRM = "salesforce"
LOGIN_URL = "https://login.salesforce.com"
JWT_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
DEFAULT_API_VERSION = "v62.0"  # collections upsert and `created` in upsert answers need v46.0+


@dataclass(frozen=True)
class ClientCredentials:
    """OAuth 2.0 client credentials of an External Client App with a run-as user.

    The token must be asked of the org's My Domain host (the instance URL), not login.
    """

    client_id: str
    client_secret: str = field(repr=False)

    def form(self, now: float) -> dict[str, str]:
        return {"grant_type": "client_credentials", "client_id": self.client_id,
                "client_secret": self.client_secret}

    hint: ClassVar[str] = "check SF_CLIENT_ID and SF_CLIENT_SECRET and the app's run-as user"


@dataclass(frozen=True)
class JwtBearer:
    """OAuth 2.0 JWT bearer: an RS256 assertion signed with the key whose certificate is
    uploaded to the app, for a pre-authorized `username`. `audience` is login.salesforce.com,
    test.salesforce.com (sandboxes) or the My Domain URL.

    Raises ValueError at construction when the key is not an unencrypted RSA private key.
    """

    consumer_key: str
    username: str
    private_key_pem: str = field(repr=False)
    audience: str = LOGIN_URL
    lifetime: float = 150.0  # Salesforce refuses an assertion whose exp is over 3 minutes out
    _key: rsa.RSAPrivateKey = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        try:
            key = serialization.load_pem_private_key(self.private_key_pem.encode(), None)
        except (ValueError, TypeError):
            # The key's own text never goes into a message.
            raise ValueError("the Salesforce JWT private key is not an unencrypted PEM key"
                             ) from None
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError("the Salesforce JWT private key must be an RSA key (RS256)")
        object.__setattr__(self, "_key", key)

    def assertion(self, now: float) -> str:
        claims = {"iss": self.consumer_key, "sub": self.username, "aud": self.audience,
                  "exp": int(now + self.lifetime)}
        return sign_rs256(claims, self._key)

    def form(self, now: float) -> dict[str, str]:
        return {"grant_type": JWT_GRANT, "assertion": self.assertion(now)}

    hint: ClassVar[str] = ("check SF_CLIENT_ID (the consumer key), SF_USERNAME, the uploaded "
                           "certificate, and that an admin pre-authorized the user for the app")


Credentials = ClientCredentials | JwtBearer


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def sign_rs256(claims: Mapping[str, object], key: rsa.RSAPrivateKey) -> str:
    """A compact JWT: `{"alg":"RS256"}` header, `claims`, RSASSA-PKCS1-v1_5 over SHA-256."""
    header = _b64url(json.dumps({"alg": "RS256", "typ": "JWT"}, separators=(",", ":")).encode())
    payload = _b64url(json.dumps(dict(claims), separators=(",", ":")).encode())
    signing_input = f"{header}.{payload}".encode("ascii")
    signature = key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
    return f"{header}.{payload}.{_b64url(signature)}"


class TokenSource:
    """One access token shared by every concurrent request of a target.

    Salesforce does not say when a token expires, so the token is kept until the API answers
    401 INVALID_SESSION_ID; then `refresh(stale)` fetches a new one. Refreshes are serialised by
    a lock and a caller holding an already-replaced token gets the new one without a second
    fetch, so fifty requests failing together cause one token request.
    """

    def __init__(
        self,
        client: httpx.AsyncClient,
        token_url: str,
        credentials: Credentials,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._client = client
        self._token_url = token_url
        self._credentials = credentials
        self._clock = clock
        self._token: str | None = None
        self._lock = asyncio.Lock()
        self.fetched = 0

    async def token(self) -> str:
        if self._token is not None:
            return self._token
        async with self._lock:
            if self._token is None:
                self._token = await self._fetch()
            return self._token

    async def refresh(self, stale: str) -> str:
        """A token other than `stale`: the current one if someone already refreshed."""
        async with self._lock:
            if self._token is None or self._token == stale:
                self._token = None
                self._token = await self._fetch()
            return self._token

    def forget(self, stale: str) -> None:
        """Drop `stale` so the next request fetches afresh."""
        if self._token == stale:
            self._token = None

    async def _fetch(self) -> str:
        request = self._client.build_request(
            "POST", self._token_url, data=self._credentials.form(self._clock()),
            headers={"Accept": "application/json"})
        response = await send(self._client, CRM, request)
        if response.status_code in (400, 401, 403):
            body = body_of(response)
            fields = body if isinstance(body, dict) else {}
            words = ": ".join(str(fields[k]) for k in ("error", "error_description")
                              if fields.get(k)) or str(body)[:200]
            if fields.get("error") == "unknown_error" or "REQUEST_LIMIT_EXCEEDED" in words:
                # Salesforce's "retry your request", or the org's allocation spent for now.
                raise RetryableCRMError(f"{CRM}: the token endpoint failed ({words})")
            if not fields.get("error"):  # not an OAuth answer: something else is in the way
                raise PermanentCRMError(f"{CRM}: the token endpoint answered "
                                        f"{response.status_code}: {words}")
            # Otherwise the token endpoint, the authority on credentials, refused them.
            raise CredentialsRefused(f"{CRM}: the token endpoint refused the credentials "
                                     f"({words}); {self._credentials.hint}")
        raise_for_status(CRM, response)
        body = body_of(response)
        token = body.get("access_token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token:
            raise PermanentCRMError(f"{CRM}: the token endpoint answered without an access_token")
        self.fetched += 1
        return token


class OAuth(httpx.Auth):
    """The org's access token on every request. A 401 (INVALID_SESSION_ID: the token expired
    or was revoked) refreshes it once, shared with every concurrent request, and the request
    is sent again; a 401 after that is the caller's to read, the stale token forgotten."""

    def __init__(self, tokens: TokenSource) -> None:
        self.tokens = tokens

    async def async_auth_flow(self, request: httpx.Request
                              ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        token = await self.tokens.token()
        request.headers["Authorization"] = f"Bearer {token}"
        response = yield request
        if response.status_code != 401:
            return
        token = await self.tokens.refresh(token)
        request.headers["Authorization"] = f"Bearer {token}"
        response = yield request
        if response.status_code == 401:
            self.tokens.forget(token)


@dataclass(frozen=True)
class SalesforceSettings:
    """Where and how to reach one org; `from_env` reads the usual variable names."""

    instance_url: str
    credentials: Credentials
    api_version: str = DEFAULT_API_VERSION
    token_url: str = ""  # default: the instance's /services/oauth2/token

    def resolved_token_url(self) -> str:
        return self.token_url or f"{self.instance_url.rstrip('/')}/services/oauth2/token"

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> SalesforceSettings | None:
        """None when SF_INSTANCE_URL is unset (the target is off); ValueError naming the
        missing variable otherwise. Client credentials when SF_CLIENT_SECRET is set, else JWT
        bearer from SF_USERNAME and SF_PRIVATE_KEY_FILE (or SF_PRIVATE_KEY, the PEM text)."""
        instance = environ.get("SF_INSTANCE_URL", "").strip()
        if not instance:
            return None
        client_id = environ.get("SF_CLIENT_ID", "").strip()
        if not client_id:
            raise ValueError("SF_INSTANCE_URL is set but SF_CLIENT_ID is not")
        credentials: Credentials
        if environ.get("SF_CLIENT_SECRET"):
            credentials = ClientCredentials(client_id, environ["SF_CLIENT_SECRET"])
        else:
            username = environ.get("SF_USERNAME", "").strip()
            pem = environ.get("SF_PRIVATE_KEY", "")
            if not pem and environ.get("SF_PRIVATE_KEY_FILE"):
                pem = Path(environ["SF_PRIVATE_KEY_FILE"]).read_text(encoding="ascii")
            if not username or not pem:
                raise ValueError("Salesforce needs SF_CLIENT_SECRET (client credentials) or "
                                 "SF_USERNAME with SF_PRIVATE_KEY_FILE (JWT bearer)")
            credentials = JwtBearer(client_id, username, pem,
                                    environ.get("SF_LOGIN_URL", LOGIN_URL).rstrip("/"))
        return cls(instance.rstrip("/"), credentials,
                   environ.get("SF_API_VERSION", DEFAULT_API_VERSION),
                   environ.get("SF_TOKEN_URL", ""))
