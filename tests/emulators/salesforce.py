"""A strict local emulator of the Salesforce REST API subset linkcrm uses: Starlette app + state."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote

from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.emulators.bodyschema import BodySchema
from tests.emulators.faults import FaultInjector
from tests.emulators.paths import PathFrontEnd
from tests.emulators.salesforce_model import Org, SFError
from tests.emulators.salesforce_oauth import OAuthError as _OAuthError
from tests.emulators.salesforce_oauth import verify_assertion, with_basic_client
from tests.emulators.salesforce_soql import Query, SOQLError, parse, tokenize

SCHEMAS = Path(__file__).parent / "schemas" / "salesforce"
JWT_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
LIMIT_EXCEEDED = [{"message": "TotalRequests Limit exceeded.",
                   "errorCode": "REQUEST_LIMIT_EXCEEDED"}]
SESSION_EXPIRED = [{"message": "Session expired or invalid", "errorCode": "INVALID_SESSION_ID"}]


# "In each REST call, the maximum length for the combined URI and headers is 16,384 bytes":
# over it 431 Request Header Fields Too Large, the URI itself over it 414 URI Too Long
# (help.salesforce.com article 000386264, "Maximum number of rows returned by SOQL queries
# over the REST API").
REQUEST_HEAD_BYTES = 16_384


def _too_long(request: Request) -> Response | None:
    raw = bytes(request.scope.get("raw_path") or request.url.path.encode())
    query = bytes(request.scope.get("query_string") or b"")
    uri = len(raw) + (len(query) + 1 if query else 0)
    if uri > REQUEST_HEAD_BYTES:
        return Response("URI Too Long", 414)
    headers = sum(len(name) + len(value) + 4 for name, value in request.scope["headers"])
    if uri + headers > REQUEST_HEAD_BYTES:
        return Response("Request Header Fields Too Large", 431)
    return None


def _validators() -> dict[str, BodySchema]:
    return {path.stem: BodySchema(json.loads(path.read_text(encoding="utf-8")))
            for path in sorted(SCHEMAS.glob("*.json"))}


@dataclass
class SalesforceEmulator:
    """One org. Change any attribute between requests; `app()` serves it.

    Tokens last `token_lifetime` seconds (`revoke_all()` ends them at once); every data request
    costs one unit of `api_limit` and carries `Sforce-Limit-Info`; `counters` and
    `schema_violations` are there for assertions.
    """

    client_id: str = "linkcrm-client-id"
    client_secret: str = "linkcrm-client-secret"
    jwt_public_key: rsa.RSAPublicKey | None = None
    jwt_username: str = "integration@example.com"
    jwt_audiences: tuple[str, ...] = ("https://login.salesforce.com",
                                      "https://test.salesforce.com")
    token_lifetime: float = 7200.0
    api_limit: int = 100_000
    api_usage: int = 0
    latency: float = 0.0
    query_page_size: int = 2000
    # How the front end reads a percent-encoded External ID value in a URL path (the REST
    # docs only say to encode it; clients report both): "decoded" takes each encoded segment
    # as one literal value (`%2F`, `%2E%2E` stay in the value); "rerouted" decodes the whole
    # path before routing, so `%2F` splits the value and `%2E%2E` climbs a level (seen as
    # NOT_FOUND for values with `/`: texei-sfdx-plugin#111, simple-salesforce#22).
    path_values: str = "decoded"
    org: Org = field(default_factory=Org)
    counters: Counter[str] = field(default_factory=Counter)
    schema_violations: list[str] = field(default_factory=list)
    clock: Callable[[], float] = time.monotonic
    _tokens: dict[str, float] = field(default_factory=dict)
    _pages: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._schemas = _validators()
        self.org.counters = self.counters

    @property
    def records(self) -> dict[str, dict[str, dict[str, Any]]]:
        return self.org.records

    @records.setter
    def records(self, value: dict[str, dict[str, dict[str, Any]]]) -> None:
        self.org.records = value

    # -- state helpers for tests -------------------------------------------------------------

    def revoke_all(self) -> None:
        self._tokens.clear()

    def seed(self, sobject: str, **values: Any) -> str:
        """Insert a record as is, bypassing uniqueness (how a 300 comes about in real orgs)."""
        return self.org.seed(sobject, **values)

    def find(self, sobject: str, field_name: str, value: str) -> list[dict[str, Any]]:
        return self.org.find(sobject, field_name, value)

    @property
    def leads(self) -> list[dict[str, Any]]:
        return list(self.records["Lead"].values())

    @property
    def opportunities(self) -> list[dict[str, Any]]:
        return list(self.records["Opportunity"].values())

    def faulty(self, rate: float, **options: Any) -> FaultInjector:
        """This emulator behind fault injection; its over-limit answer is Salesforce's 403."""
        return FaultInjector(self.app(), rate=rate, too_many=lambda: (
            403, self._limit_header(), LIMIT_EXCEEDED), server_error=lambda: (
            500, {}, [{"message": "An unexpected error occurred. Please include this ErrorId "
                                  "if you contact support: 1234-5678 (-1)",
                       "errorCode": "UNKNOWN_EXCEPTION"}]), **options)

    # -- the app -----------------------------------------------------------------------------

    def app(self) -> Starlette:
        data = "/services/data/{version}"
        api = self._api
        if self.path_values not in ("decoded", "rerouted"):
            raise ValueError(f"path_values must be 'decoded' or 'rerouted', not "
                             f"{self.path_values!r}")
        rerouted = self.path_values == "rerouted"
        return Starlette(middleware=[Middleware(PathFrontEnd, rerouted=rerouted)], routes=[
            Route("/services/oauth2/token", self._token, methods=["POST"]),
            Route(data + "/sobjects/{sobject}/describe", api(self._describe), methods=["GET"]),
            Route(data + "/sobjects/{sobject}/", api(self._create), methods=["POST"]),
            Route(data + "/sobjects/{sobject}/{record_id}", api(self._by_id),
                  methods=["GET", "PATCH"]),
            Route(data + "/sobjects/{sobject}/{field}/{value:path}", api(self._by_external),
                  methods=["GET", "PATCH"]),
            Route(data + "/query/", api(self._query), methods=["GET"]),
            Route(data + "/query/{locator}", api(self._query_more), methods=["GET"]),
            Route(data + "/composite/sobjects/{sobject}/{field}", api(self._collections),
                  methods=["PATCH"]),
        ], exception_handlers={404: _not_found, 405: _not_allowed})

    def _limit_header(self) -> dict[str, str]:
        return {"Sforce-Limit-Info": f"api-usage={self.api_usage}/{self.api_limit}"}

    def _api(self, handler: Callable[[Request], Awaitable[Response]]) -> Callable[
            [Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            if self.latency:
                await asyncio.sleep(self.latency)
            self.counters["requests"] += 1
            self.counters[f"{request.method} {handler.__name__.strip('_')}"] += 1
            too_long = _too_long(request)
            if too_long is not None:
                self.counters["too_long"] += 1
                return too_long
            try:
                version = request.path_params["version"]
                if not (version.startswith("v") and _is_version(version[1:])):
                    raise SFError(404, "NOT_FOUND", "The requested resource does not exist")
                if not self._authorized(request):
                    self.counters["unauthorized"] += 1
                    return JSONResponse(SESSION_EXPIRED, 401, self._limit_header())
                if self.api_usage >= self.api_limit:
                    self.counters["limit_exceeded"] += 1
                    return JSONResponse(LIMIT_EXCEEDED, 403, self._limit_header())
                self.api_usage += 1
                response = await handler(request)
            except SFError as error:
                response = JSONResponse([error.entry()], error.status)
            response.headers.update(self._limit_header())
            return response

        return endpoint

    def _authorized(self, request: Request) -> bool:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        issued = self._tokens.get(token) if scheme in ("Bearer", "OAuth") else None
        return issued is not None and self.clock() - issued < self.token_lifetime

    async def _body(self, request: Request, schema: str) -> Any:
        if request.headers.get("content-type", "").split(";")[0] != "application/json":
            raise SFError(415, "UNSUPPORTED_MEDIA_TYPE", "Content-Type must be application/json")
        try:
            body = json.loads(await request.body())
        except ValueError as error:
            raise SFError(400, "JSON_PARSER_ERROR", f"Unexpected character: {error}") from None
        problems = [e.message for e in self._schemas[schema].iter_errors(body)]
        if problems:
            self.schema_violations.append(f"{request.method} {request.url.path}: {problems[0]}")
            raise SFError(400, "JSON_PARSER_ERROR", f"body does not match {schema}: "
                          f"{problems[0]}")
        return body

    def _url(self, request: Request, sobject: str, record_id: str) -> str:
        return f"/services/data/{request.path_params['version']}/sobjects/{sobject}/{record_id}"

    def _view(self, request: Request, sobject: str, record: dict[str, Any],
              names: Sequence[str] | None = None) -> dict[str, Any]:
        shown = {n: record.get(n) for n in (names or self.org.fields(sobject))}
        return {"attributes": {"type": sobject, "url": self._url(request, sobject, record["Id"])},
                **shown}

    def _requested(self, request: Request, sobject: str) -> list[str] | None:
        raw = request.query_params.get("fields")
        if raw is None:
            return None
        names = [n.strip() for n in raw.split(",") if n.strip()]
        fields = self.org.fields(sobject)
        for name in names:
            if name not in fields:
                raise SFError(400, "INVALID_FIELD",
                              f"No such column '{name}' on sobject of type {sobject}", [name])
        return names

    # -- OAuth -------------------------------------------------------------------------------

    async def _token(self, request: Request) -> Response:
        self.counters["token_requests"] += 1
        if request.headers.get("content-type", "").split(";")[0] != \
                "application/x-www-form-urlencoded":
            return JSONResponse({"error": "invalid_request",
                                 "error_description": "must use Content-Type form-urlencoded"},
                                400)
        try:
            # Parsed by hand: Starlette's form parser needs python-multipart.
            pairs = parse_qsl((await request.body()).decode(), keep_blank_values=True,
                              strict_parsing=True)
        except ValueError:
            return JSONResponse({"error": "invalid_request", "error_description": "bad form"},
                                400)
        try:
            form = with_basic_client(request.headers.get("authorization", ""), dict(pairs))
            body = self._grant(request, form)
        except _OAuthError as error:
            return JSONResponse(error.body, 400)
        self.counters["token_issued"] += 1
        return JSONResponse(body)

    def _grant(self, request: Request, form: dict[str, str]) -> dict[str, Any]:
        grant = form.get("grant_type")
        schema = {"client_credentials": "oauth_client_credentials",
                  JWT_GRANT: "oauth_jwt_bearer"}.get(grant or "")
        if schema is None:
            raise _OAuthError("unsupported_grant_type", "grant type not supported")
        problems = [e.message for e in self._schemas[schema].iter_errors(form)]
        if problems:
            self.schema_violations.append(f"POST /services/oauth2/token: {problems[0]}")
            raise _OAuthError("invalid_request", problems[0])
        if grant == "client_credentials":
            if (form.get("client_id"), form.get("client_secret")) != (self.client_id,
                                                                       self.client_secret):
                raise _OAuthError("invalid_client", "invalid client credentials")
        else:
            verify_assertion(form["assertion"], self.jwt_public_key, self.client_id,
                             self.jwt_username, self.jwt_audiences)
        token = f"00DEMU0000000001!{secrets.token_urlsafe(32)}"
        self._tokens[token] = self.clock()
        base = str(request.base_url).rstrip("/")
        return {"access_token": token, "signature": secrets.token_urlsafe(32),
                "scope": "api", "instance_url": base, "token_format": "opaque",
                "id": "https://login.salesforce.com/id/00DEMU0000000001AAA/005EMU0000000001AAA",
                "token_type": "Bearer", "issued_at": str(int(time.time() * 1000))}

    # -- sObjects ----------------------------------------------------------------------------

    async def _describe(self, request: Request) -> Response:
        sobject = request.path_params["sobject"]
        fields = self.org.fields(sobject)
        return JSONResponse({"name": sobject, "label": sobject,
                             "fields": [f.describe() for f in fields.values()]})

    async def _create(self, request: Request) -> Response:
        sobject = request.path_params["sobject"]
        self.org.fields(sobject)
        values = await self._body(request, f"{sobject.lower()}_write")
        record_id = self.org.save(sobject, None, values)
        return JSONResponse({"id": record_id, "success": True, "errors": []}, 201)

    async def _by_id(self, request: Request) -> Response:
        sobject, record_id = request.path_params["sobject"], request.path_params["record_id"]
        self.org.fields(sobject)
        record = self.records[sobject].get(record_id)
        if record is None:
            raise SFError(404, "NOT_FOUND", "The requested resource does not exist")
        if request.method == "GET":
            return JSONResponse(self._view(request, sobject, record,
                                           self._requested(request, sobject)))
        values = await self._body(request, f"{sobject.lower()}_write")
        self.org.save(sobject, record_id, values)
        return Response(status_code=204)

    async def _by_external(self, request: Request) -> Response:
        sobject, name = request.path_params["sobject"], request.path_params["field"]
        value = self._external_value(request)
        spec = self.org.fields(sobject).get(name)
        if spec is None or not spec.external_id or value is None \
                or value.lower().endswith(".inc"):
            # Salesforce's docs: a value ending in a top-level domain that is also a file
            # format extension (".inc") is not found.
            raise SFError(404, "NOT_FOUND", "The requested resource does not exist")
        matches = self.find(sobject, name, value)
        if len(matches) > 1:
            return JSONResponse([self._url(request, sobject, r["Id"]) for r in matches], 300)
        if request.method == "GET":
            if not matches:
                raise SFError(404, "NOT_FOUND", "The requested resource does not exist")
            return JSONResponse(self._view(request, sobject, matches[0],
                                           self._requested(request, sobject)))
        values = await self._body(request, f"{sobject.lower()}_write")
        if name in values:
            raise SFError(400, "INVALID_FIELD", f"{name}: the External ID field of the URL "
                          "should not be specified in the sobject data", [name])
        if not matches and request.query_params.get("updateOnly") == "true":
            raise SFError(404, "NOT_FOUND", "The requested resource does not exist")
        record_id = self.org.save(sobject, matches[0]["Id"] if matches else None,
                               values if matches else {**values, name: value})
        created = not matches
        if _version(request) < 46.0:
            return JSONResponse({"id": record_id, "success": True, "errors": []}, 201) \
                if created else Response(status_code=204)
        return JSONResponse({"id": record_id, "success": True, "errors": [],
                             "created": created}, 201 if created else 200)

    def _external_value(self, request: Request) -> str | None:
        """The External ID value of `/sobjects/<object>/<field>/<value>`, or None when the
        path holds more segments than that (no such resource)."""
        if self.path_values == "rerouted":  # the value as routing saw it, decoded
            value = str(request.path_params["value"])
            return None if not value or "/" in value else value
        raw = bytes(request.scope.get("raw_path") or request.url.path.encode())
        segment = raw.split(b"/", 7)[-1].decode("ascii", "replace")
        return None if not segment or "/" in segment else unquote(segment)  # decoded alone

    # -- query and collections ---------------------------------------------------------------

    async def _query(self, request: Request) -> Response:
        text = request.query_params.get("q")
        if not text:
            raise SFError(400, "MALFORMED_QUERY", "q parameter is required")
        self.counters["queries"] += 1
        try:
            query, selected = self.select(text)
        except SOQLError as error:
            self.counters["malformed_queries"] += 1
            raise SFError(400, error.code, error.message) from None
        views = [self._view(request, query.sobject, r, query.fields) for r in selected]
        return JSONResponse(self._page(request, views, len(views), 0))

    def select(self, text: str) -> tuple[Query, list[dict[str, Any]]]:
        """The query `text` and the records it answers, in the order it answers them; raises
        SOQLError. A WHERE of `=` and IN terms joined by OR (what the target sends) reads only
        the records holding one of its values; every record is still tested against it."""
        query = parse(text, {name: fields for name, fields in self.org.objects.items()})
        wanted = _wanted(text, self.org.objects[query.sobject])
        rows = self.org.rows(query.sobject) if wanted is None \
            else self.org.holding(query.sobject, wanted)
        selected = [r for r in rows if query.where is None or query.where(r)]
        for name, descending in reversed(query.order):
            selected.sort(key=_sort_key(name), reverse=descending)
        if query.limit is not None:
            selected = selected[: query.limit]
        return query, selected

    async def _query_more(self, request: Request) -> Response:
        locator, _, offset = request.path_params["locator"].rpartition("-")
        if locator not in self._pages or not offset.isdigit():
            raise SFError(400, "INVALID_QUERY_LOCATOR", "invalid query locator")
        views = self._pages[locator]
        return JSONResponse(self._page(request, views, len(views), int(offset), locator))

    def _page(self, request: Request, views: list[dict[str, Any]], total: int, offset: int,
              locator: str = "") -> dict[str, Any]:
        end = offset + self.query_page_size
        body: dict[str, Any] = {"totalSize": total, "done": end >= total,
                                "records": views[offset:end]}
        if end < total:
            locator = locator or f"01gEMU{len(self._pages):09d}"
            self._pages[locator] = views
            body["nextRecordsUrl"] = (f"/services/data/{request.path_params['version']}"
                                      f"/query/{locator}-{end}")
        return body

    async def _collections(self, request: Request) -> Response:
        sobject, name = request.path_params["sobject"], request.path_params["field"]
        spec = self.org.fields(sobject).get(name)
        if spec is None or not spec.external_id:
            raise SFError(400, "INVALID_FIELD", f"Field name provided, {name} is not an "
                          f"External ID or indexed field for {sobject}", [name])
        body = await self._body(request, "collections_upsert")
        snapshot = {k: dict(v) for k, v in self.records[sobject].items()}
        results, seen = [], set()
        for raw in body["records"]:
            values = {k: v for k, v in raw.items() if k != "attributes"}
            try:
                if raw["attributes"]["type"] != sobject:
                    raise SFError(400, "INVALID_TYPE", f"records must all be {sobject}")
                key = values.pop(name, None)
                if not isinstance(key, str) or not key:
                    raise SFError(400, "MISSING_ARGUMENT", f"{name} not specified", [name])
                if key in seen:
                    raise SFError(400, "DUPLICATE_VALUE", f"Duplicate external id specified: "
                                  f"{key}", [name])
                seen.add(key)
                matches = self.find(sobject, name, key)
                if len(matches) > 1:
                    raise SFError(300, "DUPLICATE_EXTERNAL_ID", f"{name}: more than one record "
                                  f"found for external id field: "
                                  f"[{', '.join(r['Id'] for r in matches)}]", [name])
                record_id = self.org.save(sobject, matches[0]["Id"] if matches else None,
                                       values if matches else {**values, name: key})
                results.append({"id": record_id, "success": True, "errors": [],
                                "created": not matches})
            except SFError as error:
                results.append({"success": False, "errors": [
                    {"statusCode": error.code, "message": error.message,
                     "fields": error.fields}]})
        if body.get("allOrNone") and not all(r["success"] for r in results):
            self.records[sobject] = snapshot
            results = [r if not r["success"] else {"success": False, "errors": [
                {"statusCode": "ALL_OR_NONE_OPERATION_ROLLED_BACK", "fields": [],
                 "message": "Record rolled back because not all records were valid and the "
                            "request was using AllOrNone header"}]} for r in results]
        self.counters["collection_records"] += len(results)
        return JSONResponse(results)


async def _not_found(request: Request, error: Exception) -> Response:
    return JSONResponse([{"errorCode": "NOT_FOUND",
                          "message": "The requested resource does not exist"}], 404)


async def _not_allowed(request: Request, error: Exception) -> Response:
    return JSONResponse([{"errorCode": "METHOD_NOT_ALLOWED",
                          "message": f"HTTP Method '{request.method}' not allowed."}], 405)


def _wanted(text: str, fields: Mapping[str, Any]) -> dict[str, list[str]] | None:
    """The string values each field is asked for when the WHERE of a parsed query is only
    `F = 'v'` and `F IN ('v', ...)` terms joined by OR; None for any other WHERE (or none).

    >>> _wanted("SELECT Id FROM Lead WHERE email IN ('a', 'b') OR Id = 'c'", {"Email": 0, "Id": 0})
    {'Email': ['a', 'b'], 'Id': ['c']}
    """
    tokens = [(t.kind, t.text) for t in tokenize(text)]
    if ("keyword", "WHERE") not in tokens:
        return None
    columns = {name.lower(): name for name in fields}
    wanted: dict[str, list[str]] = {}
    at = tokens.index(("keyword", "WHERE")) + 1
    while True:  # at: a term's column
        if tokens[at][0] != "ident" or tokens[at + 1] not in (("op", "="), ("keyword", "IN")):
            return None
        values = wanted.setdefault(columns[tokens[at][1].lower()], [])
        at += 2 if tokens[at + 1] == ("op", "=") else 3  # past `=`, or `IN (`
        while True:  # at: a value
            if tokens[at][0] != "string":
                return None
            values.append(tokens[at][1])
            if tokens[at + 1] != ("punct", ","):
                break
            at += 2
        at += 1 if tokens[at + 1] != ("punct", ")") else 2  # past the value, or the `)` of IN
        if tokens[at] != ("keyword", "OR"):
            return wanted if tokens[at] in (("end", ""), ("keyword", "ORDER"),
                                            ("keyword", "LIMIT")) else None
        at += 1


def _sort_key(name: str) -> Callable[[dict[str, Any]], tuple[bool, str]]:
    return lambda record: (record.get(name) is None, str(record.get(name)))


def _is_version(text: str) -> bool:
    major, dot, minor = text.partition(".")
    return major.isdigit() and dot == "." and minor.isdigit()


def _version(request: Request) -> float:
    return float(request.path_params["version"][1:])
