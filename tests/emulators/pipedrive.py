"""A strict emulator of the Pipedrive API v2 subset linkcrm uses: persons, deals, fields, search.

Behaviour follows `CRM_FACTS.md` and Pipedrive's v2 OpenAPI (read once; nothing of it is loaded):

- auth by the `x-api-token` header only; `?api_token=` is refused on v2 (401 envelope);
- v1 `/v1/persons*` and `/v1/deals*` answer **410 Gone**: they are out of support since
  2026-08-01 and gone from the published v1 spec, and 410 (not 404) tells an adapter that uses
  them that the endpoint is retired, not that a record is missing;
- envelopes `{"success": true, "data", "additional_data"}` and
  `{"success": false, "error", "error_info", "data": null, "additional_data": null}`;
- v2 strictness: every request body is checked against `schemas/pipedrive/*.json` (no string to
  number coercion, booleans only true/false), custom fields live under `custom_fields` keyed by
  40-character hex keys generated per account, an unknown key or a wrongly typed value is a 400,
  dates are `YYYY-MM-DD`, option fields take option ids;
- search: `exact_match` ignores case, terms need 2 characters (1 with `exact_match`), only the
  searchable custom field types are searched, and the index lags writes by `search_lag` seconds
  (what makes search-then-create race); lists (`GET /persons`, `GET /deals`) do not lag;
- token-based rate limits: each request's `x-token-cost` comes from a daily budget; per-token
  burst limit in a rolling `burst_window` and the Search API limit; `x-ratelimit-limit`,
  `x-ratelimit-remaining`, `x-ratelimit-reset`; 429 with the failure envelope and Retry-After;
- deletes are soft ("Marks a person as deleted. After 30 days, the person will be permanently
  deleted."): the record keeps its id with `is_deleted: true`, lists leave it out. What reads of
  a deleted record answer is not documented, so two switches show each possibility:
  `deleted_reads="flagged"` (GET and PATCH work, `is_deleted: true`) or `"missing"` (404), and
  `deleted_in_search` (search still finds it) or not;
- account set-up (fields, pipelines, stages): see `tests.emulators.pipedrive_setup`.

State is plain attributes (`persons`, `deals`, `calls`, `tokens_used`, `rate_limited`, ...) for
assertions. Wrap `emulator.app` in a `FaultInjector(too_many=emulator.too_many)` for faults.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import random
import re
import secrets
import time
from collections import Counter, deque
from collections.abc import Callable
from datetime import date, datetime
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.emulators.pipedrive_search import SearchIndex
from tests.emulators.pipedrive_setup import INFO, AccountSetup, ApiError, Handler, builtin, rfc3339

SCHEMAS = Path(__file__).parent / "schemas" / "pipedrive"
TEXT_TYPES = {"varchar": 255, "varchar_auto": 255, "phone": 255, "text": 65535, "address": 255}
V1_RETIRED = re.compile(r"^/(api/)?v1/(persons|deals)(/|$)")
DELETED_FOR = 30 * 86_400.0  # a deleted person or deal is kept, marked, for 30 days


def _failure(error: str, info: str = INFO) -> dict[str, Any]:
    return {"success": False, "error": error, "error_info": info, "data": None,
            "additional_data": None}


class PipedriveEmulator(AccountSetup, SearchIndex):
    """One Pipedrive company account. Limits are per API token; the tests use one token."""

    def __init__(self, *, api_token: str = "pd-test-token", search_lag: float = 0.0,
                 latency: float = 0.0, burst_limit: int = 20, burst_window: float = 2.0,
                 search_limit: int = 10, search_window: float = 2.0,
                 daily_budget: int = 30_000, seed: int = 1,
                 deleted_reads: str = "flagged", deleted_in_search: bool = False,
                 new_pipeline_stages: tuple[str, ...] = (),
                 clock: Callable[[], float] = time.time) -> None:
        if deleted_reads not in ("flagged", "missing"):
            raise ValueError(f"deleted_reads must be 'flagged' or 'missing', not "
                             f"{deleted_reads!r}")
        self.deleted_reads, self.deleted_in_search = deleted_reads, deleted_in_search
        self.new_pipeline_stages = new_pipeline_stages
        self.api_token, self.search_lag, self.latency = api_token, search_lag, latency
        self.burst_limit, self.burst_window = burst_limit, burst_window
        self.search_limit, self.search_window = search_limit, search_window
        self.daily_budget, self.clock = daily_budget, clock
        self.persons: dict[int, dict[str, Any]] = {}
        self.deals: dict[int, dict[str, Any]] = {}
        self.fields: dict[str, list[dict[str, Any]]] = {
            "person": [builtin(*f) for f in (
                ("name", "Name", "varchar"), ("emails", "Email", "varchar"),
                ("phones", "Phone", "phone"), ("org_id", "Organization", "org"),
                ("owner_id", "Owner", "user"))],
            "deal": [builtin(*f) for f in (
                ("title", "Title", "varchar"), ("value", "Value", "monetary"),
                ("person_id", "Contact person", "people"), ("pipeline_id", "Pipeline", "int"),
                ("stage_id", "Stage", "stage"), ("status", "Status", "status"))]}
        self.pipelines: list[dict[str, Any]] = []
        self.stages: list[dict[str, Any]] = []
        self.calls: Counter[str] = Counter()
        self.statuses: Counter[int] = Counter()
        self.log: list[tuple[float, str, str, int]] = []
        self.tokens_used = 0
        self.rate_limited = 0
        self._random = random.Random(seed)
        self._next_id = {"person": 1, "deal": 1, "field": 1, "option": 1, "pipeline": 1, "stage": 1}
        self._index: dict[tuple[str, int], dict[str, Any]] = {}
        self._deleted_at: dict[tuple[str, int], float] = {}
        self._pending: list[tuple[float, str, int, dict[str, Any]]] = []
        self._burst: deque[float] = deque()
        self._search: deque[float] = deque()
        self._validators = {p.stem: Draft202012Validator(
            json.loads(p.read_text()), format_checker=Draft202012Validator.FORMAT_CHECKER)
            for p in SCHEMAS.glob("*.json")}
        self._ops = self._routes()
        self.add_pipeline("Pipeline", ["Qualified", "Contact Made", "Proposal Made",
                                       "Negotiations Started"])
        self.app = Starlette(routes=[Route("/{path:path}", self._dispatch,
                                           methods=["GET", "POST", "PATCH", "PUT", "DELETE"])])

    # -- set-up and inspection helpers for tests -------------------------------------------------

    def _id(self, kind: str) -> int:
        value = self._next_id[kind]
        self._next_id[kind] += 1
        return value

    def with_value(self, kind: str, name: str, value: Any) -> list[dict[str, Any]]:
        """Records whose custom field labelled `name` holds exactly `value`."""
        key = self.field_key(kind, name)
        records = self.persons if kind == "person" else self.deals
        return [r for r in records.values() if r["custom_fields"].get(key) == value]

    def delete_person(self, person_id: int) -> None:
        """Delete as a person in Pipedrive does: marked deleted, gone for good in 30 days."""
        self._soft_delete("person", person_id)

    def delete_deal(self, deal_id: int) -> None:
        self._soft_delete("deal", deal_id)

    def live(self, kind: str) -> list[dict[str, Any]]:
        """The persons or deals that are not deleted."""
        records = self.persons if kind == "person" else self.deals
        return [r for r in records.values() if not r["is_deleted"]]

    def reset_usage(self) -> None:
        """Forget the requests made so far (set-up traffic that a test does not measure)."""
        self._burst.clear()
        self._search.clear()
        self.tokens_used = self.rate_limited = 0
        self.calls.clear()
        self.statuses.clear()
        self.log.clear()

    def too_many(self) -> tuple[int, dict[str, str], Any]:
        """Pipedrive's own 429 (for `FaultInjector(too_many=...)`)."""
        reset = self._seconds(self.burst_window, self.burst_window)
        return 429, {"Retry-After": reset, "x-ratelimit-limit": str(self.burst_limit),
                     "x-ratelimit-remaining": "0", "x-ratelimit-reset": reset}, \
            _failure("Request over limit", "Rate limit exceeded. " + INFO)

    # -- dispatch --------------------------------------------------------------------------------

    def _routes(self) -> list[tuple[str, re.Pattern[str], str, int, bool, str | None, Handler]]:
        table = [
            ("GET", "persons", 10, False, None, lambda r, p, b: self._list(r, "person")),
            ("POST", "persons", 5, False, "persons_create", lambda r, p, b: self._create_person(b)),
            ("GET", "persons/search", 20, True, None, lambda r, p, b: self._find(r, "person")),
            ("GET", "persons/{id}", 1, False, None, lambda r, p, b: self._get(r, "person", p)),
            ("PATCH", "persons/{id}", 5, False, "persons_update",
             lambda r, p, b: self._update_person(int(p["id"]), b)),
            ("DELETE", "persons/{id}", 3, False, None, lambda r, p, b: self._delete("person", p)),
            ("GET", "deals", 10, False, None, lambda r, p, b: self._list(r, "deal")),
            ("POST", "deals", 5, False, "deals_create", lambda r, p, b: self._write_deal(None, b)),
            ("GET", "deals/search", 20, True, None, lambda r, p, b: self._find(r, "deal")),
            ("GET", "deals/{id}", 1, False, None, lambda r, p, b: self._get(r, "deal", p)),
            ("PATCH", "deals/{id}", 5, False, "deals_update",
             lambda r, p, b: self._write_deal(int(p["id"]), b)),
            ("DELETE", "deals/{id}", 3, False, None, lambda r, p, b: self._delete("deal", p)),
            *self._setup_routes(),
        ]
        routes = []
        for method, path, cost, search, schema, handler in table:
            pattern = re.sub(r"\{id\}", r"(?P<id>\\d+)", path)
            pattern = re.sub(r"\{code\}", r"(?P<code>[^/]+)", pattern)
            routes.append((method, re.compile(f"^/api/v2/{pattern}$"), f"{method} /api/v2/{path}",
                           cost, search, schema, handler))
        return routes

    async def _dispatch(self, request: Request) -> JSONResponse:
        if self.latency:
            await asyncio.sleep(self.latency)
        path, method = request.url.path, request.method
        headers: dict[str, str] = {}
        try:
            if V1_RETIRED.match(path):
                raise ApiError(410, "This endpoint is out of support. Use API v2 (/api/v2/).",
                               "v1 person and deal endpoints are out of support since "
                               "2026-08-01; see developers.pipedrive.com/changelog")
            self._purge()
            route = next(((r, m) for r in self._ops if r[0] == method
                          and (m := r[1].match(path))), None)
            if route is None:
                raise ApiError(404, "Unknown method .", INFO)
            (_, _, name, cost, search, schema, handler), match = route
            self.calls[name] += 1
            self._authenticate(request)
            headers = self._take(cost, search)
            body = await self._body(request, schema)
            data, additional = handler(request, match.groupdict(), body)
            status = 200
            payload: dict[str, Any] = {"success": True, "data": data,
                                       "additional_data": additional}
        except ApiError as error:
            status, payload = error.status, _failure(error.error, error.info)
            headers = {**headers, **error.headers}
        self.statuses[status] += 1
        self.log.append((self.clock(), method, path, status))
        return JSONResponse(payload, status_code=status, headers=headers)

    def _authenticate(self, request: Request) -> None:
        if "api_token" in request.query_params:
            raise ApiError(401, "API token in the query string is not supported by API v2",
                           "Send the token in the x-api-token header. " + INFO)
        token = request.headers.get("x-api-token", "")
        if not secrets.compare_digest(token.encode(), self.api_token.encode()):
            raise ApiError(401, "unauthorized access", INFO)

    @staticmethod
    def _seconds(value: float, window: float) -> str:
        # Whole seconds as Pipedrive sends them; test-sized windows under 1 s keep hundredths.
        if window >= 1:
            return str(max(1, math.ceil(value)))
        return f"{max(0.01, value):.2f}"

    def _take(self, cost: int, search: bool) -> dict[str, str]:
        now = self.clock()
        checks = [(self._burst, self.burst_limit, self.burst_window)]
        if search:
            checks.append((self._search, self.search_limit, self.search_window))
        for window, limit, span in checks:
            while window and window[0] <= now - span:
                window.popleft()
            if len(window) >= limit:
                self.rate_limited += 1
                reset = self._seconds(window[0] + span - now, span)
                raise ApiError(429, "Request over limit", "Rate limit exceeded. " + INFO,
                               {"Retry-After": reset, "x-ratelimit-limit": str(limit),
                                "x-ratelimit-remaining": "0", "x-ratelimit-reset": reset})
        if self.tokens_used + cost > self.daily_budget:
            self.rate_limited += 1
            midnight = (now // 86400 + 1) * 86400
            raise ApiError(429, "Daily API token budget exhausted",
                           "The company's daily token budget resets at midnight. " + INFO,
                           {"Retry-After": str(math.ceil(midnight - now))})
        for window, _, _ in checks:
            window.append(now)
        self.tokens_used += cost
        window, limit, span = checks[-1]
        return {"x-ratelimit-limit": str(limit),
                "x-ratelimit-remaining": str(limit - len(window)),
                "x-ratelimit-reset": self._seconds(window[0] + span - now, span)}

    async def _body(self, request: Request, schema: str | None) -> Any:
        if schema is None:
            return None
        try:
            body = json.loads(await request.body())
        except ValueError:
            raise ApiError(400, "Request body is not valid JSON") from None
        error = best_match(self._validators[schema].iter_errors(body))
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path) or "body"
            raise ApiError(400, f"Validation failed: {where}: {error.message}")
        return body

    # -- query parameters ------------------------------------------------------------------------

    def _page(self, request: Request, items: list[Any]) -> tuple[Any, Any]:
        params = request.query_params
        limit = self._int_param(params.get("limit", "100"), "limit", 1, 500)
        start = 0
        if params.get("cursor"):
            try:
                start = int(base64.urlsafe_b64decode(params["cursor"].encode()).decode())
            except ValueError:
                raise ApiError(400, "Invalid cursor") from None
        page = items[start:start + limit]
        more = start + limit < len(items)
        cursor = base64.urlsafe_b64encode(str(start + limit).encode()).decode() if more else None
        return page, {"next_cursor": cursor}

    @staticmethod
    def _int_param(text: str, name: str, low: int, high: int) -> int:
        if not re.fullmatch(r"\d+", text) or not low <= int(text) <= high:
            raise ApiError(400, f"Parameter '{name}' must be an integer from {low} to {high}")
        return int(text)

    @staticmethod
    def _bool_param(text: str | None, name: str) -> bool:
        if text not in (None, "true", "false"):
            raise ApiError(400, f"Parameter '{name}' must be a boolean (true or false)")
        return text == "true"

    # -- records ---------------------------------------------------------------------------------

    def _custom_defs(self, kind: str) -> dict[str, dict[str, Any]]:
        return {f["field_code"]: f for f in self.fields[kind] if f["is_custom_field"]}

    def _render(self, kind: str, record: dict[str, Any], keys: list[str] | None = None
                ) -> dict[str, Any]:
        codes = keys if keys is not None else list(self._custom_defs(kind))
        return {**record, "custom_fields": {k: record["custom_fields"].get(k) for k in codes},
                "add_time": rfc3339(record["add_time"]),
                "update_time": rfc3339(record["update_time"])}

    def _check_custom(self, kind: str, values: dict[str, Any]) -> None:
        defs = self._custom_defs(kind)
        for key, value in values.items():
            spec = defs.get(key)
            if spec is None:
                raise ApiError(400, f"Unknown custom field key '{key}'")
            if value is None:
                continue
            field_type, ok = spec["field_type"], False
            option_ids = {o["id"] for o in spec["options"] or []}
            if field_type in TEXT_TYPES:
                ok = isinstance(value, str) and len(value) <= TEXT_TYPES[field_type]
            elif field_type == "double":
                ok = isinstance(value, int | float) and not isinstance(value, bool)
            elif field_type == "date":
                ok = isinstance(value, str) and re.fullmatch(r"\d{4}-\d{2}-\d{2}", value) \
                    is not None and _valid_date(value)
            elif field_type == "enum":
                ok = isinstance(value, int) and not isinstance(value, bool) and value in option_ids
            elif field_type == "set":
                ok = isinstance(value, list) and bool(value) and all(
                    isinstance(v, int) and v in option_ids for v in value)
            elif field_type == "monetary":
                ok = isinstance(value, dict) and isinstance(value.get("value"), int | float)
            if not ok:
                raise ApiError(400, f"Invalid value for custom field '{key}' of type "
                                    f"{field_type}")

    def _record(self, kind: str, record_id: int) -> dict[str, Any]:
        """The record a read or write by id reaches: 404 when there is none (or, with
        `deleted_reads="missing"`, when it is deleted)."""
        record = (self.persons if kind == "person" else self.deals).get(record_id)
        if record is None or (record["is_deleted"] and self.deleted_reads == "missing"):
            raise ApiError(404, "Entity was not found", "Object was not found.")
        return record

    def _soft_delete(self, kind: str, record_id: int) -> None:
        record = (self.persons if kind == "person" else self.deals)[record_id]
        record["is_deleted"] = True
        record["update_time"] = self.clock()
        self._deleted_at[(kind, record_id)] = self.clock()

    def _delete(self, kind: str, params: dict[str, str]) -> tuple[Any, Any]:
        record = self._record(kind, int(params["id"]))
        if record["is_deleted"]:
            raise ApiError(404, "Entity was not found", "Object was not found.")
        self._soft_delete(kind, record["id"])
        return {"id": record["id"]}, None

    def _purge(self) -> None:
        """Delete for good what was deleted 30 days ago."""
        now = self.clock()
        for (kind, record_id), when in list(self._deleted_at.items()):
            if now - when >= DELETED_FOR:
                del self._deleted_at[(kind, record_id)]
                (self.persons if kind == "person" else self.deals).pop(record_id, None)
                self._index.pop((kind, record_id), None)

    def _get(self, request: Request, kind: str, params: dict[str, str]) -> tuple[Any, Any]:
        record = self._record(kind, int(params["id"]))
        keys = request.query_params.get("custom_fields")
        selected = keys.split(",") if keys else None
        if selected is not None and len(selected) > 15:
            raise ApiError(400, "A maximum of 15 custom field keys is allowed")
        return self._render(kind, record, selected), None

    def _list(self, request: Request, kind: str) -> tuple[Any, Any]:
        params = request.query_params
        records = [r for r in (self.persons if kind == "person" else self.deals).values()
                   if not r["is_deleted"]]
        if params.get("updated_since"):
            since = _parse_rfc3339(params["updated_since"], "updated_since")
            records = [r for r in records if int(r["update_time"]) >= since]
        sort = params.get("sort_by", "id")
        if sort not in ("id", "update_time", "add_time"):
            raise ApiError(400, "Parameter 'sort_by' is invalid")
        records.sort(key=lambda r: (r[sort], r["id"]),
                     reverse=params.get("sort_direction") == "desc")
        keys = params.get("custom_fields")
        rendered = [self._render(kind, r, keys.split(",") if keys else None) for r in records]
        return self._page(request, rendered)

    def _create_person(self, body: dict[str, Any]) -> tuple[Any, Any]:
        if not str(body.get("name", "")).strip():
            raise ApiError(400, "Name is required")
        now = self.clock()
        person: dict[str, Any] = {
            "id": self._id("person"), "name": "", "first_name": "", "last_name": "",
            "owner_id": 1, "org_id": None, "emails": [], "phones": [], "is_deleted": False,
            "visible_to": 3, "label_ids": [], "picture_id": None, "add_time": now,
            "update_time": now, "custom_fields": {}}
        self._check_custom("person", body.get("custom_fields", {}))
        self.persons[person["id"]] = person
        return self._update_person(person["id"], body)

    def _update_person(self, person_id: int, body: dict[str, Any]) -> tuple[Any, Any]:
        person = self._record("person", person_id)
        if "name" in body and not body["name"].strip():
            raise ApiError(400, "Name cannot be empty")
        self._check_custom("person", body.get("custom_fields", {}))
        for key in ("name", "owner_id", "org_id", "visible_to", "label_ids"):
            if key in body:
                person[key] = body[key]
        first, _, last = person["name"].partition(" ")
        person["first_name"], person["last_name"] = first, last
        for key in ("emails", "phones"):
            if key in body:
                person[key] = [{"label": "work", "primary": False, **e} for e in body[key]]
        person["custom_fields"].update(body.get("custom_fields", {}))
        self._touch("person", person)
        return self._render("person", person), None

    def _write_deal(self, deal_id: int | None, body: dict[str, Any]) -> tuple[Any, Any]:
        deal = self._record("deal", deal_id) if deal_id is not None else None
        self._check_custom("deal", body.get("custom_fields", {}))
        if "person_id" in body:
            try:
                self._record("person", body["person_id"])
            except ApiError:
                raise ApiError(400, f"Person with id {body['person_id']} does not exist") \
                    from None
        stages = {s["id"]: s for s in self.stages}
        pipeline_id = body.get("pipeline_id", deal["pipeline_id"] if deal else None)
        if pipeline_id is not None and pipeline_id not in {p["id"] for p in self.pipelines}:
            raise ApiError(400, f"Pipeline with id {pipeline_id} does not exist")
        stage_id = body.get("stage_id")
        if stage_id is not None and stage_id not in stages:
            raise ApiError(400, f"Stage with id {stage_id} does not exist")
        if stage_id is not None and "pipeline_id" in body \
                and stages[stage_id]["pipeline_id"] != pipeline_id:
            raise ApiError(400, "Stage does not belong to the given pipeline")
        if stage_id is None and (deal is None or "pipeline_id" in body):
            pipeline_id = pipeline_id or self.pipelines[0]["id"]
            stage_id = min((s for s in self.stages if s["pipeline_id"] == pipeline_id),
                           key=lambda s: s["order_nr"])["id"]
        now = self.clock()
        if deal is None:
            deal = {"id": self._id("deal"), "title": "", "creator_user_id": 1, "owner_id": 1,
                    "value": 0, "currency": "USD", "person_id": None, "org_id": None,
                    "status": "open", "is_deleted": False, "is_archived": False,
                    "probability": None, "expected_close_date": None, "label_ids": [],
                    "visible_to": 3, "add_time": now, "update_time": now, "custom_fields": {}}
            self.deals[deal["id"]] = deal
        for key in ("title", "owner_id", "person_id", "org_id", "value", "currency", "status",
                    "expected_close_date", "visible_to", "label_ids"):
            if key in body:
                deal[key] = body[key]
        if stage_id is not None:
            deal["stage_id"], deal["pipeline_id"] = stage_id, stages[stage_id]["pipeline_id"]
        deal["custom_fields"].update(body.get("custom_fields", {}))
        self._touch("deal", deal)
        return self._render("deal", deal), None

def _valid_date(text: str) -> bool:
    try:
        date.fromisoformat(text)
    except ValueError:
        return False
    return True


def _parse_rfc3339(text: str, name: str) -> int:
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})", text):
        raise ApiError(400, f"Parameter '{name}' must be an RFC 3339 date-time")
    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp())
