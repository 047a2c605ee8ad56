"""A strict HubSpot CRM v3 emulator (the subset linkcrm uses), as a Starlette app.

    app, state = create_hubspot_emulator(token="t", rate_limit=100, window_seconds=10)
    with serve(FaultInjector(app, rate=0.2, too_many=lambda: too_many(state))) as url: ...

Every request is authenticated (401 with HubSpot's body), counted against the rolling limit
(429 TEN_SECONDLY_ROLLING with the X-HubSpot-RateLimit-* headers, which every other non-search
answer also carries) or search's own per-second limit (search answers carry no rate-limit
headers), delayed by `latency`, and its JSON body validated against the request schema in
`schemas/hubspot/` (400 on mismatch), before the operation runs. Rules: `hubspot_state.py`.

Its front end resolves dot segments before routing, as web servers do (`paths.py`): a record
id or unique value of `.` or `..` in a path reaches another resource, as it would at HubSpot.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match
from referencing import Registry, Resource
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.emulators.hubspot_ops import Operations
from tests.emulators.hubspot_state import (
    ApiError,
    HubSpotState,
    RollingLimit,
    error_body,
)
from tests.emulators.paths import PathFrontEnd

SCHEMAS = Path(__file__).parent / "schemas" / "hubspot"
Handler = Callable[[Request, Any], tuple[int, Any]]


def load_validators() -> dict[str, Draft202012Validator]:
    """One validator per request schema; schemas `$ref` each other by file name."""
    documents = {p.name: json.loads(p.read_text()) for p in sorted(SCHEMAS.glob("*.json"))}
    registry: Registry[Any] = Registry().with_resources(
        (doc["$id"], Resource.from_contents(doc)) for doc in documents.values())
    return {name.removesuffix(".json"): Draft202012Validator(doc, registry=registry)
            for name, doc in documents.items()}


def create_hubspot_emulator(
    token: str = "hs-test-token", *, rate_limit: int = 100, window_seconds: float = 10.0,
    daily_limit: int = 250_000, search_per_second: int = 5, latency: float = 0.0,
    conflict_format: str = "legacy", search_lag: float = 0.0, send_retry_after: bool = False,
    unique_conflict: str = "409", upsert_echo: str = "all",
    create_response: str = "201-object", path_values: str = "decoded",
) -> tuple[Starlette, HubSpotState]:
    """The app and its inspectable state (records, properties, counts of requests and 429s).
    Switches for behaviour HubSpot shows either way: `conflict_format` (the 409 body),
    `unique_conflict` ("409" or "400" for a taken hasUniqueValue value), `upsert_echo` ("all"
    or "written" properties in batch upsert results), `create_response` ("201-object": a
    create answers 201 with the object, a batch create 201; "200-wrapped": 200 with
    `{createdResourceId, entity, location}`, a batch create 200, as newer spec versions say),
    `path_values` ("decoded": an encoded path segment is one literal value; "rerouted": the
    path is decoded before routing, so `%2F` splits it and `%2E%2E` climbs a level)."""
    assert unique_conflict in ("409", "400") and upsert_echo in ("all", "written")
    assert create_response in ("201-object", "200-wrapped")
    assert path_values in ("decoded", "rerouted")
    state = HubSpotState(token=token, limit=RollingLimit(rate_limit, window_seconds),
                         search_limit=RollingLimit(search_per_second, 1.0),
                         daily_limit=daily_limit, conflict_format=conflict_format,
                         search_lag=search_lag, latency=latency,
                         send_retry_after=send_retry_after, unique_conflict=unique_conflict,
                         upsert_echo=upsert_echo, create_response=create_response,
                         path_values=path_values)
    validators = load_validators()
    ops = Operations(state)

    def endpoint(template: str, handler: Handler, schema: str | None = None, *,
                 search: bool = False) -> Callable[[Request], Any]:
        async def run(request: Request) -> Response:
            kind = template.replace("{object}", request.path_params.get("object", "{object}"))
            state.requests[f"{request.method} {kind}"] += 1
            state.request_times.append(state.limit.clock())
            denied = _authenticate(state, request)
            if denied is not None:
                return denied
            throttled = _throttle(state, search)
            if throttled is not None:
                return throttled
            if state.latency:
                await asyncio.sleep(state.latency)
            headers = {} if search else rate_headers(state)
            try:
                body = await _body(request, validators.get(schema or ""), schema)
                status, payload = handler(request, body)
            except ApiError as error:
                status, payload = error.status, error.body
            return JSONResponse(payload, status_code=status, headers=headers)
        return run

    routes = [
        Route("/crm/v3/objects/{object}/batch/upsert",
              endpoint("/crm/v3/objects/{object}/batch/upsert", ops.batch_upsert,
                       "batch_upsert"), methods=["POST"]),
        Route("/crm/v3/objects/{object}/batch/read",
              endpoint("/crm/v3/objects/{object}/batch/read", ops.batch_read, "batch_read"),
              methods=["POST"]),
        Route("/crm/v3/objects/{object}/batch/create",
              endpoint("/crm/v3/objects/{object}/batch/create", ops.batch_create,
                       "batch_create"), methods=["POST"]),
        Route("/crm/v3/objects/{object}/search",
              endpoint("/crm/v3/objects/{object}/search", ops.search, "search", search=True),
              methods=["POST"]),
        Route("/crm/v3/objects/{object}",
              endpoint("/crm/v3/objects/{object}", ops.create, "object_create"),
              methods=["POST"]),
        # `{id:path}`: the front end decides what an encoded `/` in the id means (the switch).
        Route("/crm/v3/objects/{object}/{id:path}",
              endpoint("/crm/v3/objects/{object}/{id}", ops.get), methods=["GET"]),
        Route("/crm/v3/objects/{object}/{id:path}",
              endpoint("/crm/v3/objects/{object}/{id}", ops.update, "object_update"),
              methods=["PATCH"]),
        Route("/crm/v4/objects/deals/{id}/associations/default/contacts/{contact}",
              endpoint("/crm/v4/objects/deals/{id}/associations/default/contacts/{contact}",
                       ops.associate), methods=["PUT"]),
        Route("/crm/v3/properties/{object}/groups",
              endpoint("/crm/v3/properties/{object}/groups", ops.list_groups),
              methods=["GET"]),
        Route("/crm/v3/properties/{object}/groups",
              endpoint("/crm/v3/properties/{object}/groups", ops.create_group,
                       "property_group_create"), methods=["POST"]),
        Route("/crm/v3/properties/{object}",
              endpoint("/crm/v3/properties/{object}", ops.list_properties), methods=["GET"]),
        Route("/crm/v3/properties/{object}",
              endpoint("/crm/v3/properties/{object}", ops.create_property, "property_create"),
              methods=["POST"]),
        Route("/crm/v3/pipelines/deals",
              endpoint("/crm/v3/pipelines/deals", ops.pipelines), methods=["GET"]),
    ]

    async def not_found(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 404
        return JSONResponse(error_body(f"Unable to route {request.method} {request.url.path}",
                                       "OBJECT_NOT_FOUND"), status_code=status)

    app = Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found},
                    middleware=[Middleware(PathFrontEnd, rerouted=path_values == "rerouted")])
    return app, state


def rate_headers(state: HubSpotState) -> dict[str, str]:
    per_second = max(1, math.ceil(state.limit.limit / state.limit.window))
    return {
        "X-HubSpot-RateLimit-Daily": str(state.daily_limit),
        "X-HubSpot-RateLimit-Daily-Remaining": str(max(0, state.daily_limit - state.daily_used)),
        "X-HubSpot-RateLimit-Interval-Milliseconds": str(int(state.limit.window * 1000)),
        "X-HubSpot-RateLimit-Max": str(state.limit.limit),
        "X-HubSpot-RateLimit-Remaining": str(state.limit.remaining()),
        "X-HubSpot-RateLimit-Secondly": str(per_second),
        "X-HubSpot-RateLimit-Secondly-Remaining": str(min(per_second,
                                                          state.limit.remaining())),
    }


def too_many(state: HubSpotState) -> tuple[int, dict[str, str], Any]:
    """HubSpot's ten-second 429, for the emulator and for FaultInjector(too_many=...)."""
    headers = {**rate_headers(state), "X-HubSpot-RateLimit-Remaining": "0"}
    if state.send_retry_after:
        headers["Retry-After"] = str(max(1, math.ceil(state.limit.free_in())))
    return 429, headers, {
        "status": "error", "message": "You have reached your ten_secondly_rolling limit.",
        "errorType": "RATE_LIMIT", "correlationId": error_body("", "")["correlationId"],
        "policyName": "TEN_SECONDLY_ROLLING", "requestId": error_body("", "")["correlationId"]}


