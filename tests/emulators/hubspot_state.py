"""The HubSpot emulator's state and rules: objects, properties, unique values, rate limits.

What it enforces, and where each rule comes from (CRM_FACTS.md section 1 unless noted):
- property values are strings; an unknown property is a 400 VALIDATION_ERROR whose message is
  "Property values were not valid: [...]" with PROPERTY_DOESNT_EXIST and the property's name
  (the shape HubSpot has long sent, seen in public issue threads); enumeration values must be
  options (INVALID_OPTION); date properties take midnight UTC (epoch ms) or YYYY-MM-DD
  (INVALID_DATE otherwise); read-only properties are refused (READ_ONLY_VALUE);
- email is the contacts' dedupe key and hasUniqueValue properties are unique: a duplicate is
  409 "Contact already exists. Existing ID: N" in the older (category CONFLICT) or newer
  (OBJECT_ALREADY_EXISTS, identityProfile, errors[].in) format, switchable; a taken value of a
  hasUniqueValue property (the deep-link token, the deal key) is that 409, or with
  `unique_conflict="400"` a 400 VALIDATION_ERROR "... already has that value" that names no
  record (HubSpot answers either; which one is not documented);
- batch upsert results echo every property (`upsert_echo="all"`) or only those each input
  wrote (`"written"`), as HubSpot may; a partial upsert by `email` (one that would update an
  existing contact) is refused with 400, as HubSpot's contacts guide says;
- property options need `label`, `value` and `hidden` (the spec's OptionInput); a create needs
  `properties` only (`associations` is optional); GET reads `properties` repeated
  (`?properties=a&properties=b`, what the official client sends) or comma-separated;
- a create answers 201 with the object (`create_response="201-object"`) or 200 with
  `{createdResourceId, entity, location}` (`"200-wrapped"`, the Rollouts/424 spec), a batch
  create 201 or 200 to match; a path's dot segments are resolved before routing, and an
  encoded id segment is one literal value (`path_values="decoded"`) or split (`"rerouted"`);
- `lifecyclestage` only moves forward: a backwards write is silently ignored (200, value
  unchanged), as HubSpot users report; clearing it with "" first is what moves it back;
- the ten-second rolling limit counts each accepted request; search is exempt from it and has
  its own per-second limit.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

LIFECYCLE = ("subscriber", "lead", "marketingqualifiedlead", "salesqualifiedlead",
             "opportunity", "customer", "evangelist", "other")
PIPELINE_STAGES = ("appointmentscheduled", "qualifiedtobuy", "presentationscheduled",
                   "decisionmakerboughtin", "contractsent", "closedwon", "closedlost")
EXTERNAL_OPTIONS = {"dealstage": PIPELINE_STAGES, "pipeline": ("default",)}
READ_ONLY = ("hs_object_id", "createdate", "lastmodifieddate", "hs_lastmodifieddate")
DEFAULT_PROPERTIES = ("createdate", "hs_object_id", "lastmodifieddate")
PORTAL_ID = 4242


class ApiError(Exception):
    """An error answer: status and HubSpot's body."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(body.get("message", ""))
        self.status = status
        self.body = body


def error_body(message: str, category: str, **extra: Any) -> dict[str, Any]:
    return {"status": "error", "message": message, "correlationId": str(uuid.uuid4()),
            "category": category, **extra}


def validation_error(results: list[dict[str, Any]]) -> ApiError:
    return ApiError(400, error_body("Property values were not valid: " + json.dumps(results),
                                    "VALIDATION_ERROR"))


def _result(name: str, code: str, message: str) -> dict[str, Any]:
    return {"isValid": False, "message": message, "error": code, "name": name,
            "localizedErrorMessage": message}


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class PropertyDef:
    name: str
    label: str
    type: str = "string"
    fieldType: str = "text"  # HubSpot's wire names
    groupName: str = ""
    hasUniqueValue: bool = False
    options: list[dict[str, Any]] = field(default_factory=list)
    description: str = ""
    hubspotDefined: bool = False
    externalOptions: bool = False

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "label": self.label, "type": self.type,
                "fieldType": self.fieldType, "groupName": self.groupName,
                "description": self.description, "options": self.options,
                "hasUniqueValue": self.hasUniqueValue, "hubspotDefined": self.hubspotDefined,
                "externalOptions": self.externalOptions, "calculated": False,
                "formField": False, "hidden": False, "displayOrder": -1, "archived": False,
                "modificationMetadata": {"archivable": not self.hubspotDefined,
                                         "readOnlyDefinition": self.hubspotDefined,
                                         "readOnlyValue": self.name in READ_ONLY}}


