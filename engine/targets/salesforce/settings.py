"""Salesforce's settings from the environment: the org, its OAuth flow, and the limit backoff."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from engine.targets.salesforce.auth import SalesforceSettings
from engine.targets.settings import Reader, seconds, url


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
        read = Reader(environ)
        read.optional("SF_INSTANCE_URL", None, url)
        read.optional("SF_TOKEN_URL", None, url)
        read.optional("SF_LOGIN_URL", None, url)
        backoff = read.optional("SF_LIMIT_BACKOFF", 300.0, seconds)
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
        read.done(None)
        assert settings is not None  # done() raised otherwise
        return cls(settings, backoff)
