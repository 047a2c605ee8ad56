"""The field map: canonical fields and stages, each CRM's name for them, and value coercion.

`rules/fields.yaml` declares each canonical field once (type, identity or not, contact or deal)
and what each CRM calls it. Coercion checks a rule's JSON value against the field's type and
writes it in the format a target's API wants, as that target's `Dialect` says (HubSpot dates as
midnight-UTC epoch milliseconds, Salesforce DateTime as ISO 8601, Pipedrive RFC 3339). The field
map itself knows no CRM's ways: each target package declares its dialect and passes it in. It
is pure and used by `explain --target` and the adapters.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time
from pathlib import Path
from typing import Any, Literal

from engine.actions import JSON
from engine.config.links import LinkPolicy
from engine.config.schemacheck import schema_problems
from engine.config.yamlsource import YamlDocument, YamlError, load_yaml
from engine.errors import ConfigError, Location, Problem

CRMS = ("hubspot", "salesforce", "pipedrive")
TARGETS = ("local", *CRMS)
Target = Literal["local", "hubspot", "salesforce", "pipedrive"]

_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


Kind = Literal["name", "label", "builtin"]


@dataclass(frozen=True)
class CRMField:
    """A field as one CRM knows it: an API name, a custom field's label, or one of the CRM's
    own fields (`builtin`). `bare`: written as a bare string, which names the field the way
    that CRM names its fields (its `Dialect.bare`)."""

    name: str
    kind: Kind = "name"
    type: str | None = None  # overrides the canonical type for this CRM
    bare: bool = False


def _iso_seconds(instant: datetime) -> JSON:
    return instant.isoformat(timespec="seconds").replace("+00:00", "Z")


def iso_milliseconds(instant: datetime) -> JSON:
    """`2026-03-01T12:31:10.000Z`: ISO 8601 in UTC to the millisecond."""
    return instant.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Dialect:
    """How one target reads the field map and writes values to its API; each target package
    declares its own (`engine.targets.<crm>.kind`).

    `target` is its name in fields.yaml; `bare` what a bare string names there (an API name,
    or a custom field's label); `write_date` and `write_datetime` write those types as its
    API takes them; `text`: every value travels as text (HubSpot property values are
    strings)."""

    target: str
    bare: Kind = "name"
    write_date: Callable[[date], JSON] = date.isoformat
    write_datetime: Callable[[datetime], JSON] = _iso_seconds
    text: bool = False
    # What `explain --target` shows: the target's names for a deal's own fields (title,
    # stage, amount), the `targets.<crm>` setting naming its deal-key field, and the one
    # holding the defaults a new contact record gets (Salesforce's lead_defaults).
    deal_names: tuple[tuple[str, str], ...] = ()
    deal_key_setting: str = ""
    contact_defaults_setting: str = ""

    def kind(self, crm_field: CRMField) -> Kind:
        """What `crm_field` names in this target: a bare string means the target's default."""
        return self.bare if crm_field.bare else crm_field.kind


# The field map's own language: canonical names, ISO 8601 values (the embedded `local` CRM).
CANONICAL = Dialect("local")


@dataclass(frozen=True)
class FieldSpec:
    name: str
    type: str
    object: Literal["contact", "deal"] = "contact"
    identity: bool = False
    label: str = ""
    options: tuple[str, ...] = ()
    crm: dict[str, CRMField] = field(default_factory=dict)

    def in_crm(self, target: str) -> CRMField | None:
        if target == "local":
            return CRMField(self.name)
        return self.crm.get(target)


@dataclass(frozen=True)
class Stage:
    name: str
    values: dict[str, str]  # CRM -> that CRM's value

    def value(self, target: str) -> str:
        return self.name if target == "local" else self.values.get(target, "")


@dataclass(frozen=True)
class FieldMap:
    fields: dict[str, FieldSpec]
    contact_stages: tuple[Stage, ...]
    deal_stages: tuple[Stage, ...]
    contact_stage_field: dict[str, CRMField] = field(default_factory=dict)
    deal_pipeline: dict[str, CRMField] = field(default_factory=dict)
    targets: dict[str, dict[str, Any]] = field(default_factory=dict)
    file: str = ""
    links: LinkPolicy = field(default_factory=LinkPolicy)

    # Looked up for every stage action a CRM writes: by name, built once per field map (the
    # first of a repeated name wins, as a scan in order would find it).
    @functools.cached_property
    def _contact_stages(self) -> dict[str, tuple[int, Stage]]:
        found: dict[str, tuple[int, Stage]] = {}
        for rank, stage in enumerate(self.contact_stages):
            found.setdefault(stage.name, (rank, stage))
        return found

    @functools.cached_property
    def _deal_stages(self) -> dict[str, Stage]:
        found: dict[str, Stage] = {}
        for stage in self.deal_stages:
            found.setdefault(stage.name, stage)
        return found

    def contact_stage(self, name: str) -> Stage | None:
        found = self._contact_stages.get(name)
        return None if found is None else found[1]

    def deal_stage(self, name: str) -> Stage | None:
        return self._deal_stages.get(name)

    def stage_rank(self, name: str) -> int:
        """Position in the forward order; a contact never moves to a lower rank. KeyError for
        a name that is no contact stage."""
        return self._contact_stages[name][0]

    def coerce(self, dialect: Dialect, name: str, value: JSON) -> JSON:
        """`value` for canonical field `name` as `dialect`'s target wants it; raises
        CoercionError."""
        spec = self.fields[name]
        crm_field = spec.in_crm(dialect.target)
        kind = (crm_field.type if crm_field and crm_field.type else None) or spec.type
        return coerce_value(dialect, kind, value, spec)


class CoercionError(ValueError):
    """A value cannot be written as the field's type (names field, value kind and the type)."""


def coerce_value(dialect: Dialect, kind: str, value: JSON, spec: FieldSpec) -> JSON:
    if kind in ("string", "text", "url"):
        result: JSON = _as_string(value, spec)
    elif kind == "email":
        text = _as_string(value, spec).strip()
        if not _EMAIL.match(text):
            raise CoercionError(f"{spec.name}: {text!r} is not an email address")
        result = text
    elif kind in ("number", "integer"):
        result = _as_number(value, spec, integer=kind == "integer")
    elif kind == "boolean":
        if not isinstance(value, bool):
            raise CoercionError(f"{spec.name}: expected true or false, got {value!r}")
        result = value
    elif kind == "enum":
        text = _as_string(value, spec)
        if spec.options and text not in spec.options:
            raise CoercionError(
                f"{spec.name}: {text!r} is not one of {', '.join(spec.options)}"
            )
        result = text
    elif kind == "date":
        return dialect.write_date(_as_instant(value, spec).date())
    elif kind == "datetime":
        return dialect.write_datetime(_as_instant(value, spec))
    else:
        raise CoercionError(f"{spec.name}: unknown field type {kind!r}")
    if dialect.text and not isinstance(result, str):
        return "true" if result is True else "false" if result is False else str(result)
    return result


def _as_string(value: JSON, spec: FieldSpec) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    raise CoercionError(f"{spec.name}: expected a text value, got {type(value).__name__}")


def _as_number(value: JSON, spec: FieldSpec, *, integer: bool) -> int | float:
    number: int | float
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise CoercionError(f"{spec.name}: expected a number, got {value!r}")
    if isinstance(value, str):
        try:
            number = int(value) if re.fullmatch(r"[-+]?\d+", value.strip()) else float(value)
        except ValueError:
            raise CoercionError(f"{spec.name}: {value!r} is not a number") from None
    else:
        number = value
    if isinstance(number, float) and not math.isfinite(number):
        raise CoercionError(f"{spec.name}: {value!r} is not a finite number")
    if integer and isinstance(number, float):
        if not number.is_integer():
            raise CoercionError(f"{spec.name}: {value!r} is not a whole number")
        number = int(number)
    return number


def _as_instant(value: JSON, spec: FieldSpec) -> datetime:
    """ISO 8601 date or date-time text, or epoch milliseconds, as an aware UTC datetime."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return datetime.fromtimestamp(value / 1000, tz=UTC)
    if isinstance(value, str):
        text = value.strip()
        try:
            if len(text) == 10:
                return datetime.combine(date.fromisoformat(text), time(), UTC)
            parsed = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            raise CoercionError(f"{spec.name}: {value!r} is not an ISO 8601 date") from None
        return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).astimezone(UTC)
    raise CoercionError(f"{spec.name}: expected a date, got {value!r}")


def load_field_map(path: Path) -> FieldMap:
    """Load and check `fields.yaml`; raise ConfigError with every problem found."""
    file = str(path)
    try:
        document = load_yaml(path.read_text(encoding="utf-8"), file)
    except YamlError as error:
        raise ConfigError(
            [Problem(error.location, "yaml-syntax", error.message, error.hint)]
        ) from None
    except OSError as error:
        raise ConfigError([Problem(Location(file), "missing-field-map", str(error.strerror),
                                   "every rules folder needs a fields.yaml (see README)")]
                          ) from None
    problems = schema_problems(document, "fields.schema.json")
    problems.extend(_semantic_problems(document))
    if any(p.severity == "error" for p in problems):
        raise ConfigError(problems)
    return _build(document)


_TYPES = frozenset({"string", "text", "url", "email", "number", "integer", "boolean", "enum",
                    "date", "datetime"})


def field_map_outline(path: Path) -> FieldMap | None:
    """What a field map with errors still declares: every field name (with its object,
    identity, type and options where they can be read) and every stage name. `validate`
    checks the rules against it, so a broken field map does not hide the rules' own problems
    until a second run. None when the file is not even YAML."""
    try:
        data = load_yaml(path.read_text(encoding="utf-8"), str(path)).data
    except (OSError, UnicodeDecodeError, YamlError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("fields"), dict) or not all(
            isinstance(data.get(key), list) for key in ("contact_stages", "deal_stages")):
        return None  # too little to check rules against without false alarms
    raw_fields: dict[str, Any] = data["fields"]
    fields = {}
    for name, raw in raw_fields.items():
        spec = raw if isinstance(raw, dict) else {}
        kind = spec.get("type")
        options = spec.get("options")
        fields[name] = FieldSpec(
            name=name, type=kind if kind in _TYPES else "string",
            object="deal" if spec.get("object") == "deal" else "contact",
            identity=spec.get("identity") is True,
            options=tuple(o for o in options if isinstance(o, str))
            if isinstance(options, list) else ())

    def stages(key: str) -> tuple[Stage, ...]:
        return tuple(Stage(s["name"], {}) for s in data[key]
                     if isinstance(s, dict) and isinstance(s.get("name"), str))

    return FieldMap(fields, stages("contact_stages"), stages("deal_stages"), file=str(path))


def _semantic_problems(document: YamlDocument) -> list[Problem]:
    data = document.data if isinstance(document.data, dict) else {}
    problems = []
    for key in ("contact_stages", "deal_stages"):
        seen: set[str] = set()
        for index, stage in enumerate(data.get(key) or []):
            name = stage.get("name") if isinstance(stage, dict) else None
            if isinstance(name, str) and name in seen:
                problems.append(Problem(document.location((key, index, "name")),
                                        "duplicate-stage", f"stage {name!r} is declared twice",
                                        "each stage appears once in its list", path=f"$.{key}"))
            if isinstance(name, str):
                seen.add(name)
    per_person = _listed(data, "per_person")
    shared = _listed(data, "shared")
    for index, prefix in enumerate(shared):
        if prefix in per_person:
            problems.append(Problem(
                document.location(("links", "shared", "prefixes", index)), "link-kind-conflict",
                f"prefix {prefix!r} is declared both per-person and shared",
                "a link is one or the other: remove it from links.per_person.prefixes or from "
                "links.shared.prefixes (shared wins meanwhile)", path="$.links"))
    return problems


def _listed(data: dict[str, Any], kind: str) -> list[Any]:
    """`links.<kind>.prefixes` when it is a list (the schema reports any other shape)."""
    links = data.get("links")
    section = links.get(kind) if isinstance(links, dict) else None
    prefixes = section.get("prefixes") if isinstance(section, dict) else None
    return prefixes if isinstance(prefixes, list) else []


def _crm_field(raw: Any) -> CRMField:
    if isinstance(raw, str):
        return CRMField(raw, bare=True)
    if "label" in raw:
        return CRMField(raw["label"], "label", raw.get("type"))
    if "builtin" in raw:
        return CRMField(raw["builtin"], "builtin", raw.get("type"))
    return CRMField(raw["name"], "name", raw.get("type"))


def _per_crm(raw: dict[str, Any]) -> dict[str, CRMField]:
    return {crm: _crm_field(v) for crm, v in raw.items()}


def _build(document: YamlDocument) -> FieldMap:
    data = document.data
    fields = {
        name: FieldSpec(
            name=name,
            type=spec["type"],
            object=spec.get("object", "contact"),
            identity=bool(spec.get("identity", False)),
            label=spec.get("label", name.replace("_", " ").capitalize()),
            options=tuple(spec.get("options", ())),
            crm=_per_crm({crm: spec[crm] for crm in CRMS if crm in spec}),
        )
        for name, spec in data["fields"].items()
    }

    def stages(key: str) -> tuple[Stage, ...]:
        return tuple(
            Stage(s["name"], {crm: s[crm] for crm in CRMS if crm in s}) for s in data[key]
        )

    return FieldMap(
        fields=fields,
        contact_stages=stages("contact_stages"),
        deal_stages=stages("deal_stages"),
        contact_stage_field=_per_crm(data.get("contact_stage_field", {})),
        deal_pipeline=_per_crm(data.get("deal_pipeline", {})),
        targets=dict(data.get("targets", {})),
        file=document.file,
        links=LinkPolicy.from_document(data.get("links")),
    )