@dataclass
class Record:
    id: str
    properties: dict[str, str]
    created_at: str
    updated_at: str
    created_clock: float

    def as_json(self, names: list[str] | None = None) -> dict[str, Any]:
        if names is None:
            props: dict[str, Any] = dict(self.properties)
        else:
            props = {n: self.properties.get(n) for n in [*DEFAULT_PROPERTIES, *names]}
        return {"id": self.id, "properties": props, "createdAt": self.created_at,
                "updatedAt": self.updated_at, "archived": False}


def _options(values: tuple[str, ...]) -> list[dict[str, Any]]:
    return [{"label": v, "value": v, "displayOrder": i, "hidden": False}
            for i, v in enumerate(values)]


class ObjectType:
    """One object type's properties, groups and records."""

    def __init__(self, name: str, singular: str, first_id: int) -> None:
        self.name = name
        self.singular = singular
        self.properties: dict[str, PropertyDef] = {}
        self.groups: dict[str, dict[str, Any]] = {}
        self.records: dict[str, Record] = {}
        self._next = first_id
        # property -> value -> ids of the records holding it, in creation order: built for a
        # property the first time it is looked up, then kept by `stored` and `changed`. HubSpot
        # finds a record by a property at once; a scan here would make a drain of thousands
        # of contacts measure the emulator (which shares the worker's process) instead.
        self._holders: dict[str, dict[str, list[str]]] = {}

    def define(self, prop: PropertyDef) -> None:
        self.properties[prop.name] = prop

    def is_unique(self, name: str) -> bool:
        prop = self.properties.get(name)
        return (self.name == "contacts" and name == "email") or bool(prop and prop.hasUniqueValue)

    def find(self, name: str, value: str) -> Record | None:
        if name == "hs_object_id":
            return self.records.get(value)
        if name == "email":
            value = value.lower()
        holders = self._holders.get(name)
        if holders is None:
            holders = self._holders[name] = {}
            for record in self.records.values():
                held = record.properties.get(name)
                if held is not None:
                    holders.setdefault(held, []).append(record.id)
        ids = holders.get(value)
        return self.records[ids[0]] if ids else None

    def stored(self, record: Record) -> None:
        """A new record, with its properties set."""
        self.records[record.id] = record
        for name, holders in self._holders.items():
            value = record.properties.get(name)
            if value is not None:
                holders.setdefault(value, []).append(record.id)

    def changed(self, record: Record, name: str, old: str | None) -> None:
        """`record`'s property `name` was `old` and is what it holds now."""
        holders = self._holders.get(name)
        if holders is None or old == record.properties.get(name):
            return
        if old is not None:
            holders[old].remove(record.id)
            if not holders[old]:
                del holders[old]
        new = record.properties.get(name)
        if new is not None:
            ids = holders.setdefault(new, [])
            ids.append(record.id)
            ids.sort(key=int)  # creation order, as a scan of the records would find them

    def normalise(self, properties: dict[str, str], creating: bool) -> dict[str, str]:
        """Validated values as stored; raises the 400 HubSpot gives for the bad ones."""
        problems: list[dict[str, Any]] = []
        out: dict[str, str] = {}
        for name, value in properties.items():
            prop = self.properties.get(name)
            if prop is None:
                problems.append(_result(name, "PROPERTY_DOESNT_EXIST",
                                        f'Property "{name}" does not exist'))
                continue
            if name in READ_ONLY:
                problems.append(_result(name, "READ_ONLY_VALUE",
                                        f'"{name}" is a read only property; its value cannot '
                                        "be set."))
                continue
            try:
                out[name] = _value(prop, value)
            except ValueError as error:
                code, message = error.args
                problems.append(_result(name, code, message))
        if problems:
            raise validation_error(problems)
        return out

    def next_id(self) -> str:
        self._next += 1
        return str(self._next)


def _value(prop: PropertyDef, value: str) -> str:
    if value == "":
        return ""  # "" clears a value
    if prop.type == "number":
        try:
            float(value)
        except ValueError:
            raise ValueError("INVALID_FLOAT", f"{value} is not a valid number") from None
    elif prop.type == "bool" and value not in ("true", "false"):
        raise ValueError("INVALID_BOOLEAN", f"{value} is not a valid boolean")
    elif prop.type == "enumeration":
        # Deal stages and pipelines live in the pipeline, not in the property's options.
        allowed = list(EXTERNAL_OPTIONS.get(prop.name, ())) if prop.externalOptions else [
            o["value"] for o in prop.options]
        if value not in allowed:
            raise ValueError("INVALID_OPTION",
                             f"{value} was not one of the allowed options: {allowed}")
    elif prop.type == "date":
        return _date(value)
    elif prop.type == "datetime":
        return _datetime(value)
    if prop.name == "email":
        if not re.fullmatch(r"[^@\s]+@[^@\s]+\.[^@\s]+", value):
            raise ValueError("INVALID_EMAIL", f"Email address {value} is invalid")
        return value.lower()
    return value