def _authenticate(state: HubSpotState, request: Request) -> Response | None:
    if request.headers.get("authorization") == f"Bearer {state.token}":
        return None
    return JSONResponse(error_body(
        "Authentication credentials not found. This API supports OAuth 2.0 authentication and "
        "you can find more details at https://developers.hubspot.com/docs/methods/auth/"
        "oauth-overview", "INVALID_AUTHENTICATION"), status_code=401)


def _throttle(state: HubSpotState, search: bool) -> Response | None:
    if search:
        if state.search_limit.take():
            return None
        state.throttled += 1
        state.throttled_at.append(state.limit.clock())
        return JSONResponse({"status": "error", "message": "You have reached your secondly "
                             "limit.", "errorType": "RATE_LIMIT", "policyName": "SECONDLY",
                             "correlationId": error_body("", "")["correlationId"]},
                            status_code=429)
    if state.daily_used >= state.daily_limit:
        state.throttled += 1
        return JSONResponse({"status": "error", "message": "You have reached your daily limit.",
                             "errorType": "RATE_LIMIT", "policyName": "DAILY",
                             "correlationId": error_body("", "")["correlationId"]},
                            status_code=429, headers=rate_headers(state))
    if not state.limit.take():
        state.throttled += 1
        state.throttled_at.append(state.limit.clock())
        status, headers, body = too_many(state)
        return JSONResponse(body, status_code=status, headers=headers)
    state.daily_used += 1
    return None


async def _body(request: Request, validator: Draft202012Validator | None,
                schema: str | None) -> Any:
    raw = await request.body()
    if schema is None:
        if raw.strip():
            raise ApiError(400, error_body("This endpoint takes no request body",
                                           "VALIDATION_ERROR"))
        return None
    try:
        body = json.loads(raw)
    except ValueError as bad:
        raise ApiError(400, error_body(f"Invalid input JSON: {bad}", "VALIDATION_ERROR")
                       ) from None
    assert validator is not None, f"no request schema {schema}.json"
    mismatch = best_match(validator.iter_errors(body))
    if mismatch is not None:
        where = "/".join(str(p) for p in mismatch.absolute_path) or "(root)"
        message = re.sub(r"\s+", " ", mismatch.message)
        raise ApiError(400, error_body(
            f"Invalid input JSON: {message} at {where} (schema {schema}.json)",
            "VALIDATION_ERROR"))
    return body
