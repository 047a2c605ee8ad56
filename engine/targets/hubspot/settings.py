"""HubSpot's settings from the environment: the private-app token, base URL and rate limit."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from engine.targets.hubspot.api import DEFAULT_BASE_URL
from engine.targets.settings import Reader, count, url

TIERS = "100 (Free, Starter) or 190 (Professional, Enterprise)"


@dataclass(frozen=True)
class HubSpotSettings:
    """`HUBSPOT_ACCESS_TOKEN` (a private-app token), `HUBSPOT_BASE_URL` and `HUBSPOT_RATE_LIMIT`
    (the account's requests per 10 s; the answers' rate-limit headers correct it if wrong)."""

    token: str = field(repr=False)
    base_url: str = DEFAULT_BASE_URL
    rate_limit: int = 100

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> HubSpotSettings:
        """The settings, or ConfigError naming every missing or malformed variable."""
        read = Reader(environ)
        return read.done(cls(
            token=read.required("HUBSPOT_ACCESS_TOKEN", "a HubSpot private-app token, pat-..."),
            base_url=read.optional("HUBSPOT_BASE_URL", DEFAULT_BASE_URL, url),
            rate_limit=read.optional("HUBSPOT_RATE_LIMIT", 100, count(TIERS))))