def _date(value: str) -> str:
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
        return value
    if not value.isdigit():
        raise ValueError("INVALID_DATE", f"{value} is not a valid date")
    instant = datetime.fromtimestamp(int(value) / 1000, tz=UTC)
    if int(value) % 86_400_000:
        raise ValueError("INVALID_DATE", f"{value} is at {instant:%H:%M:%S.%f} UTC, not "
                                         "midnight!")
    return instant.date().isoformat()


def _datetime(value: str) -> str:
    try:
        instant = (datetime.fromtimestamp(int(value) / 1000, tz=UTC) if value.isdigit()
                   else datetime.fromisoformat(value.replace("Z", "+00:00")))
    except ValueError:
        raise ValueError("INVALID_DATETIME", f"{value} is not a valid datetime") from None
    if instant.tzinfo is None:
        instant = instant.replace(tzinfo=UTC)
    return instant.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class RollingLimit:
    """At most `limit` requests in any `window` seconds (a sliding log, as HubSpot's rolling
    ten-second window behaves)."""

    limit: int
    window: float
    clock: Callable[[], float] = time.monotonic
    hits: deque[float] = field(default_factory=deque)

    def take(self) -> bool:
        now = self.clock()
        while self.hits and self.hits[0] <= now - self.window:
            self.hits.popleft()
        if len(self.hits) >= self.limit:
            return False
        self.hits.append(now)
        return True

    def remaining(self) -> int:
        return max(0, self.limit - len(self.hits))

    def free_in(self) -> float:
        return max(0.0, self.hits[0] + self.window - self.clock()) if self.hits else 0.0


