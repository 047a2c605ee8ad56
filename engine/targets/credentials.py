"""Each CRM's credentials, base URL and limits, read from the environment by the usual names."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from engine.errors import ConfigError, Location, Problem
from engine.targets.hubspot.api import DEFAULT_BASE_URL as HUBSPOT_URL
from engine.targets.salesforce.auth import SalesforceSettings

T = TypeVar("T")

HUBSPOT_TIERS = "100 (Free, Starter) or 190 (Professional, Enterprise)"
PIPEDRIVE_PLANS = "20 (Essential), 40 (Advanced), 80 (Professional), 100 (Power), 120 (Enterprise)"


@dataclass(frozen=True)
class HubSpotSettings:
    """`HUBSPOT_ACCESS_TOKEN` (a private-app token), `HUBSPOT_BASE_URL` and `HUBSPOT_RATE_LIMIT`
    (the account's requests per 10 s; the answers' rate-limit headers correct it if wrong)."""

    token: str = field(repr=False)
    base_url: str = HUBSPOT_URL
    rate_limit: int = 100

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> HubSpotSettings:
        """The settings, or ConfigError naming every missing or malformed variable."""
        read = _Reader(environ)
        settings = cls(
            token=read.required("HUBSPOT_ACCESS_TOKEN", "a HubSpot private-app token, pat-..."),
            base_url=read.optional("HUBSPOT_BASE_URL", HUBSPOT_URL, _url),
            rate_limit=read.optional("HUBSPOT_RATE_LIMIT", 100, _count(HUBSPOT_TIERS)),
        )
        read.done()
        return settings


@dataclass(frozen=True)
class PipedriveSettings:
    """`PIPEDRIVE_API_TOKEN`, `PIPEDRIVE_DOMAIN` (`acme` of acme.pipedrive.com),
    `PIPEDRIVE_BASE_URL` (overrides the domain's URL) and `PIPEDRIVE_RATE_LIMIT` (the token's
    burst limit per 2 s, by plan)."""

    api_token: str = field(repr=False)
    domain: str
    base_url: str | None = None
    rate_limit: int = 20

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> PipedriveSettings:
        read = _Reader(environ)
        settings = cls(
            api_token=read.required("PIPEDRIVE_API_TOKEN", "the API token of the user linkcrm "
                                    "acts as: Personal preferences > API"),
            domain=_domain(read.required("PIPEDRIVE_DOMAIN", "your company domain, e.g. acme "
                                         "for acme.pipedrive.com")),
            base_url=read.optional("PIPEDRIVE_BASE_URL", None, _url),
            rate_limit=read.optional("PIPEDRIVE_RATE_LIMIT", 20, _count(PIPEDRIVE_PLANS)),
        )
        read.done()
        return settings


@dataclass(frozen=True)
class SalesforceEnvironment:
    """The org (`SalesforceSettings.from_env`: SF_INSTANCE_URL, SF_CLIENT_ID and either
    SF_CLIENT_SECRET or SF_USERNAME with SF_PRIVATE_KEY_FILE/SF_PRIVATE_KEY; SF_TOKEN_URL,
    SF_LOGIN_URL, SF_API_VERSION) and `SF_LIMIT_BACKOFF`, how long to hold back once the org's
    daily API allocation is spent (403 REQUEST_LIMIT_EXCEEDED)."""

    settings: SalesforceSettings
    limit_backoff: float = 300.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> SalesforceEnvironment:
        read = _Reader(environ)
        read.optional("SF_INSTANCE_URL", None, _url)
        read.optional("SF_TOKEN_URL", None, _url)
        read.optional("SF_LOGIN_URL", None, _url)
        backoff = read.optional("SF_LIMIT_BACKOFF", 300.0, _seconds)
        settings: SalesforceSettings | None = None
        try:
            settings = SalesforceSettings.from_env(environ)
        except ValueError as error:
            read.problem("SF_CLIENT_ID", str(error), "set SF_CLIENT_SECRET (client credentials) "
                         "or SF_USERNAME and SF_PRIVATE_KEY_FILE (JWT bearer)")
        except OSError as error:
            read.problem("SF_PRIVATE_KEY_FILE", f"SF_PRIVATE_KEY_FILE cannot be read: "
                         f"{error.strerror or error}", "point it at the PEM file of the key "
                         "whose certificate is uploaded to the connected app")
        if settings is None:
            read.required("SF_INSTANCE_URL", "the org's My Domain URL, "
                          "e.g. https://acme.my.salesforce.com")
        read.done()
        assert settings is not None  # done() raised otherwise
        return cls(settings, backoff)


class _Reader:
    """Reads variables, collecting every problem before raising one ConfigError."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.environ = environ
        self.problems: list[Problem] = []

    def required(self, name: str, what: str) -> str:
        value = self.environ.get(name, "").strip()
        if not value:
            self.problem(name, f"{name} is not set", f"export {name}=...  ({what})",
                         code="missing-credentials")
        return value

    def optional(self, name: str, default: T, parse: Callable[[str], T]) -> T:
        raw = self.environ.get(name, "").strip()
        if not raw:
            return default
        try:
            return parse(raw)
        except ValueError as error:
            self.problem(name, f"{name} {error}", f"fix or unset {name}")
            return default

    def problem(self, name: str, message: str, hint: str, code: str = "bad-setting") -> None:
        self.problems.append(Problem(Location("environment"), code, message, hint))

    def done(self) -> None:
        if self.problems:
            raise ConfigError(self.problems)


def _url(raw: str) -> str:
    if not raw.lower().startswith(("https://", "http://")):
        raise ValueError(f"must be an http(s) URL, got {raw!r}")
    return raw.rstrip("/")


def _count(choices: str) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            value = 0
        if value <= 0:
            raise ValueError(f"must be a whole number of requests, e.g. {choices}; got {raw!r}")
        return value

    return parse


def _seconds(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise ValueError(f"must be a number of seconds, got {raw!r}")
    return value


def _domain(raw: str) -> str:
    """`acme`, whether given as acme, acme.pipedrive.com or https://acme.pipedrive.com/."""
    host = raw.strip().lower().split("://", 1)[-1].split("/", 1)[0]
    return host.removesuffix(".pipedrive.com")
