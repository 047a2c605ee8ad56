"""Pipedrive API v2 requests: the token header, pacing to the burst and Search API limits, 429s."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import httpx

from engine.errors import PermanentCRMError, RetryableCRMError
from engine.targets.base import CredentialsRefused
from engine.targets.http import body_of, path_segment, raise_for_status, retry_after
from engine.targets.pacing import Pacer
from engine.targets.session import HeaderAuth, Lane, Session, Throttled

CRM = "pipedrive"
Record = dict[str, Any]  # one JSON object from Pipedrive's `data`
Params = Mapping[str, str | int]
CLOCK_SKEW = 120.0  # seconds of slack between our clock and Pipedrive's update_time


class PipedriveAuthError(CredentialsRefused):
    """Pipedrive refused the API token (401)."""


def base_url_for(domain: str | None = None, base_url: str | None = None) -> str:
    """`https://{PIPEDRIVE_DOMAIN}.pipedrive.com`, unless `base_url` overrides it."""
    if base_url:
        return base_url.rstrip("/")
    if domain:
        return f"https://{domain}.pipedrive.com"
    return "https://api.pipedrive.com"


class PipedriveAPI(Session):
    """Send v2 requests with `x-api-token`, through the shared request loop, paced by `burst`
    (every request) and `search` (search requests too).

    A 429 pauses the pacer that was exceeded for its Retry-After (or `x-ratelimit-reset`) and
    the request is sent again, up to `max_429` times, when the wait is short; a longer wait (an
    exhausted daily budget) becomes RetryableCRMError carrying the wait, and so does every call
    until then, unsent and at once (a lane must not hang until midnight). A remaining count of
    0 pauses the pacer until the window resets, so the next request does not earn a 429.
    """

    crm = CRM

    def __init__(self, client: httpx.AsyncClient, *, api_token: str, base_url: str,
                 burst: Pacer | None = None, search: Pacer | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 max_inline_wait: float = 30.0, max_429: int = 3,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not api_token:
            raise PermanentCRMError("pipedrive: no API token; set PIPEDRIVE_API_TOKEN")
        super().__init__(client, base_url.rstrip("/") + "/api/v2",
                         HeaderAuth("x-api-token", api_token), attempts=max_429 + 1,
                         sleep=sleep)
        self.burst, self.search = burst, search
        self.lane = Lane(burst)
        self.search_lane = Lane(search, shared=burst, name="search")
        self._max_inline_wait = max_inline_wait
        self._clock = clock
        self._spent_until = 0.0  # the daily budget ran out: nothing is sent before this

    async def get(self, path: str, params: Params | None = None, *, search: bool = False,
                  missing_ok: bool = False) -> Record | None:
        """The whole envelope; None for a 404 when `missing_ok` (a deleted record)."""
        return await self._call("GET", path, params=params, search=search,
                                missing_ok=missing_ok)

    async def get_all(self, path: str, params: Params | None = None, *,
                      search: bool = False) -> list[Record]:
        """Every item of a cursor-paged list (search results sit in `data.items`)."""
        items: list[Record] = []
        query: dict[str, str | int] = {"limit": 500, **(params or {})}
        while True:
            envelope = await self._call("GET", path, params=query, search=search)
            assert envelope is not None
            data = envelope.get("data") or []
            items.extend(data.get("items", []) if isinstance(data, dict) else data)
            cursor = (envelope.get("additional_data") or {}).get("next_cursor")
            if not cursor:
                return items
            query["cursor"] = cursor

    async def post(self, path: str, body: object) -> Record:
        envelope = await self._call("POST", path, json=body)
        assert envelope is not None
        return envelope

    async def patch(self, path: str, body: object) -> Record:
        envelope = await self._call("PATCH", path, json=body)
        assert envelope is not None
        return envelope

    async def find(self, path: str, term: str, fields: str,
                   holds: Callable[[Record], bool]) -> Record | None:
        """The oldest record whose field holds exactly `term`: `exact_match` ignores case and
        a hit may match on another field, so each hit is read back and `holds` decides."""
        hits = await self.get_all(f"{path}/search", {"term": term, "fields": fields,
                                                     "exact_match": "true"}, search=True)
        for record_id in sorted({int(hit["item"]["id"]) for hit in hits}):
            record = await self.record(path, str(record_id))
            if record is not None and holds(record):
                return record
        return None

    async def recent(self, path: str, since: float, keys: list[str],
                     holds: Callable[[Record], bool]) -> Record | None:
        """A record updated since `since` for which `holds` is true. Lists read the records,
        not the search index, so they see a create that search does not show yet."""
        params: dict[str, str | int] = {"updated_since": rfc3339(since - CLOCK_SKEW),
                                        "sort_by": "id"}
        if keys:
            params["custom_fields"] = ",".join(keys[:15])
        return next((r for r in await self.get_all(path, params)
                     if not is_deleted(r) and holds(r)), None)

    async def record(self, path: str, record_id: str) -> Record | None:
        """One record's `data`, or None when it is gone: deleted in Pipedrive, whether the
        answer is a 404 or the record marked `is_deleted` (deletes are soft for 30 days), or
        an id that is not Pipedrive's (ids are whole numbers)."""
        if not record_id.isascii() or not record_id.isdigit():
            return None
        envelope = await self.get(f"{path}/{path_segment(record_id)}", missing_ok=True)
        data = None if envelope is None else envelope.get("data")
        return data if isinstance(data, dict) and not is_deleted(data) else None

    async def _call(self, method: str, path: str, *, params: Params | None = None,
                    json: object = None, search: bool = False,
                    missing_ok: bool = False) -> Record | None:
        response = await self.send(method, path, params=params, json=json,
                                   lane=self.search_lane if search else self.lane)
        if response.status_code == 404 and missing_ok:
            return None
        body = body_of(response)
        if response.status_code == 401:
            raise PipedriveAuthError(f"{CRM}: {method} {path} -> 401: {_message(body)}; "
                                     "check PIPEDRIVE_API_TOKEN")
        raise_for_status(CRM, response, _message(body))
        if not isinstance(body, dict) or body.get("success") is not True:
            raise RetryableCRMError(f"{CRM}: {method} {path} -> {response.status_code} "
                                    "without a success envelope")
        return body

    def check(self, method: str, path: str) -> None:
        spent = self._spent_until - self._clock()
        if spent > 0:
            raise RetryableCRMError(f"{CRM}: {method} {path} not sent: the daily API token "
                                    "budget is spent until it resets", retry_after=spent)

    def message(self, body: object) -> str:
        return _message(body)

    def observe(self, response: httpx.Response, lane: Lane) -> None:
        """A remaining count of zero means the next request in this window earns a 429: the
        pacer holds back until the reset, unless this process's own requests filled the window
        (its rolling window then frees the next slot at the moment the CRM does)."""
        if lane.pacer is None or response.headers.get("x-ratelimit-remaining") != "0":
            return
        reset = _seconds(response.headers.get("x-ratelimit-reset"))
        if reset is not None and not lane.pacer.filled_here():
            lane.pacer.pause(reset)

    def throttled(self, response: httpx.Response, lane: Lane) -> Throttled | None:
        if response.status_code != 429:
            return None
        wait = _wait(response.headers)
        if wait > self._max_inline_wait:
            # The daily budget is spent: pausing the pacer would hang every call until it
            # resets; fail them fast instead, so the worker reschedules them.
            self._spent_until = self._clock() + wait
            return Throttled(wait, again=False, hold=False)
        return Throttled(wait)


def is_deleted(record: Record) -> bool:
    """Deleted in Pipedrive: kept, marked, for 30 days; linkcrm treats it as gone."""
    return record.get("is_deleted") is True


def rfc3339(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _seconds(text: str | None) -> float | None:
    try:
        return max(0.0, float(text)) if text is not None else None
    except ValueError:
        return None


def _wait(headers: httpx.Headers) -> float:
    found = retry_after(headers)
    if found is None:
        found = _seconds(headers.get("x-ratelimit-reset"))
    return 2.0 if found is None else found  # 2 s: Pipedrive's burst window


def _message(body: object) -> str:
    """Pipedrive's own words: `error`, then `error_info` when it adds something."""
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        info = body.get("error_info")
        return f"{body['error']} ({info})" if isinstance(info, str) and info else body["error"]
    return str(body)[:300]