@dataclass
class HubSpotState:
    """Everything the emulator holds, for tests to arrange and assert on."""

    token: str
    limit: RollingLimit
    search_limit: RollingLimit
    daily_limit: int = 250_000
    conflict_format: str = "legacy"  # or "identity_profile" (the newer 409 body)
    unique_conflict: str = "409"  # or "400": a custom unique value taken is a VALIDATION_ERROR
    upsert_echo: str = "all"  # or "written": upsert results carry only the properties written
    create_response: str = "201-object"  # or "200-wrapped": {createdResourceId, entity}, 200
    path_values: str = "decoded"  # or "rerouted": the path is decoded before routing
    search_lag: float = 0.0
    latency: float = 0.0
    send_retry_after: bool = False
    contacts: ObjectType = field(default_factory=lambda: ObjectType("contacts", "Contact", 100))
    deals: ObjectType = field(default_factory=lambda: ObjectType("deals", "Deal", 5000))
    associations: set[tuple[str, str]] = field(default_factory=set)  # (deal id, contact id)
    requests: Counter[str] = field(default_factory=Counter)
    throttled: int = 0
    throttled_at: list[float] = field(default_factory=list)
    request_times: list[float] = field(default_factory=list)  # when each request came in
    daily_used: int = 0

    @property
    def first_request_at(self) -> float | None:
        return self.request_times[0] if self.request_times else None

    def forget_requests(self) -> None:
        """Count from here: the requests, the rate-limit window and the 429s so far are
        forgotten (set-up such as provisioning is not part of what a test measures)."""
        self.requests.clear()
        self.limit.hits.clear()
        self.throttled_at.clear()
        self.throttled = 0
        self.request_times.clear()

    def __post_init__(self) -> None:
        contact_defaults: tuple[tuple[str, str, str, str, tuple[str, ...]], ...] = (
            ("email", "Email", "string", "text", ()),
            ("firstname", "First Name", "string", "text", ()),
            ("lastname", "Last Name", "string", "text", ()),
            ("phone", "Phone Number", "string", "phonenumber", ()),
            ("company", "Company Name", "string", "text", ()),
            ("lifecyclestage", "Lifecycle Stage", "enumeration", "radio", LIFECYCLE),
            ("hs_object_id", "Record ID", "number", "number", ()),
            ("createdate", "Create Date", "datetime", "date", ()),
            ("lastmodifieddate", "Last Modified Date", "datetime", "date", ()),
        )
        for name, label, kind, field_type, options in contact_defaults:
            self.contacts.define(PropertyDef(name, label, kind, field_type, "contactinformation",
                                             options=_options(options), hubspotDefined=True))
        deal_defaults: tuple[tuple[str, str, str, str, tuple[str, ...]], ...] = (
            ("dealname", "Deal Name", "string", "text", ()),
            ("dealstage", "Deal Stage", "enumeration", "radio", PIPELINE_STAGES),
            ("pipeline", "Pipeline", "enumeration", "select", ("default",)),
            ("amount", "Amount", "number", "number", ()),
            ("closedate", "Close Date", "datetime", "date", ()),
            ("hs_object_id", "Record ID", "number", "number", ()),
            ("createdate", "Create Date", "datetime", "date", ()),
            ("hs_lastmodifieddate", "Last Modified Date", "datetime", "date", ()),
        )
        for name, label, kind, field_type, options in deal_defaults:
            external = name in EXTERNAL_OPTIONS
            self.deals.define(PropertyDef(name, label, kind, field_type, "dealinformation",
                                          options=[] if external else _options(options),
                                          hubspotDefined=True, externalOptions=external))
        for object_type, group in ((self.contacts, "contactinformation"),
                                   (self.deals, "dealinformation")):
            object_type.groups[group] = {"name": group, "label": group.title(),
                                         "displayOrder": 0, "archived": False}

    def object_type(self, name: str) -> ObjectType:
        if name == "contacts":
            return self.contacts
        if name == "deals":
            return self.deals
        raise ApiError(404, error_body(f"Unable to infer object type from: {name}",
                                       "OBJECT_NOT_FOUND"))

    def define_property(self, object_name: str, name: str, type: str = "string", *,
                        unique: bool = False, options: tuple[str, ...] = ()) -> None:
        """Arrange a custom property directly (tests that skip `provision`)."""
        field_type = {"enumeration": "select", "date": "date", "datetime": "date",
                      "number": "number", "bool": "booleancheckbox"}.get(type, "text")
        self.object_type(object_name).define(PropertyDef(
            name, name.replace("_", " ").capitalize(), type, field_type, "deep_link_attribution",
            hasUniqueValue=unique, options=_options(options)))

    # -- records ----------------------------------------------------------------------------

    def conflict(self, object_type: ObjectType, name: str, value: str,
                 existing: Record) -> ApiError:
        if name != "email" and self.unique_conflict == "400":
            return validation_error([_result(name, "INVALID_PROPERTY_VALUE", (
                f"Another {object_type.singular.lower()} already has that value for the "
                f"unique property {name}."))])
        if object_type is not self.contacts:
            return ApiError(409, error_body(
                f"A {object_type.singular.lower()} with {name} {value!r} already exists. "
                f"Existing ID: {existing.id}", "CONFLICT"))
        message = f"Contact already exists. Existing ID: {existing.id}"
        if self.conflict_format == "legacy":
            return ApiError(409, error_body(message, "CONFLICT"))
        return ApiError(409, error_body(
            message, "OBJECT_ALREADY_EXISTS", error="CONTACT_EXISTS",
            identityProfile={"vid": int(existing.id), "identity": [], "linkedVid": [],
                             "isContact": True, "savedAtTimestamp": 0},
            errors=[{"message": f"A contact with {name} {value} already exists. Existing ID: "
                                f"{existing.id}", "in": name}]))

    def check_unique(self, object_type: ObjectType, values: dict[str, str],
                     record_id: str | None) -> None:
        for name, value in values.items():
            if value and object_type.is_unique(name):
                holder = object_type.find(name, value)
                if holder is not None and holder.id != record_id:
                    raise self.conflict(object_type, name, value, holder)

    def create(self, object_type: ObjectType, values: dict[str, str]) -> Record:
        self.check_unique(object_type, values, None)
        stamp = now_iso()
        record_id = object_type.next_id()
        record = Record(record_id, {}, stamp, stamp, time.monotonic())
        record.properties.update({k: v for k, v in values.items() if v != ""})
        record.properties.update({"hs_object_id": record_id, "createdate": stamp,
                                  _modified(object_type): stamp})
        object_type.stored(record)
        return record

    def update(self, object_type: ObjectType, record: Record, values: dict[str, str]) -> Record:
        self.check_unique(object_type, values, record.id)
        for name, value in values.items():
            if name == "lifecyclestage" and not _forward(record.properties.get(name), value):
                continue  # HubSpot ignores a backwards lifecycle stage without an error
            old = record.properties.get(name)
            if value == "":
                record.properties.pop(name, None)
            else:
                record.properties[name] = value
            object_type.changed(record, name, old)
        modified = _modified(object_type)
        old = record.properties.get(modified)
        record.updated_at = record.properties[modified] = now_iso()
        object_type.changed(record, modified, old)
        return record

    def visible_to_search(self, record: Record) -> bool:
        return time.monotonic() - record.created_clock >= self.search_lag


def _modified(object_type: ObjectType) -> str:
    return "lastmodifieddate" if object_type.name == "contacts" else "hs_lastmodifieddate"


def _forward(current: str | None, new: str) -> bool:
    if not current or new == "" or current not in LIFECYCLE or new not in LIFECYCLE:
        return True
    return LIFECYCLE.index(new) >= LIFECYCLE.index(current)
