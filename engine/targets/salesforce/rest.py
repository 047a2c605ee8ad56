"""Salesforce REST plumbing on the shared request loop: the OAuth token refreshed once on a 401,
API-usage pacing, error mapping."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import httpx

from engine.actions import JSON
from engine.errors import PermanentCRMError, RetryableCRMError
from engine.targets.http import body_of, raise_for_status
from engine.targets.pacing import Pacer
from engine.targets.salesforce.auth import OAuth, TokenSource
from engine.targets.session import Lane, Session, Throttled

CRM = "salesforce"
Body = JSON | Mapping[str, Any]
_USAGE = re.compile(r"api-usage=(\d+)/(\d+)")
# Per-record codes in collection answers that a later attempt can clear.
BATCH = 200  # sObject Collections take at most 200 records per request
IN_VALUES = 200  # records per SOQL read at most; QUERY_BYTES may cut a read shorter
# A query's `q` value at most, percent-encoded. Salesforce answers 414 to a request URI over
# 16,384 bytes (431 when URI and headers together pass it); the rest is left to the instance
# URL, the API path and the headers (the bearer token among them).
QUERY_BYTES = 12_000
TRANSIENT_CODES = frozenset({"UNABLE_TO_LOCK_ROW", "REQUEST_LIMIT_EXCEEDED", "SERVER_UNAVAILABLE"})


def error_entries(body: Any) -> list[dict[str, Any]]:
    """Salesforce's error array (`[{"message", "errorCode", "fields"}]`), or []."""
    if isinstance(body, list):
        return [entry for entry in body if isinstance(entry, dict)]
    return []


def describe_errors(entries: Sequence[Mapping[str, Any]]) -> str:
    """`CODE: message` for each error, in Salesforce's own words (REST or collection shape)."""
    return "; ".join(
        f"{entry.get('errorCode') or entry.get('statusCode') or 'ERROR'}: "
        f"{entry.get('message', '')}" for entry in entries)


class SalesforceAPI(Session):
    """Requests to one org's REST API (`{instance}/services/data/{version}`), through the
    shared request loop with the org's OAuth token (`OAuth`: one refresh on a 401).

    Every request is paced through the shared bucket. A second 401 right after a successful
    refresh raises RetryableCRMError: whether the credentials are really revoked is for the
    token endpoint to say, and it does on the next attempt (a refused token request is a
    PermanentCRMError). 403 REQUEST_LIMIT_EXCEEDED (the org's daily allocation) pauses the
    pacer and raises RetryableCRMError with `limit_backoff` as the retry delay; when
    `Sforce-Limit-Info` shows the allocation within `usage_reserve` of its end, requests slow
    to the rate the allocation sustains over `usage_window` seconds.
    """

    crm = CRM

    def __init__(
        self,
        client: httpx.AsyncClient,
        instance_url: str,
        api_version: str,
        tokens: TokenSource,
        pacer: Pacer,
        *,
        usage_reserve: float = 0.1,
        usage_window: float = 86_400.0,
        limit_backoff: float = 300.0,
        session_backoff: float = 30.0,
    ) -> None:
        super().__init__(client, instance_url, OAuth(tokens))
        self.instance_url = self.base_url
        self.base = f"{self.instance_url}/services/data/{api_version}"
        self.tokens = tokens
        self.pacer = pacer
        self.lane = Lane(pacer)
        self.usage_reserve = usage_reserve
        self.usage_window = usage_window
        self.limit_backoff = limit_backoff
        self.session_backoff = session_backoff
        self.usage: tuple[int, int] | None = None  # (used, allocation) from the last answer

    def url(self, path: str) -> str:
        return f"{self.instance_url}{path}" if path.startswith("/services/") else \
            f"{self.base}{path}"

    async def request(self, method: str, path: str, *, json: Body = None,
                      params: Mapping[str, str] | None = None) -> httpx.Response:
        """The response to `method path`, whatever its status except the ones handled here
        (401 after one refresh, 403 REQUEST_LIMIT_EXCEEDED); transport errors are retryable."""
        response = await self.send(method, path, json=json, params=params, lane=self.lane)
        if response.status_code == 401:
            raise RetryableCRMError(
                f"{CRM}: {method} {response.request.url.path} -> 401 again with a fresh "
                f"token: {self.message(body_of(response))}", retry_after=self.session_backoff)
        return response

    async def json(self, method: str, path: str, *, json: Body = None,
                   params: Mapping[str, str] | None = None) -> Any:
        """The decoded body of a 2xx answer; any other status raises the mapped CRM error."""
        response = await self.request(method, path, json=json, params=params)
        raise_for_status(CRM, response, self.message(body_of(response)))
        return None if response.status_code == 204 else body_of(response)

    async def query(self, soql: str) -> list[dict[str, Any]]:
        """Every record a SOQL query returns, following `nextRecordsUrl` pages."""
        body = await self.json("GET", "/query/", params={"q": soql})
        records: list[dict[str, Any]] = []
        while True:
            if not isinstance(body, dict) or not isinstance(body.get("records"), list):
                raise PermanentCRMError(f"{CRM}: unexpected query answer: {str(body)[:200]}")
            records.extend(r for r in body["records"] if isinstance(r, dict))
            following = body.get("nextRecordsUrl")
            if body.get("done", True) or not isinstance(following, str):
                return records
            body = await self.json("GET", following)

    def message(self, body: Any) -> str:
        return describe_errors(error_entries(body))

    def observe(self, response: httpx.Response, lane: Lane) -> None:
        match = _USAGE.search(response.headers.get("sforce-limit-info", ""))
        if match is None:
            return
        used, allocation = int(match[1]), int(match[2])
        self.usage = (used, allocation)
        if allocation > 0 and allocation - used <= allocation * self.usage_reserve:
            # Near the end of the rolling allocation: go no faster than it refills on average.
            self.pacer.pause(self.usage_window / allocation)

    def throttled(self, response: httpx.Response, lane: Lane) -> Throttled | None:
        """403 REQUEST_LIMIT_EXCEEDED: the org's allocation is spent for now."""
        if response.status_code == 403 and "REQUEST_LIMIT_EXCEEDED" in _codes(response):
            return Throttled(self.limit_backoff, again=False)
        return None


def _codes(response: httpx.Response) -> set[str]:
    return {str(entry.get("errorCode")) for entry in error_entries(body_of(response))}
