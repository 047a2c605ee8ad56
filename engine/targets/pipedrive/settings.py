"""Pipedrive's settings from the environment: the API token, company domain and burst limit."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from engine.targets.settings import Reader, count, url

PLANS = "20 (Essential), 40 (Advanced), 80 (Professional), 100 (Power), 120 (Enterprise)"


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
        read = Reader(environ)
        token = read.required("PIPEDRIVE_API_TOKEN",
                              "the API token of the user linkcrm acts as: Personal preferences "
                              "> API")
        domain = read.required("PIPEDRIVE_DOMAIN", "your company domain, e.g. acme for "
                               "acme.pipedrive.com")
        return read.done(cls(token, _domain(domain),
                             read.optional("PIPEDRIVE_BASE_URL", None, url),
                             read.optional("PIPEDRIVE_RATE_LIMIT", 20, count(PLANS))))


def _domain(raw: str) -> str:
    """`acme`, whether given as acme, acme.pipedrive.com or https://acme.pipedrive.com/."""
    host = raw.strip().lower().split("://", 1)[-1].split("/", 1)[0]
    return host.removesuffix(".pipedrive.com")
