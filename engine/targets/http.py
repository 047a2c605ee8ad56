"""HTTP plumbing every CRM adapter shares: transport errors and status codes mapped to the two
errors the worker understands, and Retry-After parsing (the request loop itself is
`engine.targets.session`).

Like httpx's own `map_httpcore_exceptions`, this is the one place where httpx exceptions are
translated; adapters add only their CRM's own rules (Salesforce's 403 REQUEST_LIMIT_EXCEEDED,
HubSpot's 409 duplicates, ...) before falling back to `raise_for_status`.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote

import httpx

from engine.errors import PermanentCRMError, RetryableCRMError

RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
DOT_SEGMENTS = frozenset({".", ".."})


def path_segment(value: str) -> str:
    """`value` as exactly one URL path segment: everything but letters, digits and `-._~`
    percent-encoded (`/`, `?`, `#`, `%`, spaces, non-ASCII), so it can neither end the path
    nor add a segment.

    Raises ValueError for a value that no encoding keeps in its place: empty, or a dot
    segment (`.`, `..`), which httpx and servers resolve (RFC 3986 §5.2.4), so the request
    would reach another resource (and `%2E` is the same as `.`, RFC 3986 §2.3); and a lone
    surrogate, which has no UTF-8 form. Callers send such values another way (a query
    parameter, a body), or refuse them.

        >>> path_segment("a/b?c")
        'a%2Fb%3Fc'
    """
    if not value or value in DOT_SEGMENTS:
        raise ValueError(f"{value!r} cannot be a URL path segment")
    try:
        return quote(value, safe="")
    except UnicodeEncodeError:
        raise ValueError("a value with a lone surrogate cannot be a URL path segment") from None


def retry_after(headers: Mapping[str, str], now: datetime | None = None) -> float | None:
    """Seconds to wait from a `Retry-After` header (delta seconds or an HTTP date)."""
    value = headers.get("retry-after") or headers.get("Retry-After")
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    current = now or datetime.now(UTC)
    return max(0.0, (when - current).total_seconds())


async def send(client: httpx.AsyncClient, crm: str, request: httpx.Request,
               auth: httpx.Auth | None = None) -> httpx.Response:
    """Send `request` (through `auth`'s flow when given); a timeout or a broken connection
    becomes RetryableCRMError.

    The response is returned whatever its status: the caller decides what a status means.
    A read timeout asks for a wait as long as the timeout before the retry: the CRM may still
    be working on the request, and a write that lands after its retry was sent could make a
    second record in a CRM without idempotent creates (Pipedrive).
    """
    try:
        if auth is None:
            return await client.send(request)
        return await client.send(request, auth=auth)
    except httpx.ReadTimeout:
        timeout = request.extensions.get("timeout")
        read = timeout.get("read") if isinstance(timeout, dict) else None
        raise RetryableCRMError(
            f"{crm}: {request.method} {request.url.path} timed out waiting for the answer",
            retry_after=float(read) if isinstance(read, int | float) else None) from None
    except httpx.TimeoutException as error:
        raise RetryableCRMError(f"{crm}: {request.method} {request.url.path} timed out "
                                f"({type(error).__name__})") from None
    except httpx.TransportError as error:
        raise RetryableCRMError(f"{crm}: {request.method} {request.url.path} failed: "
                                f"{type(error).__name__}") from None


def body_of(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text[:500]


def raise_for_status(crm: str, response: httpx.Response, message: str = "") -> None:
    """Map a non-2xx status: retryable ones to RetryableCRMError (with Retry-After), the rest
    to PermanentCRMError carrying the CRM's own message."""
    if response.is_success:
        return
    what = f"{crm}: {response.request.method} {response.request.url.path} -> " \
           f"{response.status_code}: {message or message_of(body_of(response))}"
    if response.status_code in RETRYABLE_STATUS:
        raise RetryableCRMError(what, retry_after=retry_after(response.headers))
    raise PermanentCRMError(what)


def message_of(body: Any) -> str:
    """The CRM's own words from the usual error body shapes (object, Salesforce's array)."""
    if isinstance(body, list) and body and isinstance(body[0], dict):
        return "; ".join(f"{e.get('errorCode', '')}: {e.get('message', '')}" for e in body)
    if isinstance(body, dict):
        for key in ("message", "error", "error_description", "error_info"):
            if isinstance(body.get(key), str):
                return str(body[key])
    return str(body)[:300]
