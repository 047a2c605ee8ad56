"""The Salesforce emulator's org: object fields as describe shows them, and write validation."""

from __future__ import annotations

import itertools
import re
import time
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")

# (value, IsConverted) in sort order; the first is the default.
DEFAULT_LEAD_STATUSES = (
    ("Open - Not Contacted", False), ("Working - Contacted", False),
    ("Closed - Converted", True), ("Closed - Not Converted", False),
    ("Deep Link Customer", False),
)
OPPORTUNITY_STAGES = ("Prospecting", "Qualification", "Needs Analysis", "Value Proposition",
                      "Negotiation/Review", "Closed Won", "Closed Lost")
PREFIXES = {"Lead": "00Q", "Opportunity": "006", "LeadStatus": "01J"}
LEAD_SOURCES = ("Web", "Phone Inquiry", "Partner Referral", "Other", "Deep Link")

# A validation rule: (object name, the record as it would be saved) -> an error message or None.
ValidationRule = Callable[[str, Mapping[str, Any]], "str | None"]


class SFError(Exception):
    """One Salesforce error: HTTP status, errorCode, message and the fields concerned."""

    def __init__(self, status: int, code: str, message: str, fields: list[str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.fields = fields or []

    def entry(self) -> dict[str, Any]:
        return {"message": self.message, "errorCode": self.code, "fields": self.fields}


@dataclass
class SField:
    name: str
    type: str = "string"  # as describe says: id string email date datetime picklist double ...
    required: bool = False
    external_id: bool = False
    unique: bool = False
    case_sensitive: bool = False
    length: int = 255
    picklist: tuple[str, ...] = ()
    restricted: bool = False
    updateable: bool = True
    label: str = ""

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name, "label": self.label or self.name, "type": self.type,
            "length": self.length if self.type in ("string", "email", "textarea") else 0,
            "externalId": self.external_id, "unique": self.unique,
            "caseSensitive": self.case_sensitive, "nillable": not self.required,
            "createable": self.updateable, "updateable": self.updateable,
            "restrictedPicklist": self.restricted,
            "picklistValues": [{"value": v, "label": v, "active": True,
                                "defaultValue": i == 0 and self.required}
                               for i, v in enumerate(self.picklist)],
        }


def _fields(*items: SField) -> dict[str, SField]:
    return {item.name: item for item in items}


def lead_fields(statuses: tuple[str, ...]) -> dict[str, SField]:
    custom = [SField(n) for n in ("Deep_Link_Prefix__c", "Deep_Link_Campaign__c",
                                  "Deep_Link_Platform__c", "Referral_Source__c",
                                  "App_User_Id__c")]
    dates = [SField(n, "date") for n in ("Install_Date__c", "Referral_Date__c",
                                         "Conversion_Date__c")]
    return _fields(
        SField("Id", "id", updateable=False), SField("CreatedDate", "datetime", updateable=False),
        SField("IsConverted", "boolean", updateable=False),
        SField("FirstName", length=40), SField("LastName", required=True, length=80),
        SField("Company", required=True), SField("Email", "email"),
        SField("Status", "picklist", required=True, picklist=statuses, restricted=True),
        SField("LeadSource", "picklist", picklist=LEAD_SOURCES),
        SField("Deep_Link_Token__c", external_id=True, unique=True, case_sensitive=True),
        *custom, *dates, SField("Last_Deep_Link_Claimed_At__c", "datetime"),
    )


def opportunity_fields() -> dict[str, SField]:
    return _fields(
        SField("Id", "id", updateable=False), SField("CreatedDate", "datetime", updateable=False),
        SField("Name", required=True, length=120),
        SField("StageName", "picklist", required=True, picklist=OPPORTUNITY_STAGES,
               restricted=True),
        SField("CloseDate", "date", required=True), SField("Amount", "currency"),
        SField("LeadSource", "picklist", picklist=LEAD_SOURCES),
        SField("Linkcrm_Deal_Key__c", external_id=True, unique=True, case_sensitive=True),
        SField("Deep_Link_Token__c"), SField("Referral_Code__c"),
    )


def lead_status_fields() -> dict[str, SField]:
    return _fields(SField("Id", "id", updateable=False), SField("MasterLabel"),
                   SField("IsConverted", "boolean"), SField("IsDefault", "boolean"),
                   SField("SortOrder", "double"))


@dataclass
class Org:
    """Object definitions plus the org's rules: converted statuses and validation rules."""

    lead_statuses: tuple[tuple[str, bool], ...] = DEFAULT_LEAD_STATUSES
    objects: dict[str, dict[str, SField]] = field(default_factory=dict)
    validation_rules: list[ValidationRule] = field(default_factory=list)
    records: dict[str, dict[str, dict[str, Any]]] = field(
        default_factory=lambda: {"Lead": {}, "Opportunity": {}})
    counters: Counter[str] = field(default_factory=Counter)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _indexes: dict[str, _Index] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.objects:
            self.objects = {
                "Lead": lead_fields(tuple(v for v, _ in self.lead_statuses)),
                "Opportunity": opportunity_fields(),
                "LeadStatus": lead_status_fields(),
            }

    def new_id(self, sobject: str) -> str:
        return f"{PREFIXES.get(sobject, '001')}EMU{next(self._ids):012d}"

    def seed(self, sobject: str, **values: Any) -> str:
        record_id = self.new_id(sobject)
        self._store(sobject, record_id, {"Id": record_id, **self._defaults(sobject), **values})
        return record_id

    def _defaults(self, sobject: str) -> dict[str, Any]:
        return {"Status": self.lead_statuses[0][0], "IsConverted": False} \
            if sobject == "Lead" else {}

    def find(self, sobject: str, field_name: str, value: str) -> list[dict[str, Any]]:
        """Records whose field holds `value`, ignoring case unless the field is case sensitive."""
        sensitive = self.fields(sobject)[field_name].case_sensitive

        def fold(v: Any) -> Any:
            return v if sensitive or not isinstance(v, str) else v.casefold()

        return [r for r in self.holding(sobject, {field_name: [value]})
                if fold(r.get(field_name)) == fold(value)]

    def holding(self, sobject: str, wanted: Mapping[str, Iterable[Any]]) -> list[dict[str, Any]]:
        """The records in which a field of `wanted` holds one of its values, compared as SOQL
        compares (strings ignoring case), in the order `rows` gives them. Read through the
        index; every row when a value cannot be indexed or the object keeps no records of its
        own (LeadStatus): callers test each record they get, as they would in a scan.

        >>> org = Org(); _ = org.seed("Lead", Email="Ada@Example.com")
        >>> [r["Email"] for r in org.holding("Lead", {"Email": ["ada@example.com"]})]
        ['Ada@Example.com']
        """
        if sobject not in self.records:
            return self.rows(sobject)
        table = self.records[sobject]
        ids = self._index(sobject).holding(wanted)
        return list(table.values()) if ids is None else [table[i] for i in ids]

    def rows(self, sobject: str) -> list[dict[str, Any]]:
        """What a query FROM `sobject` sees (LeadStatus is made from the status settings)."""
        if sobject == "LeadStatus":
            return [{"Id": f"01JEMU{i:09d}", "MasterLabel": value, "IsConverted": converted,
                     "IsDefault": i == 0, "SortOrder": float(i + 1)}
                    for i, (value, converted) in enumerate(self.lead_statuses)]
        return list(self.records[sobject].values())

    def save(self, sobject: str, record_id: str | None, values: dict[str, Any]) -> str:
        """Validate and store a create (record_id None) or an update; returns the id."""
        self.check_values(sobject, values)
        existing = self.records[sobject].get(record_id or "", {})
        merged = {**(existing or self._defaults(sobject)), **values}
        self.check_record(sobject, merged)
        for name, spec in self.fields(sobject).items():
            if spec.unique and merged.get(name) not in (None, ""):
                clash = [r for r in self.find(sobject, name, merged[name])
                         if r["Id"] != record_id]
                if clash:
                    raise SFError(400, "DUPLICATE_VALUE", f"duplicate value found: {name} "
                                  f"duplicates value on record with id: {clash[0]['Id']}",
                                  [name])
        if record_id is None:
            record_id = self.new_id(sobject)
            merged["Id"] = record_id
            merged["CreatedDate"] = time.strftime("%Y-%m-%dT%H:%M:%S.000+0000", time.gmtime())
            self.counters[f"created {sobject}"] += 1
        else:
            self.counters[f"updated {sobject}"] += 1
        self._store(sobject, record_id, merged)
        return record_id

    def _store(self, sobject: str, record_id: str, record: dict[str, Any]) -> None:
        index = self._index(sobject)  # before the table changes: a changed size means a rebuild
        self.records[sobject][record_id] = record
        index.put(record_id, record)

    def _index(self, sobject: str) -> _Index:
        """`sobject`'s index, built again when its table is not the one it was kept for: the
        Collections rollback and tests replace tables (`emulator.records = ...`), and a table
        whose size changed behind the Org's back was written to directly."""
        table = self.records[sobject]
        index = self._indexes.get(sobject)
        if index is None or not index.keeps(table):
            index = self._indexes[sobject] = _Index(table)
        return index

    def fields(self, sobject: str) -> dict[str, SField]:
        if sobject not in self.objects or sobject == "LeadStatus":
            raise SFError(404, "NOT_FOUND", "The requested resource does not exist")
        return self.objects[sobject]

    def check_values(self, sobject: str, values: Mapping[str, Any]) -> None:
        """Field names, writability and value formats of a create or update body."""
        fields = self.fields(sobject)
        for name, value in values.items():
            spec = fields.get(name)
            if spec is None:
                raise SFError(400, "INVALID_FIELD",
                              f"No such column '{name}' on sobject of type {sobject}", [name])
            if not spec.updateable:
                raise SFError(400, "INVALID_FIELD_FOR_INSERT_UPDATE",
                              f"Unable to create/update fields: {name}. Please check the "
                              "security settings of this field and verify that it is "
                              "read/write for your profile or permission set.", [name])
            if value is not None:
                _check_type(spec, value)
            if sobject == "Lead" and name == "Status" and dict(self.lead_statuses).get(value):
                raise SFError(400, "FIELD_INTEGRITY_EXCEPTION",
                              f"Status: a converted status ({value}) can only be set by "
                              "converting the lead", [name])

    def check_record(self, sobject: str, record: Mapping[str, Any]) -> None:
        """Required fields and validation rules on the record as it would be saved."""
        missing = [n for n, f in self.fields(sobject).items()
                   if f.required and record.get(n) in (None, "")]
        if missing:
            raise SFError(400, "REQUIRED_FIELD_MISSING",
                          f"Required fields are missing: [{', '.join(missing)}]", missing)
        for rule in self.validation_rules:
            message = rule(sobject, record)
            if message:
                raise SFError(400, "FIELD_CUSTOM_VALIDATION_EXCEPTION", message)


class _Index:
    """The records of one table by field value, so a lookup reads the records holding a value
    and not every record (upserting 2,500 Leads twice each: 2.2 s of scans, 0.1 s this way).

    A field is indexed from its first lookup on, and kept by every write the Org makes
    (`put`). Values are keyed case folded, as SOQL compares them; `Org.find` narrows the
    holders of a case-sensitive field to exact matches. Each record's place in the table keeps
    the answers in table order, as a scan finds them. Values that cannot be keyed (unhashable,
    or unequal to themselves like NaN) are left out, and a lookup of such a value says None:
    scan. A record dict edited in place is not seen: write through the Org."""

    def __init__(self, table: dict[str, dict[str, Any]]) -> None:
        self.table = table
        self.places = {record_id: place for place, record_id in enumerate(table)}
        self.next_place = len(self.places)
        # field -> key -> ids of the records holding it; field -> id -> the key it is under
        self.holders: dict[str, dict[Hashable, dict[str, None]]] = {}
        self.filed: dict[str, dict[str, Hashable]] = {}

    def keeps(self, table: dict[str, dict[str, Any]]) -> bool:
        return table is self.table and len(table) == len(self.places)

    def put(self, record_id: str, record: Mapping[str, Any]) -> None:
        """`record` is now stored under `record_id` (new, or replacing what was there)."""
        if record_id not in self.places:
            self.places[record_id] = self.next_place
            self.next_place += 1
        for name in self.holders:
            self._unfile(name, record_id)
            self._file(name, record_id, record)

    def holding(self, wanted: Mapping[str, Iterable[Any]]) -> list[str] | None:
        """Ids of the records holding one of the values of a field of `wanted`, in table order;
        None when a value cannot be looked up by key."""
        found: set[str] = set()
        for name, values in wanted.items():
            holders = self.holders.get(name)
            if holders is None:
                holders = self._build(name)
            for value in values:
                key = _folded(value)
                if not _keyable(key):
                    return None
                found.update(holders.get(key, ()))
        return sorted(found, key=self.places.__getitem__)

    def _build(self, name: str) -> dict[Hashable, dict[str, None]]:
        self.holders[name], self.filed[name] = {}, {}
        for record_id, record in self.table.items():
            self._file(name, record_id, record)
        return self.holders[name]

    def _file(self, name: str, record_id: str, record: Mapping[str, Any]) -> None:
        key = _folded(record.get(name))
        if _keyable(key):
            self.holders[name].setdefault(key, {})[record_id] = None
            self.filed[name][record_id] = key

    def _unfile(self, name: str, record_id: str) -> None:
        filed = self.filed[name]
        if record_id in filed:
            key = filed.pop(record_id)
            ids = self.holders[name][key]
            del ids[record_id]
            if not ids:
                del self.holders[name][key]


def _folded(value: Any) -> Any:
    """A value as SOQL compares it: strings ignoring case."""
    return value.casefold() if isinstance(value, str) else value


def _keyable(key: Any) -> bool:
    """Whether a dict finds `key` exactly when `==` does (not so for NaN, nor unhashables)."""
    try:
        hash(key)
    except TypeError:
        return False
    return bool(key == key)


def _check_type(spec: SField, value: Any) -> None:
    kind, name = spec.type, spec.name
    if kind in ("string", "email", "picklist", "textarea"):
        if not isinstance(value, str):
            raise SFError(400, "JSON_PARSER_ERROR", f"Cannot deserialize instance of string "
                          f"from {type(value).__name__} value for {name}", [name])
        if len(value) > spec.length:
            raise SFError(400, "STRING_TOO_LONG", f"{spec.label or name}: data value too large: "
                          f"{value[:20]}... (max length={spec.length})", [name])
        if kind == "email" and not _EMAIL.match(value):
            raise SFError(400, "INVALID_EMAIL_ADDRESS", f"{name}: invalid email address: "
                          f"{value}", [name])
        if kind == "picklist" and spec.restricted and value not in spec.picklist:
            raise SFError(400, "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST",
                          f"{name}: bad value for restricted picklist field: {value}", [name])
    elif kind == "date":
        if not (isinstance(value, str) and _DATE.match(value) and _parses(date, value)):
            raise SFError(400, "JSON_PARSER_ERROR", f"Cannot deserialize instance of date from "
                          f"VALUE_STRING value {value} for {name}", [name])
    elif kind == "datetime":
        if not (isinstance(value, str) and len(value) > 10
                and _parses(datetime, value.replace("Z", "+00:00"))):
            raise SFError(400, "JSON_PARSER_ERROR", f"Cannot deserialize instance of datetime "
                          f"from VALUE_STRING value {value} for {name}", [name])
    elif kind in ("double", "currency"):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise SFError(400, "JSON_PARSER_ERROR", f"Cannot deserialize instance of double "
                          f"for {name}", [name])
    elif kind == "boolean" and not isinstance(value, bool):
        raise SFError(400, "JSON_PARSER_ERROR", f"Cannot deserialize instance of boolean for "
                      f"{name}", [name])


def _parses(kind: type[date] | type[datetime], text: str) -> bool:
    try:
        kind.fromisoformat(text)
    except ValueError:
        return False
    return True
