"""HubSpot's HTTP surface as linkcrm uses it: bearer auth, pacing, rate-limit headers, errors.

Requests go through the shared loop (`engine.targets.session.Session`). Every request waits for
the shared `Pacer` first (search has its own limit and its own pacer), and every answer's
`X-HubSpot-RateLimit-*` headers re-shape the pacer to the limit HubSpot actually enforces. A
429 from the ten-second window pauses the pacer and is retried here (it was not processed); a
daily-limit 429 goes back to the worker with its wait. Other statuses are left to the caller to
read (`expect`) or mapped to RetryableCRMError/PermanentCRMError with HubSpot's own message.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import httpx

from engine.errors import CRMError, PermanentCRMError
from engine.targets.http import body_of, path_segment, raise_for_status, retry_after
from engine.targets.pacing import Pacer
from engine.targets.session import HeaderAuth, Lane, Session, Throttled

CRM = "hubspot"
DEFAULT_BASE_URL = "https://api.hubapi.com"
EXISTING_ID = re.compile(r"Existing ID: (\d+)")
# A unique value already taken, in the words HubSpot uses for it: 409 "... already exists" or
# 400 VALIDATION_ERROR "... already has that value" (both seen; which one an account gets is
# not documented).
TAKEN = re.compile(r"already (has that value|exists)", re.IGNORECASE)
EMAIL = re.compile(r"[^\s@\"'<>()\[\],;:]+@[^\s@\"'<>()\[\],;:]+\.[A-Za-z]{2,}")
THROTTLED_ATTEMPTS = 4
SEARCH_PER_SECOND = 4  # docs say 4 or 5 per second (unverified which): take the lower

Sleep = Callable[[float], Awaitable[None]]


def as_object(value: object) -> dict[str, object]:
    return value if isinstance(value, dict) else {}


def as_list(value: object) -> list[object]:
    return value if isinstance(value, list) else []


def hubspot_message(body: object) -> str:
    """HubSpot's own words: category, message and each error's message, plus the
    correlation id HubSpot support asks for. Email addresses HubSpot quotes (a 409's
    "A contact with email ... already exists") are masked: errors end up in logs and dead
    letters, which must not carry personal data."""
    data = as_object(body)
    if not data:
        return EMAIL.sub("<email>", str(body)[:500])
    parts = [str(data.get("category") or data.get("errorType") or "")]
    message = str(data.get("message", ""))
    parts.append(message)
    for error in as_list(data.get("errors")):
        text = str(as_object(error).get("message", ""))
        if text and text not in message:
            parts.append(text)
    text = EMAIL.sub("<email>", ": ".join(p for p in parts if p))
    correlation = data.get("correlationId")
    return f"{text} (correlationId {correlation})" if correlation else text


def existing_id(body: object) -> str | None:
    """The record id a 409 names, in either body format HubSpot sends."""
    data = as_object(body)
    texts = [str(data.get("message", ""))]
    texts += [str(as_object(e).get("message", "")) for e in as_list(data.get("errors"))]
    for text in texts:
        match = EXISTING_ID.search(text)
        if match:
            return match.group(1)
    vid = as_object(data.get("identityProfile")).get("vid")
    return str(vid) if isinstance(vid, int | str) and str(vid).isdigit() else None


def unique_conflict(status: int, body: object) -> bool:
    """Whether an answer says a unique value (email, a hasUniqueValue property such as the
    deep-link token or the deal key) is held by another record: a 409, or a 400
    VALIDATION_ERROR saying the value "already has that value" / "already exists". The caller
    still looks the holder up: the words alone never decide which record to adopt."""
    if status == 409:
        return True
    if status != 400:
        return False
    data = as_object(body)
    texts = [str(data.get("message", ""))]
    texts += [str(as_object(e).get("message", "")) for e in as_list(data.get("errors"))]
    return any(TAKEN.search(text) for text in texts)


def without_fix(error: Exception) -> str:
    """An error's text without the "; fix: ..." it may carry, for callers that give their own."""
    return str(error).partition("; fix: ")[0]


def error_for(response: httpx.Response) -> CRMError:
    """A non-expected status as the error the worker understands, with HubSpot's message."""
    message = hubspot_message(body_of(response))
    request = response.request
    if response.status_code == 401:
        return PermanentCRMError(
            f"{CRM}: {request.method} {request.url.path} -> 401: {message}; fix: set "
            "HUBSPOT_ACCESS_TOKEN to a private-app token of this HubSpot account")
    try:
        raise_for_status(CRM, response, message)
    except CRMError as error:
        return error
    return PermanentCRMError(f"{CRM}: {request.method} {request.url.path} -> unexpected "
                             f"{response.status_code}: {message}")


@dataclass(frozen=True)
class HubSpotObject:
    id: str
    properties: dict[str, str | None]
    new: bool = False


def parse_object(raw: object) -> HubSpotObject | None:
    data = as_object(raw)
    record_id = data.get("id")
    if not isinstance(record_id, str | int):
        return None
    properties = {str(k): (None if v is None else str(v))
                  for k, v in as_object(data.get("properties")).items()}
    return HubSpotObject(str(record_id), properties, data.get("new") is True)


def parse_created(body: object) -> HubSpotObject | None:
    """The object a single create made, from either answer HubSpot documents: 201 with the
    object itself (`SimplePublicObject`), or 200 with it wrapped as `{createdResourceId,
    entity, location}` (`CreatedResponseSimplePublicObject`, the newer spec versions)."""
    data = as_object(body)
    if "entity" not in data and "createdResourceId" not in data:
        return parse_object(data)
    entity = as_object(data.get("entity"))
    record_id = entity.get("id") or data.get("createdResourceId")
    return parse_object({**entity, "id": record_id})


