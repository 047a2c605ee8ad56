"""The HubSpot emulator's operations: each takes a request and its validated body and returns
(status, body) or raises ApiError. They are synchronous, so each runs atomically on the event
loop: a request's reads and writes never interleave with another's."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote

from starlette.requests import Request

from tests.emulators.hubspot_state import (
    PIPELINE_STAGES,
    PORTAL_ID,
    ApiError,
    HubSpotState,
    ObjectType,
    PropertyDef,
    Record,
    error_body,
    now_iso,
)

OBJECT_TYPE_IDS = {"contacts": "0-1", "deals": "0-3"}
# HubSpot-defined association type ids: deal -> contact 3, contact -> deal 4.
ASSOCIATION_TYPES = {("deals", 3): "contacts", ("contacts", 4): "deals"}
TYPES = {"string": {"text", "textarea", "select", "radio", "phonenumber", "html", "file"},
         "number": {"number", "select", "radio", "calculation_equation"},
         "date": {"date"}, "datetime": {"date"},
         "enumeration": {"select", "radio", "checkbox", "booleancheckbox"},
         "bool": {"booleancheckbox", "select", "radio"}, "phone_number": {"phonenumber"}}


def _not_found(what: str) -> ApiError:
    return ApiError(404, error_body(f"resource not found: {what}", "OBJECT_NOT_FOUND"))


def _batch(results: list[dict[str, Any]], errors: list[dict[str, Any]]) -> dict[str, Any]:
    stamp = now_iso()
    body: dict[str, Any] = {"status": "COMPLETE", "results": results, "startedAt": stamp,
                            "completedAt": stamp}
    if errors:
        body.update(errors=errors, numErrors=len(errors))
    return body


class Operations:
    def __init__(self, state: HubSpotState) -> None:
        self.state = state

    def _type(self, request: Request) -> ObjectType:
        return self.state.object_type(request.path_params.get("object", ""))

    def _path_id(self, request: Request, object_type: ObjectType) -> str:
        """The `{id}` of `/crm/v3/objects/<object>/<id>` as the front end reads it (the
        `path_values` switch); a path with more segments than that names no record (404)."""
        if self.state.path_values == "rerouted":  # routing saw the decoded path
            value = str(request.path_params["id"])
        else:  # the raw segment, decoded alone
            raw = bytes(request.scope.get("raw_path") or request.url.path.encode())
            value = raw.split(b"/", 5)[-1].decode("ascii", "replace")
            value = "" if "/" in value else unquote(value)
        if not value or (self.state.path_values == "rerouted" and "/" in value):
            raise _not_found(f"{object_type.singular.lower()} {value}")
        return value

    def _created(self, object_type: ObjectType, record: Record) -> tuple[int, Any]:
        """A single create's answer, in the shape the `create_response` switch says."""
        if self.state.create_response == "201-object":
            return 201, record.as_json()
        return 200, {"createdResourceId": record.id, "entity": record.as_json(),
                     "location": f"https://api.hubapi.com/crm/v3/objects/{object_type.name}/"
                                 f"{record.id}"}

    def _id_property(self, object_type: ObjectType, name: str | None) -> str:
        if not name:
            return "hs_object_id"
        if name not in object_type.properties:
            raise ApiError(400, error_body(f'Property "{name}" does not exist',
                                           "VALIDATION_ERROR"))
        if not object_type.is_unique(name):
            raise ApiError(400, error_body(
                f"Unable to perform update/upsert by non-unique "
                f"{OBJECT_TYPE_IDS[object_type.name]} property {name} in portal ID {PORTAL_ID}",
                "VALIDATION_ERROR"))
        return name

    # -- single objects ---------------------------------------------------------------------

    def create(self, request: Request, body: Any) -> tuple[int, Any]:
        object_type = self._type(request)
        values = object_type.normalise(body["properties"], creating=True)
        links = self._associations(object_type, body.get("associations", []))
        record = self.state.create(object_type, values)
        self._link(object_type, record, links)
        return self._created(object_type, record)

    def get(self, request: Request, body: Any) -> tuple[int, Any]:
        object_type = self._type(request)
        record_id = self._path_id(request, object_type)
        id_property = self._id_property(object_type, request.query_params.get("idProperty"))
        record = object_type.find(id_property, record_id)
        if record is None:
            raise _not_found(f"{object_type.singular.lower()} {record_id}")
        # Repeated (?properties=a&properties=b, the official client) or comma-separated.
        names = [n for v in request.query_params.getlist("properties") for n in v.split(",")
                 if n]
        return 200, record.as_json(names)

    def update(self, request: Request, body: Any) -> tuple[int, Any]:
        object_type = self._type(request)
        record_id = self._path_id(request, object_type)
        id_property = self._id_property(object_type, request.query_params.get("idProperty"))
        record = object_type.find(id_property, record_id)
        if record is None:
            raise _not_found(f"{object_type.singular.lower()} {record_id}")
        values = object_type.normalise(body["properties"], creating=False)
        return 200, self.state.update(object_type, record, values).as_json()

    # -- batches ----------------------------------------------------------------------------

    def batch_read(self, request: Request, body: Any) -> tuple[int, Any]:
        object_type = self._type(request)
        id_property = self._id_property(object_type, body.get("idProperty"))
        results, missing = [], []
        for item in body["inputs"]:
            record = object_type.find(id_property, item["id"])
            if record is None:
                missing.append(item["id"])
            else:
                results.append(record.as_json(list(body["properties"])))
        if not missing:
            return 200, _batch(results, [])
        return 207, _batch(results, [{
            "status": "error", "category": "OBJECT_NOT_FOUND",
            "message": f"Could not get some {object_type.singular.upper()} objects, they may be "
                       "deleted or not exist. Check that ids are valid.",
            "context": {"ids": missing}}])

    def batch_upsert(self, request: Request, body: Any) -> tuple[int, Any]:
        """Per-input validation errors answer 207; a duplicate email or unique value answers
        409 for the whole batch and writes nothing (as batch create does); so does a partial
        upsert by email (400). Results echo all properties or only those written (a switch)."""
        object_type = self._type(request)
        inputs = body["inputs"]
        seen: set[tuple[str, str]] = set()
        for item in inputs:
            if "idProperty" not in item:
                raise ApiError(400, error_body("idProperty is required to upsert",
                                               "VALIDATION_ERROR"))
            id_property = self._id_property(object_type, item["idProperty"])
            value = item["id"].lower() if id_property == "email" else item["id"]
            if (id_property, value) in seen:
                raise ApiError(400, error_body(f"Duplicate IDs found in batch input: [{value}]",
                                               "VALIDATION_ERROR"))
            seen.add((id_property, value))
            if id_property == "email" and object_type.find("email", value) is not None:
                # Updating an existing contact by email is a partial upsert, which HubSpot
                # does not support by email.
                raise ApiError(400, error_body(
                    "Partial upserts are not supported when using email as the idProperty; "
                    "use a custom unique property as the idProperty, or update existing "
                    "contacts by record id", "VALIDATION_ERROR"))
        planned: list[tuple[dict[str, str], Record | None, list[str]]] = []
        errors: list[dict[str, Any]] = []
        for item in inputs:
            try:
                values = object_type.normalise(
                    {**item["properties"], item["idProperty"]: item["id"]}, creating=True)
            except ApiError as error:
                errors.append({**error.body, "context": {"ids": [item["id"]]}})
                continue
            planned.append((values, object_type.find(item["idProperty"], item["id"]),
                            list(item["properties"])))
        claimed: dict[tuple[str, str], str] = {}
        for position, (values, record, _) in enumerate(planned):
            self.state.check_unique(object_type, values, record.id if record else None)
            target = record.id if record else f"new {position}"
            for name, value in values.items():
                if value and object_type.is_unique(name) and \
                        claimed.setdefault((name, value), target) != target:
                    raise ApiError(409, error_body(
                        f"Duplicate unique value {value!r} for {name} in batch input",
                        "CONFLICT"))
        results = []
        for values, record, written in planned:
            new = record is None
            if record is None:
                record = self.state.create(object_type, values)
            else:
                record = self.state.update(object_type, record, values)
            echoed = written if self.state.upsert_echo == "written" else None
            results.append({**record.as_json(echoed), "new": new})
        return (207 if errors else 200), _batch(results, errors)

    def batch_create(self, request: Request, body: Any) -> tuple[int, Any]:
        object_type = self._type(request)
        prepared = []
        for item in body["inputs"]:
            values = object_type.normalise(item["properties"], creating=True)
            links = self._associations(object_type, item.get("associations", []))
            self.state.check_unique(object_type, values, None)
            prepared.append((values, links))
        claimed: set[tuple[str, str]] = set()
        for values, _ in prepared:
            for name, value in values.items():
                if value and object_type.is_unique(name):
                    if (name, value) in claimed:
                        raise ApiError(409, error_body(
                            f"Duplicate unique value {value!r} for {name} in batch input",
                            "CONFLICT"))
                    claimed.add((name, value))
        results = []
        for values, links in prepared:
            record = self.state.create(object_type, values)
            self._link(object_type, record, links)
            results.append(record.as_json())
        return (201 if self.state.create_response == "201-object" else 200), _batch(results, [])

    def search(self, request: Request, body: Any) -> tuple[int, Any]:
        object_type = self._type(request)
        groups = body.get("filterGroups", [])
        matches = [r for r in sorted(object_type.records.values(), key=lambda r: int(r.id))
                   if self.state.visible_to_search(r)
                   and (not groups or any(all(_matches(r, f) for f in g["filters"])
                                          for g in groups))]
        start = int(body.get("after") or 0)
        limit = int(body.get("limit", 10))
        page = matches[start:start + limit]
        result: dict[str, Any] = {"total": len(matches), "results": [
            r.as_json(list(body.get("properties", []))) for r in page]}
        if start + limit < len(matches):
            result["paging"] = {"next": {"after": str(start + limit)}}
        return 200, result

    # -- associations -------------------------------------------------------------------------

    def _associations(self, object_type: ObjectType, items: list[Any]) -> list[str]:
        ids = []
        for item in items:
            for kind in item["types"]:
                other = ASSOCIATION_TYPES.get((object_type.name, kind["associationTypeId"]))
                if kind["associationCategory"] != "HUBSPOT_DEFINED" or other is None:
                    raise ApiError(400, error_body(
                        f"Invalid association type {kind['associationCategory']}/"
                        f"{kind['associationTypeId']} from {object_type.name}",
                        "VALIDATION_ERROR"))
                if item["to"]["id"] not in self.state.object_type(other).records:
                    raise ApiError(400, error_body(
                        f"One or more associations are invalid: {other} {item['to']['id']} "
                        "does not exist", "VALIDATION_ERROR"))
                ids.append(item["to"]["id"])
        return ids

    def _link(self, object_type: ObjectType, record: Record, ids: list[str]) -> None:
        for other in ids:
            pair = (record.id, other) if object_type.name == "deals" else (other, record.id)
            self.state.associations.add(pair)

    def associate(self, request: Request, body: Any) -> tuple[int, Any]:
        deal, contact = request.path_params["id"], request.path_params["contact"]
        if deal not in self.state.deals.records:
            raise _not_found(f"deal {deal}")
        if contact not in self.state.contacts.records:
            raise _not_found(f"contact {contact}")
        self.state.associations.add((deal, contact))
        return 200, _batch([{"from": {"id": deal}, "to": {"id": contact}, "associationSpec": {
            "associationCategory": "HUBSPOT_DEFINED", "associationTypeId": 3}}], [])

    # -- properties and pipelines -------------------------------------------------------------

    def list_properties(self, request: Request, body: Any) -> tuple[int, Any]:
        return 200, {"results": [p.as_json() for p in self._type(request).properties.values()]}

    def create_property(self, request: Request, body: Any) -> tuple[int, Any]:
        object_type = self._type(request)
        name = body["name"]
        if name in object_type.properties:
            raise ApiError(409, error_body(f"Property named '{name}' already exists.",
                                           "OBJECT_ALREADY_EXISTS"))
        if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
            raise ApiError(400, error_body(f"Property name '{name}' is invalid: use lowercase "
                                           "letters, digits and underscores", "VALIDATION_ERROR"))
        if body["groupName"] not in object_type.groups:
            raise ApiError(400, error_body(f"Property group '{body['groupName']}' does not "
                                           "exist", "VALIDATION_ERROR"))
        if body["fieldType"] not in TYPES[body["type"]]:
            raise ApiError(400, error_body(f"fieldType {body['fieldType']} is not valid for "
                                           f"type {body['type']}", "VALIDATION_ERROR"))
        if body["type"] == "enumeration" and not body.get("options"):
            raise ApiError(400, error_body("Enumeration properties need options",
                                           "VALIDATION_ERROR"))
        prop = PropertyDef(name, body["label"], body["type"], body["fieldType"],
                           body["groupName"], bool(body.get("hasUniqueValue", False)),
                           list(body.get("options", [])), body.get("description", ""))
        object_type.define(prop)
        return 201, prop.as_json()

    def list_groups(self, request: Request, body: Any) -> tuple[int, Any]:
        return 200, {"results": list(self._type(request).groups.values())}

    def create_group(self, request: Request, body: Any) -> tuple[int, Any]:
        object_type = self._type(request)
        if body["name"] in object_type.groups:
            raise ApiError(409, error_body(
                f"A property group named '{body['name']}' already exists.",
                "OBJECT_ALREADY_EXISTS"))
        group = {"name": body["name"], "label": body["label"],
                 "displayOrder": body.get("displayOrder", -1), "archived": False}
        object_type.groups[body["name"]] = group
        return 201, group

    def pipelines(self, request: Request, body: Any) -> tuple[int, Any]:
        stages = [{"id": s, "label": s, "displayOrder": i, "archived": False,
                   "metadata": {"isClosed": str(s.startswith("closed")).lower()}}
                  for i, s in enumerate(PIPELINE_STAGES)]
        return 200, {"results": [{"id": "default", "label": "Sales Pipeline", "displayOrder": 0,
                                  "archived": False, "stages": stages}]}


def _matches(record: Record, item: dict[str, Any]) -> bool:
    value = record.properties.get(item["propertyName"])
    operator = item["operator"]
    if operator == "HAS_PROPERTY":
        return value is not None
    if operator == "NOT_HAS_PROPERTY":
        return value is None
    if operator in ("IN", "NOT_IN"):
        hit = value in [str(v) for v in item.get("values", [])]
        return hit if operator == "IN" else not hit
    wanted = str(item.get("value", ""))
    if item["propertyName"] == "email" and value is not None:
        value, wanted = value.lower(), wanted.lower()
    if operator == "EQ":
        return value == wanted
    if operator == "NEQ":
        return value != wanted
    raise ApiError(400, error_body(f"The emulator does not support operator {operator}",
                                   "VALIDATION_ERROR"))