@dataclass(frozen=True)
class Created:
    """The answer to a single create: the new `record` (None: the answer named no id), or,
    when `taken`, a unique value the create writes is held by another record (409, or 400
    VALIDATION_ERROR "already has that value"); `holder` is that record's id when the answer
    names it (a 409's "Existing ID")."""

    status: int
    body: object
    record: HubSpotObject | None = None
    taken: bool = False
    holder: str | None = None

    def refused(self, path: str) -> PermanentCRMError:
        return PermanentCRMError(f"{CRM}: POST {path} -> {self.status}: "
                                 f"{hubspot_message(self.body)}")


def record_path(prefix: str, record_id: str) -> str:
    """`prefix/<record_id>` for an id HubSpot gave. The id is encoded as one path segment; one
    that cannot be (empty, `.`, `..`) is refused, never sent to another resource."""
    try:
        return f"{prefix}/{path_segment(record_id)}"
    except ValueError:
        raise PermanentCRMError(f"{CRM}: {record_id!r} is not a HubSpot record id (HubSpot "
                                "gives numbers), so no URL can name it; this is a linkcrm "
                                "bug: please report it") from None


class HubSpotAPI(Session):
    """One HubSpot account through an injected client, on the shared request loop with the
    private-app token as a bearer header. `pacer` paces every call but search,
    `search_pacer` paces search; either may be None (admin commands send a handful)."""

    crm = CRM

    def __init__(self, client: httpx.AsyncClient, token: str, *,
                 base_url: str = DEFAULT_BASE_URL, pacer: Pacer | None = None,
                 search_pacer: Pacer | None = None, window_seconds: float = 10.0,
                 sleep: Sleep = asyncio.sleep) -> None:
        super().__init__(client, base_url, HeaderAuth("Authorization", f"Bearer {token}"),
                         attempts=THROTTLED_ATTEMPTS, sleep=sleep)
        self.pacer = pacer
        self.search_pacer = search_pacer
        self.lane = Lane(pacer)
        self.search_lane = Lane(search_pacer, name="search")
        self.window_seconds = window_seconds
        self.limit: int | None = None

    async def call(self, method: str, path: str, *, json: object = None,
                   params: Mapping[str, str] | None = None, expect: Sequence[int] = (200,),
                   search: bool = False) -> httpx.Response:
        """Send one request (paced; throttled ones retried) and return the response when its
        status is in `expect`; raise RetryableCRMError/PermanentCRMError otherwise."""
        response = await self.send(method, path, json=json, params=params,
                                   lane=self.search_lane if search else self.lane)
        if response.status_code in expect:
            return response
        raise error_for(response)

    async def create(self, path: str, body: object) -> Created:
        """POST one object: what it made, or which unique value is taken; any other refusal
        raises the mapped error."""
        response = await self.call("POST", path, json=body, expect=(200, 201, 400, 409))
        answer, status = response.json(), response.status_code
        if status == 400 and not unique_conflict(status, answer):
            raise error_for(response)
        if status in (400, 409):
            holder = existing_id(answer) if status == 409 else None
            return Created(status, answer, taken=True, holder=holder)
        # 201 with the object, or 200 with it wrapped (the newer spec versions).
        return Created(status, answer, record=parse_created(answer))

    def message(self, body: object) -> str:
        return hubspot_message(body)

    def observe(self, response: httpx.Response, lane: Lane) -> None:
        """Follow the limit HubSpot states (100 or 190 per 10 s by tier, more with the add-on);
        search answers state none."""
        if lane.name == "search":
            return
        headers = response.headers
        limit = _number(headers.get("x-hubspot-ratelimit-max"))
        interval = _number(headers.get("x-hubspot-ratelimit-interval-milliseconds"))
        if limit is None or limit <= 0:
            return
        window = interval / 1000 if interval else self.window_seconds
        if self.pacer is not None and (int(limit) != self.limit or window != self.window_seconds):
            self.pacer.follow(limit, window)
        self.limit, self.window_seconds = int(limit), window
        remaining = _number(headers.get("x-hubspot-ratelimit-remaining"))
        if remaining is not None and remaining <= 0 and self.pacer is not None:
            # Someone else shares this app's limit: give the window one slot's time to free.
            self.pacer.pause(window / limit)

    def throttled(self, response: httpx.Response, lane: Lane) -> Throttled | None:
        """A 429 from the ten-second (or search's one-second) window is waited out here; one
        from the daily limit goes back to the worker with the wait until it resets."""
        if response.status_code != 429:
            return None
        body = as_object(body_of(response))
        stated = retry_after(response.headers)
        if str(body.get("policyName", "")) == "DAILY" or "daily limit" in str(
                body.get("message", "")):
            return Throttled(_to_midnight(), again=False, hold=False)
        if stated is not None:
            return Throttled(stated)
        if lane.name == "search" or "secondly limit" in str(body.get("message", "")):
            return Throttled(1.0)
        interval = _number(response.headers.get("x-hubspot-ratelimit-interval-milliseconds"))
        # TEN_SECONDLY_ROLLING: a rolling window frees fully after one interval.
        return Throttled(interval / 1000 if interval else self.window_seconds)


def _number(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _to_midnight() -> float:
    # The daily limit resets at midnight in the account's time zone, which the API does not
    # say: UTC midnight is a guess the worker's backoff corrects.
    now = datetime.now(UTC)
    tomorrow = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return max(60.0, (tomorrow - now).total_seconds())
